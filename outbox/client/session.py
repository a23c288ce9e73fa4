"""One connection's life: stream pending rows out, read acks in, keep the heartbeat.

The sender only moves things between the store, the ack window and the socket; the rules
live in ``window.py`` (acks, timeouts, dead rows), ``wire.py`` (frames) and ``heartbeat.py``.
A session ends by raising: the connection closed, the heartbeat gave up, or the outbox is
closing (cancellation). The supervisor decides what happens next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from ..errors import OutboxBrokenError, OutboxError, ProtocolError
from ..protocol import wire
from ..protocol.batching import encode_frames, frame_groups
from ..protocol.feed import CommittedRows, Row
from ..protocol.heartbeat import HeartbeatMonitor
from ..protocol.window import InFlight, SendWindow
from ..websocket_writes import write_text_frames
from .heartbeat import run_heartbeat
from .options import Options
from .stats import Counters
from .store import Store

logger = logging.getLogger("outbox")

MAX_TRUSTED_HIGH_WATER = 2**53 - 1
"""The highest Outbox-High-Water a client moves its ids to (JavaScript's largest exact
integer). A spoofer who records id 2**63-1 under a victim's client id must not make the
victim's next id overflow SQLite's integers: higher marks are logged and ignored."""


_WRITE_CHUNK = 256 * 1024  # bytes of frames written between two drains


class SessionEnded(Exception):
    """The server closed the connection (cleanly or not); carries its close code."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"connection closed by the server (code {code}, reason {reason!r})")
        self.code = code
        self.reason = reason


class FrameTooLarge(SessionEnded):
    """The server sent a frame over ``max_server_frame``: we closed the connection with 1009.

    A failed attempt for the supervisor: acks read before it do not reset the backoff.
    """

    def __init__(self, limit: int, reason: str) -> None:
        Exception.__init__(
            self,
            f"the server sent a frame larger than max_server_frame={limit} bytes "
            f"({reason[:200]}); closed the connection with 1009",
        )
        self.code = 1009
        self.reason = reason


class Session:
    """Drives one open connection until it ends."""

    def __init__(
        self,
        ws: ClientConnection,
        store: Store,
        window: SendWindow,
        options: Options,
        counters: Counters,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.ws = ws
        self.store = store
        self.window = window
        self.options = options
        self.counters = counters
        self.clock = clock
        features = wire.parse_features(_response_header(ws, wire.FEATURES_HEADER))
        self.batch = options.batch and wire.FEATURE_BATCH in features
        self.renumbers = wire.FEATURE_ID_CONFLICT in features
        """The receiver flags id conflicts: renumber such a message rather than let it die."""
        self.high_water = (
            wire.parse_high_water(_response_header(ws, wire.HIGH_WATER_HEADER))
            if self.renumbers
            else 0
        )
        self.low_water = wire.FEATURE_LOW_WATER in features
        """The receiver takes low-water frames: announce the mark when it rises."""
        self.heartbeat = HeartbeatMonitor(
            interval=options.heartbeat_interval,
            timeout=options.heartbeat_timeout,
            max_missed=options.max_missed_heartbeats,
        )
        self.saw_life = False
        """Set on the first ack or pong: the connection really works (resets the backoff)."""
        self._wake = asyncio.Event()
        self._check_now = asyncio.Event()
        self._json_pong: asyncio.Future[None] | None = None
        self._unacked_before: set[int] = set()
        self._refill_at = min(options.page_size, max(1, options.max_inflight // 4))
        self._feed = CommittedRows(limit=options.page_size)
        self._largest: tuple[int, Sequence[Row], int] = (0, (), 0)
        """The largest frame written on this connection: its size, its page, its index.
        If the server closes with 1009 (too big), this frame is one it refused."""
        self._largest_solo: frozenset[int] = frozenset()
        """The solo ids when the largest frame was encoded, to find its rows again."""
        self._noted_too_big = False

    async def run(self) -> None:
        """Resend everything un-acked, then stream until the connection ends."""
        try:
            # Acks read on the last connection are made durable first, so the rescan below
            # does not resend what the server already has.
            await self.store.flush()
        except OutboxBrokenError:
            raise  # not the disk: the store's commit loop is gone (the supervisor stops)
        except OutboxError as exc:
            # The file is locked or full: resending acked rows is harmless (the receiver
            # deduplicates), waiting for the disk is not.
            logger.warning("could not commit acks before resending (%s); going on", exc)
        if self.high_water > MAX_TRUSTED_HIGH_WATER:
            logger.warning(
                "the receiver reports message ids up to %d from this client, beyond any id an "
                "outbox gives out in practice (2**53); ignoring it rather than jumping there "
                "(a peer may have sent a huge id under this client id: authenticate clients)",
                self.high_water,
            )
        elif self.high_water > self.store.max_id:
            await self._skip_used_ids()
        # Everything un-acked on the last connection goes out again, in id order.
        self._unacked_before = set(self.window.clear())
        unsubscribe = self.store.subscribe(self._on_commit)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._send_loop(), name="outbox-send")
                group.create_task(self._read_loop(), name="outbox-read")
                group.create_task(
                    run_heartbeat(self.heartbeat, self._ping, self.clock, self._check_now),
                    name="outbox-heartbeat",
                )
                if self.low_water:
                    group.create_task(self._low_water_loop(), name="outbox-low-water")
        except BaseExceptionGroup as group_error:
            # Surface the first real cause to the supervisor, not a group of cancellations.
            cause = _first_cause(group_error)
            if isinstance(cause, ConnectionClosed | SessionEnded):
                # The send or the read loop may see the close first; either way, if it was
                # our 1009 (websockets refused an oversized frame), say so.
                sent = self.ws.protocol.close_sent
                if (
                    sent is not None
                    and sent.code == 1009
                    and not self.ws.protocol.close_rcvd_then_sent
                ):
                    raise FrameTooLarge(self.options.max_server_frame, sent.reason) from cause
            raise cause from None
        finally:
            unsubscribe()
            self.counters.heartbeat_misses += self.heartbeat.total_missed

    # -- outgoing ----------------------------------------------------------------------------

    def _on_commit(self, new_rows: list[Row]) -> None:
        self._feed.add(new_rows)
        self._wake.set()

    async def _send_loop(self) -> None:
        cursor = 0  # highest id read from the store on this connection
        generation = self.store.requeue_generation
        foreign = self.store.foreign_generation
        while True:
            self._wake.clear()
            now = self.clock()
            expired = self.window.expire(now, last_heard=self.heartbeat.answered_ping_at)
            if expired.unheard:
                # Acks are late and nothing sent after them has been answered: the connection
                # may be slow or dead. Not a failed attempt; let the heartbeat find out now.
                logger.info(
                    "%d message(s) unacked after %ss and nothing sent since answered; "
                    "checking the connection",
                    len(expired.unheard),
                    self.window.ack_timeout,
                )
                self._check_now.set()
            if expired:
                await self._handle_expired(expired.resend, expired.dead)
            if generation != self.store.requeue_generation:
                generation, cursor = self.store.requeue_generation, 0  # dead rows came back
                self._feed.invalidate()
            if foreign != self.store.foreign_generation:
                foreign = self.store.foreign_generation  # other connections added rows
                self._feed.invalidate()
            capacity = self.window.capacity
            # Refill in pages, not one row per ack: a read costs a thread hop.
            if capacity >= self._refill_at or (capacity and not self.window):
                limit = min(capacity, self.options.page_size)
                rows = self._feed.take(cursor, limit, now)
                if rows is None:
                    epoch = self._feed.epoch
                    rows = await self.store.fetch_pending(cursor, limit)
                    # Rows dropped from memory while the query ran may be missing from its
                    # snapshot too: then only another query can say we reached the end.
                    reached_end = len(rows) < limit and epoch == self._feed.epoch
                    self._feed.scanned(rows[-1].id if rows else cursor, reached_end, now)
                if rows:
                    cursor = rows[-1].id
                    # (A read that raced with a renumbering may still hold the old id.)
                    retired = self.store.renumbered
                    fresh = [r for r in rows if r.id not in self.window and r.id not in retired]
                    if self._unacked_before:
                        again = self._unacked_before.intersection(row.id for row in fresh)
                        self.counters.resends += len(again)
                        self._unacked_before -= again
                    await self._transmit(fresh)
                    continue
            # Wake for the next ack deadline, or to re-check the store (rows that other
            # processes committed reach it, not our memory), whichever comes first.
            wake_at = [
                t for t in (self.window.next_deadline(), self._feed.stale_at()) if t is not None
            ]
            timeout = max(0.0, min(wake_at) - self.clock()) if wake_at else None
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that races with the event, and this loop would never end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _handle_expired(self, resent: list[InFlight], dead: list[InFlight]) -> None:
        error = f"no ack within {self.window.ack_timeout}s"
        if resent:
            self.store.record_timeouts([(m.id, m.attempts) for m in resent], error)
            rows = await self.store.fetch_ids(m.id for m in resent)
            still = {row.id for row in rows}
            for m in resent:
                if m.id not in still:  # acked or dead meanwhile
                    self.window.discard(m.id)
            logger.info("resending %d message(s) after %s", len(rows), error)
            self.counters.resends += len(rows)
            await self._send_frames(rows)
        if dead:
            reason = f"{error}, {self.window.max_attempts} times"
            logger.warning("giving up on %d message(s): %s", len(dead), reason)
            self.store.record_timeouts([(m.id, m.attempts) for m in dead], error)
            self.store.mark_dead([(m.id, reason) for m in dead])

    async def _transmit(self, rows: list[Row]) -> None:
        self.window.sent(((row.id, row.attempts) for row in rows), self.clock())
        await self._send_frames(rows)

    async def _send_frames(self, rows: Sequence[Row]) -> None:
        """Write a page of frames in one go.

        ``send_context`` is the way websockets documents for writing through its protocol
        object: one check of the connection state and one drain for the whole page, where
        ``ws.send()`` per frame pays both every time (most of the cost of a small message).
        """
        if not rows:
            return
        frames = encode_frames(
            rows,
            batch=self.batch,
            max_messages=self.options.max_batch_messages,
            max_bytes=self.options.max_batch_bytes,
            solo=self.window.solo,
        )
        ws = self.ws
        start = 0
        while start < len(frames):
            # Drain after every _WRITE_CHUNK bytes or so: large messages must not pile up
            # in the transport's buffer beyond what flow control would allow.
            written = 0
            page: list[bytes] = []
            while start < len(frames) and written < _WRITE_CHUNK:
                data = frames[start].encode()
                if len(data) > self._largest[0]:
                    self._largest = (len(data), rows, start)
                    self._largest_solo = frozenset(self.window.solo)
                page.append(data)
                written += len(data)
                start += 1
            try:
                await write_text_frames(ws, page)
            except ConnectionClosed as closed:
                raise self._ended() from closed
            except AttributeError:
                # Python 3.11: once a transport has flushed its buffer and closed, its loop
                # is None and the abort() websockets then calls raises AttributeError
                # ('NoneType' object has no attribute 'call_soon'). The connection is gone:
                # say why, like any other close.
                if not ws.connection_lost_waiter.done():
                    raise
                raise self._ended() from None
        self.counters.frames_sent += len(frames)
        self.counters.messages_sent += len(rows)

    async def _low_water_loop(self) -> None:
        """Tell the receiver when the low-water mark rose, every ``low_water_interval``: it
        may then forget its inbox rows below the mark. Only to a receiver that accepted
        ``low-water`` (a seed-style server never sees the frame)."""
        request = self.ws.request
        sent = wire.parse_low_water(
            None if request is None else request.headers.get(wire.LOW_WATER_HEADER)
        )
        announced = sent or 0
        while True:
            await asyncio.sleep(self.options.low_water_interval)
            try:
                mark = await self.store.low_water_mark()
            except OutboxBrokenError:
                raise
            except OutboxError as exc:  # locked or busy: the next check will do
                logger.debug("could not read the low-water mark: %s", exc)
                continue
            if mark > announced:
                try:
                    await self.ws.send(wire.encode_low_water(mark))
                except ConnectionClosed as closed:
                    raise self._ended() from closed
                announced = mark

    # -- incoming ----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        ws = self.ws
        while True:
            try:
                frame = await ws.recv()
            except ConnectionClosed as closed:
                raise self._ended() from closed
            self.heartbeat.frame_received(self.clock())
            try:
                event = wire.parse_server_frame(frame)
            except ProtocolError as exc:
                self.counters.protocol_errors += 1
                logger.warning("ignoring a bad frame from the server: %s", exc)
                continue
            self.saw_life = True
            if isinstance(event, wire.Ack):
                known, unknown = self.window.acked(event.ids, self.clock())
                if unknown:
                    self.counters.unknown_acks += len(unknown)
                    logger.debug("ack for id(s) not in flight (late or repeated): %s", unknown)
                if known:
                    self.counters.acks += len(known)
                    self.store.mark_acked(known)
                    self._wake.set()
            elif isinstance(event, wire.Nack):
                if event.conflict and self.renumbers and event.id in self.window:
                    await self._renumber(event)
                elif self.window.discard(event.id):
                    self.counters.nacks += 1
                    logger.warning("message %d refused by the server: %s", event.id, event.reason)
                    self.store.mark_dead([(event.id, f"nack: {event.reason}")])
                    self._wake.set()
                else:
                    logger.debug("nack for id %d, which is not in flight; ignored", event.id)
            elif self._json_pong is not None and not self._json_pong.done():
                self._json_pong.set_result(None)

    def _ended(self) -> SessionEnded:
        """Why the connection ended, once it has (noting a 1009 on the rows it refused)."""
        code, reason = _close_info(self.ws)
        protocol = self.ws.protocol
        # Only a 1009 the server started blames our frames: when websockets refused one of
        # the server's frames (max_server_frame), the server only echoes our 1009.
        by_server = protocol.close_rcvd is not None and protocol.close_rcvd_then_sent is not False
        if code == 1009 and by_server and not self._noted_too_big:
            self._noted_too_big = True
            self._note_too_big(reason)
        return SessionEnded(code, reason)

    def _note_too_big(self, reason: str) -> None:
        """The server refused a frame as too big: say so in the last_error of its rows.

        Whatever frame the server refused was over its limit, so the largest frame written
        on this connection is over it too: its rows are the ones to blame.
        """
        size, page, index = self._largest
        if not size:
            return
        if self.batch:
            groups = frame_groups(
                page,
                max_messages=self.options.max_batch_messages,
                max_bytes=self.options.max_batch_bytes,
                solo=self._largest_solo,
            )
        else:
            groups = [[row] for row in page]
        rows = groups[index] if index < len(groups) else []
        error = f"server closed with 1009 (frame of {size} bytes too big for it): {reason}"[:300]
        held = [r.id for r in rows if r.id in self.window]
        if not held:
            return
        logger.warning(
            "the server refused a frame of %d bytes as too big (1009) holding message(s) "
            "%s; lower max_message_size/max_batch_bytes or raise the server's max_size",
            size,
            ", ".join(str(message_id) for message_id in held[:10]),
        )
        decided = self.window.refused_too_big(held)
        if decided.split:
            # Not blamed yet: one of them may be small enough alone. Noted, not counted.
            note = f"{error} (a batch of {len(held)}; sent one per frame next)"[:300]
            self.store.record_timeouts(
                [(n, a) for n in decided.split if (a := self.window.attempts(n)) is not None],
                note,
            )
        if decided.counted:
            self.store.record_timeouts(decided.counted, error)
        if decided.dead:
            reason_dead = f"{error}; {self.window.max_attempts} times"[:300]
            logger.warning(
                "giving up on message(s) %s: refused as too big (1009) %s times",
                ", ".join(str(n) for n, _ in decided.dead),
                self.window.max_attempts,
            )
            self.store.record_timeouts(decided.dead, error)
            self.store.mark_dead([(n, reason_dead) for n, _ in decided.dead])

    # -- reused ids (docs/protocol.md, "Reused ids") -------------------------------------------

    async def _skip_used_ids(self) -> None:
        """The receiver has seen higher ids from this client than this file ever gave out:
        the file was restored from a backup or a snapshot. New messages start past them."""
        previous = await self.store.raise_sequence(self.high_water)
        logger.warning(
            "the receiver has recorded message ids up to %d from client %s, but this outbox "
            "has only given out ids up to %d: was %s restored from a backup or a snapshot? "
            "New messages get ids from %d on; pending ones the receiver refuses as conflicts "
            "are renumbered",
            self.high_water,
            self.store.client_id,
            previous,
            self.store.path,
            self.high_water + 1,
        )

    async def _renumber(self, nack: wire.Nack) -> None:
        """The receiver holds this id with other content, so it has never seen this message:
        give it a fresh id and send it again, rather than lose it."""
        self.counters.nacks += 1
        note = f"renumbered from {nack.id} after an id conflict: {nack.reason}"
        try:
            # The id stays in the window meanwhile, so the sender cannot resend it as it is.
            new_id = await self.store.renumber(nack.id, note)
        except OutboxError as exc:
            logger.error("could not renumber message %d (%s); marking it dead", nack.id, exc)
            self.window.discard(nack.id)
            self.store.mark_dead([(nack.id, f"nack: {nack.reason}")])
            return
        self.window.discard(nack.id)
        logger.warning(
            "message %d refused by the server as an id conflict (it holds id %d from this "
            "client with other content); renumbered to %s and sent again",
            nack.id,
            nack.id,
            new_id if new_id is not None else "nothing (no longer pending)",
        )
        self._wake.set()

    async def _ping(self) -> Awaitable[object]:
        if self.options.heartbeat == "protocol":
            return await self.ws.ping()
        self._json_pong = asyncio.get_running_loop().create_future()
        await self.ws.send(wire.PING_FRAME)
        return self._json_pong


def _response_header(ws: ClientConnection, name: str) -> str | None:
    response = ws.response
    return None if response is None else response.headers.get(name)


def _close_info(ws: ClientConnection) -> tuple[int | None, str]:
    return ws.close_code, ws.close_reason or ""


def _first_cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception that ended a session, preferring a real error over a cancellation."""
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(error)

    walk(group)
    for leaf in leaves:
        if not isinstance(leaf, asyncio.CancelledError):
            return leaf
    return leaves[0]
