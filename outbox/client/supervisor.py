"""The supervisor owns the connection: connect, run a session, back off, reconnect.

Every attempt, successful or not, is followed by a jittered exponential delay before the
next one (``backoff.py``), so no failure mode turns into a hot loop: a refused handshake
(401/403), a bad host, a server closing with 1012/1013 (restarting / try again later). The
delay resets only once a connection has shown it works (an ack or pong arrived), so a server
that accepts and drops at once still gets a growing delay.

What ended a session is sorted by one seam, ``process_exception(exc) -> exc | None``, as in
websockets' ``connect``: None means a failure of the network, the server or the disk that
retrying may cure (OSError, ConnectionClosed / SessionEnded, TimeoutError, InvalidHandshake /
InvalidStatus, HeartbeatTimeout, ProtocolError, StoreError such as a locked or full file),
logged as one WARNING line. Anything else is a bug, in outbox or in code it calls: it is
logged at ERROR **with its traceback**, as unexpected and not as a connection failure, and
the supervisor still reconnects after the backoff delay, so that the process keeps
delivering if the bug only strikes now and then. A bug never resets the backoff, so one that
strikes every session ends up retrying every ``reconnect_max_interval``; its traceback is
logged at most once per ``BUG_LOG_INTERVAL`` seconds (one line in between). The exception is
OutboxBrokenError, the store's commit loop gone: nothing can be delivered from it, so the
supervisor stops and lets it reach the Outbox (which stops too; the store has logged it).
Pass another ``process_exception`` to Supervisor to change what counts as retryable.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from ..errors import OutboxBrokenError, OutboxError, ProtocolError, StoreError
from ..protocol import wire
from ..protocol.backoff import Backoff
from ..protocol.heartbeat import HeartbeatTimeout
from ..protocol.window import SendWindow
from .options import Options
from .session import FrameTooLarge, Session, SessionEnded
from .stats import Counters
from .store import Store

logger = logging.getLogger("outbox")

BUG_LOG_INTERVAL = 60.0
"""Seconds between two tracebacks of unexpected errors (reconnects can be every second)."""

RETRYABLE: tuple[type[Exception], ...] = (
    OSError,  # refused, reset, unreachable, DNS, TLS (ssl.SSLError is an OSError)
    ConnectionClosed,
    SessionEnded,
    TimeoutError,  # open_timeout
    InvalidHandshake,  # InvalidStatus (401, 503...), InvalidMessage, bad headers
    HeartbeatTimeout,
    ProtocolError,
    StoreError,  # the file is locked by another process or the disk is full: may pass
)
"""What a network, a server or a disk does: reconnecting after a delay may cure it."""


CLEAN_CLOSE_CODES = (1000, 1001, 1012)
"""Close codes a server sends on purpose (normal, going away, service restart): logged at
INFO. The reconnect still waits its jittered backoff delay, so clients that one receiver's
drain closed together do not come back together."""


def process_exception(exc: Exception) -> Exception | None:
    """None if ``exc`` is a failure that retrying may cure; ``exc`` itself if it is a bug.

    The default seam of :class:`Supervisor` (like ``process_exception`` in websockets'
    ``connect``): see the module docstring for what the supervisor does with each.
    """
    if isinstance(exc, RETRYABLE):
        return None
    return exc


class State(enum.Enum):
    """Where the connection is. Each change is logged at DEBUG by ``Supervisor.state``."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKING_OFF = "backing_off"
    GAVE_UP = "gave_up"
    """max_reconnect_attempts used up; rows stay pending on disk for the next Outbox."""
    CLOSED = "closed"


def describe_failure(exc: BaseException) -> str:
    """One line for the log saying what went wrong and, where we can tell, what to do."""
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        hint = {
            401: "check the credentials in additional_headers",
            403: "the server refuses this client",
            404: "check the URL path",
        }.get(status, "the server is not accepting WebSocket connections right now")
        return f"the server answered the handshake with HTTP {status} ({hint})"
    if isinstance(exc, SessionEnded):
        meaning = {
            1012: "server restarting",
            1013: "server overloaded, try again later",
            1001: "server going away",
        }.get(exc.code or 0)
        return str(exc) + (f": {meaning}" if meaning else "")
    if isinstance(exc, HeartbeatTimeout | InvalidHandshake):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out opening the connection (open_timeout)"
    if isinstance(exc, OSError):
        detail = exc.strerror or str(exc) or type(exc).__name__
        if isinstance(exc, ConnectionResetError | ConnectionAbortedError):
            detail += " (a wss:// URL to a server without TLS ends like this)"
        return f"cannot reach the server: {detail}"
    return f"{type(exc).__name__}: {exc}"


def describe_bug(exc: BaseException) -> str:
    """One line for an unexpected error: its type and (cut) text, never a network story."""
    return f"unexpected {type(exc).__name__}: {exc}"[:300]


class Supervisor:
    """Runs sessions over fresh connections until cancelled or out of attempts."""

    def __init__(
        self,
        url: str,
        store: Store,
        options: Options,
        counters: Counters,
        window: SendWindow,
        *,
        backoff: Backoff,
        clock: Callable[[], float],
        process_exception: Callable[[Exception], Exception | None] = process_exception,
    ) -> None:
        self.url = url
        self.store = store
        self.options = options
        self.counters = counters
        self.window = window
        self.backoff = backoff
        self.clock = clock
        self.process_exception = process_exception
        self._state = State.CONNECTING
        self.state_changed = asyncio.Event()
        self.on_give_up: Callable[[], None] | None = None
        """Called once the state is GAVE_UP (the Outbox fails its wait_acked() callers)."""
        self.last_error: str | None = None
        self.ws: ClientConnection | None = None
        self._bug_logged_at: float | None = None

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, value: State) -> None:
        if value is not self._state:
            logger.debug("connection state %s -> %s", self._state.value, value.value)
            self._state = value
            self.state_changed.set()
            self.state_changed = asyncio.Event()

    def _connect_kwargs(self) -> dict[str, Any]:
        options = self.options
        headers = {
            wire.CLIENT_ID_HEADER: self.store.client_id,
            wire.FEATURES_HEADER: wire.format_features(wire.CLIENT_FEATURES),
            **(options.additional_headers or {}),
        }
        kwargs: dict[str, Any] = {
            "additional_headers": headers,
            "compression": "deflate" if options.compression else None,
            "open_timeout": options.open_timeout,
            "close_timeout": options.close_timeout,
            "ping_interval": None,  # our heartbeat, with our rules, replaces the built-in one
            "ping_timeout": None,
            # Acks are small. Unbounded, one frame of a server (or a ~1 MB deflated one that
            # inflates) could take gigabytes; websockets closes with 1009 beyond this.
            "max_size": options.max_server_frame,
            "proxy": None,
        }
        if options.ssl is not None:
            kwargs["ssl"] = options.ssl
        return kwargs

    async def _announce_low_water(self, headers: dict[str, str]) -> None:
        """Put the current low-water mark in the handshake (docs/protocol.md); none if the
        file cannot be read just now (the receiver then simply keeps its rows longer)."""
        try:
            headers[wire.LOW_WATER_HEADER] = str(await self.store.low_water_mark())
        except OutboxBrokenError:
            raise
        except OutboxError as exc:
            logger.debug("no low-water mark in this handshake: %s", exc)
            headers.pop(wire.LOW_WATER_HEADER, None)

    async def _run_session(self, session: Session, ws: ClientConnection) -> None:
        """Run one session to its end; re-raise why it ended.

        The session runs in a task of its own, watched with ``asyncio.wait``, so that the
        two ways it can end stay apart: the Outbox closing (this task is cancelled: cancel
        the session, say goodbye with a closing handshake, re-raise) and the connection
        failing (the session's own error). Awaiting the session directly would let an error
        racing with the cancellation swallow it, and on Python 3.11 a TaskGroup whose child
        failed leaves its task's cancelling() count raised.
        """
        task = asyncio.create_task(session.run(), name="outbox-session")
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.wait({task})
            # close_timeout bounds the wait for the peer's close frame, not the drain of
            # our own buffer before it: a peer that stopped reading would hold us forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.options.close_timeout):
                    await ws.close(1000, "outbox closing")
            raise
        error = task.exception()
        if error is not None:
            raise error

    async def run(self) -> None:
        kwargs = self._connect_kwargs()
        while True:
            self.state = State.CONNECTING
            session: Session | None = None
            bug: Exception | None = None
            too_large = False
            clean_close = False
            try:
                await self._announce_low_water(kwargs["additional_headers"])
                ws = await connect(self.url, **kwargs)
                self.ws = ws
                try:
                    self.counters.connects += 1
                    if self.counters.connects > 1:
                        self.counters.reconnects += 1
                    self.state = State.CONNECTED
                    logger.info("connected to %s", self.url)
                    session = Session(
                        ws, self.store, self.window, self.options, self.counters, clock=self.clock
                    )
                    await self._run_session(session, ws)
                finally:
                    # After a failure, a dead or blackholed peer would make the closing
                    # handshake wait for close_timeout: drop the TCP connection at once.
                    # Not once it is lost: aborting a transport whose connection_lost ran
                    # raises AttributeError on Python 3.11 (its loop is already None).
                    if not ws.connection_lost_waiter.done():
                        ws.transport.abort()
            except OutboxBrokenError:
                raise  # the store is gone (it logged why): nothing left to deliver from
            except Exception as exc:
                bug = self.process_exception(exc)
                self.last_error = describe_failure(exc) if bug is None else describe_bug(bug)
                too_large = isinstance(exc, FrameTooLarge)
                # 1000 / 1001 / 1012: the server said goodbye on purpose (a drain, a
                # rolling restart): INFO, not a failure; the backoff delay applies all the same.
                clean_close = isinstance(exc, SessionEnded) and exc.code in CLEAN_CLOSE_CODES
            finally:
                self.ws = None
            # A server that sends an oversized frame on every connection would otherwise be
            # retried at once after each ack that came before it: it counts as a failure.
            if session is not None and session.saw_life and bug is None and not too_large:
                self.backoff.reset()
            delay = self.backoff.next_delay()
            if delay is None:
                self._give_up()
                return
            self.state = State.BACKING_OFF
            if clean_close:
                logger.info(
                    "the server closed the connection to %s: %s; reconnect attempt %d in %.2fs",
                    self.url,
                    self.last_error,
                    self.backoff.attempts,
                    delay,
                )
            elif bug is None:
                logger.warning(
                    "connection to %s failed or dropped: %s; reconnect attempt %d in %.2fs",
                    self.url,
                    self.last_error,
                    self.backoff.attempts,
                    delay,
                )
            else:
                self._log_bug(bug, delay)
            await asyncio.sleep(delay)

    def _log_bug(self, bug: Exception, delay: float) -> None:
        """ERROR with the traceback, at most once per BUG_LOG_INTERVAL (one line between)."""
        now = self.clock()
        with_traceback = (
            self._bug_logged_at is None or now - self._bug_logged_at >= BUG_LOG_INTERVAL
        )
        if with_traceback:
            self._bug_logged_at = now
        logger.error(
            "unexpected error in the session with %s, a bug (in outbox or in code it calls), "
            "not a network failure: %s; reconnect attempt %d in %.2fs%s",
            self.url,
            self.last_error,
            self.backoff.attempts,
            delay,
            "" if with_traceback else f" (one traceback per {BUG_LOG_INTERVAL:.0f}s: see above)",
            exc_info=bug if with_traceback else None,
        )

    def _give_up(self) -> None:
        self.state = State.GAVE_UP
        if self.on_give_up is not None:
            self.on_give_up()
        logger.error(
            "giving up on %s after %d failed connection attempt(s) in a row "
            "(max_reconnect_attempts);"
            " last error: %s; %d message(s) stay pending on disk and will be sent by "
            "the next Outbox opened on %s",
            self.url,
            self.backoff.attempts + 1,
            self.last_error,
            self.store.counts.pending,
            self.store.path,
        )
