"""``outbox.enqueue`` and friends on the application's own connection: in its transaction,
never committing, with send()'s payload rule and idempotency by key."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import aiosqlite
import pytest

import outbox
from outbox.storage import schema


def rows(path: Path) -> list[tuple[int, str, str | None, str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return list(conn.execute("SELECT id, payload, key, status FROM outbox ORDER BY id"))


@pytest.fixture
def app_db(tmp_path: Path) -> Path:
    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, total REAL)")
        conn.commit()
        outbox.migrate(conn)
    return path


@pytest.fixture
def conn(app_db: Path) -> Iterator[sqlite3.Connection]:
    with contextlib.closing(sqlite3.connect(app_db)) as connection:
        yield connection


def test_migrate_by_path_or_connection_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    assert outbox.migrate(path) == schema.latest_version()
    assert outbox.migrate(str(path)) == schema.latest_version()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert outbox.migrate(conn) == schema.latest_version()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_migrate_refuses_an_open_transaction(tmp_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / "a.db")) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        assert conn.in_transaction
        with pytest.raises(outbox.NoTransactionError, match="commit or roll back"):
            outbox.migrate(conn)


def test_commit_writes_the_order_and_the_message_together(conn: sqlite3.Connection) -> None:
    with conn:
        conn.execute("INSERT INTO orders VALUES (42, 9.5)")
        msg_id = outbox.enqueue(conn, {"type": "order", "id": 42}, key="order-42")
        assert conn.in_transaction  # enqueue never commits
    assert rows(Path(conn.execute("PRAGMA database_list").fetchone()[2])) == [
        (msg_id, '{"type":"order","id":42}', "order-42", "pending")
    ]


def test_rollback_writes_neither(conn: sqlite3.Connection, app_db: Path) -> None:
    with pytest.raises(RuntimeError), conn:
        conn.execute("INSERT INTO orders VALUES (1, 1.0)")
        outbox.enqueue(conn, {"n": 1})
        raise RuntimeError("the application fails after enqueueing")
    assert rows(app_db) == []
    assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 0


def test_enqueue_opens_a_transaction_as_sqlite3_would(conn: sqlite3.Connection) -> None:
    assert not conn.in_transaction
    outbox.enqueue(conn, "x")
    assert conn.in_transaction
    conn.rollback()
    assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0


def test_a_key_returns_the_existing_id_committed_or_not(
    conn: sqlite3.Connection, app_db: Path
) -> None:
    with conn:
        first = outbox.enqueue(conn, {"n": 1}, key="k")
        assert outbox.enqueue(conn, {"n": 1}, key="k") == first  # same transaction
    with conn:
        assert outbox.enqueue(conn, {"n": 1}, key="k") == first  # committed before
        ids = outbox.enqueue_many(conn, ["a", "b", "a2"], keys=["k2", "k", "k2"])
    assert ids[1] == first and ids[0] == ids[2] and ids[0] > first
    assert len(rows(app_db)) == 2


def test_enqueue_many_returns_ids_in_order(conn: sqlite3.Connection) -> None:
    with conn:
        ids = outbox.enqueue_many(conn, [{"i": i} for i in range(250)])
    assert ids == sorted(ids) and len(set(ids)) == 250
    assert outbox.enqueue_many(conn, []) == []


def test_same_payload_checks_as_send(conn: sqlite3.Connection, app_db: Path) -> None:
    with pytest.raises(outbox.PayloadNotJSONError):
        outbox.enqueue(conn, object())
    with pytest.raises(outbox.PayloadTooLargeError):
        outbox.enqueue(conn, "x" * (1 << 20))
    with pytest.raises(outbox.PayloadTooLargeError):
        outbox.enqueue(conn, "x" * 100, max_message_size=50)
    with pytest.raises(TypeError, match="key"):
        outbox.enqueue(conn, 1, key=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keys"):
        outbox.enqueue_many(conn, [1, 2], keys=["a"])
    with pytest.raises(outbox.PayloadNotJSONError):  # one bad payload: nothing written
        outbox.enqueue_many(conn, [1, {2}])
    assert not conn.in_transaction
    assert rows(app_db) == []


def test_a_closed_connection_is_refused(conn: sqlite3.Connection) -> None:
    conn.close()
    with pytest.raises(outbox.OutboxClosedError, match="closed"):
        outbox.enqueue(conn, 1)


def test_autocommit_without_a_transaction_is_refused(app_db: Path) -> None:
    with contextlib.closing(sqlite3.connect(app_db, isolation_level=None)) as conn:
        with pytest.raises(outbox.NoTransactionError, match="autocommit"):
            outbox.enqueue(conn, 1)
        assert rows(app_db) == []
        conn.execute("BEGIN")  # an explicit transaction is joined
        outbox.enqueue(conn, 1)
        conn.execute("ROLLBACK")
    assert rows(app_db) == []


def test_a_database_without_the_tables_says_to_migrate(tmp_path: Path) -> None:
    with (
        contextlib.closing(sqlite3.connect(tmp_path / "plain.db")) as conn,
        pytest.raises(outbox.SchemaMissingError, match=r"outbox\.migrate"),
    ):
        outbox.enqueue(conn, 1)


def test_a_read_only_database_is_refused(app_db: Path) -> None:
    uri = f"file:{app_db}?mode=ro"
    with (
        contextlib.closing(sqlite3.connect(uri, uri=True)) as conn,
        pytest.raises(outbox.StoreError, match="read-only"),
    ):
        outbox.enqueue(conn, 1)


def test_not_a_connection_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"sqlite3\.Connection"):
        outbox.enqueue("app.db", 1)  # type: ignore[arg-type]


async def test_the_async_form_on_aiosqlite(app_db: Path) -> None:
    async with aiosqlite.connect(app_db) as conn:
        await conn.execute("INSERT INTO orders VALUES (7, 1.0)")
        first = await outbox.enqueue_async(conn, {"n": 7}, key="o-7")
        ids = await outbox.enqueue_many_async(conn, ["a", "b"], keys=[None, "o-7"])
        assert conn.in_transaction
        await conn.commit()
        assert ids[1] == first
        await conn.execute("INSERT INTO orders VALUES (8, 1.0)")
        await outbox.enqueue_async(conn, {"n": 8})
        await conn.rollback()
    assert [r[2] for r in rows(app_db)] == ["o-7", None]
    with pytest.raises(outbox.OutboxClosedError):
        await outbox.enqueue_async(conn, 1)
    with pytest.raises(outbox.PayloadNotJSONError):
        await outbox.enqueue_async(conn, object())


async def test_an_outbox_sends_what_enqueue_committed(app_db: Path) -> None:
    from tests.support import ScriptedServer, fast_options, wait_until

    with contextlib.closing(sqlite3.connect(app_db)) as conn, conn:
        ids = outbox.enqueue_many(conn, [{"i": i} for i in range(5)])
    async with (
        ScriptedServer() as server,
        outbox.Outbox(app_db, server.url, **fast_options()) as box,
    ):
        await box.drain(timeout=5)
        await wait_until(lambda: server.unique_ids() >= set(ids))
