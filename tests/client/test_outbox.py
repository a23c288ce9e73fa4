"""The Outbox end to end: a real websockets server on 127.0.0.1 and a real SQLite file.

Intervals are scaled down (milliseconds), so reconnects, resends and dead-lettering happen
fast; tests wait on conditions with deadlines, never on sleeps.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from outbox import (
    DatabaseCorruptError,
    DatabaseMissingError,
    MessageDeadError,
    Outbox,
    OutboxClosedError,
    PayloadNotJSONError,
    PayloadTooLargeError,
    QueueFullError,
    ReconnectLimitError,
    SchemaTooNewError,
    State,
    StoreError,
)
from outbox.client import session as sender_module
from outbox.client.store import Row
from outbox.protocol import wire
from outbox.protocol.feed import CommittedRows
from outbox.testing.fault_proxy import FaultProxy

from ..support import MS, ScriptedServer, fast_options, wait_until

FAST = fast_options()


def rows(db: Path) -> list[tuple[int, str, int, str | None]]:
    """The outbox table as the sqlite3 shell sees it (a separate connection)."""
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT id, status, attempts, last_error FROM outbox ORDER BY id"
        ).fetchall()


def statuses(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM outbox GROUP BY status"))


async def test_happy_path_delivers_in_order_and_marks_acked(
    server: ScriptedServer, db: Path
) -> None:
    async with Outbox(db, server.url, **FAST) as box:
        ids = [await box.send({"n": i}) for i in range(20)]
        await box.drain(timeout=5)
        await box.wait_acked(ids[-1], timeout=1)
        stats = box.stats()
    assert ids == sorted(ids) and len(set(ids)) == 20
    assert server.ids() == ids
    assert [r.data for r in server.received] == [{"n": i} for i in range(20)]
    assert statuses(db) == {"acked": 20}
    assert stats.pending == 0 and stats.acked == 20 and stats.in_flight == 0
    assert stats.connected and stats.state == "connected"


async def test_client_id_header_is_stable_across_reopen(server: ScriptedServer, db: Path) -> None:
    async with Outbox(db, server.url, **FAST) as box:
        await box.wait_acked(await box.send("a"), timeout=5)
        first = box.client_id
    async with Outbox(db, server.url, **FAST) as box:
        await box.wait_acked(await box.send("b"), timeout=5)
        assert box.client_id == first
    assert [r.client_id for r in server.received] == [first, first]


async def test_concurrent_senders_all_delivered_exactly_once_in_id_order(
    server: ScriptedServer, db: Path
) -> None:
    async with Outbox(db, server.url, **FAST) as box:
        ids = await asyncio.gather(*(box.send({"task": i}) for i in range(300)))
        await box.drain(timeout=10)
    assert sorted(ids) == list(range(1, 301))
    assert server.ids() == sorted(ids)


async def test_send_many_is_one_transaction_with_ordered_ids(
    server: ScriptedServer, db: Path
) -> None:
    async with Outbox(db, server.url, **FAST) as box:
        ids = await box.send_many([{"i": i} for i in range(50)])
        await box.drain(timeout=5)
    assert ids == list(range(ids[0], ids[0] + 50))
    assert server.ids() == ids


async def test_batch_frames_when_the_server_announces_them(db: Path) -> None:
    async with ScriptedServer(batch=True) as server, Outbox(db, server.url, **FAST) as box:
        await box.send_many([{"i": i} for i in range(400)])
        await box.drain(timeout=5)
        counters = box.stats().counters
    assert server.ids() == list(range(1, 401))
    assert counters.messages_sent == 400
    assert counters.frames_sent < 400 / 10  # packed many messages per frame


async def test_one_message_per_frame_still_writes_a_page_of_frames_at_once(db: Path) -> None:
    """A seed-style server (no batch frames): one send_many's 100 rows are 100 frames, in
    one write to the socket (not one system call per frame)."""
    async with ScriptedServer() as server, Outbox(db, server.url, **FAST) as box:
        await wait_until(lambda: box.stats().connected)
        ws = box._supervisor.ws
        assert ws is not None
        writes: list[int] = []
        transport: Any = ws.transport
        write = transport.write
        transport.write = lambda data: (writes.append(len(data)), write(data))
        await box.send_many([{"i": i} for i in range(100)])
        await box.drain(timeout=5)
        sizes = list(writes)
        counters = box.stats().counters
    assert server.ids() == list(range(1, 101))
    assert counters.frames_sent == 100
    assert len(sizes) == 1, sizes


async def test_idempotent_key_returns_the_same_row(server: ScriptedServer, db: Path) -> None:
    async with Outbox(db, server.url, **FAST) as box:
        first = await box.send({"order": 42}, key="order-42")
        again = await box.send({"order": 42}, key="order-42")
        other = await box.send({"order": 43}, key="order-43")
        await box.drain(timeout=5)
    assert first == again != other
    assert len(rows(db)) == 2
    assert sorted(server.unique_ids()) == [first, other]


async def test_server_closes_socket_mid_stream_nothing_lost(
    server: ScriptedServer, db: Path
) -> None:
    server.close_after = 7
    async with Outbox(db, server.url, **FAST) as box:
        ids = await box.send_many([{"i": i} for i in range(30)])
        await box.drain(timeout=10)
        stats = box.stats()
    assert server.unique_ids() == set(ids)
    assert statuses(db) == {"acked": 30}
    assert stats.reconnects >= 1
    assert server.connections >= 2
    # First deliveries happen in id order; resends after the drop start again in id order.
    first_seen = list(dict.fromkeys(server.ids()))
    assert first_seen == ids


async def test_server_gone_and_back_backs_off_then_delivers(
    server: ScriptedServer, db: Path
) -> None:
    async with Outbox(db, server.url, **FAST) as box:
        await box.wait_acked(await box.send("before"), timeout=5)
        await server.stop()
        await wait_until(lambda: box.state is State.BACKING_OFF)
        during = await box.send_many([f"during-{i}" for i in range(10)])
        assert box.stats().pending == 10  # durable while nobody listens
        await server.start()  # same port: the server came back
        await box.drain(timeout=10)
        assert box.state is State.CONNECTED
    assert set(during) <= server.unique_ids()
    assert statuses(db) == {"acked": 11}


async def test_new_outbox_sends_leftovers_of_a_closed_one(db: Path) -> None:
    server = ScriptedServer()
    await server.start()
    url = server.url
    await server.stop()  # nobody listens while the first Outbox runs
    async with Outbox(db, url, **FAST) as box:
        ids = await box.send_many([{"left": i} for i in range(5)])
    assert statuses(db) == {"pending": 5}
    await server.start()
    async with Outbox(db, url, **FAST) as box:
        await box.drain(timeout=5)
    await server.stop()
    assert server.ids() == ids


async def test_ack_timeout_resends_then_marks_dead(server: ScriptedServer, db: Path) -> None:
    server.ack = False
    options = {**FAST, "ack_timeout": 50 * MS, "max_attempts": 3}
    async with Outbox(db, server.url, **options) as box:
        message_id = await box.send({"never": "acked"})
        with pytest.raises(MessageDeadError, match=re.escape(f"no ack within {50 * MS}s")):
            await box.wait_acked(message_id, timeout=5)
        stats = box.stats()
    assert server.ids() == [message_id] * 3  # sent, resent, resent, then given up
    [(row_id, status, attempts, error)] = rows(db)
    assert (row_id, status, attempts) == (message_id, "dead", 3)
    assert error is not None and "no ack" in error
    assert stats.dead == 1 and stats.counters.resends == 2


async def test_dead_rows_can_be_requeued(server: ScriptedServer, db: Path) -> None:
    server.ack = False
    options = {**FAST, "ack_timeout": 30 * MS, "max_attempts": 1}
    async with Outbox(db, server.url, **options) as box:
        message_id = await box.send("x")
        with pytest.raises(MessageDeadError):
            await box.wait_acked(message_id, timeout=5)
        server.ack = True
        assert await box.requeue_dead() == 1
        await box.wait_acked(message_id, timeout=5)
    assert statuses(db) == {"acked": 1}


async def test_nack_marks_dead_at_once_with_the_reason(server: ScriptedServer, db: Path) -> None:
    server.nack = {2: "order 2 is invalid"}
    async with Outbox(db, server.url, **FAST) as box:
        ids = await box.send_many(["a", "b", "c"])
        with pytest.raises(MessageDeadError, match="order 2 is invalid"):
            await box.wait_acked(2, timeout=5)
        await box.drain(timeout=5)
    assert ids == [1, 2, 3]
    assert [(r[0], r[1], r[3]) for r in rows(db)] == [
        (1, "acked", None),
        (2, "dead", "nack: order 2 is invalid"),
        (3, "acked", None),
    ]
    assert server.ids() == [1, 2, 3]  # a nacked message is not resent


async def nobody_listening() -> str:
    """The URL of a server that started and stopped: every connection attempt is refused."""
    server = ScriptedServer()
    await server.start()
    url = server.url
    await server.stop()
    return url


async def test_reconnect_limit_gives_up_and_keeps_rows(db: Path) -> None:
    url = await nobody_listening()
    options = {**FAST, "max_reconnect_attempts": 2}
    async with Outbox(db, url, **options) as box:
        message_id = await box.send("kept")
        await wait_until(lambda: box.state is State.GAVE_UP)
        with pytest.raises(ReconnectLimitError, match="max_reconnect_attempts"):
            await box.wait_acked(message_id, timeout=5)
        with pytest.raises(ReconnectLimitError):
            await box.drain(timeout=5)
        assert await box.send("still accepted") == message_id + 1
    assert statuses(db) == {"pending": 2}


async def test_a_wait_acked_already_waiting_fails_when_the_supervisor_gives_up(
    db: Path,
) -> None:
    url = await nobody_listening()
    options = {**FAST, "max_reconnect_attempts": 3}
    async with Outbox(db, url, **options) as box:
        message_id = await box.send("kept")
        assert box.state is not State.GAVE_UP
        waiting = asyncio.create_task(box.wait_acked(message_id))  # no timeout of its own
        with pytest.raises(ReconnectLimitError, match=rf"wait_acked\({message_id}\)"):
            await asyncio.wait_for(waiting, 10)
        assert box.state is State.GAVE_UP
        assert box._store is not None and box._store._waiters == {}
    assert statuses(db) == {"pending": 1}


async def test_refused_handshake_backs_off_instead_of_hot_looping(db: Path) -> None:
    async with ScriptedServer(refuse_status=401) as server:
        options = {**FAST, "reconnect_interval": 20 * MS, "reconnect_max_interval": 1000 * MS}
        async with Outbox(db, server.url, **options) as box:
            await box.send("waits")
            await wait_until(lambda: len(server.handshakes) >= 5)
        gaps = [b - a for a, b in zip(server.handshakes, server.handshakes[1:], strict=False)]
    # Delays double: attempt n waits at least half of 20 ms * 2**(n-1).
    for n, gap in enumerate(gaps[:4], start=1):
        assert gap >= 0.5 * 20 * MS * 2 ** (n - 1)
    assert statuses(db) == {"pending": 1}


@pytest.mark.parametrize("code", [1001, 1012, 1013])
async def test_server_restarting_close_codes_get_a_backoff(db: Path, code: int) -> None:
    async with ScriptedServer(close_code=code) as server:
        options = {**FAST, "reconnect_interval": 50 * MS, "reconnect_max_interval": 50 * MS}
        async with Outbox(db, server.url, **options) as box:
            await wait_until(lambda: len(server.handshakes) >= 3)
            server.close_code = None
            await box.wait_acked(await box.send("after restart"), timeout=5)
        gaps = [b - a for a, b in zip(server.handshakes, server.handshakes[1:], strict=False)]
    assert all(gap >= 25 * MS for gap in gaps[:2])  # jitter keeps at least half of 50 ms


async def test_json_heartbeat_without_pongs_reconnects(db: Path) -> None:
    async with ScriptedServer(answer_json_ping=False) as server:
        options = {
            **FAST,
            "heartbeat": "json",
            "heartbeat_interval": 20 * MS,
            "heartbeat_timeout": 20 * MS,
            "max_missed_heartbeats": 2,
        }
        async with Outbox(db, server.url, **options) as box:
            await wait_until(lambda: server.connections >= 2)
            assert box.stats().counters.heartbeat_misses >= 2


async def test_json_heartbeat_with_pongs_keeps_the_connection(db: Path) -> None:
    async with ScriptedServer() as server:
        options = {
            **FAST,
            "heartbeat": "json",
            "heartbeat_interval": 10 * MS,
            "heartbeat_timeout": 200 * MS,
        }
        async with Outbox(db, server.url, **options) as box:
            pings_before = time.monotonic()
            await box.wait_acked(await box.send("x"), timeout=5)
            # Let several heartbeats happen; they all get pongs.
            await wait_until(lambda: time.monotonic() - pings_before > 200 * MS)
            assert server.connections == 1
            assert box.stats().counters.heartbeat_misses == 0


async def test_bad_frames_from_the_server_are_ignored(db: Path) -> None:
    bad: list[str | bytes] = [
        "not json",
        "[1, 2]",
        b"\x00binary",
        '{"type": "ack", "messageId": 999}',
        '{"type": "ack", "messageId": "one"}',
        '{"type": "surprise"}',
    ]
    async with ScriptedServer(extra_frames=bad) as server, Outbox(db, server.url, **FAST) as box:
        ids = await box.send_many(["a", "b"])
        await box.drain(timeout=5)
        counters = box.stats().counters
    assert server.ids() == ids
    # not JSON, not an object, binary, a non-integer id, an unknown type
    assert counters.protocol_errors == 5
    assert counters.unknown_acks >= 1 and server.connections == 1


async def test_refuses_payloads_before_writing(server: ScriptedServer, db: Path) -> None:
    async with Outbox(db, server.url, max_message_size=100, **FAST) as box:
        with pytest.raises(PayloadNotJSONError, match="not JSON-serializable"):
            await box.send({"when": object()})
        with pytest.raises(PayloadNotJSONError):
            await box.send(float("nan"))
        with pytest.raises(PayloadTooLargeError, match="max_message_size=100"):
            await box.send("x" * 200)
        with pytest.raises(PayloadTooLargeError):
            await box.send_many(["ok", "é" * 60])  # 120 bytes of UTF-8: the whole call fails
        with pytest.raises(TypeError, match="idempotency key"):
            await box.send("x", key=42)  # type: ignore[arg-type]
    assert rows(db) == []


async def test_max_pending_quota_raises_queue_full(db: Path) -> None:
    url = await nobody_listening()
    async with Outbox(db, url, max_pending=3, **FAST) as box:
        await box.send_many([1, 2, 3])
        with pytest.raises(QueueFullError, match="max_pending is 3"):
            await box.send(4)
    assert statuses(db) == {"pending": 3}


async def test_send_after_close_raises(server: ScriptedServer, db: Path) -> None:
    box = Outbox(db, server.url, **FAST)
    with pytest.raises(OutboxClosedError, match="not open"):
        await box.send("early")
    async with box:
        await box.send("ok")
    with pytest.raises(OutboxClosedError, match="closed"):
        await box.send("late")


def test_bad_url_and_unknown_option_fail_at_construction(db: Path) -> None:
    with pytest.raises(ValueError, match="not a WebSocket URL"):
        Outbox(db, "http://example.invalid/")
    with pytest.raises(TypeError, match="unknown option"):
        Outbox(db, "ws://127.0.0.1:1/", ack_timout=1)
    with pytest.raises(ValueError, match="max_inflight"):
        Outbox(db, "ws://127.0.0.1:1/", max_inflight=0)


async def test_cancelled_send_commits_all_or_nothing(server: ScriptedServer, db: Path) -> None:
    async with Outbox(db, server.url, **FAST) as box:
        tasks = [asyncio.create_task(box.send({"i": i}, key=f"k{i}")) for i in range(200)]
        await asyncio.sleep(0)
        for task in tasks[::2]:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        committed = [r for r in results if isinstance(r, int)]
        # Retrying with the same keys finds the committed rows and writes the missing ones.
        again = await box.send_many(
            [{"i": i} for i in range(200)], keys=[f"k{i}" for i in range(200)]
        )
        await box.drain(timeout=10)
    assert set(committed) <= set(again)
    assert len(set(again)) == 200 == len(rows(db))
    with sqlite3.connect(db) as conn:
        payloads = dict(conn.execute("SELECT key, payload FROM outbox"))
    assert all(payloads[f"k{i}"] == f'{{"i":{i}}}' for i in range(200))  # no half rows


async def test_acked_rows_are_purged_but_ids_never_reused(server: ScriptedServer, db: Path) -> None:
    options = {**FAST, "acked_retention": 0.0, "purge_interval": 10 * MS}
    async with Outbox(db, server.url, **options) as box:
        first = await box.send_many(["a", "b", "c"])
        await box.drain(timeout=5)
        await wait_until(lambda: not rows(db))
        await box.wait_acked(first[0], timeout=1)  # a purged id still reads as acked
        later = await box.send("d")
        await box.drain(timeout=5)
    assert later > max(first)
    assert server.unique_ids() == {*first, later}


async def test_blackholed_connection_is_detected_by_the_heartbeat(
    server: ScriptedServer, db: Path
) -> None:
    """The TCP connection stays open but nothing comes back: only pings can tell."""
    options = {
        **FAST,
        "heartbeat_interval": 50 * MS,
        "heartbeat_timeout": 50 * MS,
        "max_missed_heartbeats": 2,
        "open_timeout": 300 * MS,
    }
    async with (
        FaultProxy("127.0.0.1", server.port) as proxy,
        Outbox(db, proxy.url(), **options) as box,
    ):
        await box.wait_acked(await box.send("before"), timeout=5)
        proxy.blackhole(True)
        stuck = await box.send("during")
        await wait_until(lambda: box.stats().counters.heartbeat_misses >= 2)
        await wait_until(lambda: box.state is not State.CONNECTED)
        proxy.blackhole(False)
        await box.wait_acked(stuck, timeout=5)
        assert box.stats().reconnects >= 1
    assert statuses(db) == {"acked": 2}


async def test_acks_count_as_signs_of_life_for_the_heartbeat(db: Path) -> None:
    """Pongs never come (JSON pings ignored) but acks keep flowing: no reconnect."""
    async with ScriptedServer(answer_json_ping=False) as server:
        options = {
            **FAST,
            "heartbeat": "json",
            "heartbeat_interval": 50 * MS,
            "heartbeat_timeout": 50 * MS,
            "max_missed_heartbeats": 1,
        }
        async with Outbox(db, server.url, **options) as box:
            started = time.monotonic()
            while time.monotonic() - started < 0.3:  # keep the server busy acking
                await box.wait_acked(await box.send("tick"), timeout=5)
            assert server.connections == 1


async def test_a_blocked_event_loop_is_not_a_missed_pong(server: ScriptedServer, db: Path) -> None:
    options = {
        **FAST,
        "heartbeat_interval": 20 * MS,
        "heartbeat_timeout": 50 * MS,
        "max_missed_heartbeats": 1,
    }
    async with Outbox(db, server.url, **options) as box:
        await box.wait_acked(await box.send("a"), timeout=5)
        for _ in range(3):
            # Wait for the next ping to be in the air, then freeze the loop past its deadline.
            pinged = time.monotonic()
            await wait_until(lambda pinged=pinged: time.monotonic() - pinged > 0.03)
            time.sleep(0.2)  # noqa: ASYNC251 - the application blocking its own loop
        await box.wait_acked(await box.send("b"), timeout=5)
        assert server.connections == 1
        assert box.stats().counters.heartbeat_misses == 0


async def test_retention_by_count_keeps_the_newest_acked_rows(
    server: ScriptedServer, db: Path
) -> None:
    options = {**FAST, "acked_retention_count": 5, "purge_interval": 10 * MS}
    async with Outbox(db, server.url, **options) as box:
        ids = await box.send_many(list(range(20)))
        await box.drain(timeout=5)
        await wait_until(lambda: len(rows(db)) == 5)
    assert [row[0] for row in rows(db)] == ids[-5:]


async def test_unusable_database_files_raise_clear_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database, just bytes" * 200)
    with pytest.raises(DatabaseCorruptError, match="not a usable SQLite database"):
        await Outbox(garbage, "ws://127.0.0.1:9/").open()

    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 999")
    with pytest.raises(SchemaTooNewError, match="upgrade the outbox package"):
        await Outbox(newer, "ws://127.0.0.1:9/").open()

    with pytest.raises(StoreError, match="directory exists"):
        await Outbox(tmp_path / "missing" / "o.db", "ws://127.0.0.1:9/").open()


# -------------------------------------------------------------------------------------------
# Regressions from an adversarial review of the client half: each test below proved a bug
# (lost rows, hangs, the quota refusing a keyed retry, batch sizes in characters) before it
# was fixed.
# -------------------------------------------------------------------------------------------


def closed_port_url() -> str:
    """A ws:// URL nobody listens on: an Outbox there stays offline (another process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"ws://127.0.0.1:{port}/"


# -------------------------------------------------------------------------------------------
# A committed message never sent: CommittedRows marked complete after a stale query
# -------------------------------------------------------------------------------------------


async def test_rows_committed_during_a_query_that_overflow_the_feed_are_sent(
    server: ScriptedServer, db: Path
) -> None:
    box = Outbox(db, server.url, page_size=5, **FAST)
    await box.open()
    try:
        store = box._store
        assert store is not None
        real_fetch = store.fetch_pending
        armed = True
        committed: list[int] = []

        async def fetch_then_commit(after: int, limit: int) -> list[Row]:
            # The SELECT's snapshot is taken first; a bigger-than-page_size send_many then
            # commits and is published before the query's result reaches the sender. The
            # reader and writer are two threads, so this order happens on its own; here it
            # is forced, once, to make the test deterministic.
            nonlocal armed
            rows = await real_fetch(after, limit)
            if armed:
                armed = False
                committed.extend(await box.send_many([{"n": i} for i in range(12)]))
            return rows

        store.fetch_pending = fetch_then_commit  # type: ignore[method-assign]
        await wait_until(lambda: len(committed) == 12, timeout=2)
        # Nothing else is ever committed: the application just waits for its 12 messages.
        await box.drain(timeout=1.0)
        assert server.unique_ids() == set(committed)
    finally:
        await box.close()


# -------------------------------------------------------------------------------------------
# close() hangs when the server stops reading
# -------------------------------------------------------------------------------------------


async def test_close_returns_when_the_server_stops_reading(db: Path) -> None:
    peers: list[ServerConnection] = []

    async def never_reads(ws: ServerConnection) -> None:
        peers.append(ws)
        await ws.wait_closed()  # accept, then never read (a stuck or overloaded peer)

    async with serve(
        never_reads, "127.0.0.1", 0, max_queue=1, compression=None, close_timeout=0.1
    ) as srv:
        port = srv.sockets[0].getsockname()[1]
        box = Outbox(db, f"ws://127.0.0.1:{port}/", close_timeout=0.2, **FAST)
        await box.open()
        supervisor = box._supervisor
        assert supervisor is not None
        await box.send_many([{"pad": "x" * 65536} for _ in range(400)])  # ~26 MB to write
        await wait_until(lambda: supervisor.ws is not None and supervisor.ws.paused, timeout=5)
        ws = supervisor.ws
        assert ws is not None
        closing = asyncio.create_task(box.close())
        done, _ = await asyncio.wait({closing}, timeout=1.0)
        if not done:
            ws.transport.abort()  # clean up the hung close so the test can end
            await closing
        for peer in peers:
            peer.transport.abort()
        assert done, "Outbox.close() did not return within 1 s (close_timeout=0.2)"


# -------------------------------------------------------------------------------------------
# Two processes on one outbox file
# -------------------------------------------------------------------------------------------


async def test_drain_returns_when_another_process_shares_the_file(
    server: ScriptedServer, db: Path
) -> None:
    async with (
        Outbox(db, server.url, **FAST) as box,
        Outbox(db, closed_port_url(), **FAST) as other,  # another process, offline
    ):
        await wait_until(lambda: box.state is State.CONNECTED)
        theirs = await other.send({"from": "other"})
        mine = await box.send({"from": "me"})  # the id gap sends our sender to the store
        await wait_until(lambda: server.unique_ids() == {theirs, mine}, timeout=2)
        await box.wait_acked(mine, timeout=1)
        await box.drain(timeout=1.0)
        assert box.stats().pending == 0


async def test_idle_sender_picks_up_rows_another_process_committed(
    server: ScriptedServer, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # max_age scaled down from 1 s, as the other tests scale every interval.
    monkeypatch.setattr(
        sender_module,
        "CommittedRows",
        lambda *, limit: CommittedRows(limit=limit, max_age=50 * MS),
    )
    async with (
        Outbox(db, server.url, **FAST) as box,
        Outbox(db, closed_port_url(), **FAST) as other,  # another process, offline
    ):
        await box.wait_acked(await box.send("warm up"), timeout=2)  # feed now complete, idle
        theirs = await other.send({"from": "other"})
        await wait_until(lambda: theirs in server.unique_ids(), timeout=1.0)


# -------------------------------------------------------------------------------------------
# An idempotent retry at the max_pending quota
# -------------------------------------------------------------------------------------------


async def test_retry_with_the_same_key_at_quota_returns_the_id(db: Path) -> None:
    async with Outbox(db, closed_port_url(), max_pending=1, **FAST) as box:
        first = await box.send({"order": 42}, key="order-42")
        try:
            again = await box.send({"order": 42}, key="order-42")
        except QueueFullError as exc:
            pytest.fail(f"an idempotent retry that adds no row was refused: {exc}")
        assert again == first


# -------------------------------------------------------------------------------------------
# max_batch_bytes counts characters, not bytes
# -------------------------------------------------------------------------------------------


async def test_batch_frames_respect_max_batch_bytes_in_bytes(db: Path) -> None:
    sizes: list[int] = []

    async def record(ws: ServerConnection) -> None:
        async for frame in ws:
            assert isinstance(frame, str)
            sizes.append(len(frame.encode()))
            items = wire.parse_client_frame(frame)
            assert isinstance(items, list)
            await ws.send(wire.encode_acks([m.id for m in items]))

    def announce_batch(connection: Any, request: Any, response: Any) -> None:
        response.headers[wire.FEATURES_HEADER] = wire.FEATURE_BATCH

    limit = 16 * 1024
    async with serve(
        record, "127.0.0.1", 0, process_response=announce_batch, compression=None
    ) as srv:
        port = srv.sockets[0].getsockname()[1]
        async with Outbox(db, f"ws://127.0.0.1:{port}/", max_batch_bytes=limit, **FAST) as box:
            await box.send_many(["\U0001f600" * 1000 for _ in range(40)])  # 4 bytes a char
            await box.drain(timeout=2)
    envelope = 100 + 40 * 20  # {"type":"batch","messages":[...]} and {"id":N,"data":...}
    assert max(sizes) <= limit + envelope, f"frames of {sizes} bytes, limit {limit}"


async def test_a_requeue_from_the_sqlite3_shell_is_delivered_without_a_reconnect(
    server: ScriptedServer, db: Path
) -> None:
    """Dead rows put back to pending by another connection (as the shell would): the
    running sender notices, sends them on the same connection, and drain() waits for them."""
    server.nack = {1: "not now"}
    async with Outbox(db, server.url, **FAST) as box:
        first = await box.send("refused once")
        with pytest.raises(MessageDeadError):
            await box.wait_acked(first, timeout=5)
        await box.wait_acked(await box.send("after it"), timeout=5)
        server.nack = {}
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE outbox SET status = 'pending', attempts = 0 WHERE status = 'dead'")
        await box.drain(timeout=5)  # must not return before the requeued row is acked
        assert statuses(db) == {"acked": 2}
        assert box.stats().pending == 0 and box.stats().dead == 0
    assert server.ids() == [1, 2, 1] and server.connections == 1


async def test_an_idle_outbox_notices_a_requeue_from_the_shell(
    server: ScriptedServer, db: Path
) -> None:
    server.nack = {1: "not now"}
    async with Outbox(db, server.url, **FAST) as box:
        with pytest.raises(MessageDeadError):
            await box.wait_acked(await box.send("refused once"), timeout=5)
        server.nack = {}
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE outbox SET status = 'pending', attempts = 0 WHERE status = 'dead'")
        await wait_until(lambda: statuses(db) == {"acked": 1}, timeout=5)  # nobody calls drain
    assert server.ids() == [1, 1] and server.connections == 1


def remove_database(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


async def test_deleting_the_outbox_file_while_open_makes_send_fail(db: Path) -> None:
    async with Outbox(db, "ws://127.0.0.1:9/", **FAST) as box:
        assert await box.send_many(["a", "b"]) == [1, 2]
        remove_database(db)
        with pytest.raises(DatabaseMissingError, match="deleted while the Outbox had it open"):
            await box.send("c")
        for _ in range(3):  # and every later one: no id for a row that is in no file
            with pytest.raises(DatabaseMissingError, match="not durable"):
                await box.send("d")


async def test_concurrent_sends_get_no_id_once_the_file_is_deleted(db: Path) -> None:
    returned_after: list[int] = []
    deleted = False

    async def producer() -> None:
        while True:
            message_id = await box.send("x")
            if deleted:
                returned_after.append(message_id)

    async with Outbox(db, "ws://127.0.0.1:9/", **FAST) as box:
        tasks = [asyncio.create_task(producer()) for _ in range(20)]
        await wait_until(lambda: box.stats().pending >= 100)
        await box.send("a commit that starts after the deletion is not acknowledged")
        remove_database(db)
        deleted = True
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, DatabaseMissingError) for r in results), results
    # A send that was already committed when the file went may still return (it was on
    # disk then); any commit that began after the deletion was refused.
    assert len(returned_after) <= 20, returned_after


async def test_replacing_the_outbox_file_while_open_makes_send_fail(
    db: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.db"
    async with Outbox(other, "ws://127.0.0.1:9/", **FAST) as box:
        await box.send("belongs to the other file")
    async with Outbox(db, "ws://127.0.0.1:9/", **FAST) as box:
        await box.send("first")
        os.replace(other, db)
        with pytest.raises(DatabaseMissingError, match="replaced by another file"):
            await box.send("second")
    with sqlite3.connect(db) as conn:
        payloads = [p for (p,) in conn.execute("SELECT payload FROM outbox")]
    assert '"second"' not in payloads, payloads  # refused before it was written anywhere


async def test_retention_ignores_a_wall_clock_step(server: ScriptedServer, db: Path) -> None:
    """+2 h on the wall clock: rows acked a second ago stay (and so does their key)."""
    wall = [time.time()]
    options = {**FAST, "acked_retention": 3600.0, "purge_interval": 0.01}
    async with Outbox(db, server.url, wall_clock=lambda: wall[0], **options) as box:
        first = await box.send("a", key="k")
        await box.drain(timeout=5)
        wall[0] += 7200.0
        store = box._store
        assert store is not None
        commits = store.commits
        await wait_until(lambda: store.commits >= commits + 5)  # several purges ran
        assert [r[0] for r in rows(db)] == [first]
        assert await box.send("a", key="k") == first  # the retry finds the same id
    assert server.ids() == [first]
