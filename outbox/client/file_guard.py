"""Is the file still the one we opened, and is its WAL growing? Checked on the writer thread.

A deleted or replaced outbox file must fail ``send()``: rows committed into an unlinked file
are gone at the next start. The store records the device and inode of the file and of its
``-wal`` at open; :func:`check_identity` compares them before ``BEGIN`` and after ``COMMIT``,
before any caller is told its row is durable. :func:`wal_after` watches the ``-wal`` size and
checkpoints it (``TRUNCATE``) once no reader holds a snapshot.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from dataclasses import dataclass

logger = logging.getLogger("outbox")


@dataclass(frozen=True, slots=True)
class AfterCommit:
    """What the writer thread checks after a COMMIT, before anyone is told it committed."""

    path: str
    identity: tuple[tuple[int, int], tuple[int, int] | None]
    check_wal: bool
    truncate_bytes: int
    busy_timeout_ms: int


def _stat_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def file_identity(path: str) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(st_dev, st_ino) of the database and of its -wal (None if there is none yet)."""
    try:
        wal: tuple[int, int] | None = _stat_id(path + "-wal")
    except FileNotFoundError:
        wal = None
    return _stat_id(path), wal


def check_identity(after: AfterCommit) -> str | None:
    """Why the path no longer names the file the store opened, or None if it still does.

    Two stat() calls (microseconds): sqlite3 gives no fstat of its file, so the path is
    compared with what it named at open. The -wal holds the latest commits until a
    checkpoint: deleting it loses them just as surely.
    """
    main, wal = after.identity
    for path, expected in ((after.path, main), (after.path + "-wal", wal)):
        if expected is None:
            continue
        try:
            found = _stat_id(path)
        except FileNotFoundError:
            return _missing_text(after.path, f"{path} was deleted")
        except OSError as exc:
            return _missing_text(after.path, f"{path} cannot be checked ({exc})")
        if found != expected:
            return _missing_text(after.path, f"{path} was replaced by another file")
    return None


def _missing_text(path: str, what: str) -> str:
    return (
        f"{what} while the Outbox had it open: messages committed since then are not "
        f"durable and are not in any file that a restart will find. Nothing more is "
        f"accepted. Restore the file (with its -wal) if you have it, or close and restart "
        f"the application to open {path} anew."
    )


def wal_after(conn: sqlite3.Connection, after: AfterCommit) -> int | None:
    """The -wal size; past truncate_bytes, first try a checkpoint that truncates it.

    With busy_timeout at 0 for the attempt: while a reader holds an old snapshot it returns
    busy at once (the WAL cannot shrink), and the next check tries again.
    """
    if not after.check_wal:
        return None
    try:
        size = os.stat(after.path + "-wal").st_size
    except OSError:
        return None
    if size <= after.truncate_bytes:
        return size
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    except sqlite3.Error as exc:
        logger.debug("outbox: checkpoint of %s failed: %s", after.path, exc)
        busy = 1
    finally:
        conn.execute(f"PRAGMA busy_timeout = {after.busy_timeout_ms}")
    if busy:
        return size
    try:
        return os.stat(after.path + "-wal").st_size
    except OSError:
        return None
