"""One connection: its state, the reader that turns frames into work, the sender of answers.

The reader parses frames (``outbox.protocol.wire``) and hands the messages to the writer; it
answers JSON pings at once and stops reading when the connection's backlog is full, so TCP
slows the client down. The sender sends the acks, nacks, pongs and the closing frame in the
order they were queued, so a slow client never stalls the writer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from ..errors import ProtocolError
from ..protocol import wire
from ..protocol.wire import Close, Item, Malformed, salvage
from .api import ReceiverStats

__all__ = ["Peer", "Submit", "read_loop", "run", "send_loop"]

logger = logging.getLogger("outbox.receiver")

Submit = Callable[["Peer", Sequence[Item]], None]
"""Hands a connection's parsed items to the writer."""


class Peer:
    """One connection's state, shared by its reader, its sender and the writer."""

    __slots__ = (
        "batch_ack",
        "client_id",
        "closed",
        "failed",
        "halted",
        "outgoing",
        "pending",
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

    def send(self, frame: str | Close) -> None:
        self.outgoing.append(frame)
        self.wake.set()

    def backlog(self) -> int:
        return len(self.pending) + len(self.outgoing)

    def fail(self, close: Close) -> None:
        """Handle nothing more from this connection; close it after what is already queued."""
        if self.failed:
            return
        self.failed = True
        self.pending.clear()
        self.room.set()
        self.send(close)


async def run(
    peer: Peer,
    *,
    stats: ReceiverStats,
    submit: Submit,
    max_backlog: int,
    closing: Callable[[], bool],
) -> None:
    """Read until the connection ends, then let the sender finish what is queued."""
    async with asyncio.TaskGroup() as group:
        group.create_task(send_loop(peer), name=f"outbox-receiver-sender:{peer.client_id}")
        try:
            await read_loop(
                peer, stats=stats, submit=submit, max_backlog=max_backlog, closing=closing
            )
        finally:
            peer.closed = True
            peer.wake.set()


async def read_loop(
    peer: Peer,
    *,
    stats: ReceiverStats,
    submit: Submit,
    max_backlog: int,
    closing: Callable[[], bool],
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
                logger.warning(
                    "client %r: %s; closed with %s", peer.client_id, sent.reason, sent.code
                )
            return
        stats.frames += 1
        if peer.halted or peer.failed:
            continue  # a close is on its way; keep reading so its handshake can finish
        items: Sequence[Item]
        try:
            parsed = wire.parse_client_frame(frame)
        except ProtocolError as exc:
            items = salvage(frame, exc)
            _note_protocol_errors(peer, items, stats)
        else:
            if isinstance(parsed, wire.Ping):
                peer.send(wire.PONG_FRAME)
                continue
            items = parsed
        submit(peer, items)
        while peer.backlog() >= max_backlog and not (peer.failed or closing()):
            peer.room.clear()
            await peer.room.wait()


def _note_protocol_errors(peer: Peer, items: Sequence[Item], stats: ReceiverStats) -> None:
    for item in items:
        if isinstance(item, Malformed):
            stats.protocol_errors += 1
            logger.warning("client %r: message %s nacked: %s", peer.client_id, item.id, item.reason)
        elif isinstance(item, Close):
            stats.protocol_errors += 1
            peer.halted = True
            logger.warning("client %r: closing with %s: %s", peer.client_id, item.code, item.reason)


async def send_loop(peer: Peer) -> None:
    """Send what the peer's outgoing queue holds, in order, until a Close or the end."""
    ws = peer.ws
    try:
        while True:
            if not peer.outgoing:
                if peer.closed:
                    return
                peer.wake.clear()
                await peer.wake.wait()
                continue
            item = peer.outgoing.popleft()
            if isinstance(item, Close):
                await ws.close(item.code, item.reason)
                return
            await ws.send(item)
            peer.room.set()
    except ConnectionClosed:
        return
