"""Stopping without a storm: finish the work already read, then close with 1012.

A receiver that is stopped (``close()``, SIGTERM for ``outbox serve``) during a rolling
restart drains its connections instead of dropping them:

1. the health endpoint answers 503 "draining" and new WebSocket handshakes are refused with
   503 (the listener stays open until the end, so a probe sees "draining", not a refusal);
2. every connection's reader stops taking work: frames that arrive from now on are read and
   dropped, unanswered (what the client sent after that is its to resend, as after any
   drop; reading on lets the client's close frame through behind them);
3. the writer handles and commits what the readers had already queued, and the answers
   (acks, nacks) are queued after it: at most ``drain_timeout`` seconds;
4. each connection is closed with 1012 (service restart) after its answers, so a client
   knows it was a restart, not a failure, and reconnects after its jittered backoff delay:
   at most ``close_timeout`` seconds for the closing handshakes;
5. a connection still open after that (a client that does not read its answers) is
   dropped (TCP abort).

Nothing is lost at any step: a message is acked only after its COMMIT, so whatever was not
committed when a bound ran out is not acked and is resent to the next receiver; whatever was
committed but not acked is resent and answered from the inbox as a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Set

from websockets.frames import CloseCode

from ..protocol.wire import Close
from .connection import Peer
from .writer import Writer

__all__ = ["RESTART", "Connections", "drain"]

logger = logging.getLogger("outbox.receiver")

RESTART = Close(CloseCode.SERVICE_RESTART, "receiver restarting; reconnect and resend")
"""The close frame of a drain: 1012, which our client (and browsers) treat as "come back"."""


class Connections:
    """The open connections of a receiver, and a way to wait until they are all gone."""

    def __init__(self) -> None:
        self.peers: set[Peer] = set()
        self._changed = asyncio.Event()

    def add(self, peer: Peer) -> None:
        self.peers.add(peer)

    def discard(self, peer: Peer) -> None:
        self.peers.discard(peer)
        self._changed.set()

    async def all_gone(self) -> None:
        while self.peers:
            self._changed.clear()
            await self._changed.wait()


async def drain(
    connections: Connections, writer: Writer, *, drain_timeout: float, close_timeout: float
) -> None:
    """Steps 2 to 5 of the module docstring (step 1 is the caller's: it sets the flag the
    handshake reads before calling this)."""
    peers: Set[Peer] = connections.peers
    if not peers:
        return
    started = time.monotonic()
    logger.info("draining %d connection(s) (at most %ss)", len(peers), drain_timeout)
    for peer in list(peers):
        peer.stop_reading()
    try:
        async with asyncio.timeout(drain_timeout):
            await writer.drained()
    except TimeoutError:
        waiting = sum(len(peer.pending) for peer in peers)
        logger.warning(
            "drain_timeout (%ss) passed with work still being handled (%d message(s) not "
            "reached): closing the connections anyway; what was not committed is not acked, "
            "so the clients resend it",
            drain_timeout,
            waiting,
        )
    for peer in list(peers):
        peer.fail(RESTART)  # after the answers already queued; drops work not yet taken
    try:
        async with asyncio.timeout(close_timeout):
            await connections.all_gone()
    except TimeoutError:
        stuck = list(peers)
        logger.warning(
            "%d connection(s) did not finish their closing handshake within close_timeout "
            "(%ss), clients not reading their answers: dropping them",
            len(stuck),
            close_timeout,
        )
        for peer in stuck:
            peer.ws.transport.abort()
        with contextlib.suppress(TimeoutError):  # an abort ends them at once; never hang
            async with asyncio.timeout(close_timeout):
                await connections.all_gone()
    logger.info("drained in %.2fs", time.monotonic() - started)
