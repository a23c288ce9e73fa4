"""Stopping without a storm (issue 11, part 4): ``close()`` drains, connections close with
1012, clients come back with a jittered delay and resend, and the health endpoint says where
the receiver is. Real receivers, real ``Outbox`` clients, real SQLite files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import CloseCode

from outbox import Outbox
from outbox.health import Health, health_url, probe
from outbox.protocol import wire
from outbox.receiver import ConnectRequest, Incoming, Receiver, Transaction, serve

from ..chaos_support import check_end_state, create_effects_table, record_effect, report
from ..raw_client import closed_with
from ..support import MS, fast_options, wait_until

HEADERS = {wire.CLIENT_ID_HEADER: "c1", wire.FEATURES_HEADER: "batch, batch-ack"}


def message(message_id: int) -> str:
    return wire.encode_message(message_id, json.dumps({"n": message_id}))


async def acked_ids(ws: ClientConnection, count: int) -> list[int]:
    """Read ack frames (either form) until ``count`` ids arrived; fail on anything else."""
    ids: list[int] = []
    while len(ids) < count:
        async with asyncio.timeout(5):
            frame = json.loads(await ws.recv())
        assert frame["type"] == "ack", frame
        ids.extend(frame["messageIds"] if "messageIds" in frame else [frame["messageId"]])
    return ids


def inbox_ids(db: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [r[0] for r in conn.execute("SELECT message_id FROM inbox ORDER BY message_id")]


class Gate:
    """A handler that waits at a gate before recording each message: holds a drain open
    for exactly as long as the test wants, without timing."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.entered = asyncio.Event()
        self.handled: list[int] = []

    async def __call__(self, message: Incoming) -> None:
        self.entered.set()
        await self.open.wait()
        self.handled.append(message.id)


async def health(receiver_url: str) -> Health:
    """The CLI's probe (outbox.health), run off the event loop: it is synchronous."""
    return await asyncio.to_thread(probe, health_url(receiver_url), timeout=5)


# ---------------------------------------------------------------------------------------------
# The drain itself
# ---------------------------------------------------------------------------------------------


async def test_drain_acks_what_was_read_reads_nothing_new_and_closes_with_1012(
    tmp_path: Path,
) -> None:
    gate = Gate()
    db = tmp_path / "inbox.db"
    receiver = serve(gate, db)
    await receiver.start()
    try:
        async with connect(receiver.url, additional_headers=HEADERS) as ws:
            for message_id in range(1, 51):
                await ws.send(message(message_id))
            await wait_until(lambda: receiver.stats.frames >= 50)  # all read, one in hand
            await asyncio.wait_for(gate.entered.wait(), 5)
            closing = asyncio.ensure_future(receiver.close())
            await wait_until(lambda: receiver.draining)
            await ws.send(message(51))  # after the readers stopped: never read, never acked
            gate.open.set()
            assert sorted(await acked_ids(ws, 50)) == list(range(1, 51))
            assert await closed_with(ws) == CloseCode.SERVICE_RESTART  # after every ack
            await asyncio.wait_for(closing, 5)
    finally:
        await receiver.close()
    assert gate.handled == list(range(1, 51))  # each once, in order
    assert inbox_ids(db) == list(range(1, 51))


async def test_new_connections_are_refused_with_503_while_draining(tmp_path: Path) -> None:
    gate = Gate()
    receiver = serve(gate, tmp_path / "inbox.db")
    await receiver.start()
    try:
        async with connect(receiver.url, additional_headers=HEADERS) as ws:
            await ws.send(message(1))
            await asyncio.wait_for(gate.entered.wait(), 5)
            closing = asyncio.ensure_future(receiver.close())
            await wait_until(lambda: receiver.draining)
            with pytest.raises(InvalidStatus) as info:
                await connect(receiver.url, additional_headers=HEADERS)
            assert info.value.response.status_code == 503
            assert b"draining" in info.value.response.body
            gate.open.set()
            assert await acked_ids(ws, 1) == [1]
            await asyncio.wait_for(closing, 5)
    finally:
        await receiver.close()
    assert receiver.stats.refused == 0  # a drain is not the client's fault


async def test_close_during_a_stream_loses_nothing_and_clients_come_back_with_jitter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Four Outbox clients streaming into receiver A; A drains mid-stream; B starts on the
    same port and inbox. Every client was closed with 1012, logged it at INFO (a restart,
    not a failure) and waited its own jittered backoff delay; in the end every message
    is in the inbox once and its effect row exists once."""
    caplog.set_level(logging.INFO, logger="outbox")
    inbox = tmp_path / "inbox.db"
    create_effects_table(inbox)
    interval = 400 * MS
    options = fast_options(reconnect_interval=interval, reconnect_max_interval=4 * interval)
    first = serve(record_effect, inbox)
    await first.start()
    port = first.port
    outboxes = [tmp_path / f"outbox-{n}.db" for n in range(4)]
    stop = asyncio.Event()

    async def produce(box: Outbox) -> None:
        while not stop.is_set():  # paced, so the backlog stays short on a busy machine
            await box.send_many([{"n": n} for n in range(5)])
            await asyncio.sleep(10 * MS)

    second: Receiver | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            boxes = [
                await stack.enter_async_context(Outbox(path, first.url, **options))
                for path in outboxes
            ]
            producers = [asyncio.ensure_future(produce(box)) for box in boxes]
            await wait_until(lambda: first.stats.messages >= 200, timeout=20)
            started = time.monotonic()
            await asyncio.wait_for(first.close(), 10)
            drain_seconds = time.monotonic() - started
            second = serve(record_effect, inbox, port=port)
            await second.start()
            await wait_until(lambda: second is not None and second.stats.messages >= 200, 20)
            stop.set()
            await asyncio.gather(*producers)
            for box in boxes:
                await box.drain(timeout=30)
    finally:
        stop.set()
        await first.close()
        if second is not None:
            await second.close()
    messages = 0
    for path in outboxes:
        state = check_end_state(path, inbox, context="drain during a stream")
        assert state.acked == state.messages > 0
        messages += state.messages
    restarts = [r for r in caplog.records if "(code 1012," in r.getMessage()]
    assert len(restarts) == len(outboxes), [r.getMessage() for r in restarts]
    assert {r.levelno for r in restarts} == {logging.INFO}
    delays = [
        float(re.search(r"reconnect attempt 1 in ([0-9.]+)s", r.getMessage())[1])  # type: ignore[index]
        for r in restarts
    ]
    # Each client's own delay: in the jittered first step of its backoff, not all the same.
    assert all(0.5 * interval - 0.01 <= d <= interval + 0.01 for d in delays), delays
    assert len(set(delays)) > 1, delays
    assert second is not None
    report(
        f"[drain during a stream] clients={len(outboxes)} messages={messages} lost=0 "
        f"handled_twice=0 handled_by_first={first.stats.messages} drain_s={drain_seconds:.3f} "
        f"duplicates_answered_by_second={second.stats.duplicates} "
        f"reconnect_delays_s={sorted(delays)}"
    )


async def test_a_drain_that_times_out_closes_anyway_and_the_client_resends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A slow handler with a backlog and a short drain_timeout: A closes before it has
    handled everything; what it did not commit was not acked, so the client resends it to B,
    which handles it once."""
    inbox = tmp_path / "inbox.db"
    create_effects_table(inbox)

    async def slow(message: Incoming) -> None:
        await asyncio.sleep(2 * MS)
        await record_effect(message)

    first = serve(slow, inbox, drain_timeout=50 * MS, max_transaction_time=10 * MS)
    await first.start()
    port = first.port
    outbox_db = tmp_path / "outbox.db"
    second: Receiver | None = None
    try:
        async with Outbox(outbox_db, first.url, **fast_options()) as box:
            ids = await box.send_many([{"n": n} for n in range(500)])
            await wait_until(lambda: first.stats.messages >= 20)
            await asyncio.wait_for(first.close(), 10)
            handled_by_first = first.stats.messages
            second = serve(slow, inbox, port=port, max_transaction_time=10 * MS)
            await second.start()
            await box.drain(timeout=30)
    finally:
        await first.close()
        if second is not None:
            await second.close()
    assert handled_by_first < len(ids)  # the drain was cut short
    assert "drain_timeout" in caplog.text
    state = check_end_state(outbox_db, inbox, context="drain timed out")
    assert state.acked == state.delivered == len(ids)
    assert second is not None
    report(
        f"[drain timed out] messages={len(ids)} lost=0 handled_twice=0 "
        f"handled_by_first={handled_by_first} handled_by_second={second.stats.messages} "
        f"duplicates_answered_by_second={second.stats.duplicates}"
    )


async def test_a_client_that_never_reads_does_not_hold_the_drain(tmp_path: Path) -> None:
    """A peer that never reads its answers (nacks here): its sender is stuck with
    send_timeout 30 s, but close() returns after drain_timeout + close_timeout and drops it."""
    receiver = serve(
        None, tmp_path / "inbox.db", send_timeout=30, drain_timeout=0.2, close_timeout=0.2
    )
    await receiver.start()
    stuck = False

    def sender_is_stuck() -> bool:
        return any(peer.outgoing_bytes > 1000 for peer in receiver._peers)

    try:
        # Small socket buffers on both ends, so they fill after a few kB of pongs (see
        # test_bounds); max_queue=1 and no recv(): the client stops reading.
        for listening in receiver._server.sockets if receiver._server else ():
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", receiver.port))
        async with connect(receiver.url, max_queue=1, sock=sock, close_timeout=0.1) as ws:

            async def flood() -> None:
                # Malformed messages: each nack carries a clipped reason of a few hundred
                # bytes, so the buffers fill after fewer frames than with pongs.
                bad = json.dumps({"id": 1, "type": "x" * 300, "data": 1})
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        await ws.send(bad)

            flooding = asyncio.ensure_future(flood())
            try:
                await wait_until(sender_is_stuck, timeout=10)
                stuck = True
                flooding.cancel()  # it goes on not reading, quietly
                await asyncio.wait_for(receiver.close(), 5)  # not 30 s: dropped
            finally:
                flooding.cancel()
                ws.transport.abort()
    finally:
        await receiver.close()
    assert stuck and receiver.stats.open_connections == 0


async def test_a_handshake_that_ends_during_the_drain_is_refused_with_503(
    tmp_path: Path,
) -> None:
    """An authenticate hook still running when the drain begins: the upgrade is refused."""
    admitted = asyncio.Event()
    release = asyncio.Event()

    async def authenticate(request: ConnectRequest) -> str:
        admitted.set()
        await release.wait()
        return "alice"

    receiver = serve(None, tmp_path / "inbox.db", authenticate=authenticate)
    await receiver.start()
    try:
        connecting = asyncio.ensure_future(connect(receiver.url))
        await asyncio.wait_for(admitted.wait(), 5)
        closing = asyncio.ensure_future(receiver.close())
        await wait_until(lambda: receiver.draining)
        release.set()  # the hook accepts, after the drain began
        with pytest.raises(InvalidStatus) as info:
            await asyncio.wait_for(connecting, 5)
        assert info.value.response.status_code == 503
        await asyncio.wait_for(closing, 5)
    finally:
        release.set()
        await receiver.close()


# ---------------------------------------------------------------------------------------------
# The health endpoint
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_health_through_start_serve_drain_and_close(tmp_path: Path) -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}/"
    in_setup = asyncio.Event()
    finish_setup = asyncio.Event()

    async def setup(tx: Transaction) -> None:
        in_setup.set()
        await finish_setup.wait()

    gate = Gate()
    receiver = serve(gate, tmp_path / "inbox.db", port=port, setup=setup)
    starting = asyncio.ensure_future(receiver.start())
    try:
        await asyncio.wait_for(in_setup.wait(), 5)
        assert (await health(url)).status is None  # starting: not listening yet
        finish_setup.set()
        await asyncio.wait_for(starting, 5)
        assert await health(url) == Health(200, "ready")
        async with connect(url, additional_headers=HEADERS) as ws:
            await ws.send(message(1))
            await asyncio.wait_for(gate.entered.wait(), 5)
            closing = asyncio.ensure_future(receiver.close())
            await wait_until(lambda: receiver.draining)
            assert await health(url) == Health(503, "draining")
            gate.open.set()
            assert await acked_ids(ws, 1) == [1]
            await asyncio.wait_for(closing, 5)
        closed = await health(url)
        assert closed.status is None and "refused" in closed.detail.lower()
    finally:
        finish_setup.set()
        gate.open.set()
        await receiver.close()
    assert receiver.stats.refused == 0  # probes are not refused handshakes


async def test_health_needs_no_credentials_and_can_move_or_go(tmp_path: Path) -> None:
    def authenticate(request: ConnectRequest) -> str | None:
        return None  # refuses every WebSocket client

    async with serve(None, tmp_path / "a.db", authenticate=authenticate) as receiver:
        assert await health(receiver.url) == Health(200, "ready")
        with pytest.raises(InvalidStatus):
            await connect(receiver.url)
    async with serve(None, tmp_path / "b.db", health_path="/ops/ready") as receiver:
        moved = await asyncio.to_thread(probe, health_url(receiver.url, "/ops/ready"))
        assert moved == Health(200, "ready")
        # The old path is a WebSocket path again: a plain GET is not an upgrade.
        assert (await health(receiver.url)).status == 426
    async with serve(None, tmp_path / "c.db", health_path=None) as receiver:
        assert (await health(receiver.url)).status == 426
        async with connect(receiver.url + "healthz", additional_headers=HEADERS) as ws:
            await ws.send(message(1))
            assert await acked_ids(ws, 1) == [1]


@pytest.mark.parametrize(
    ("name", "value", "error", "words"),
    [
        ("drain_timeout", -1, ValueError, "drain_timeout must be a number of seconds >= 0"),
        ("drain_timeout", "10", TypeError, "drain_timeout must be a number"),
        ("health_path", "healthz", ValueError, "must be a URL path starting with '/'"),
        ("health_path", "/", ValueError, "must not be '/'"),
        ("health_path", "/h?x=1", ValueError, "no query"),
        ("health_path", 1, TypeError, "health_path must be a str or None"),
    ],
)
def test_drain_and_health_options_are_checked(
    tmp_path: Path, name: str, value: Any, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=re.escape(words)):
        Receiver(None, tmp_path / "inbox.db", **{name: value})


def test_health_url_from_a_receiver_url() -> None:
    assert health_url("ws://h:1/") == "http://h:1/healthz"
    assert health_url("wss://h:1") == "https://h:1/healthz"
    assert health_url("http://h:1/ops/ready") == "http://h:1/ops/ready"
    assert health_url("ws://h:1/", "/up") == "http://h:1/up"
    with pytest.raises(ValueError, match="not a receiver URL"):
        health_url("h:1")


async def test_health_over_tls_is_https_on_the_same_port(tmp_path: Path) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with serve(None, tmp_path / "inbox.db", ssl=server_context) as receiver:
        url = health_url(receiver.url)
        assert url.startswith("https://127.0.0.1:")
        trusted = await asyncio.to_thread(probe, url, context=client_context)
        assert trusted == Health(200, "ready")
        untrusted = await asyncio.to_thread(probe, url)  # the system CAs do not know it
        assert untrusted.status is None and "CERTIFICATE_VERIFY_FAILED" in untrusted.detail
