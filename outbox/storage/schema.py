"""Schema migrations: numbered SQL files applied in order, tracked by PRAGMA user_version.

The files live in ``outbox/storage/migrations/``, package data shipped inside the wheel.
Each file and its version bump run in one explicit transaction (``executescript`` would
commit early), so a failed step leaves the database at the previous version. This module
is synchronous on purpose: it runs once at open, on a plain ``sqlite3`` connection in a
worker thread, and is tested without an event loop.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

from ..errors import SchemaTooNewError, StoreError

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def _migrations_folder() -> Traversable:
    """The SQL files, shipped inside the package as ``outbox/storage/migrations/``."""
    return resources.files("outbox.storage.migrations")


def available() -> list[Migration]:
    """The migrations shipped with this version of outbox, in order."""
    return read_migrations(_migrations_folder(), "outbox")


def read_migrations(folder: Traversable, label: str) -> list[Migration]:
    """The ``NNNN_name.sql`` files of a package folder, in order; numbered 1..n or refused.
    Shared by the SQLite chain and the PostgreSQL receiver's own."""
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{label} migrations must be numbered 1..n without gaps: {versions}")
    return found


def latest_version() -> int:
    return len(available())


_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)


def statements(sql: str) -> list[str]:
    """Split a script into complete statements, at each ``;`` that ends one.

    ``sqlite3.complete_statement`` decides, so a ``;`` inside a string, a comment or a
    trigger body does not split. Only comments may follow the last statement.
    """
    result, buffer = [], ""
    pieces = sql.split(";")
    for index, piece in enumerate(pieces):
        buffer += piece if index == len(pieces) - 1 else piece + ";"
        if sqlite3.complete_statement(buffer):
            if _COMMENTS.sub("", buffer).strip(" \t\r\n;"):
                result.append(buffer.strip())
            buffer = ""
    if _COMMENTS.sub("", buffer).strip():
        raise ValueError(f"incomplete SQL statement at the end of a migration: {buffer!r}")
    return result


def _too_new(path: str, current: int, latest: int) -> SchemaTooNewError:
    return SchemaTooNewError(
        f"{path} has schema version {current}, but this outbox knows only up to {latest}; "
        "upgrade the outbox package (pip install -U outbox) to open it"
    )


def refuse_newer(conn: sqlite3.Connection, path: str = "the database") -> None:
    """Raise SchemaTooNewError, touching nothing, if the file is newer than this code."""
    current = int(conn.execute("PRAGMA user_version").fetchone()[0])
    latest = latest_version()
    if current > latest:
        raise _too_new(path, current, latest)


OWN_TABLES = ("outbox", "outbox_meta", "inbox", "inbox_floor")
"""The tables the migrations create: a file with one of them and no version is not ours."""


def refuse_foreign(conn: sqlite3.Connection, path: str = "the database") -> None:
    """Raise StoreError, touching nothing, if tables with our names exist but were not made
    by our migrations (``user_version`` 0): someone else's ``outbox`` table, say."""
    if int(conn.execute("PRAGMA user_version").fetchone()[0]) != 0:
        return
    marks = ",".join("?" * len(OWN_TABLES))
    found = [
        str(row[0])
        for row in conn.execute(
            f"SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
            f"AND name IN ({marks}) ORDER BY name",
            OWN_TABLES,
        )
    ]
    if found:
        raise StoreError(
            f"{path} already has a table named {', '.join(found)} that outbox did not create "
            "(its schema version is 0); it was left untouched: give outbox a database file "
            "of its own"
        )


def migrate(conn: sqlite3.Connection, path: str = "the database") -> int:
    """Bring ``conn`` up to the latest schema; return the version it is at.

    Refuses a database whose user_version is newer than this code knows, rather than
    guessing at a schema it has never seen.
    """
    migrations = available()
    latest = len(migrations)
    for migration in migrations:
        # Re-read the version under the write lock: another process may have migrated.
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current > latest:
                raise _too_new(path, current, latest)
            if migration.version <= current:
                conn.execute("ROLLBACK")
                continue
            for statement in statements(migration.sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {migration.version}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    current = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if current > latest:
        raise _too_new(path, current, latest)
    return current
