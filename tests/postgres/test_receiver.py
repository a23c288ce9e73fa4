"""The receiver on PostgreSQL: the SQLite receiver's semantics, against a real server.

Each test gets a fresh database on the session's throwaway server (``pg_url``), real
receivers on 127.0.0.1 port 0, and real clients (our Outbox, or raw websockets for frames a
conforming client would not send). The handler writes one ``effects`` row per call through
``message.tx``, so "handled once" is read back from PostgreSQL itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.frames import CloseCode

from outbox import Outbox
from outbox.errors import SchemaTooNewError, StoreError
from outbox.protocol import wire
from outbox.receiver import Incoming, Reject, serve
from outbox.receiver.backend import SUPERSEDED
from outbox.receiver.postgres import DriverMissingError, PostgresInbox, display_url

from ..raw_client import acks, batch, closed_with, headers, message, recv
from ..support import fast_options, wait_until


async def create_effects(tx: Any) -> None:
    await tx.execute(
        "CREATE TABLE IF NOT EXISTS effects (client_id text NOT NULL, message_id bigint NOT NULL,"
        " seq bigserial)"
    )


class Recorder:
    """A handler that writes one effects row per call through message.tx, and can block,
    fail once or reject chosen ids."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail_once: set[int] = set()
        self.reject: dict[int, str] = {}
        self.block: dict[int, asyncio.Event] = {}
        self.entered: dict[int, asyncio.Event] = {}

    async def __call__(self, message: Incoming) -> None:
        self.calls.append((message.client_id, message.id))
        await message.tx.execute(
            "INSERT INTO effects (client_id, message_id) VALUES ($1, $2)",
            (message.client_id, message.id),
        )
        if message.id in self.entered:
            self.entered[message.id].set()
        if message.id in self.block:
            await self.block[message.id].wait()
        if message.id in self.fail_once:
            self.fail_once.discard(message.id)
            raise RuntimeError(f"handler bug on {message.id}")
        if message.id in self.reject:
            raise Reject(self.reject[message.id])


async def effects(url: str, client_id: str | None = None) -> list[tuple[str, int]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT client_id, message_id FROM effects ORDER BY seq")
    finally:
        await conn.close()
    return [(r[0], r[1]) for r in rows if client_id is None or r[0] == client_id]


async def inbox_rows(url: str) -> list[tuple[str, int, str | None]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT client_id, message_id, reject_reason FROM inbox ORDER BY 1, 2"
        )
    finally:
        await conn.close()
    return [(r[0], r[1], r[2]) for r in rows]


# -- the SQLite receiver's semantics -------------------------------------------------------


async def test_outbox_client_handled_once_and_resends_answered_from_the_inbox(
    pg_url: str, tmp_path: Path
) -> None:
    recorder = Recorder()
    # No pruning: the resend below must find its rows in the inbox. With it, the floor may
    # pass them first (the client announces its low-water mark as acks come in), and then a
    # resend from a client that renumbers is a conflict (test_retention covers that).
    async with serve(recorder, pg_url, setup=create_effects, prune=False) as receiver:
        async with Outbox(tmp_path / "outbox.db", receiver.url, **fast_options()) as box:
            ids = [await box.send({"n": n}) for n in range(300)]
            await box.wait_acked(ids[-1], timeout=20)
        [client_id] = {c for c, _ in recorder.calls}
        # A resend of the first 10 (as after a lost ack): answered, the handler not called.
        async with connect(receiver.url, additional_headers=headers(client_id)) as ws:
            await ws.send(
                wire.encode_batch([(i, json.dumps({"n": n})) for n, i in enumerate(ids[:10])])
            )
            assert await acks(ws, 10) == ids[:10]
        assert receiver.stats.duplicates == 10
        assert receiver.stats.transactions < len(ids)  # group commit: shared transactions
    assert recorder.calls == [(client_id, i) for i in ids]
    assert await effects(pg_url) == [(client_id, i) for i in ids]
    assert [(c, i) for c, i, _ in await inbox_rows(pg_url)] == [(client_id, i) for i in ids]


async def test_a_repeat_with_other_content_is_a_conflict(pg_url: str) -> None:
    recorder = Recorder()
    async with (
        serve(recorder, pg_url, setup=create_effects) as receiver,
        connect(receiver.url, additional_headers=headers("c1")) as ws,
    ):
        await ws.send(message(1, {"amount": 10}))
        assert await acks(ws, 1) == [1]
        await ws.send(message(1, {"amount": 99}))
        answer = await recv(ws)
        assert answer["type"] == "nack" and answer["messageId"] == 1, answer
        assert "conflict" in answer["reason"]
        assert receiver.stats.conflicts == 1
    assert recorder.calls == [("c1", 1)]


async def test_handler_raise_closes_1011_and_the_resend_is_handled_once(pg_url: str) -> None:
    recorder = Recorder()
    recorder.fail_once = {3}
    async with serve(recorder, pg_url, setup=create_effects) as receiver:
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([1, 2, 3, 4, 5]))
            assert await acks(ws, 2) == [1, 2]
            assert await closed_with(ws) == CloseCode.INTERNAL_ERROR
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([3, 4, 5]))
            assert await acks(ws, 3) == [3, 4, 5]
        assert receiver.stats.handler_errors == 1
    # 3's first attempt wrote through tx, then raised: its SAVEPOINT was rolled back.
    assert [i for _, i in recorder.calls] == [1, 2, 3, 3, 4, 5]
    assert await effects(pg_url) == [("c1", i) for i in (1, 2, 3, 4, 5)]


async def test_reject_is_recorded_and_a_resend_is_nacked_again(pg_url: str) -> None:
    recorder = Recorder()
    recorder.reject = {2: "order 2 is invalid"}
    async with serve(recorder, pg_url, setup=create_effects) as receiver:
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([1, 2, 3]))
            assert await recv(ws) == {"type": "ack", "messageIds": [1, 3]}
            assert await recv(ws) == {
                "type": "nack",
                "messageId": 2,
                "reason": "order 2 is invalid",
            }
            await ws.send(message(2, {"n": 2}))
            again = await recv(ws)
            assert (again["type"], again["messageId"]) == ("nack", 2)
        assert receiver.stats.rejected == 1
    assert [i for _, i in recorder.calls] == [1, 2, 3]
    assert await inbox_rows(pg_url) == [
        ("c1", 1, None),
        ("c1", 2, "order 2 is invalid"),
        ("c1", 3, None),
    ]
    assert await effects(pg_url) == [("c1", 1), ("c1", 3)]  # the rejected write rolled back


async def test_inbox_only_receiver_without_a_handler(pg_url: str) -> None:
    async with (
        serve(None, pg_url) as receiver,
        connect(receiver.url, additional_headers=headers("c1")) as ws,
    ):
        await ws.send(batch(list(range(1, 1001))))
        assert await acks(ws, 1000) == list(range(1, 1001))
    assert len(await inbox_rows(pg_url)) == 1000


# -- migrations ------------------------------------------------------------------------------


async def test_migrations_are_idempotent_and_concurrent_starts_apply_each_once(
    pg_url: str,
) -> None:
    inboxes = await asyncio.gather(*(PostgresInbox.open(pg_url) for _ in range(5)))
    for inbox in inboxes:
        await inbox.close()
    again = await PostgresInbox.open(pg_url)  # nothing left to apply
    await again.close()
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT version, name FROM outbox_schema ORDER BY version")
    finally:
        await conn.close()
    assert [(r[0], r[1]) for r in rows] == [
        (1, "0001_inbox.sql"),
        (2, "0002_fence.sql"),
        (3, "0003_inbox_floor.sql"),
    ]


async def test_concurrent_setup_hooks_do_not_race(pg_url: str) -> None:
    receivers = [serve(Recorder(), pg_url, setup=create_effects) for _ in range(4)]
    await asyncio.gather(*(r.start() for r in receivers))
    for receiver in receivers:
        await receiver.close()


async def test_a_newer_schema_is_refused(pg_url: str) -> None:
    await (await PostgresInbox.open(pg_url)).close()
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("INSERT INTO outbox_schema (version, name) VALUES (99, '0099_x.sql')")
    finally:
        await conn.close()
    with pytest.raises(SchemaTooNewError, match="upgrade the outbox package"):
        await PostgresInbox.open(pg_url)


async def test_a_foreign_inbox_table_is_refused(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("CREATE TABLE inbox (id int)")
    finally:
        await conn.close()
    with pytest.raises(StoreError, match="not ours"):
        await PostgresInbox.open(pg_url)


# -- bad input -------------------------------------------------------------------------------


async def test_unreachable_server_is_a_clear_error(pg_url: str) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StoreError, match=r"cannot reach PostgreSQL.*is the server running"):
        async with serve(None, f"postgresql://nobody:secret@127.0.0.1:{port}/db"):
            pass


async def test_missing_database_says_create_it(pg_url: str) -> None:
    with pytest.raises(StoreError, match="CREATE DATABASE"):
        async with serve(None, pg_url + "_missing"):
            pass


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgresql://u@127.0.0.1:notaport/db", "not a usable PostgreSQL URL"),
        ("postgresql://u@127.0.0.1:5432", "names no database"),
    ],
)
async def test_bad_urls_are_refused(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        async with serve(None, url):
            pass


def test_sqlite_only_options_are_refused_on_postgresql() -> None:
    with pytest.raises(ValueError, match="synchronous applies to a SQLite inbox only"):
        serve(None, "postgresql://u@h/db", synchronous="NORMAL")
    with pytest.raises(ValueError, match="busy_timeout applies to a SQLite inbox only"):
        serve(None, "postgresql://u@h/db", busy_timeout=1.0)


def test_the_password_never_shows(tmp_path: Path) -> None:
    assert display_url("postgresql://me:hunter2@db:5432/x") == "postgresql://me:***@db:5432/x"
    assert serve(None, "postgresql://me:hunter2@db/x").db_path == "postgresql://me:***@db/x"


def test_missing_driver_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from outbox.receiver import postgres

    monkeypatch.setitem(sys.modules, "asyncpg", None)  # import asyncpg now raises
    with pytest.raises(DriverMissingError, match=r"pip install 'outbox\[postgres\]'"):
        postgres._driver()


# -- fencing: two receivers on one database ------------------------------------------------


async def test_stale_connection_on_one_receiver_is_fenced_by_a_new_one_on_another(
    pg_url: str,
) -> None:
    recorder_a, recorder_b = Recorder(), Recorder()
    async with (
        serve(recorder_a, pg_url, setup=create_effects) as a,
        serve(recorder_b, pg_url, setup=create_effects) as b,
    ):
        stale = await connect(a.url, additional_headers=headers("c1"))
        try:
            await stale.send(batch([1, 2]))
            assert await acks(stale, 2) == [1, 2]
            # The client reconnects to B while its old connection to A is still open.
            async with connect(b.url, additional_headers=headers("c1")) as fresh:
                await stale.send(batch([3, 4]))  # the old connection still sends: fenced
                assert await closed_with(stale) == SUPERSEDED
                await fresh.send(batch([3, 4, 5]))
                assert await acks(fresh, 3) == [3, 4, 5]
        finally:
            await stale.close()
        assert a.stats.superseded == 1 and b.stats.superseded == 0
    assert recorder_a.calls == [("c1", 1), ("c1", 2)]
    assert recorder_b.calls == [("c1", 3), ("c1", 4), ("c1", 5)]
    assert await effects(pg_url) == [("c1", i) for i in (1, 2, 3, 4, 5)]


async def test_a_new_connection_waits_for_the_old_ones_commit_in_flight(
    pg_url: str, postgres: Any
) -> None:
    """The claim on B waits for A's group commit holding c1's row; once A commits, B's
    connection resends what A handled and gets duplicates, and goes on in order."""
    recorder_a, recorder_b = Recorder(), Recorder()
    recorder_a.block = {3: asyncio.Event()}
    recorder_a.entered = {3: asyncio.Event()}
    async with (
        serve(recorder_a, pg_url, setup=create_effects) as a,
        serve(recorder_b, pg_url, setup=create_effects) as b,
        connect(a.url, additional_headers=headers("c1")) as old,
    ):
        await old.send(batch([1, 2]))
        assert await acks(old, 2) == [1, 2]
        await old.send(message(3, {"n": 3}))
        await asyncio.wait_for(recorder_a.entered[3].wait(), 10)  # A's commit is in flight

        async def open_fresh() -> ClientConnection:
            return await connect(b.url, additional_headers=headers("c1"))

        reconnect = asyncio.create_task(open_fresh())
        dbname = pg_url.rsplit("/", 1)[1]

        def claim_waits_for_the_lock() -> bool:
            waiting = postgres.psql(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                f"AND datname = '{dbname}'"
            )
            return int(waiting) >= 1

        await wait_until(claim_waits_for_the_lock, timeout=10)
        assert not reconnect.done()
        recorder_a.block[3].set()  # A commits 3 and acks it, then B's claim goes through
        assert await acks(old, 1) == [3]
        async with await reconnect as fresh:
            await fresh.send(batch([3, 4]))  # resends 3 (its ack was "lost")
            assert await acks(fresh, 2) == [3, 4]
            assert b.stats.duplicates == 1
            await old.send(message(5, {"n": 5}))  # the old connection is fenced now
            assert await closed_with(old) == SUPERSEDED
    assert recorder_a.calls == [("c1", 1), ("c1", 2), ("c1", 3)]
    assert recorder_b.calls == [("c1", 4)]
    assert await effects(pg_url) == [("c1", i) for i in (1, 2, 3, 4)]


async def test_two_connections_of_one_client_on_one_receiver(pg_url: str) -> None:
    recorder = Recorder()
    async with serve(recorder, pg_url, setup=create_effects) as receiver:
        old = await connect(receiver.url, additional_headers=headers("c1"))
        try:
            await old.send(message(1, {"n": 1}))
            assert await acks(old, 1) == [1]
            async with connect(receiver.url, additional_headers=headers("c1")) as new:
                await old.send(message(2, {"n": 2}))
                assert await closed_with(old) == SUPERSEDED
                await new.send(batch([2, 3]))
                assert await acks(new, 2) == [2, 3]
                # Anonymous connections are not fenced: each is its own identity.
                async with connect(receiver.url) as anon1, connect(receiver.url) as anon2:
                    await anon1.send(message(1, "x"))
                    await anon2.send(message(1, "y"))
                    assert await acks(anon1, 1) == [1] and await acks(anon2, 1) == [1]
        finally:
            await old.close()
    assert [c for c in recorder.calls if c[0] == "c1"] == [("c1", 1), ("c1", 2), ("c1", 3)]


async def test_outbox_client_moving_between_receivers_sees_exactly_once(
    pg_url: str, tmp_path: Path
) -> None:
    """A real Outbox against A, then (A stopped) against B on the same database: every
    message handled once, in order, across the move."""
    recorder_a, recorder_b = Recorder(), Recorder()
    box_db = tmp_path / "outbox.db"
    async with (
        serve(recorder_a, pg_url, setup=create_effects) as a,
        Outbox(box_db, a.url, **fast_options()) as box,
    ):
        first = [await box.send({"n": n}) for n in range(100)]
        await box.wait_acked(first[-1], timeout=20)
    async with (
        serve(recorder_b, pg_url, setup=create_effects) as b,
        Outbox(box_db, b.url, **fast_options()) as box,
    ):
        second = [await box.send({"n": n}) for n in range(100, 200)]
        await box.wait_acked(second[-1], timeout=20)
    [client_id] = {c for c, _ in recorder_a.calls}
    assert await effects(pg_url) == [(client_id, i) for i in first + second]


async def test_a_failed_statement_fails_only_its_message_even_if_the_handler_swallows_it(
    pg_url: str,
) -> None:
    """PostgreSQL aborts the transaction after an error; the SAVEPOINT keeps it that
    message's: the others of the same group commit, it is closed 1011 and resent."""
    bad = {2}

    async def handler(message: Incoming) -> None:
        await message.tx.execute(
            "INSERT INTO effects (client_id, message_id) VALUES ($1, $2)",
            (message.client_id, message.id),
        )
        if message.id in bad:
            bad.clear()
            # Swallowed: the message must still not commit.
            with contextlib.suppress(asyncpg.UndefinedTableError):
                await message.tx.execute("SELECT * FROM no_such_table")

    async with serve(handler, pg_url, setup=create_effects) as receiver:
        async with (
            connect(receiver.url, additional_headers=headers("c1")) as ws,
            connect(receiver.url, additional_headers=headers("c2")) as other,
        ):
            await other.send(message(1, "x"))
            await ws.send(batch([1, 2, 3]))
            assert await acks(ws, 1) == [1]
            assert await closed_with(ws) == CloseCode.INTERNAL_ERROR
            assert await acks(other, 1) == [1]
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([2, 3]))
            assert await acks(ws, 2) == [2, 3]
        assert receiver.stats.handler_errors == 1 and receiver.stats.storage_errors == 0
    assert await effects(pg_url, "c1") == [("c1", 1), ("c1", 2), ("c1", 3)]


async def test_group_commit_takes_the_same_round_trips_for_1000_messages_as_for_1(
    pg_url: str,
) -> None:
    """One frame of n messages is one transaction of a fixed set of statements (BEGIN,
    fence, dedup, INSERT, COMMIT) on the writer's connection, whatever n."""
    async with serve(None, pg_url) as receiver:
        inbox = receiver._inbox
        assert isinstance(inbox, PostgresInbox)
        statements: list[str] = []
        inbox._conn.add_query_logger(lambda record: statements.append(record.query))
        counts = []
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            start = 1
            for n in (1, 1, 1000, 10):  # the first also pays asyncpg's type introspection
                statements.clear()
                await ws.send(batch(list(range(start, start + n))))
                assert await acks(ws, n) == list(range(start, start + n))
                await wait_until(lambda: bool(statements) and statements[-1] == "COMMIT")
                counts.append(len(statements))
                start += n
    assert counts[1:] == [5, 5, 5], counts


async def test_a_lost_database_connection_fails_the_group_with_1013_and_the_resend_is_handled_once(
    pg_url: str, postgres: Any
) -> None:
    """The writer's connection is killed server-side: the group in progress fails (1013, not
    acked), the next transaction reconnects, and the client's resend is handled once."""
    recorder = Recorder()
    async with serve(recorder, pg_url, setup=create_effects) as receiver:
        inbox = receiver._inbox
        assert isinstance(inbox, PostgresInbox)
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(message(1, {"n": 1}))
            assert await acks(ws, 1) == [1]
            postgres.psql(f"SELECT pg_terminate_backend({inbox._conn.get_server_pid()})")
            await ws.send(message(2, {"n": 2}))
            assert await closed_with(ws) == CloseCode.TRY_AGAIN_LATER
        assert receiver.stats.storage_errors == 1
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([2, 3]))
            assert await acks(ws, 2) == [2, 3]
    assert await effects(pg_url) == [("c1", 1), ("c1", 2), ("c1", 3)]


async def test_a_handler_that_writes_costs_two_statements_per_message(pg_url: str) -> None:
    """Its own INSERT and its SAVEPOINT (a kept one is released in the same round trip as
    the next opens, or by COMMIT): 5 + 2n statements for n messages."""

    async def handler(message: Incoming) -> None:
        await message.tx.execute(
            "INSERT INTO effects (client_id, message_id) VALUES ($1, $2)",
            (message.client_id, message.id),
        )

    # A long max_transaction_time: a slow machine must not split the 50 into two groups.
    async with serve(handler, pg_url, setup=create_effects, max_transaction_time=60.0) as receiver:
        inbox = receiver._inbox
        assert isinstance(inbox, PostgresInbox)
        statements: list[str] = []
        inbox._conn.add_query_logger(lambda record: statements.append(record.query))
        counts = []
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            start = 1
            for n in (1, 1, 50):
                statements.clear()
                await ws.send(batch(list(range(start, start + n))))
                assert await acks(ws, n) == list(range(start, start + n))
                await wait_until(lambda: bool(statements) and statements[-1] == "COMMIT")
                counts.append(len(statements))
                start += n
    assert counts[1:] == [5 + 2, 5 + 2 * 50], counts
    assert await effects(pg_url) == [("c1", i) for i in range(1, 53)]


async def test_a_database_gone_away_refuses_handshakes_with_503_and_close_still_works(
    tmp_path: Path,
) -> None:
    from websockets.exceptions import InvalidStatus

    from ..postgres_server import PostgresServer

    with PostgresServer() as own:
        url = own.create_database()
        receiver = serve(None, url)
        await receiver.start()
        try:
            async with connect(receiver.url, additional_headers=headers("c1")) as ws:
                await ws.send(message(1, "x"))
                assert await acks(ws, 1) == [1]
            await asyncio.to_thread(own.stop)
            with pytest.raises(InvalidStatus) as refused:
                async with connect(receiver.url, additional_headers=headers("c1")):
                    pass
            assert refused.value.response.status_code == 503
            assert receiver.stats.refused == 1
        finally:
            async with asyncio.timeout(30):
                await receiver.close()
