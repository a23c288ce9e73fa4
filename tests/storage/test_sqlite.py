"""The opener both sides share (outbox.storage.sqlite), on real files in a temp dir.

The order of its steps is the point: a file written by a newer outbox is refused before
anything, WAL included, is changed in it, whichever side opens it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path

import pytest

from outbox.client.store import Store
from outbox.errors import DatabaseCorruptError, SchemaTooNewError, StorageFullError, StoreError
from outbox.receiver.inbox import Inbox
from outbox.storage import schema, sqlite


def journal_mode(path: Path) -> str:
    with closing(sqlite3.connect(path)) as conn:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()


def too_new_file(path: Path) -> Path:
    """A rollback-journal database whose user_version is past what this code knows."""
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE from_the_future (x)")
        conn.execute(f"PRAGMA user_version = {schema.latest_version() + 1}")
        conn.commit()
    assert journal_mode(path) == "delete"
    return path


# -- synchronous and the per-connection pragmas ----------------------------------------------


@pytest.mark.parametrize("value", ["OFF", "normal", "Full", "EXTRA"])
def test_synchronous_levels_are_accepted_in_any_case(value: str) -> None:
    assert sqlite.check_synchronous(value) == value.upper()


@pytest.mark.parametrize("value", ["SOMETIMES", "", "FULL; DROP TABLE outbox"])
def test_other_synchronous_values_are_refused_before_reaching_a_pragma(value: str) -> None:
    with pytest.raises(ValueError, match=r"synchronous must be OFF, NORMAL, FULL or EXTRA, got"):
        sqlite.check_synchronous(value)


def test_connection_pragmas() -> None:
    assert sqlite.connection_pragmas("normal", 2.5) == (
        "PRAGMA synchronous = NORMAL",
        "PRAGMA busy_timeout = 2500",
    )


async def test_both_sides_refuse_a_bad_synchronous_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous must be"):
        await Inbox.open(tmp_path / "inbox.db", synchronous="SOMETIMES")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="synchronous must be"):
        await Store.open(tmp_path / "outbox.db", synchronous="SOMETIMES")  # type: ignore[arg-type]
    assert not (tmp_path / "inbox.db").exists() and not (tmp_path / "outbox.db").exists()


# -- prepare ---------------------------------------------------------------------------------


def test_prepare_enables_wal_migrates_and_returns_the_callers_part(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    seen: list[int] = []

    def then(conn: sqlite3.Connection) -> str:
        seen.append(int(conn.execute("PRAGMA user_version").fetchone()[0]))
        return "mine"

    assert sqlite.prepare(str(path), 1.0, then) == "mine"
    assert seen == [schema.latest_version()]
    assert journal_mode(path) == "wal"


def test_prepare_refuses_a_newer_schema_and_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = too_new_file(tmp_path / "newer.db")
    before = path.read_bytes()
    called = []
    with pytest.raises(SchemaTooNewError, match="upgrade the outbox package"):
        sqlite.prepare(str(path), 1.0, called.append)
    assert called == []
    assert journal_mode(path) == "delete"
    assert path.read_bytes() == before
    assert not path.with_name("newer.db-wal").exists()


def test_prepare_fails_early_on_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are not the pages you are looking for\n" * 100)
    with pytest.raises(sqlite3.DatabaseError) as caught:
        sqlite.prepare(str(path), 1.0, lambda conn: None)
    assert isinstance(sqlite.sqlite_error(caught.value, str(path)), DatabaseCorruptError)
    assert path.read_bytes().startswith(b"these are not")


Opener = Callable[[Path], Awaitable[object]]


async def open_inbox(path: Path) -> object:
    return await Inbox.open(path)


async def open_store(path: Path) -> object:
    return await Store.open(path)


@pytest.mark.parametrize("opener", [open_inbox, open_store], ids=["inbox", "store"])
async def test_a_newer_schema_is_refused_before_wal_by_both_sides(
    tmp_path: Path, opener: Opener
) -> None:
    """Regression: the inbox used to switch a too-new file to WAL, then refuse it."""
    path = too_new_file(tmp_path / "newer.db")
    with pytest.raises(SchemaTooNewError, match=f"schema version {schema.latest_version() + 1}"):
        await opener(path)
    assert journal_mode(path) == "delete"


# -- translating sqlite3 errors --------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "kind", "advice"),
    [
        ("database or disk is full", StorageFullError, "free disk space"),
        ("file is not a database", DatabaseCorruptError, "restore it from a backup"),
        ("database disk image is malformed", DatabaseCorruptError, "move it aside"),
        ("attempt to write a readonly database", StoreError, "needs write access"),
        ("database is locked", StoreError, "longer than busy_timeout"),
        ("unable to open database file", StoreError, "directory exists"),
        ("something new", StoreError, "SQLite error on x.db: something new"),
    ],
)
def test_sqlite_errors_become_outbox_errors_that_say_what_to_do(
    message: str, kind: type[StoreError], advice: str
) -> None:
    error = sqlite.sqlite_error(sqlite3.OperationalError(message), "x.db")
    assert type(error) is kind
    assert advice in str(error) and "x.db" in str(error)


def test_translate_passes_other_errors_through() -> None:
    other = RuntimeError("not SQLite's")
    assert sqlite.translate(other, "x.db") is other
    assert isinstance(sqlite.translate(sqlite3.OperationalError("disk is full"), "x"), StoreError)


async def test_an_unrelated_outbox_table_is_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE outbox (anything)")
        conn.commit()
    with pytest.raises(StoreError, match="already has a table named outbox that outbox did not"):
        await Store.open(path)
    with pytest.raises(StoreError, match="already has a table named outbox"):
        await Inbox.open(path)
    assert journal_mode(path) == "delete"
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (0,)
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["outbox"]


async def test_a_directory_as_the_database_path_says_so(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory; give the path of a database file"):
        await Store.open(tmp_path)
