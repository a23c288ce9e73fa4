"""A slow handler, a flooding client, a hostile client, a client that never reads: the
receiver keeps its promise to everyone else, and its memory bounded in bytes (issue 9)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from outbox import Incoming, Outbox, Receiver, serve
from outbox.protocol import wire
from outbox.receiver.connection import ITEM_OVERHEAD

from ..support import MS, wait_until


def slow_recorder(delay: float) -> tuple[Callable[[Incoming], Awaitable[None]], list[Any]]:
    """A handler that takes ``delay`` seconds per message (an HTTP call, a slow disk)."""
    handled: list[Any] = []

    async def handler(message: Incoming) -> None:
        await asyncio.sleep(delay)
        handled.append((message.client_id, message.id))

    return handler, handled


async def test_a_slow_handler_with_a_long_backlog_dead_letters_nothing(tmp_path: Path) -> None:
    """1200 messages, 6x max_inflight, a 2 ms handler, ack_timeout 100 ms: each window of
    200 takes 400 ms to handle, four deadlines. Every message handled once, none dead, none
    resent, the whole run close to the handler's own time. (Before: one transaction per
    window, acked at its COMMIT, each deadline in it a failed attempt: every one dead.)"""
    handler, handled = slow_recorder(2 * MS)
    count = 1200
    options: dict[str, Any] = {
        "max_inflight": 200,
        "ack_timeout": 100 * MS,
        "heartbeat_interval": 50 * MS,
        "heartbeat_timeout": 50 * MS,
        "reconnect_interval": 10 * MS,
        "acked_retention": None,
    }
    async with (
        # NORMAL: a loaded machine's fsync must not be what this test measures.
        serve(
            handler, tmp_path / "inbox.db", max_transaction_time=10 * MS, synchronous="NORMAL"
        ) as rx,
        Outbox(tmp_path / "outbox.db", rx.url, **options) as box,
    ):
        started = time.monotonic()
        ids = await box.send_many([{"n": n} for n in range(count)])
        await box.drain(timeout=60)
        elapsed = time.monotonic() - started
        stats = box.stats()
        for message_id in ids:
            await box.wait_acked(message_id, timeout=1)  # raises MessageDeadError if dead
    assert stats.dead == 0 and stats.acked == count
    assert sorted(n for _, n in handled) == ids  # each once
    assert stats.counters.resends == 0
    handler_time = count * 2 * MS
    print(f"\n{count} messages, handler time {handler_time:.2f}s, took {elapsed:.2f}s")
    assert elapsed < 3 * handler_time + 2.0  # a sanity bound, not a speed target


async def test_one_clients_backlog_does_not_hold_another_clients_acks(tmp_path: Path) -> None:
    handler, handled = slow_recorder(2 * MS)
    async with (
        serve(handler, tmp_path / "inbox.db", max_transaction_time=10 * MS) as rx,
        connect(rx.url, additional_headers={wire.CLIENT_ID_HEADER: "flood"}) as flood,
        connect(rx.url, additional_headers={wire.CLIENT_ID_HEADER: "quiet"}) as quiet,
    ):
        for n in range(1, 501):  # a second of handler time
            await flood.send(wire.encode_message(n, '{"flood": true}'))
        await wait_until(lambda: len(handled) >= 5, timeout=5)
        sent_at = time.monotonic()
        await quiet.send(wire.encode_message(1, '{"quiet": true}'))
        async with asyncio.timeout(5):
            ack = json.loads(await quiet.recv())
        waited = time.monotonic() - sent_at
        assert ack == {"type": "ack", "messageId": 1}
        flood_left = 500 - sum(1 for client, _ in handled if client == "flood")
        # Acked while most of the flood still waits: it did not queue behind it.
        assert flood_left > 250, (waited, flood_left)


async def test_a_hostile_client_cannot_make_another_reconnect(tmp_path: Path) -> None:
    """Frames that parse but cannot be stored are refused for the sender alone. (Before,
    they failed the shared transaction and every connection in it was closed with 1013.)"""
    inbox = tmp_path / "inbox.db"
    handled: list[tuple[str, int]] = []

    async def handler(message: Incoming) -> None:
        handled.append((message.client_id, message.id))

    hostile_frames = [
        '{"id": 9223372036854775808, "data": 1}',  # past SQLite's integers
        '{"id": 2, "data": NaN}',
        '{"id": 3, "data": "\\ud800"}',
        '{"id": 4, "data": ' + "[" * 1000 + "]" * 1000 + "}",
        '{"id": 5, "data": 123456789012345678901234567890}',
    ]
    async with (
        serve(handler, inbox) as rx,
        Outbox(tmp_path / "victim.db", rx.url, reconnect_interval=0.01) as victim,
        connect(rx.url, additional_headers={wire.CLIENT_ID_HEADER: "hostile"}) as hostile,
    ):
        ids = []
        for round_ in range(20):
            for frame in hostile_frames:
                try:
                    await hostile.send(frame)
                except ConnectionClosed:
                    break
            ids += await victim.send_many([{"round": round_, "i": i} for i in range(10)])
        await victim.drain(timeout=10)
        assert victim.stats().reconnects == 0
        assert victim.stats().dead == 0
        assert sorted(n for client, n in handled if client == victim.client_id) == ids
        assert not [n for client, n in handled if client == "hostile"]
    assert rx.stats.storage_errors == 0


async def test_pongs_to_a_client_that_never_reads_are_bounded_then_it_is_dropped(
    tmp_path: Path,
) -> None:
    """JSON pings from a peer that never reads its answers: the pongs count in the byte
    bound, reading stops, and after send_timeout the peer is dropped. (Before, pongs skipped
    the bound: memory grew without end and the peer was never dropped.)"""
    limit = 64 * 1024
    async with serve(None, tmp_path / "inbox.db", max_backlog_bytes=limit, send_timeout=0.3) as rx:
        peak = 0

        def watch() -> bool:
            nonlocal peak
            for peer in list(rx._peers):
                peak = max(peak, peer.pending_bytes + peer.outgoing_bytes)
            return rx.stats.open_connections == 0 and rx.stats.connections == 1

        # max_queue=1 and never calling recv(): the client stops reading from the socket.
        # Small socket buffers on both ends, so they fill after a few kB of pongs instead of
        # megabytes (accepted sockets inherit the listening socket's send buffer size).
        for listening in rx._server.sockets if rx._server else ():
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", rx.port))
        async with connect(rx.url, max_queue=1, sock=sock) as ws:

            async def flood() -> None:
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        await ws.send(wire.PING_FRAME)

            flooding = asyncio.ensure_future(flood())
            try:
                await wait_until(watch, timeout=10)  # the receiver dropped it
            finally:
                flooding.cancel()
                ws.transport.abort()  # it never reads: a closing handshake would wait it out
    assert peak <= limit + 64, peak


async def test_large_messages_behind_a_slow_handler_are_bounded_in_bytes(tmp_path: Path) -> None:
    """1 MiB messages faster than the handler takes them: the connection holds at most
    max_backlog_bytes plus one frame, and every message is still handled."""
    handler, handled = slow_recorder(20 * MS)
    limit = 2 * 1024 * 1024
    big = json.dumps("x" * (1024 * 1024))
    async with serve(
        handler, tmp_path / "inbox.db", max_backlog_bytes=limit, max_size=2 * 1024 * 1024
    ) as rx:
        peak = 0

        def watch() -> bool:
            nonlocal peak
            for peer in list(rx._peers):
                peak = max(peak, peer.pending_bytes + peer.outgoing_bytes)
            return len(handled) == 20

        async with connect(rx.url, max_size=None) as ws:
            sender = asyncio.ensure_future(
                asyncio.gather(*(ws.send(wire.encode_message(n, big)) for n in range(1, 21)))
            )
            await wait_until(watch, timeout=20)
            await sender
            ws.transport.abort()  # it read no ack: a closing handshake would wait it out
    assert peak <= limit + len(big) + 100 + ITEM_OVERHEAD, peak


async def test_receiver_options_bound_rounds(tmp_path: Path) -> None:
    """The new bounds are options like the others, checked at construction."""
    for name, bad in [
        ("max_transaction_messages", 0),
        ("max_transaction_time", 0),
        ("max_backlog_bytes", 0),
        ("send_timeout", -1),
    ]:
        with pytest.raises(ValueError, match=name):
            Receiver(None, tmp_path / "inbox.db", **{name: bad})


async def test_nacks_to_a_client_that_never_reads_do_not_echo_its_frames(tmp_path: Path) -> None:
    """A 4 MB ``type`` field, nacked as malformed, to a client that never reads: the nack's
    reason is clipped, so the receiver's memory does not grow with what the client sends.
    (Before, each nack repeated the 4 MB field: 3 GB in 37 s.)"""
    import psutil

    process = psutil.Process()
    huge = "x" * 4_000_000
    async with serve(None, tmp_path / "inbox.db") as rx:
        before = process.memory_info().rss
        peak = before
        async with connect(rx.url, max_queue=1) as ws:  # never calls recv()
            for n in range(1, 21):  # 80 MB sent
                await ws.send(json.dumps({"id": n, "type": huge, "data": 1}))
                peak = max(peak, process.memory_info().rss)
            await wait_until(lambda: rx.stats.protocol_errors >= 20, timeout=30)
            peak = max(peak, process.memory_info().rss)
            held = sum(peer.outgoing_bytes for peer in rx._peers)
            ws.transport.abort()  # it never reads: a closing handshake would wait it out
    growth_mb = (peak - before) / 1e6
    print(f"\nRSS growth {growth_mb:.1f} MB after 80 MB of bad frames; answers held {held} B")
    assert held <= 20 * 400  # 20 nacks of a few hundred bytes, not 20 x 4 MB
    assert growth_mb < 60  # the 20 echoes alone would be 80 MB


async def test_one_batch_frame_cannot_queue_more_than_max_frame_messages(tmp_path: Path) -> None:
    """A 4 MB batch of tiny messages was 178,744 messages in one connection's backlog (18x
    max_backlog, about 8 bytes of memory per byte of frame). Now it is refused whole."""
    tiny = [(n, "1") for n in range(1, 100_001)]
    async with (
        serve(None, tmp_path / "inbox.db", max_frame_messages=1000) as rx,
        connect(rx.url, max_size=None) as ws,
    ):
        await ws.send(wire.encode_batch(tiny))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(10):
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        assert "at most 1000 per frame" in closed.value.rcvd.reason
    assert rx.stats.messages == 0
