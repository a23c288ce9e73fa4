"""One connection: its state, the reader that turns frames into work, the sender of answers.

The reader parses frames (``outbox.protocol.wire``) and hands the messages to the writer; it
answers JSON pings at once and stops reading when the connection's backlog is full (in
messages or in bytes, pongs included), so TCP slows the client down. The sender sends the
acks, nacks, pongs and the closing frame in the order they were queued, so a slow client
never stalls the writer; a client that does not read them within ``send_timeout`` is dropped,
so one that never reads cannot pin memory or a connection forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from ..errors import ProtocolError
from ..logs import PEERS, rate_limited
from ..protocol import wire
from ..protocol.wire import Close, Item, Malformed, close_reason, salvage
from ..websocket_writes import write_text_frames
from .api import ReceiverStats

__all__ = ["Announce", "Limits", "Peer", "Submit", "read_loop", "run", "send_loop"]

logger = logging.getLogger("outbox.receiver")
peer_log = rate_limited(PEERS)
"""Lines a client's own behaviour causes (bad frames, not reading): rate-limited."""

Submit = Callable[["Peer", Sequence[Item], int], None]
"""Hands a connection's parsed items, and the size of the frame they came in, to the writer."""

Announce = Callable[["Peer", int], None]
"""Hands a connection's announced low-water mark to the pruner."""


@dataclass(frozen=True, slots=True)
class Limits:
    """How much one connection may hold before its reader stops, and how long a send waits."""

    messages: int
    bytes: int
    send_timeout: float | None
    frame_messages: int = 1000
    """Most messages one batch frame may carry."""


PAGE_BYTES = 16 * 1024
"""Most bytes of answers the sender writes at once (then waits for the socket to drain).
Below websockets' write high-water mark (32 KiB by default), so a page alone never makes
the drain wait: ``send_timeout`` judges a slow reader by the bytes it leaves unread, as
one frame at a time did, not by a page it must swallow whole within the timeout."""

ITEM_OVERHEAD = 256
"""Bytes counted for each queued message on top of its share of the frame: its parsed form
(dicts, strings, a Message) costs several times its JSON text when messages are tiny."""


class Peer:
    """One connection's state, shared by its reader, its sender and the writer."""

    __slots__ = (
        "batch_ack",
        "client_id",
        "closed",
        "draining",
        "failed",
        "halted",
        "outgoing",
        "outgoing_bytes",
        "pending",
        "pending_bytes",
        "pending_sizes",
        "queued",
        "room",
        "wake",
        "ws",
    )

    def __init__(self, ws: ServerConnection, client_id: str, batch_ack: bool) -> None:
        self.ws = ws
        self.client_id = client_id
        self.batch_ack = batch_ack
        self.pending: list[Item] = []
        """Work the writer has not taken yet, in arrival order."""
        self.pending_sizes: list[int] = []
        """Bytes of frame each pending item stands for (a frame's size split among its items)."""
        self.pending_bytes = 0
        self.outgoing_bytes = 0
        self.queued = False
        """In the writer's ready list."""
        self.outgoing: deque[str | Close] = deque()
        self.wake = asyncio.Event()
        """Set when there is something for the sender to do."""
        self.room = asyncio.Event()
        """Set when pending or outgoing shrank (the reader waits on it when they are full)."""
        self.halted = False
        """The reader queued a Close: ignore further frames."""
        self.failed = False
        """The writer is closing this connection: drop its pending work."""
        self.closed = False
        """The connection is over: nothing more can be sent."""
        self.draining = False
        """The receiver is draining: frames read from now on are dropped (``stop_reading``)."""

    def send(self, frame: str | Close) -> None:
        self.outgoing.append(frame)
        if isinstance(frame, str):
            self.outgoing_bytes += len(frame)
        self.wake.set()

    def add_pending(self, items: Sequence[Item], size: int) -> None:
        """Queue items read from one frame of ``size`` bytes, in order."""
        if not items:
            return
        share = size // len(items) + ITEM_OVERHEAD
        self.pending.extend(items)
        self.pending_sizes.extend([share] * len(items))
        self.pending_bytes += share * len(items)

    def take_pending(self, limit: int) -> tuple[list[Item], list[int]]:
        """The first ``limit`` pending items and their sizes; the rest stay queued."""
        items, sizes = self.pending[:limit], self.pending_sizes[:limit]
        del self.pending[:limit], self.pending_sizes[:limit]
        self.pending_bytes -= sum(sizes)
        self.room.set()
        return items, sizes

    def put_back(self, items: Sequence[Item], sizes: Sequence[int]) -> None:
        """Items the writer took but did not reach: first in line again."""
        if self.failed or not items:
            return
        self.pending[:0] = items
        self.pending_sizes[:0] = sizes
        self.pending_bytes += sum(sizes)

    def backlog_full(self, limits: Limits) -> bool:
        return (
            len(self.pending) + len(self.outgoing) >= limits.messages
            or self.pending_bytes + self.outgoing_bytes >= limits.bytes
        )

    def stop_reading(self) -> None:
        """Drain: take no more work from this connection. What was read before is still
        handled and answered, and the connection stays open until a Close is queued
        (``fail``). Frames that come in meanwhile are read and dropped, unanswered (the
        client resends them after it reconnects): reading on, rather than not at all, lets
        the client's close frame through behind them."""
        self.draining = True
        self.room.set()  # a reader held by backpressure goes back to reading

    def fail(self, close: Close) -> None:
        """Handle nothing more from this connection; close it after what is already queued."""
        if self.failed:
            return
        self.failed = True
        self.pending.clear()
        self.pending_sizes.clear()
        self.pending_bytes = 0
        self.room.set()
        self.send(close)


async def run(
    peer: Peer,
    *,
    stats: ReceiverStats,
    submit: Submit,
    limits: Limits,
    closing: Callable[[], bool],
    announce: Announce | None = None,
) -> None:
    """Read until the connection ends, then let the sender finish what is queued."""
    async with asyncio.TaskGroup() as group:
        group.create_task(
            send_loop(peer, limits.send_timeout), name=f"outbox-receiver-sender:{peer.client_id}"
        )
        try:
            await read_loop(
                peer,
                stats=stats,
                submit=submit,
                limits=limits,
                closing=closing,
                announce=announce,
            )
        finally:
            peer.closed = True
            peer.wake.set()


async def read_loop(
    peer: Peer,
    *,
    stats: ReceiverStats,
    submit: Submit,
    limits: Limits,
    closing: Callable[[], bool],
    announce: Announce | None = None,
) -> None:
    """Frames in, work out; ``closing()`` true releases a reader held by backpressure."""
    ws = peer.ws
    while True:
        try:
            frame = await ws.recv()
        except ConnectionClosed as exc:
            # websockets itself closes with 1009 (too big) or 1007 (bad UTF-8).
            sent = exc.sent
            if (
                sent is not None
                and not peer.halted
                and sent.code in (CloseCode.MESSAGE_TOO_BIG, CloseCode.INVALID_DATA)
            ):
                stats.protocol_errors += 1
                peer_log.warning(
                    "client %r: %s; closed with %s", peer.client_id, sent.reason, sent.code
                )
            return
        stats.frames += 1
        if peer.halted or peer.failed or peer.draining:
            continue  # a close is on its way; keep reading so its handshake can finish
        items: Sequence[Item]
        try:
            parsed = wire.parse_client_frame(frame)
        except ProtocolError as exc:
            items = salvage(frame, exc)
            _note_protocol_errors(peer, items, stats)
        else:
            if isinstance(parsed, wire.Ping):
                peer.send(wire.PONG_FRAME)  # counted in the backlog like any answer
                parsed = []
            elif isinstance(parsed, wire.LowWater):
                if announce is not None:  # for this connection's own identity only
                    announce(peer, parsed.mark)
                parsed = []
            items = parsed
            if len(items) > limits.frame_messages:
                items = [_too_many(len(items), limits.frame_messages)]
                _note_protocol_errors(peer, items, stats)
        if items:
            submit(peer, items, len(frame))
        while peer.backlog_full(limits) and not (peer.failed or peer.draining or closing()):
            peer.room.clear()
            await peer.room.wait()


def _too_many(count: int, limit: int) -> Close:
    return Close(
        CloseCode.MESSAGE_TOO_BIG,
        close_reason(f"a batch of {count} messages; at most {limit} per frame"),
    )


def _note_protocol_errors(peer: Peer, items: Sequence[Item], stats: ReceiverStats) -> None:
    for item in items:
        if isinstance(item, Malformed):
            stats.protocol_errors += 1
            peer_log.warning(
                "client %r: message %s nacked: %s", peer.client_id, item.id, item.reason
            )
        elif isinstance(item, Close):
            stats.protocol_errors += 1
            peer.halted = True
            peer_log.warning(
                "client %r: closing with %s: %s", peer.client_id, item.code, item.reason
            )


async def send_loop(peer: Peer, send_timeout: float | None = None) -> None:
    """Send what the peer's outgoing queue holds, in order, until a Close or the end.

    What is queued meanwhile goes out as one page (one write to the socket, at most
    ``PAGE_BYTES``): a round's answers cost one write, not one per ack. A page that cannot
    be written within ``send_timeout`` (the client stopped reading, its socket buffer is
    full) drops the connection: nothing else would ever free its memory.
    """
    ws = peer.ws
    outgoing = peer.outgoing
    try:
        while True:
            if not outgoing:
                if peer.closed:
                    return
                peer.wake.clear()
                await peer.wake.wait()
                continue
            if isinstance(outgoing[0], Close):
                close = outgoing.popleft()
                assert isinstance(close, Close)
                await ws.close(close.code, close.reason)
                return
            page: list[bytes] = []
            size = 0
            while outgoing and size < PAGE_BYTES:
                item = outgoing[0]
                if isinstance(item, Close):
                    break
                outgoing.popleft()
                page.append(item.encode())
                size += len(item)
            try:
                async with asyncio.timeout(send_timeout):
                    await write_text_frames(ws, page)
            except TimeoutError:
                peer_log.warning(
                    "client %r did not read its answers for %ss; dropping the connection",
                    peer.client_id,
                    send_timeout,
                )
                peer.failed = True  # releases a reader held by backpressure
                peer.room.set()
                ws.transport.abort()
                return
            peer.outgoing_bytes -= size
            peer.room.set()
    except ConnectionClosed:
        return
