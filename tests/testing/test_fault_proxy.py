"""The fault proxy, driven through real sockets: a websockets echo server on port 0 behind it,
a real client in front, and raw TCP where a test must count bytes exactly.

Nothing here waits by sleeping: tests wait on the proxy's counters (``wait_until``), on
websockets' own futures, or on events, each bounded by ``asyncio.timeout``. The only fixed
waits are short windows in which something is proved *not* to happen, and the proxy makes
that certain by construction (the bytes are held inside it).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, WebSocketException
from websockets.protocol import State

from outbox.testing.fault_proxy import (
    ChunkFate,
    Fault,
    FaultPlan,
    FaultProxy,
    decide_accept,
    decide_chunk,
)

pytestmark = pytest.mark.timeout(5)

STEP = 1.0
"""Upper bound for any single wait on something that is certain to happen."""


# Fixtures and helpers


@pytest.fixture(autouse=True)
async def no_loop_errors(caplog: pytest.LogCaptureFixture) -> AsyncIterator[None]:
    """Fail a test if asyncio reported anything (a destroyed pending task, an exception never
    retrieved) or if the proxy logged a warning."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    caplog.set_level(logging.DEBUG, logger="outbox.testing.fault_proxy")
    try:
        yield
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert errors == []
    loud = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith(("outbox", "asyncio"))
    ]
    assert loud == []


async def _echo(ws: ServerConnection) -> None:
    """Echo every message; ``big:N`` asks for one message of N bytes instead."""
    prefix = ws.request.path.strip("/") if ws.request is not None else ""
    try:
        async for message in ws:
            if isinstance(message, str) and message.startswith("big:"):
                await ws.send("x" * int(message[4:]))
            elif prefix and isinstance(message, str):
                await ws.send(f"{prefix}:{message}")
            else:
                await ws.send(message)
    except ConnectionClosed:
        pass  # the proxy cut us: expected in these tests


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async with serve(_echo, "127.0.0.1", 0) as server:
        yield server.sockets[0].getsockname()[1]


@pytest.fixture
async def proxy(echo_port: int) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", echo_port, seed=1) as proxy:
        yield proxy


def ws_connect(proxy: FaultProxy, path: str = "/") -> connect:
    # proxy=None: ignore any HTTP proxy in the environment. ping_interval=None: the tests
    # decide when pings happen.
    return connect(
        proxy.url(path), proxy=None, ping_interval=None, open_timeout=STEP, close_timeout=STEP
    )


async def echo(ws: ClientConnection, message: str) -> str:
    await ws.send(message)
    async with asyncio.timeout(STEP):
        reply = await ws.recv()
    assert isinstance(reply, str)
    return reply


async def until(proxy: FaultProxy, predicate: Any) -> None:
    async with asyncio.timeout(STEP):
        await proxy.wait_until(predicate)


class RawServer(asyncio.Protocol):
    """A TCP server, one instance per connection, recording what it receives and echoing it
    back (when ``echo``)."""

    def __init__(self, log: RawLog) -> None:
        self.log = log

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.log.transports.append(transport)

    def data_received(self, data: bytes) -> None:
        self.log.received += data
        if self.log.echo:
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.log.lost.set()


class RawLog:
    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.received = bytearray()
        self.lost = asyncio.Event()
        self.transports: list[asyncio.Transport] = []


@contextlib.asynccontextmanager
async def raw_server(echo: bool) -> AsyncIterator[tuple[int, RawLog]]:
    log = RawLog(echo)
    server = await asyncio.get_running_loop().create_server(lambda: RawServer(log), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], log
    finally:
        server.close()
        for transport in log.transports:
            transport.abort()
        await server.wait_closed()


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """Everything the peer sent before its EOF or reset."""
    data = bytearray()
    with contextlib.suppress(ConnectionResetError):
        async with asyncio.timeout(STEP):
            while chunk := await reader.read(65536):
                data += chunk
    return bytes(data)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# Plain forwarding


async def test_forwards_both_ways_and_counts(proxy: FaultProxy) -> None:
    assert proxy.url() == f"ws://127.0.0.1:{proxy.port}/"
    assert proxy.url("feed") == proxy.url("/feed") == f"ws://127.0.0.1:{proxy.port}/feed"
    async with ws_connect(proxy) as ws:
        assert await echo(ws, "hello") == "hello"
        await ws.send(b"\x00\x01")
        async with asyncio.timeout(STEP):
            assert await ws.recv() == b"\x00\x01"
        assert proxy.active == 1
    await until(proxy, lambda: proxy.active == 0)
    stats = proxy.stats
    assert stats.accepted == 1
    assert stats.cuts == stats.refused == stats.upstream_failures == 0
    for direction in ("upstream", "downstream"):
        assert stats.forwarded[direction] > 0
        assert stats.forwarded[direction] == stats.received[direction]
    assert stats.as_dict()["forwarded_upstream"] == stats.forwarded["upstream"]


async def test_upstream_can_move_to_a_restarted_server(proxy: FaultProxy) -> None:
    async with ws_connect(proxy) as old, serve(_echo, "127.0.0.1", 0) as second:
        proxy.set_upstream("127.0.0.1", second.sockets[0].getsockname()[1])
        # The path makes the second server prefix its replies; the old connection is untouched.
        async with ws_connect(proxy, "/second") as new:
            assert await echo(new, "a") == "second:a"
        assert await echo(old, "b") == "b"


async def test_only_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("10.0.0.1", 80)
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("127.0.0.1", 80, host="0.0.0.0")
    proxy = FaultProxy("localhost", 80)
    assert proxy.upstream == ("127.0.0.1", 80)
    with pytest.raises(ValueError, match="loopback"):
        proxy.set_upstream("example.com", 80)


async def test_unreachable_upstream_resets_the_client() -> None:
    async with FaultProxy("127.0.0.1", free_port()) as proxy:
        with pytest.raises((OSError, WebSocketException)):
            async with ws_connect(proxy):
                pass
        await until(proxy, lambda: proxy.active == 0)
        assert proxy.stats.upstream_failures == 1


# Cuts


async def test_cut_all_resets_every_live_connection(proxy: FaultProxy) -> None:
    async with ws_connect(proxy) as a, ws_connect(proxy) as b:
        assert await echo(a, "1") == "1"
        assert await echo(b, "2") == "2"
        assert proxy.cut_all() == 2
        for ws in (a, b):
            with pytest.raises(ConnectionClosedError):
                async with asyncio.timeout(STEP):
                    await ws.recv()
            assert ws.close_code == 1006
    assert proxy.stats.faults[Fault.CUT_ALL] == 2
    assert proxy.stats.cuts == 2
    await until(proxy, lambda: proxy.active == 0)


async def test_cut_after_truncates_a_frame(proxy: FaultProxy) -> None:
    async with ws_connect(proxy) as ws:
        assert await echo(ws, "warm") == "warm"
        before = proxy.stats.forwarded["downstream"]
        proxy.cut_after(10, "downstream")
        await ws.send("big:1000")
        with pytest.raises(ConnectionClosedError):
            async with asyncio.timeout(STEP):
                await ws.recv()
        assert ws.close_code == 1006
    # Exactly 10 bytes of a frame over 1000 bytes long got through (the proxy stops reading
    # at the cut, so it may never have read the rest).
    assert proxy.stats.forwarded["downstream"] == before + 10
    assert proxy.stats.faults[Fault.CUT_AFTER] == 1


async def test_cut_after_downstream_delivers_exactly_the_prefix() -> None:
    async with raw_server(echo=True) as (port, _), FaultProxy("127.0.0.1", port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            proxy.cut_after(10, "downstream")
            writer.write(bytes(range(100)))
            assert await read_to_end(reader) == bytes(range(10))
        finally:
            await close_writer(writer)
        assert proxy.stats.faults[Fault.CUT_AFTER] == 1


async def test_cut_after_upstream_delivers_exactly_the_prefix() -> None:
    async with raw_server(echo=False) as (port, log), FaultProxy("127.0.0.1", port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            proxy.cut_after(5, "upstream")
            writer.write(b"0123456789")
            async with asyncio.timeout(STEP):
                await log.lost.wait()
            assert bytes(log.received) == b"01234"
            assert await read_to_end(reader) == b""
        finally:
            await close_writer(writer)


# Blackhole, refuse, delay


async def test_blackhole_holds_bytes_and_keeps_the_connection(proxy: FaultProxy) -> None:
    async with ws_connect(proxy) as ws:
        assert await echo(ws, "before") == "before"
        proxy.blackhole()
        received = proxy.stats.received["upstream"]
        forwarded = proxy.stats.forwarded["upstream"]
        pong = await ws.ping()
        # The ping reached the proxy and stays there, so no pong can come back.
        await until(proxy, lambda: proxy.stats.received["upstream"] > received)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pong), 0.05)
        assert proxy.stats.forwarded["upstream"] == forwarded
        assert ws.state is State.OPEN
        assert proxy.active == 1
        assert proxy.stats.cuts == 0
        # Lifting the blackhole delivers the held ping, in order: the stream is intact.
        proxy.blackhole(False)
        async with asyncio.timeout(STEP):
            await pong
        assert await echo(ws, "after") == "after"


async def test_refuse_fails_new_connections_only(proxy: FaultProxy) -> None:
    async with ws_connect(proxy) as live:
        proxy.refuse()
        with pytest.raises((OSError, WebSocketException)):
            async with ws_connect(proxy):
                pass
        assert await echo(live, "still here") == "still here"
        proxy.refuse(False)
        async with ws_connect(proxy) as again:
            assert await echo(again, "back") == "back"
    assert proxy.stats.faults[Fault.REFUSE] == 1
    assert proxy.stats.accepted == 3


async def test_delay_adds_latency_each_way(proxy: FaultProxy) -> None:
    async with ws_connect(proxy) as ws:
        proxy.set_delay(0.05)
        assert proxy.delay("upstream") == proxy.delay("downstream") == 0.05
        start = time.monotonic()
        assert await echo(ws, "slow") == "slow"
        assert time.monotonic() - start >= 0.1
        proxy.set_delay(0.0)
        assert await echo(ws, "fast") == "fast"


# Chaos


async def test_chaos_cut_after_the_handshake(proxy: FaultProxy) -> None:
    async with ws_connect(proxy) as ws:
        proxy.chaos(FaultPlan(cut_rate=1.0, max_faults=1))
        await ws.send("doomed")
        with pytest.raises(ConnectionClosedError):
            async with asyncio.timeout(STEP):
                await ws.recv()
    assert proxy.stats.faults[Fault.CHAOS_CUT] == 1
    # The budget is spent: the network is quiet again.
    async with ws_connect(proxy) as ws:
        assert await echo(ws, "fine") == "fine"


async def test_chaos_truncate_loses_bytes() -> None:
    async with raw_server(echo=False) as (port, log), FaultProxy("127.0.0.1", port) as proxy:
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            proxy.chaos(FaultPlan(truncate_rate=1.0))
            writer.write(b"x" * 100)
            async with asyncio.timeout(STEP):
                await log.lost.wait()
            assert len(log.received) < 100
            assert len(log.received) == proxy.stats.forwarded["upstream"]
            assert proxy.stats.faults[Fault.CHAOS_TRUNCATE] == 1
        finally:
            await close_writer(writer)


async def test_chaos_stall_delays_without_cutting(proxy: FaultProxy) -> None:
    async with ws_connect(proxy) as ws:
        proxy.chaos(FaultPlan(stall_rate=1.0, stall_seconds=0.05, max_faults=2))
        start = time.monotonic()
        assert await echo(ws, "stalled") == "stalled"
        assert time.monotonic() - start >= 0.1
    assert proxy.stats.faults[Fault.CHAOS_STALL] == 2
    assert proxy.stats.cuts == 0


async def test_chaos_refuse() -> None:
    async with (
        raw_server(echo=True) as (port, _),
        FaultProxy("127.0.0.1", port, plan=FaultPlan(refuse_rate=1.0, max_faults=1)) as proxy,
    ):
        for expected in (b"", b"ok"):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(b"ok")
                writer.write_eof()
                assert await read_to_end(reader) == expected
            finally:
                await close_writer(writer)
        assert proxy.stats.faults[Fault.CHAOS_REFUSE] == 1


# Shutdown


async def test_close_leaves_nothing_running(echo_port: int) -> None:
    proxy = FaultProxy("127.0.0.1", echo_port)
    await proxy.start()
    async with ws_connect(proxy) as held, ws_connect(proxy) as delayed:
        proxy.set_delay(30.0, "upstream")
        await delayed.send("parked in a delay")
        proxy.blackhole()
        await held.send("parked in the blackhole")
        await until(proxy, lambda: proxy.stats.received["upstream"] > 0)
        await proxy.close()
        assert [t for t in asyncio.all_tasks() if t.get_name().startswith("fault_proxy")] == []
        assert proxy.active == 0
        for ws in (held, delayed):
            async with asyncio.timeout(STEP):
                await ws.wait_closed()
            assert ws.close_code == 1006
    await proxy.close()  # idempotent


# The pure decision rule


def test_decide_chunk_is_deterministic_under_a_seed() -> None:
    plan = FaultPlan(cut_rate=0.2, truncate_rate=0.2, stall_rate=0.2, stall_seconds=1.0)

    def fates(seed: str) -> list[ChunkFate]:
        rng = random.Random(seed)
        return [decide_chunk(plan, rng, 100, i, 0) for i in range(200)]

    assert fates("a") == fates("a")
    assert fates("a") != fates("b")
    kinds = {fate.fault for fate in fates("a")}
    assert kinds == {None, Fault.CHAOS_CUT, Fault.CHAOS_TRUNCATE, Fault.CHAOS_STALL}
    for fate in fates("a"):
        if fate.fault is Fault.CHAOS_TRUNCATE:
            assert 0 <= fate.keep < 100
        else:
            assert fate.keep == 100
        assert fate.stall == (1.0 if fate.fault is Fault.CHAOS_STALL else 0.0)


def test_decide_chunk_draws_the_same_whatever_the_outcome() -> None:
    # Grace and budget do not shift the stream of draws.
    quiet, spent = random.Random(7), random.Random(7)
    for i in range(50):
        decide_chunk(FaultPlan(), quiet, 10, i, 0)
        decide_chunk(FaultPlan(cut_rate=1.0, max_faults=0), spent, 10, i, 0)
    assert quiet.random() == spent.random()


def test_grace_and_budget() -> None:
    rng = random.Random(1)
    plan = FaultPlan(cut_rate=1.0, grace_chunks=2, max_faults=3)
    assert decide_chunk(plan, rng, 10, 0, 0).fault is None
    assert decide_chunk(plan, rng, 10, 1, 0).fault is None
    assert decide_chunk(plan, rng, 10, 2, 2).fault is Fault.CHAOS_CUT
    assert decide_chunk(plan, rng, 10, 3, 3).fault is None
    assert decide_accept(FaultPlan(refuse_rate=1.0), rng, 0)
    assert not decide_accept(FaultPlan(refuse_rate=1.0, max_faults=0), rng, 0)
    assert not decide_accept(FaultPlan(), rng, 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cut_rate": 1.5},
        {"refuse_rate": -0.1},
        {"cut_rate": 0.6, "stall_rate": 0.6},
        {"stall_seconds": -1.0},
        {"grace_chunks": -1},
        {"max_faults": -1},
    ],
)
def test_plan_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FaultPlan(**kwargs)
