"""A fault-injecting TCP proxy: the network between client and receiver, made to fail on cue.

outbox promises delivery across dead sockets, truncated frames, silent partitions and refused
reconnects. A real network produces those rarely and never on cue, so the tests and the chaos
soak put this proxy between the client and the receiver and tell it when and how to fail.

What each fault does at the socket level:

- **cut** (``cut_all``, ``cut_after``, chaos cuts): both sockets of a connection are closed
  with ``SO_LINGER`` 0, so each peer receives a TCP RST (``ECONNRESET``, or EOF if it was
  already half-closed). Bytes still in the proxy's own buffers are dropped. ``cut_after``
  first hands the truncated prefix to the kernel, so the peer reads exactly those bytes and
  then the reset: a WebSocket frame cut in the middle.
- **delay**: each chunk is stamped when it is read and written no earlier than
  ``stamp + delay``. It is latency, not a bandwidth limit: chunks in flight are pipelined.
- **blackhole**: nothing is written in either direction; both TCP connections stay open.
  The proxy keeps reading into a bounded queue and then stops reading, so the senders' kernel
  buffers fill exactly as on a partitioned path. Held bytes are delivered in order when the
  blackhole lifts (TCP would retransmit them too), so the byte stream is never corrupted.
- **refuse**: new connections are accepted and reset at once (the peer's handshake fails);
  live connections carry on.
- **chaos** (:class:`FaultPlan`): after reading each chunk, a seeded draw decides whether to
  stall it, truncate it and cut, or forward it and cut. The decision rule is the pure function
  :func:`decide_chunk`, tested without sockets.

Every background task has an owner: the proxy owns one task per connection, and that task owns
its four pump tasks through a :class:`asyncio.TaskGroup`. ``close()`` resets every connection,
cancels and awaits every task, and closes the listener.

Only loopback addresses are accepted, for listening and for the upstream: this is a test tool.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

__all__ = [
    "ChunkFate",
    "Direction",
    "Fault",
    "FaultPlan",
    "FaultProxy",
    "FaultStats",
    "decide_accept",
    "decide_chunk",
]

logger = logging.getLogger(__name__)

Direction = Literal["upstream", "downstream"]
"""``upstream`` is client to server, ``downstream`` is server to client."""

DIRECTIONS: tuple[Direction, Direction] = ("upstream", "downstream")

_CHUNK_SIZE = 65536
# Chunks read but not yet written, per direction: bounds memory while blackholed or delayed,
# after which the proxy stops reading and TCP flow control pushes back on the sender.
_QUEUE_CHUNKS = 64
# How long a cut waits for the truncated prefix to leave the proxy's buffer.
_FLUSH_TIMEOUT = 1.0
_CLOSE_TIMEOUT = 5.0
_CLOCK_RESOLUTION = time.get_clock_info("monotonic").resolution


class Fault(enum.StrEnum):
    """Every kind of fault the proxy injects; :attr:`FaultStats.faults` counts them."""

    CUT_ALL = "cut_all"
    CUT_AFTER = "cut_after"
    REFUSE = "refuse"
    CHAOS_CUT = "chaos_cut"
    CHAOS_TRUNCATE = "chaos_truncate"
    CHAOS_STALL = "chaos_stall"
    CHAOS_REFUSE = "chaos_refuse"
    CUT_UPSTREAM = "cut_upstream"
    """A round-robin proxy's connections to one upstream, cut because it was killed."""


_CUTS = frozenset(
    {Fault.CUT_ALL, Fault.CUT_AFTER, Fault.CHAOS_CUT, Fault.CHAOS_TRUNCATE, Fault.CUT_UPSTREAM}
)
_REFUSALS = frozenset({Fault.REFUSE, Fault.CHAOS_REFUSE})


@dataclass(frozen=True)
class FaultPlan:
    """Random faults for a soak. Rates are probabilities per chunk (per connection for
    ``refuse_rate``); ``cut_rate + truncate_rate + stall_rate`` must not exceed 1.

    ``grace_chunks`` spares the first chunks of each direction of each connection, so a soak
    can let the WebSocket handshake through. ``max_faults`` bounds the chaos faults injected
    over the proxy's life, so a soak always ends with a quiet network.
    """

    cut_rate: float = 0.0
    truncate_rate: float = 0.0
    stall_rate: float = 0.0
    stall_seconds: float = 0.0
    refuse_rate: float = 0.0
    grace_chunks: int = 0
    max_faults: int | None = None

    def __post_init__(self) -> None:
        rates = (self.cut_rate, self.truncate_rate, self.stall_rate, self.refuse_rate)
        if not all(0.0 <= rate <= 1.0 for rate in rates):
            raise ValueError("fault rates must be between 0 and 1")
        if self.cut_rate + self.truncate_rate + self.stall_rate > 1.0:
            raise ValueError("cut_rate + truncate_rate + stall_rate must not exceed 1")
        if self.stall_seconds < 0 or self.grace_chunks < 0:
            raise ValueError("stall_seconds and grace_chunks must not be negative")
        if self.max_faults is not None and self.max_faults < 0:
            raise ValueError("max_faults must not be negative")


@dataclass(frozen=True)
class ChunkFate:
    """What happens to one chunk: wait ``stall`` seconds, forward its first ``keep`` bytes,
    then cut the connection if ``fault`` is a cut."""

    keep: int
    fault: Fault | None = None
    stall: float = 0.0


def decide_chunk(
    plan: FaultPlan, rng: random.Random, size: int, index: int, spent: int
) -> ChunkFate:
    """Decide the fate of chunk number ``index`` (``size`` bytes) of one direction.

    Always draws exactly two numbers, whatever the outcome, so the stream of decisions for a
    given seed does not shift when a rate, the grace or the budget (``spent`` chaos faults so
    far) changes.
    """
    roll, point = rng.random(), rng.random()
    if index < plan.grace_chunks or (plan.max_faults is not None and spent >= plan.max_faults):
        return ChunkFate(keep=size)
    if roll < plan.cut_rate:
        return ChunkFate(keep=size, fault=Fault.CHAOS_CUT)
    roll -= plan.cut_rate
    if roll < plan.truncate_rate:
        # Strictly fewer than `size` bytes, so something is always lost.
        return ChunkFate(keep=int(point * size), fault=Fault.CHAOS_TRUNCATE)
    roll -= plan.truncate_rate
    if roll < plan.stall_rate:
        return ChunkFate(keep=size, fault=Fault.CHAOS_STALL, stall=plan.stall_seconds)
    return ChunkFate(keep=size)


def decide_accept(plan: FaultPlan, rng: random.Random, spent: int) -> bool:
    """True if a new connection is to be refused. Always draws exactly one number."""
    roll = rng.random()
    if plan.max_faults is not None and spent >= plan.max_faults:
        return False
    return roll < plan.refuse_rate


@dataclass
class FaultStats:
    """Counters a test asserts on and a soak prints. ``accepted`` counts every TCP accept,
    refused ones included; bytes are counted per :data:`Direction`."""

    accepted: int = 0
    upstream_failures: int = 0
    faults: Counter[Fault] = field(default_factory=Counter)
    received: dict[Direction, int] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0))
    forwarded: dict[Direction, int] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0))

    @property
    def cuts(self) -> int:
        """Connections cut by the proxy, whatever the kind of cut."""
        return sum(self.faults[kind] for kind in _CUTS)

    @property
    def refused(self) -> int:
        return sum(self.faults[kind] for kind in _REFUSALS)

    @property
    def chaos_faults(self) -> int:
        return sum(n for kind, n in self.faults.items() if kind.startswith("chaos_"))

    def as_dict(self) -> dict[str, int]:
        """A flat copy for printing or for comparing before and after."""
        flat = {
            "accepted": self.accepted,
            "upstream_failures": self.upstream_failures,
            "cuts": self.cuts,
            "refused": self.refused,
        }
        flat.update({kind.value: self.faults[kind] for kind in Fault})
        for direction in DIRECTIONS:
            flat[f"received_{direction}"] = self.received[direction]
            flat[f"forwarded_{direction}"] = self.forwarded[direction]
        return flat


def _loopback(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ValueError(f"{host!r} is not a loopback address; the fault proxy stays on loopback")
    return host


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a socket so the peer gets a TCP RST, dropping whatever is still buffered."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # Fails only if the socket is already closed, and then the abort below is enough.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _sleep_until(due: float) -> None:
    # asyncio fires a timer up to one clock resolution early; the delay is a promised lower
    # bound, so add that resolution back.
    left = due - asyncio.get_running_loop().time()
    if left > 0:
        await asyncio.sleep(left + _CLOCK_RESOLUTION)


async def _flush(writer: asyncio.StreamWriter) -> None:
    """Wait until everything written has left the proxy's buffer for the kernel."""
    writer.transport.set_write_buffer_limits(high=0)
    try:
        async with asyncio.timeout(_FLUSH_TIMEOUT):
            await writer.drain()
    except (OSError, TimeoutError):
        pass  # the peer is gone or not reading; the cut goes ahead regardless


class _Link:
    """One proxied connection: the client's socket, the upstream socket, and the task that
    owns both."""

    def __init__(self, number: int, client: asyncio.StreamWriter, seed: int) -> None:
        self.number = number
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.dead = False
        self.client_done = False
        """The client closed its side (EOF): nobody is waiting on this connection's answers."""
        self.flowing = asyncio.Event()
        """Cleared: this connection alone is blackholed (see ``RoundRobinProxy.partition``)."""
        self.flowing.set()
        # One stream of draws per connection and direction, so the chaos decisions for one
        # connection do not depend on how the other connections' chunks interleave.
        self.rngs: dict[Direction, random.Random] = {
            d: random.Random(f"{seed}:{number}:{d}") for d in DIRECTIONS
        }

    def writers(self) -> list[asyncio.StreamWriter]:
        return [self.client] if self.upstream is None else [self.client, self.upstream]

    def kill(self) -> None:
        """Reset both sockets and cancel the link's task (and with it every pump)."""
        if self.dead:
            return
        self.dead = True
        for writer in self.writers():
            _reset(writer)
        if self.task is not None:
            self.task.cancel()

    def close(self) -> None:
        """Normal end: both sides sent EOF and every byte was forwarded."""
        self.dead = True
        for writer in self.writers():
            writer.close()


class FaultProxy:
    """A TCP proxy on loopback that forwards to ``(upstream_host, upstream_port)`` and
    injects faults on command or, with a :class:`FaultPlan`, at random under ``seed``.

    Usage::

        async with FaultProxy("127.0.0.1", server_port, seed=1) as proxy:
            async with connect(proxy.url(), proxy=None) as ws:
                proxy.cut_all()

    Every method is to be called from the event loop's thread.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        seed: int | None = None,
        plan: FaultPlan | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        self._host = _loopback(host)
        self._requested_port = port
        self._upstream = (_loopback(upstream_host), upstream_port)
        # Without a seed, pick one and keep it, so a failing soak can print and replay it.
        self.seed: int = random.randrange(2**32) if seed is None else seed
        self._plan = plan
        self._accept_rng = random.Random(f"{self.seed}:accept")
        self.connect_timeout = connect_timeout
        self.stats = FaultStats()

        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._closing = False
        self._closed = asyncio.Event()
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refusing = False
        self._delay: dict[Direction, float] = dict.fromkeys(DIRECTIONS, 0.0)
        self._cut_after: dict[Direction, int | None] = dict.fromkeys(DIRECTIONS)

    # Life cycle

    async def start(self) -> None:
        """Bind the listener; returns once connections are accepted."""
        if self._server is not None or self._closing:
            raise RuntimeError("a FaultProxy is started once")
        self._server = await asyncio.start_server(self._on_accept, self._host, self._requested_port)
        self._port = self._server.sockets[0].getsockname()[1]
        logger.debug("fault proxy listening on port %d", self._port)

    async def close(self) -> None:
        """Stop listening, reset every connection, and wait for every task to end."""
        if self._closing:
            await self._closed.wait()  # a second caller returns when the first is done
            return
        self._closing = True
        try:
            await self._shut_down()
        finally:
            self._closed.set()

    async def _shut_down(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.kill()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_CLOSE_TIMEOUT)
            if pending:
                logger.warning("fault proxy: %d tasks did not end on close", len(pending))
        if self._server is not None:
            try:
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await self._server.wait_closed()
            except TimeoutError:
                logger.warning("fault proxy: listener did not close in time")
        # One pass of the loop, so the aborted transports run connection_lost and close
        # their sockets before the caller moves on.
        await asyncio.sleep(0)

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # Addresses

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the FaultProxy is not started")
        return self._port

    def url(self, path: str = "/") -> str:
        """``ws://127.0.0.1:PORT/path`` for the client to connect to."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"ws://{host}:{self.port}/{path.lstrip('/')}"

    @property
    def upstream(self) -> tuple[str, int]:
        return self._upstream

    def set_upstream(self, host: str, port: int) -> None:
        """Send new connections elsewhere (a restarted server); live ones are untouched."""
        self._upstream = (_loopback(host), port)

    @property
    def active(self) -> int:
        """Connections currently proxied."""
        return len(self._links)

    # Faults

    def cut_all(self) -> int:
        """Reset every live connection now; returns how many were cut."""
        links = [link for link in self._links if not link.dead]
        for link in links:
            self._cut(link, Fault.CUT_ALL)
        return len(links)

    def cut_after(self, n_bytes: int, direction: Direction = "downstream") -> None:
        """Forward only the next ``n_bytes`` in ``direction`` (counted across connections),
        then reset the connection that carried the last of them. One shot; arming again
        replaces the count."""
        if n_bytes < 0:
            raise ValueError("n_bytes must not be negative")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}")
        self._cut_after[direction] = n_bytes

    def set_delay(self, seconds: float, direction: Direction | None = None) -> None:
        """Latency added to every chunk in ``direction`` (both when None), from now on."""
        if seconds < 0:
            raise ValueError("delay must not be negative")
        for d in DIRECTIONS if direction is None else (direction,):
            self._delay[d] = seconds

    def delay(self, direction: Direction) -> float:
        return self._delay[direction]

    def blackhole(self, on: bool = True) -> None:
        """Hold every byte, both directions, all connections, without closing anything."""
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    @property
    def blackholed(self) -> bool:
        return not self._flowing.is_set()

    def refuse(self, on: bool = True) -> None:
        """Reset new connections as soon as they are accepted; live ones carry on."""
        self._refusing = on

    @property
    def refusing(self) -> bool:
        return self._refusing

    def chaos(self, plan: FaultPlan | None) -> None:
        """Start injecting random faults from ``plan`` (None stops)."""
        self._plan = plan

    @property
    def plan(self) -> FaultPlan | None:
        return self._plan

    # Observation

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds, re-checking whenever the proxy's state changes
        (a counter, a connection opening or closing). Bound it with ``asyncio.timeout``."""
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        # Wake every waiter on the current event, then start a fresh one.
        self._changed.set()
        self._changed = asyncio.Event()

    # Internals

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain function, not a coroutine, so that asyncio spawns no task of its own: the
        # connection's task is created here and owned by the proxy.
        if self._closing:
            _reset(writer)
            return
        self.stats.accepted += 1
        number = self.stats.accepted
        kind: Fault | None = None
        if self._refusing:
            kind = Fault.REFUSE
        elif self._plan is not None and decide_accept(
            self._plan, self._accept_rng, self.stats.chaos_faults
        ):
            kind = Fault.CHAOS_REFUSE
        if kind is not None:
            self.stats.faults[kind] += 1
            logger.debug("fault proxy: connection %d refused (%s)", number, kind)
            _reset(writer)
            self._notify()
            return
        link = _Link(number, writer, self.seed)
        self._links.add(link)
        link.task = asyncio.create_task(self._run_link(link, reader), name=f"fault_proxy:{number}")
        self._tasks.add(link.task)
        link.task.add_done_callback(self._task_done)
        self._notify()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # _run_link catches everything; this is the owner's last line of defence.
            logger.error("fault proxy task failed", exc_info=task.exception())

    def _cut(self, link: _Link, kind: Fault) -> None:
        if link.dead:
            return
        self.stats.faults[kind] += 1
        logger.debug("fault proxy: connection %d cut (%s)", link.number, kind)
        link.kill()
        self._notify()

    async def _run_link(self, link: _Link, client_reader: asyncio.StreamReader) -> None:
        completed = False
        try:
            opened = await self._open_upstream(link)
            if opened is None:
                self.stats.upstream_failures += 1
                return
            up_reader, up_writer = opened
            link.upstream = up_writer
            async with asyncio.TaskGroup() as group:
                pipes: tuple[tuple[Direction, asyncio.StreamReader, asyncio.StreamWriter], ...] = (
                    ("upstream", client_reader, up_writer),
                    ("downstream", up_reader, link.client),
                )
                for direction, reader, writer in pipes:
                    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_QUEUE_CHUNKS)
                    name = f"fault_proxy:{link.number}:{direction}"
                    group.create_task(self._read(link, direction, reader, queue), name=name)
                    group.create_task(self._write(link, direction, writer, queue), name=name)
            completed = not link.dead
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("fault proxy: connection %d failed", link.number)
        finally:
            if completed:
                link.close()
            else:
                link.kill()
            self._links.discard(link)
            self._notify()

    async def _open_upstream(
        self, link: _Link
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Connect ``link`` to the upstream; None if it cannot be reached. A subclass that
        spreads connections over several upstreams overrides this alone."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await asyncio.open_connection(*self._upstream)
        except (OSError, TimeoutError) as exc:
            logger.debug("fault proxy: upstream %s unreachable: %r", self._upstream, exc)
            return None

    async def _read(
        self,
        link: _Link,
        direction: Direction,
        reader: asyncio.StreamReader,
        queue: asyncio.Queue[tuple[float, bytes] | None],
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while chunk := await reader.read(_CHUNK_SIZE):
                self.stats.received[direction] += len(chunk)
                self._notify()
                await queue.put((loop.time() + self._delay[direction], chunk))
        except OSError:
            link.kill()  # the peer reset: pass the reset on to the other side
            return
        if direction == "upstream":
            link.client_done = True
            self._notify()
        await queue.put(None)

    async def _write(
        self,
        link: _Link,
        direction: Direction,
        writer: asyncio.StreamWriter,
        queue: asyncio.Queue[tuple[float, bytes] | None],
    ) -> None:
        index = 0
        try:
            while (item := await queue.get()) is not None:
                due, chunk = item
                await _sleep_until(due)
                fate = ChunkFate(keep=len(chunk))
                if self._plan is not None:
                    fate = decide_chunk(
                        self._plan,
                        link.rngs[direction],
                        len(chunk),
                        index,
                        self.stats.chaos_faults,
                    )
                index += 1
                if fate.fault is Fault.CHAOS_STALL:
                    self.stats.faults[Fault.CHAOS_STALL] += 1
                    self._notify()
                    await asyncio.sleep(fate.stall)
                await self._flowing.wait()
                await link.flowing.wait()

                keep, cut = fate.keep, fate.fault if fate.fault in _CUTS else None
                armed = self._cut_after[direction]
                if armed is not None:
                    if armed <= keep:
                        keep, cut = armed, Fault.CUT_AFTER
                        self._cut_after[direction] = None
                    else:
                        self._cut_after[direction] = armed - keep

                if keep:
                    writer.write(chunk[:keep])
                    self.stats.forwarded[direction] += keep
                    self._notify()
                if cut is not None:
                    await _flush(writer)
                    self._cut(link, cut)
                    return
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            link.kill()  # the peer is gone: pass the reset on to the other side
