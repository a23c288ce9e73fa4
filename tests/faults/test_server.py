"""A server that misbehaves, and the client that must survive it.

What ``tests/test_outbox.py`` already covers is not repeated here (bad frames before any
ack, unknown ack ids, 401 backoff, 1012/1013, JSON pongs missing). This file adds: acks
repeated and acks or nacks for ids never sent, mixed with garbage, mid-stream; frames of
several megabytes; every close code from 1000 to 1015 and 4000, sent as raw close frames
(so the reserved ones a compliant stack refuses to send arrive too); a server that accepts
TCP and never answers the upgrade; one that completes the upgrade and then never sends a
byte (only the heartbeat notices); one that answers pings but never acks (messages become
dead after max_attempts, by design, and requeue_dead() brings them back); handshakes
refused with 401, 403, 404, 500 and 503. Each is logged with a clear line and survived.

Then a property: against a model server that drops, duplicates, delays (reorders) and
fakes acks and cuts connections, drawn by hypothesis, the real Outbox delivers every
message, first deliveries in id order, and marks acked only what the server received.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.server import Server, ServerConnection, serve

from outbox import Outbox, State
from outbox.protocol import wire
from outbox.testing.fault_proxy import FaultProxy

from ..chaos_support import outbox_statuses, read_outbox, report
from ..support import MS, ScriptedServer, fast_options, wait_until

pytestmark = pytest.mark.timeout(30)

FAST = fast_options(
    max_attempts=None,
    open_timeout=2000 * MS,
    close_timeout=100 * MS,
)


@pytest.fixture(autouse=True)
def outbox_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="outbox")


# ---------------------------------------------------------------------------------------------
# A server whose every answer the test decides
# ---------------------------------------------------------------------------------------------

Answer = Callable[[ServerConnection, int, int], Awaitable[None]]
"""``answer(ws, connection number, message id)``: what the server sends for one message."""


@dataclass
class Misbehaving:
    """A real websockets server. For each message it calls ``answer`` (default: one ack);
    ``on_connect(ws, n)`` runs first on each connection and may end it (return False)."""

    answer: Answer | None = None
    on_connect: Callable[[ServerConnection, int], Awaitable[bool]] | None = None
    compression: str | None = None
    received: list[tuple[int, int]] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _server: Server | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def first_seen(self) -> list[int]:
        return list(dict.fromkeys(message_id for _, message_id in self.received))

    async def __aenter__(self) -> Misbehaving:
        self._server = await serve(
            self._handle, "127.0.0.1", self.port, compression=self.compression, max_size=None
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close(close_connections=False)
        for ws in list(self._server.connections):
            ws.transport.abort()
        await self._server.wait_closed()

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        number = self.connections
        with contextlib.suppress(Exception):
            if self.on_connect is not None and not await self.on_connect(ws, number):
                return
            async for frame in ws:
                obj = json.loads(frame)
                items = obj["messages"] if obj.get("type") == "batch" else [obj]
                for item in items:
                    self.received.append((number, item["id"]))
                    if self.answer is None:
                        await ws.send(wire.encode_ack(item["id"]))
                    else:
                        await self.answer(ws, number, item["id"])


def assert_delivered(db: Path, server: Misbehaving, ids: list[int]) -> None:
    """Every row acked, every id received by the server, first receipts in id order."""
    assert outbox_statuses(db) == {"acked": len(ids)}
    assert server.first_seen() == sorted(ids)


# ---------------------------------------------------------------------------------------------
# Acks repeated, acks and nacks for ids never sent, garbage between them
# ---------------------------------------------------------------------------------------------


async def test_repeated_and_unknown_acks_and_garbage_mid_stream(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def answer(ws: ServerConnection, _: int, message_id: int) -> None:
        await ws.send("{not json")
        await ws.send(wire.encode_ack(message_id + 10**9))  # never sent, never will be
        await ws.send(wire.encode_nack(message_id + 10**9, "no such message"))
        await ws.send(b"\x00\x01binary")
        await ws.send('{"type": "ack"}')  # no id
        await ws.send('{"type": "ack", "messageIds": "all"}')
        await ws.send(wire.encode_acks([message_id, message_id, message_id]))
        await ws.send(wire.encode_ack(message_id))  # and again, alone
        if message_id > 1:
            await ws.send(wire.encode_ack(message_id - 1))  # an old one, long acked

    async with Misbehaving(answer=answer) as server, Outbox(db, server.url, **FAST) as box:
        ids = await box.send_many([{"i": i} for i in range(30)])
        await box.drain(timeout=10)
        counters = box.stats().counters
    assert_delivered(db, server, ids)
    assert server.connections == 1, "a misbehaving peer is not a broken connection"
    assert counters.protocol_errors == 4 * 30
    assert counters.unknown_acks >= 3 * 30
    assert counters.nacks == 0 and box.stats().dead == 0
    logged = caplog.text
    assert "ignoring a bad frame from the server: frame from the server is not JSON" in logged
    assert "unexpected binary frame (8 bytes) from the server" in logged
    assert "ack for id(s) not in flight (late or repeated)" in logged
    assert "nack for id 1000000001, which is not in flight; ignored" in logged
    report(
        f"[repeated/unknown acks + garbage] messages=30 connections=1 "
        f"protocol_errors={counters.protocol_errors} unknown_acks={counters.unknown_acks}"
    )


# ---------------------------------------------------------------------------------------------
# Huge frames
# ---------------------------------------------------------------------------------------------


async def test_huge_frames_from_the_server(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An 8 MiB text frame that is not JSON, an 8 MiB binary frame, and a 1.6 MB ack naming
    200,000 ids nobody sent, under a max_server_frame raised to 16 MiB: logged, ignored,
    survived on the same connection. (Under the default 1 MiB cap each would close the
    connection with 1009: see the tests below.)"""
    huge_text = "x" * (8 << 20)
    huge_binary = b"\xff" * (8 << 20)
    huge_ack = wire.encode_acks(list(range(10**6, 10**6 + 200_000)))

    async def on_connect(ws: ServerConnection, _: int) -> bool:
        for frame in (huge_text, huge_binary, huge_ack):
            await ws.send(frame)
        return True

    async with (
        Misbehaving(on_connect=on_connect) as server,
        Outbox(db, server.url, **FAST, max_server_frame=16 << 20) as box,
    ):
        ids = await box.send_many([{"i": i} for i in range(10)])
        await box.drain(timeout=20)
        counters = box.stats().counters
    assert_delivered(db, server, ids)
    assert server.connections == 1
    assert counters.protocol_errors == 2 and counters.unknown_acks == 200_000
    assert "ignoring a bad frame from the server" in caplog.text
    assert "8388608 bytes" in caplog.text  # the binary frame's size, not its content


async def test_a_frame_over_max_server_frame_closes_with_1009_then_delivery_goes_on(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first two connections get a 2 MiB frame: the client closes each with 1009, says
    why, backs off and reconnects; once the server's frames fit, everything is delivered."""
    close_codes: list[int | None] = []

    async def on_connect(ws: ServerConnection, number: int) -> bool:
        if number <= 2:
            await ws.send("x" * (2 << 20))
            await ws.wait_closed()
            close_codes.append(ws.close_code)
            return False
        return True

    async with Misbehaving(on_connect=on_connect) as server, Outbox(db, server.url, **FAST) as box:
        ids = await box.send_many([{"i": i} for i in range(10)])
        await box.drain(timeout=10)
    assert_delivered(db, server, ids)
    assert server.connections == 3 and close_codes == [1009, 1009]
    drops = [r.getMessage() for r in caplog.records if "failed or dropped" in r.getMessage()]
    assert len(drops) == 2, drops
    assert "larger than max_server_frame=1048576 bytes" in drops[0], drops[0]
    assert "closed the connection with 1009" in drops[0]


async def test_our_own_1009_on_a_frame_of_the_server_does_not_blame_our_messages(
    db: Path,
) -> None:
    """The client refuses the server's 2 MiB frame (1009) while messages are in flight: that
    is the server's fault, so with max_attempts=1 nothing becomes dead."""

    async def on_connect(ws: ServerConnection, number: int) -> bool:
        if number <= 2:
            await ws.recv()  # a message of ours is in flight now
            await ws.send("x" * (2 << 20))
            await ws.wait_closed()
            return False
        return True

    options = {**FAST, "max_attempts": 1}
    async with (
        Misbehaving(on_connect=on_connect) as server,
        Outbox(db, server.url, **options) as box,
    ):
        ids = await box.send_many([{"i": i} for i in range(10)])
        await box.drain(timeout=10)
        assert box.stats().dead == 0
    assert_delivered(db, server, ids)


def assert_backoff_grows(times: list[float], first: float) -> None:
    """The gaps between connection attempts follow the doubling delay (no jitter)."""
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for n, gap in enumerate(gaps):
        assert gap >= 0.9 * first * 2**n, gaps


@pytest.mark.parametrize("ack_first", [False, True], ids=["at-once", "after-an-ack"])
async def test_an_oversized_frame_on_every_connection_gets_a_growing_backoff(
    db: Path, ack_first: bool
) -> None:
    """Every connection gets a 2 MiB frame, at once or right after an ack (a sign of life
    that would otherwise reset the backoff): the delay doubles, no hot loop, and what the
    server never acked stays pending."""
    times: list[float] = []

    async def on_connect(ws: ServerConnection, number: int) -> bool:
        times.append(time.monotonic())
        if not ack_first:
            await ws.send("x" * (2 << 20))
        return True

    async def answer(ws: ServerConnection, number: int, message_id: int) -> None:
        await ws.send(wire.encode_ack(message_id))
        await ws.send("x" * (2 << 20))

    options = {**FAST, "reconnect_interval": 0.02, "reconnect_max_interval": 10.0}
    async with (
        Misbehaving(on_connect=on_connect, answer=answer) as server,
        Outbox(db, server.url, **options, reconnect_jitter=0.0) as box,
    ):
        await box.send_many([{"i": i} for i in range(50)])
        await wait_until(lambda: len(times) >= 6, timeout=10)
        pending = box.stats().pending
    assert_backoff_grows(times[:6], 0.02)
    if ack_first:
        assert 0 < pending < 50  # at most a few acks per connection got through
    else:
        assert pending == 50 and outbox_statuses(db) == {"pending": 50}


async def test_a_compressed_frame_that_inflates_past_the_cap_is_refused(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """permessage-deflate: 4 MiB of "x" is a few kilobytes on the wire; websockets' max_size
    bounds the inflated size, so the client refuses it (1009) instead of inflating it."""
    close_codes: list[int | None] = []

    async def on_connect(ws: ServerConnection, number: int) -> bool:
        if number == 1:
            assert ws.protocol.extensions, "the test needs permessage-deflate negotiated"
            await ws.send("x" * (4 << 20))
            await ws.wait_closed()
            close_codes.append(ws.close_code)
            return False
        return True

    async with (
        Misbehaving(on_connect=on_connect, compression="deflate") as server,
        Outbox(db, server.url, **FAST, compression=True) as box,
    ):
        ids = await box.send_many([{"i": i} for i in range(5)])
        await box.drain(timeout=10)
    assert_delivered(db, server, ids)
    assert close_codes == [1009]
    assert "larger than max_server_frame=1048576 bytes" in caplog.text


# ---------------------------------------------------------------------------------------------
# Every close code
# ---------------------------------------------------------------------------------------------


def raw_close(code: int, reason: bytes = b"scripted") -> bytes:
    """A server-to-client close frame (unmasked), whatever the code: reserved codes that
    websockets refuses to send (1004, 1005, 1006, 1015) go out too."""
    body = code.to_bytes(2, "big") + reason
    return bytes([0x88, len(body)]) + body


CLOSE_CODES = [*range(1000, 1016), 4000]


@pytest.mark.parametrize("code", CLOSE_CODES)
async def test_every_close_code(db: Path, caplog: pytest.LogCaptureFixture, code: int) -> None:
    """The first two connections are closed with ``code`` right after the first message
    arrives, before its ack; the client reconnects, resends, and delivers everything."""

    async def answer(ws: ServerConnection, number: int, message_id: int) -> None:
        if number <= 2:
            ws.transport.write(raw_close(code))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ws.wait_closed(), 1)
            ws.transport.abort()
            raise ConnectionError("closed by the script")
        await ws.send(wire.encode_ack(message_id))

    async with Misbehaving(answer=answer) as server, Outbox(db, server.url, **FAST) as box:
        ids = await box.send_many([{"i": i} for i in range(5)])
        await box.drain(timeout=10)
        reconnects = box.stats().reconnects
    assert_delivered(db, server, ids)
    assert reconnects == 2 and box.stats().dead == 0
    said = ("failed or dropped", "the server closed the connection")
    records = [r for r in caplog.records if any(s in r.getMessage() for s in said)]
    drops = [r.getMessage() for r in records]
    assert len(drops) == 2, drops
    # A clean close (1000 normal, 1001 going away, 1012 service restart: a drain) is the
    # server's choice, not a failure.
    expected = logging.INFO if code in (1000, 1001, 1012) else logging.WARNING
    assert {r.levelno for r in records} == {expected}, drops
    if code in (1004, 1005, 1006, 1015):
        # Reserved: never valid in a close frame. websockets fails the connection (1002 from
        # our side) and the log can only say it ended abnormally; it does not say why.
        assert "(code 1006, reason '')" in drops[0], drops[0]
    else:
        assert f"(code {code}, reason 'scripted')" in drops[0], drops[0]


# ---------------------------------------------------------------------------------------------
# Servers that never answer
# ---------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def silent_tcp_server(upgrade: bool) -> AsyncIterator[int]:
    """Accepts TCP and reads forever. With ``upgrade``, first completes the WebSocket
    handshake by hand (so the client is CONNECTED), then never sends another byte: no pong,
    no ack, no close."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(Exception):
            if upgrade:
                request = await reader.readuntil(b"\r\n\r\n")
                key = next(
                    line.split(b":", 1)[1].strip()
                    for line in request.split(b"\r\n")
                    if line.lower().startswith(b"sec-websocket-key:")
                )
                accept = base64.b64encode(
                    hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
                )
                writer.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                )
            while await reader.read(65536):
                pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        await server.wait_closed()


async def test_a_server_that_never_answers_the_upgrade(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = {**FAST, "open_timeout": 100 * MS}
    async with (
        silent_tcp_server(upgrade=False) as silent_port,
        ScriptedServer() as good,
        FaultProxy("127.0.0.1", silent_port) as proxy,
        Outbox(db, proxy.url(), **options) as box,
    ):
        ids = await box.send_many([{"i": i} for i in range(10)])
        await wait_until(lambda: proxy.stats.accepted >= 3, timeout=5)
        assert box.state is not State.CONNECTED and box.stats().pending == 10
        proxy.set_upstream("127.0.0.1", good.port)
        await box.drain(timeout=10)
    assert "timed out opening the connection (open_timeout)" in caplog.text
    assert good.ids() == ids and outbox_statuses(db) == {"acked": 10}


async def test_a_server_that_upgrades_then_never_sends_a_byte(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No pong, no ack: only the heartbeat can tell. The ack timeout is longer than the
    heartbeat needs, so nothing is counted as an attempt and nothing goes dead."""
    options = {
        **FAST,
        "heartbeat_interval": 50 * MS,
        "heartbeat_timeout": 50 * MS,
        "max_missed_heartbeats": 2,
        "ack_timeout": 2000 * MS,
        "max_attempts": 1,
    }
    async with (
        silent_tcp_server(upgrade=True) as silent_port,
        ScriptedServer() as good,
        FaultProxy("127.0.0.1", silent_port) as proxy,
        Outbox(db, proxy.url(), **options) as box,
    ):
        ids = await box.send_many([{"i": i} for i in range(10)])
        await wait_until(lambda: box.stats().counters.heartbeat_misses >= 4, timeout=10)
        assert box.stats().pending == 10
        proxy.set_upstream("127.0.0.1", good.port)
        await box.drain(timeout=10)
        misses = box.stats().counters.heartbeat_misses
    assert "no pong and no other frame for 2 heartbeats" in caplog.text
    assert good.ids() == ids and outbox_statuses(db) == {"acked": 10}
    report(f"[server upgrades then silent] heartbeat misses {misses}, messages 10, dead 0")


async def test_a_server_that_answers_pings_but_never_acks(db: Path) -> None:
    """The connection is alive (pongs come back), so ack timeouts do count: after
    max_attempts the rows are dead with the reason. That is the rule; requeue_dead() sends
    them again once the server is fixed."""
    acking = False

    async def answer(ws: ServerConnection, _: int, message_id: int) -> None:
        if acking:
            await ws.send(wire.encode_ack(message_id))

    options = {**FAST, "ack_timeout": 50 * MS, "max_attempts": 2, "heartbeat_interval": 20 * MS}
    async with Misbehaving(answer=answer) as server, Outbox(db, server.url, **options) as box:
        ids = await box.send_many([{"i": i} for i in range(5)])
        await wait_until(lambda: box.stats().dead == 5, timeout=5)
        reasons = {row.last_error for row in read_outbox(db)[1]}
        assert reasons == {f"no ack within {50 * MS}s, 2 times"}
        assert server.connections == 1  # alive all along: pongs kept coming
        acking = True
        assert await box.requeue_dead() == 5
        await box.drain(timeout=5)
    assert outbox_statuses(db) == {"acked": 5}
    assert set(server.first_seen()) == set(ids)


# ---------------------------------------------------------------------------------------------
# Handshakes refused
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "hint"),
    [
        (401, "check the credentials"),
        (403, "refuses this client"),
        (404, "check the URL path"),
        (500, "not accepting WebSocket connections right now"),
        (503, "not accepting WebSocket connections right now"),
    ],
)
async def test_handshake_refused_with_an_http_status(
    db: Path, caplog: pytest.LogCaptureFixture, status: int, hint: str
) -> None:
    async with (
        ScriptedServer(refuse_status=status) as server,
        Outbox(db, server.url, **FAST) as box,
    ):
        ids = await box.send_many(["a", "b"])
        await wait_until(lambda: len(server.handshakes) >= 3, timeout=5)
        assert box.stats().pending == 2
        server.refuse_status = None
        await box.drain(timeout=10)
    refusals = [r.getMessage() for r in caplog.records if f"HTTP {status}" in r.getMessage()]
    assert len(refusals) >= 3 and all(hint in line for line in refusals), refusals[:1]
    assert "the server answered the handshake with HTTP" in refusals[0]
    assert server.ids() == ids


# ---------------------------------------------------------------------------------------------
# Closing while the server keeps dropping the connection
# ---------------------------------------------------------------------------------------------


async def test_close_returns_while_the_server_keeps_closing_connections(db: Path) -> None:
    """Open, wait for a connection (which the server closes at once with 1013), yield to
    the loop k times, close: k sweeps the moment of the close across the session's end."""
    options = {**FAST, "reconnect_max_interval": 20 * MS}
    hung_at: int | None = None
    async with ScriptedServer(close_code=1013) as server:
        for k in range(300):
            box = Outbox(db, server.url, **options)
            await box.open()
            await wait_until(lambda box=box: box.state is State.CONNECTED, timeout=5)
            for _ in range(k % 40):
                await asyncio.sleep(0)
            closing = asyncio.create_task(box.close())
            done, _ = await asyncio.wait({closing}, timeout=1.0)
            if not done:
                hung_at = k
                # Clean up: with nothing listening no session can start, and a second
                # cancellation of the supervisor is then honoured.
                await server.stop()
                while not closing.done():
                    for task in asyncio.all_tasks():
                        if task.get_name() == "outbox-supervisor":
                            task.cancel()
                    await asyncio.wait({closing}, timeout=0.2)
                break
    report(f"[close while the server closes every connection] hung at close #{hung_at}")
    assert hung_at is None, f"Outbox.close() did not return within 1 s (close #{hung_at})"


# ---------------------------------------------------------------------------------------------
# Property: a lossy, lying, reordering server
# ---------------------------------------------------------------------------------------------

ACTIONS = ("ack", "drop", "dup", "hold", "bogus", "cut")


@dataclass
class ModelServer:
    """Answers each received message by the next action of ``script`` (then honestly):

    - ack: ack it; drop: say nothing (the client must time out and resend);
    - dup: ack it twice; bogus: ack an id nobody sent, and not this one;
    - hold: ack it only after the next message's answer (acks out of order);
    - cut: drop the TCP connection without acking (the client must resend from the store).
    """

    script: list[str]
    received: list[tuple[int, int]] = field(default_factory=list)
    connections: int = 0

    async def handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        number = self.connections
        held: list[int] = []
        with contextlib.suppress(Exception):
            async for frame in ws:
                obj = json.loads(frame)
                items = obj["messages"] if obj.get("type") == "batch" else [obj]
                for item in items:
                    message_id = item["id"]
                    self.received.append((number, message_id))
                    action = self.script.pop(0) if self.script else "ack"
                    if action == "cut":
                        ws.transport.abort()
                        return
                    frames = {
                        "ack": [wire.encode_ack(message_id)],
                        "dup": [wire.encode_ack(message_id)] * 2,
                        "bogus": [wire.encode_ack(10**9 + message_id)],
                        "drop": [],
                        "hold": [],
                    }[action]
                    if action != "hold":
                        frames += [wire.encode_ack(h) for h in held]
                        held.clear()
                    else:
                        held.append(message_id)
                    for out in frames:
                        await ws.send(out)


async def run_against_model(script: list[str], sizes: list[int], batch_window: int) -> None:
    server = ModelServer(list(script))
    options = {
        **FAST,
        "ack_timeout": 50 * MS,
        "reconnect_interval": 5 * MS,
        "reconnect_max_interval": 10 * MS,
        "max_inflight": batch_window,
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "outbox.db"
        async with serve(server.handle, "127.0.0.1", 0, compression=None) as ws_server:
            port = ws_server.sockets[0].getsockname()[1]
            async with Outbox(db, f"ws://127.0.0.1:{port}/", **options) as box:
                ids: list[int] = []
                for size in sizes:  # several commits, so rows arrive while others fly
                    ids += await box.send_many([{"n": len(ids) + i} for i in range(size)])
                await box.drain(timeout=15)
                counters = box.stats().counters
            ws_server.close()
        rows = read_outbox(db)[1]
    context = f"script={script} sizes={sizes} window={batch_window}"
    received = [message_id for _, message_id in server.received]
    assert [row.status for row in rows] == ["acked"] * len(ids), context
    # Nothing acked that the server never received, nothing lost.
    assert set(received) == set(ids), context
    # First deliveries in id order, whatever was dropped, held, faked or cut.
    assert list(dict.fromkeys(received)) == sorted(ids), context
    # Every copy beyond the first was a resend the client counted (timeouts, reconnects).
    assert counters.resends >= len(received) - len(ids), context
    assert time.monotonic() - started < 15, context


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    script=st.lists(st.sampled_from(ACTIONS), max_size=25),
    sizes=st.lists(st.integers(1, 8), min_size=1, max_size=4),
    batch_window=st.sampled_from([1, 3, 1000]),
)
def test_property_lossy_lying_reordering_server(
    script: list[str], sizes: list[int], batch_window: int
) -> None:
    asyncio.run(run_against_model(script, sizes, batch_window))
