"""Regression tests from an adversarial review of the client half: each one proved a bug
(lost rows, hangs, counts drifting, the quota refusing a keyed retry, batch sizes in
characters) before it was fixed. Real parts throughout: a websockets server on 127.0.0.1
port 0 and SQLite files in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from outbox import Outbox, QueueFullError, State
from outbox.client import session as sender_module
from outbox.client.store import Row, Store
from outbox.protocol import wire
from outbox.protocol.feed import CommittedRows

from ..support import ScriptedServer, wait_until

FAST: dict[str, Any] = {
    "reconnect_interval": 0.01,
    "reconnect_max_interval": 0.05,
    "ack_timeout": 2.0,
    "heartbeat_interval": 5.0,
    "acked_retention": None,
}


def closed_port_url() -> str:
    """A ws:// URL nobody listens on: an Outbox there stays offline (another process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"ws://127.0.0.1:{port}/"


# -------------------------------------------------------------------------------------------
# (1)/(2) A committed message never sent: CommittedRows marked complete after a stale query
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
# (2) close() hangs when the server stops reading
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
# (3) Store.counts drift: an id acked twice in one commit, 500 ids apart
# -------------------------------------------------------------------------------------------


async def test_an_id_acked_twice_in_one_commit_is_counted_once(tmp_path: Path) -> None:
    # Reachable from a session: a commit fails (file locked past busy_timeout), its acks are
    # kept for retry; the connection drops; the next session's flush fails too, so it
    # rescans the still-pending rows, resends them and reads their acks again. When the
    # lock goes, one transaction carries every id twice.
    store = await Store.open(tmp_path / "s.db")
    try:
        ids = await store.insert([(json.dumps(i), None) for i in range(600)])
        store.mark_acked(ids)  # acks read on the first connection, not yet committed
        store.mark_acked(ids)  # the same ids acked again after the resend
        await store.flush()
        assert (store.counts.pending, store.counts.acked) == (0, 600)
    finally:
        await store.close()


# -------------------------------------------------------------------------------------------
# (5) Two processes on one outbox file
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
        lambda *, limit: CommittedRows(limit=limit, max_age=0.05),
    )
    async with (
        Outbox(db, server.url, **FAST) as box,
        Outbox(db, closed_port_url(), **FAST) as other,  # another process, offline
    ):
        await box.wait_acked(await box.send("warm up"), timeout=2)  # feed now complete, idle
        theirs = await other.send({"from": "other"})
        await wait_until(lambda: theirs in server.unique_ids(), timeout=1.0)


# -------------------------------------------------------------------------------------------
# (5) An idempotent retry at the max_pending quota
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
# (5) max_batch_bytes counts characters, not bytes
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
