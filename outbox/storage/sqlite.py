"""Opening a SQLite file the way both sides need it, and translating what SQLite says.

The client's outbox and the receiver's inbox are the same kind of file (one migration chain,
WAL, a busy timeout), so they open it with the same steps in the same order. The order
matters: a database written by a newer outbox is refused *before* it is switched to WAL, so
an older program that cannot use the file leaves it exactly as it found it.

Synchronous on purpose, like ``schema``: ``prepare`` runs once at open, on a plain
``sqlite3`` connection in a worker thread, before the long-lived connections open.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import Literal, TypeVar, cast

from ..errors import DatabaseCorruptError, StorageFullError, StoreError
from . import schema

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]
"""SQLite's ``PRAGMA synchronous`` levels."""

_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")

_T = TypeVar("_T")


def check_synchronous(value: str) -> Synchronous:
    """The level in upper case; ValueError for anything SQLite would not take.

    Checked before the value is pasted into a PRAGMA (which takes no parameters).
    """
    level = value.upper() if isinstance(value, str) else value
    if level not in _LEVELS:
        raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {value!r}")
    return cast(Synchronous, level)


def connection_pragmas(synchronous: str, busy_timeout: float) -> tuple[str, str]:
    """The PRAGMAs every long-lived connection runs first (they are per connection)."""
    return (
        f"PRAGMA synchronous = {check_synchronous(synchronous)}",
        f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}",
    )


def prepare(path: str, busy_timeout: float, then: Callable[[sqlite3.Connection], _T]) -> _T:
    """Open ``path``, check it, enable WAL, migrate, then run the caller's part: its result.

    Steps, in order: fail early on a file that is not a database; refuse a schema newer than
    this code (touching nothing); switch to WAL; apply the migrations; ``then(conn)``. Raises
    ``sqlite3.Error`` as SQLite does (see ``sqlite_error``) and SchemaTooNewError / StoreError.
    """
    if os.path.isdir(path):
        raise StoreError(f"{path} is a directory; give the path of a database file in it")
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        prepare_connection(conn, path)
        return then(conn)
    finally:
        conn.close()


def prepare_connection(conn: sqlite3.Connection, path: str, *, allow_memory: bool = False) -> int:
    """``prepare``'s checks and steps on a connection someone else opened (an application's,
    for ``outbox.migrate``); returns the schema version. ``allow_memory``: an in-memory
    database (no WAL there) is accepted as it is."""
    conn.execute("PRAGMA schema_version").fetchone()  # fails early on a non-database
    schema.refuse_newer(conn, path)  # before WAL: leave a newer database as it was
    schema.refuse_foreign(conn, path)  # before WAL: leave someone else's tables alone
    mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
    if mode != "wal" and not (allow_memory and mode == "memory"):
        raise StoreError(f"{path}: could not enable WAL mode (got {mode!r})")
    return schema.migrate(conn, path)


def sqlite_error(exc: sqlite3.Error, path: str) -> StoreError:
    """Turn a sqlite3 error into an outbox error that names the problem and what to do.

    Shared by the outbox and the inbox: SQLite says the same things about either file.
    """
    text = str(exc).lower()
    if "full" in text:
        return StorageFullError(
            f"cannot write to {path}: {exc}; free disk space (or raise max_page_count) "
            "and retry; nothing from this call was written"
        )
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return DatabaseCorruptError(
            f"{path} is not a usable SQLite database ({exc}); restore it from a backup "
            "or move it aside to start afresh"
        )
    if "readonly" in text or "read-only" in text:
        return StoreError(
            f"{path} is read-only ({exc}); outbox needs write access to the file and its "
            "directory (for the -wal and -shm files)"
        )
    if "locked" in text or "busy" in text:
        return StoreError(
            f"{path} stayed locked by another connection longer than busy_timeout ({exc}); "
            "find the process holding a write transaction open"
        )
    if "unable to open" in text:
        return StoreError(
            f"cannot open {path} ({exc}); check that its directory exists and is writable"
        )
    return StoreError(f"SQLite error on {path}: {exc}")


def translate(exc: Exception, path: str) -> Exception:
    """An outbox error for a sqlite3 error; anything else passes through unchanged."""
    if isinstance(exc, sqlite3.Error):
        return sqlite_error(exc, path)
    return exc
