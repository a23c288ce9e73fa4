"""``Outbox``: the API an application embeds.

``send()`` returns once the message is committed to SQLite; a background supervisor delivers
it, in id order, over a WebSocket that it keeps reconnecting, until the server acks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from websockets.exceptions import InvalidURI
from websockets.uri import parse_uri

from ..errors import (
    MessageDeadError,
    MessageExpiredError,
    OutboxClosedError,
    QueueFullError,
    ReconnectLimitError,
)
from ..protocol.backoff import Backoff
from ..protocol.window import SendWindow
from ..transactional import encode_payload
from .commit import PURGE_CHUNK
from .expiry import ExpiryClock, check_ttl, run_expiry
from .lease import Lease
from .options import Options
from .stats import Counters, Stats
from .store import Store
from .supervisor import State, Supervisor
from .watch import run_watched

logger = logging.getLogger("outbox")

T = TypeVar("T")


class Outbox:
    """A durable queue of outgoing WebSocket messages.

    >>> async with Outbox("app-outbox.db", "ws://127.0.0.1:8765/") as box:  # doctest: +SKIP
    ...     msg_id = await box.send({"type": "order", "n": 42})
    ...     await box.wait_acked(msg_id, timeout=10)

    Every keyword of ``Options`` (see ``outbox/client/options.py`` and the README) is
    accepted here. ``clock`` (monotonic seconds: deadlines, ages, retention), ``wall_clock``
    (unix seconds: only the ``created_at`` / ``updated_at`` stamps people read) and ``rand``
    (uniform in [0, 1), for backoff jitter) are injectable for tests.
    """

    def __init__(
        self,
        path: str | Path,
        url: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        **options: Any,
    ) -> None:
        try:
            parse_uri(url)
        except InvalidURI as exc:
            raise ValueError(f"not a WebSocket URL: {url!r} ({exc}); use ws:// or wss://") from None
        self.path = str(path)
        self.url = url
        self.options = Options.from_kwargs(options)
        self._clock = clock
        self._wall_clock = wall_clock
        self._rand = rand
        self._store: Store | None = None
        self._supervisor: Supervisor | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self._closer: asyncio.Task[None] | None = None
        self._lease = Lease(self.path)
        self._runner_closing = False
        self.counters = Counters()
        self._expiry_clock = ExpiryClock(clock, wall_clock)
        self._expiry_wake = asyncio.Event()
        self.window = SendWindow(
            max_inflight=self.options.max_inflight,
            ack_timeout=self.options.ack_timeout,
            max_attempts=self.options.max_attempts,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> Outbox:
        """Open the database (migrating it) and start the supervisor; returns self.

        Returns once the background tasks run; it does not wait for a connection (sending
        works offline: rows wait on disk).
        """
        if self._store is not None or self._closed:
            raise OutboxClosedError("an Outbox can be opened once; create a new one")
        options = self.options
        self._store = store = await Store.open(
            self.path,
            synchronous=options.synchronous,
            busy_timeout=options.busy_timeout,
            clock=self._wall_clock,
            monotonic=self._clock,
            wal_warn_bytes=options.wal_warn_bytes,
        )
        store.counters = self.counters
        backoff = Backoff(
            options.reconnect_interval,
            options.reconnect_max_interval,
            jitter=options.reconnect_jitter,
            max_attempts=options.max_reconnect_attempts,
            rand=self._rand,
        )
        self._supervisor = Supervisor(
            self.url,
            store,
            options,
            self.counters,
            self.window,
            backoff=backoff,
            clock=self._clock,
        )
        self._supervisor.on_give_up = lambda: store.fail_waiters(
            lambda message_id: self._given_up_error(f"wait_acked({message_id})")
        )
        started = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run(started), name=f"outbox:{self.path}")
        await started
        logger.info(
            "outbox %s opened: %d pending, %d dead, client id %s",
            self.path,
            store.counts.pending,
            store.counts.dead,
            store.client_id,
        )
        return self

    async def _run(self, started: asyncio.Future[None]) -> None:
        """Own every background task; close the store however this ends.

        The store's commit loop is watched here too: if it crashes, the supervisor and the
        purge are cancelled and the Outbox closes (sends then raise OutboxBrokenError).
        If the event loop shuts down without ``close()`` (``asyncio.run`` returning), this
        task is cancelled and still commits queued acks and closes the database.
        """
        supervisor, store = self._supervisor, self._store
        assert supervisor is not None and store is not None
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(store.watch(), name="outbox-store-watch")
                group.create_task(self._send_while_leased(supervisor), name="outbox-supervisor")
                group.create_task(self._purge_loop(), name="outbox-purge")
                group.create_task(
                    run_expiry(store, self.window, self._expiry_clock, self._expiry_wake),
                    name="outbox-expiry",
                )
                started.set_result(None)
                # The supervisor may give up (GAVE_UP): the group then stays open, sends still
                # commit, until close() or a crash of the store.
        except Exception:
            if store.broken:  # the store logged why: say only what happens now
                logger.error(
                    "outbox %s: the store can no longer write; stopped sending and closed "
                    "(send() now raises %s)",
                    self.path,
                    type(store.failure()).__name__,
                )
            else:
                logger.exception("outbox: a background task crashed; messages stay on disk")
        finally:
            # From here the runner closes the store itself: close() must not cancel it in
            # the middle (a cancelled store.close() would leave the reader's thread behind,
            # and a process with it never exits).
            self._runner_closing = True
            self._closed = True
            supervisor.state = State.CLOSED
            await store.close()

    async def _send_while_leased(self, supervisor: Supervisor) -> None:
        """Run the supervisor only while this process holds the file's sender lease (one
        sender per file, ``lease.py``), with the watch for other writers' rows."""
        assert self._store is not None
        async with self._lease.held():
            await run_watched(self._store, supervisor.run())

    async def close(self) -> None:
        """Flush what is pending (bounded), stop every task, commit queued acks, close the
        database. Loses nothing: rows not acked by then stay pending on disk.

        While connected (or still connecting), waits up to ``close_flush_timeout`` seconds
        for the pending rows to be acked, like a Kafka producer's ``close()``; it stops
        waiting as soon as the connection fails (nothing would move). ``send()`` is refused
        from the moment close() is called. Logs at INFO how many rows stay pending.

        Safe to call more than once, also concurrently: every call returns once closed. If
        the call is cancelled, the flush is cut short and the Outbox still closes.
        """
        if self._closer is None:
            self._closer = asyncio.create_task(self._close(), name=f"outbox-close:{self.path}")
        closer = self._closer
        try:
            await asyncio.wait({closer})
        except asyncio.CancelledError:
            closer.cancel()  # cut the flush short; _close still stops and closes everything
            await asyncio.wait({closer})
            raise

    async def _close(self) -> None:
        first_close = not self._closed
        self._closed = True  # send() refuses from now on
        runner = self._runner
        try:
            if first_close and runner is not None and not runner.done():
                await self._flush_before_close()
        finally:
            if runner is not None:
                if not self._runner_closing:
                    runner.cancel()
                await asyncio.wait({runner})  # the runner closes the store on its way out
            elif self._store is not None:
                await self._store.close()
        store = self._store
        if first_close and store is not None:
            pending = store.counts.pending
            if pending:
                logger.info(
                    "outbox %s closed: %d message(s) stay pending on disk (sent by the next "
                    "Outbox opened on this file)%s",
                    self.path,
                    pending,
                    self._last_error_note(),
                )
            else:
                logger.info("outbox %s closed: nothing pending", self.path)

    async def _flush_before_close(self) -> None:
        """Wait, at most close_flush_timeout, until nothing is pending or the link fails."""
        store, supervisor = self._store, self._supervisor
        timeout = self.options.close_flush_timeout
        if store is None or supervisor is None or timeout <= 0:
            return
        live = (State.CONNECTING, State.CONNECTED)

        async def flushed() -> None:
            while (store.counts.pending or store.queued_rows) and supervisor.state in live:
                commit = asyncio.ensure_future(store.wait_commit())
                changed = asyncio.ensure_future(supervisor.state_changed.wait())
                try:
                    await asyncio.wait({commit, changed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    commit.cancel()
                    changed.cancel()
                if commit.done() and not commit.cancelled() and commit.exception() is not None:
                    return  # the store broke: it has logged why; close what is left

        waiting = store.counts.pending + store.queued_rows
        if waiting and supervisor.state in live:
            logger.debug("closing: waiting up to %ss for %d message(s)", timeout, waiting)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await flushed()

    def _last_error_note(self) -> str:
        supervisor = self._supervisor
        if supervisor is None or supervisor.last_error is None:
            return ""
        return f"; last connection failure: {supervisor.last_error}"

    async def __aenter__(self) -> Outbox:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- sending -----------------------------------------------------------------------------

    def _open_store(self) -> Store:
        store = self._store
        if store is not None:
            store.check_broken()  # "it broke" says more than "it is closed"
        if store is None or self._closed or store.closed:
            raise OutboxClosedError(
                f"the Outbox on {self.path} is "
                + ("closed" if self._closed else "not open (use 'async with Outbox(...)')")
                + "; messages can only be sent through an open Outbox"
            )
        return store

    def _encode(self, payload: Any) -> str:
        return encode_payload(payload, self.options.max_message_size)

    async def _check_quota(self, store: Store, rows: Sequence[tuple[str, str | None]]) -> None:
        """Raise QueueFullError if these rows would take the queue past max_pending.

        A row whose key is already in the outbox adds nothing: the retry that finds out
        whether a send committed must work exactly when the queue is full. With
        ``max_pending_wait`` it first waits that long for acks to make room. Returning and
        the insert that follows have no await between them, so waiters woken together do
        not overshoot the quota.
        """
        quota = self.options.max_pending
        if quota is None:
            return
        waiting = store.counts.pending + store.queued_rows
        if waiting + len(rows) <= quota:
            return
        keys = [key for _, key in rows if key is not None]
        known = await store.ids_for_keys(keys) if keys else {}
        adding = sum(1 for _, key in rows if key is None or key not in known)
        if not adding:
            return
        wait = self.options.max_pending_wait
        deadline = None if wait is None else self._clock() + wait
        while True:
            waiting = store.counts.pending + store.queued_rows
            if waiting + adding <= quota:
                return
            if adding > quota:  # no amount of waiting makes room for more than the quota
                raise QueueFullError(
                    f"this call adds {adding} messages, more than the whole max_pending quota "
                    f"of {quota}; send them in smaller groups or raise max_pending"
                )
            left = None if deadline is None else deadline - self._clock()
            if left is not None and left <= 0:
                break
            # Acks commit in groups and each commit wakes us; re-check at least every
            # second so that a close() or a file changed elsewhere is noticed too.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0 if left is None else min(left, 1.0)):
                    await store.wait_commit()
            store = self._open_store()
        waited = "" if not wait else f" after waiting {wait}s for room"
        raise QueueFullError(
            f"{waiting} messages are waiting and max_pending is {quota}{waited}; wait for "
            "acks (drain() or wait_acked()) and retry, raise max_pending, or set "
            "max_pending_wait"
        )

    async def send(self, payload: Any, *, key: str | None = None, ttl: float | None = None) -> int:
        """Commit one message and return its id. The row is durable when this returns.

        ``key`` makes the call idempotent: a key already in the outbox returns the id of the
        row it made, and nothing new is written. If the call is cancelled, the row either
        committed in full or not at all; retry with the same key to find out which.

        ``ttl`` (seconds): if the row is not acked by then it becomes ``expired`` (kept, not
        sent again; ``wait_acked`` raises MessageExpiredError). A key that names an existing
        row leaves that row's deadline as it was.
        """
        # The hot path: send_many's checks for one message, without its lists.
        store = self._open_store()
        text = self._encode(payload)
        if key is not None and not isinstance(key, str):
            raise TypeError(f"an idempotency key must be a str or None, got {key!r}")
        # The ttl counts from this call (a wait under max_pending uses it up too).
        expires_at = None if ttl is None else self._expires_at(ttl)
        if self.options.max_pending is not None:
            await self._check_quota(store, ((text, key),))
        # One await: the commit that takes this row (shared with every send() queued
        # before it begins) sets the id.
        message_id = await store.insert_one(text, key, expires_at)
        if expires_at is not None:
            self._expiry_wake.set()  # committed: its deadline may be the nearest
        return message_id

    def _expires_at(self, ttl: object) -> float | None:
        seconds = check_ttl(ttl)
        return None if seconds is None else self._expiry_clock.deadline(seconds)

    async def send_many(
        self,
        payloads: Iterable[Any],
        *,
        keys: Sequence[str | None] | None = None,
        ttl: float | None = None,
    ) -> list[int]:
        """Commit several messages in one transaction; return their ids, in order.

        ``ttl`` applies to each of them, as in ``send()``."""
        store = self._open_store()
        texts = [self._encode(payload) for payload in payloads]
        if keys is None:
            rows: list[tuple[str, str | None]] = [(text, None) for text in texts]
        else:
            if len(keys) != len(texts):
                raise ValueError(f"send_many got {len(texts)} payloads but {len(keys)} keys")
            for key in keys:
                if key is not None and not isinstance(key, str):
                    raise TypeError(f"an idempotency key must be a str or None, got {key!r}")
            rows = list(zip(texts, keys, strict=True))
        if not rows:
            return []
        expires_at = self._expires_at(ttl)  # from this call, as in send()
        await self._check_quota(store, rows)
        ids = await store.insert(rows, expires_at)
        if expires_at is not None:
            self._expiry_wake.set()  # committed: its deadline may be the nearest
        return ids

    # -- waiting -----------------------------------------------------------------------------

    async def _unless_given_up(
        self, awaitable: Awaitable[T], timeout: float | None, what: str
    ) -> T:
        """Await, but fail fast with ReconnectLimitError once the supervisor gives up."""
        supervisor = self._supervisor
        assert supervisor is not None
        task = asyncio.ensure_future(awaitable)
        try:
            async with asyncio.timeout(timeout):
                while not task.done():
                    self._check_not_given_up(what)
                    changed = asyncio.ensure_future(supervisor.state_changed.wait())
                    try:
                        await asyncio.wait({task, changed}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        changed.cancel()
        except TimeoutError:
            raise self._timeout_error(what, timeout) from None
        finally:
            task.cancel()
        return task.result()

    async def wait_acked(self, message_id: int, timeout: float | None = None) -> None:
        """Return once the message is acked; MessageDeadError if it became dead
        (MessageExpiredError, a subclass, if it expired)."""
        store = self._open_store()
        what = f"wait_acked({message_id})"
        self._check_not_given_up(what)
        # One future, no task of its own: the supervisor's give-up and the store's close
        # fail it (ReconnectLimitError, OutboxClosedError), as they fail every waiter.
        future = store.status_future(message_id)
        try:
            async with asyncio.timeout(timeout):
                status, reason = await future
        except TimeoutError:
            raise self._timeout_error(what, timeout) from None
        finally:
            store.forget_waiter(message_id, future)
        if status == "expired":
            raise MessageExpiredError(message_id, reason)
        if status == "dead":
            raise MessageDeadError(message_id, reason)

    def _check_not_given_up(self, what: str) -> None:
        supervisor = self._supervisor
        assert supervisor is not None
        if supervisor.state is State.GAVE_UP:
            raise self._given_up_error(what)
        if supervisor.state is State.CLOSED:
            if self._store is not None:
                self._store.check_broken()
            raise OutboxClosedError(f"{what}: the Outbox was closed")

    def _given_up_error(self, what: str) -> ReconnectLimitError:
        supervisor = self._supervisor
        assert supervisor is not None
        return ReconnectLimitError(
            f"{what}: the connection to {self.url} was given up after "
            f"max_reconnect_attempts ({supervisor.last_error}); the messages "
            f"stay pending in {self.path}"
        )

    def _timeout_error(self, what: str, timeout: float | None) -> TimeoutError:
        supervisor = self._supervisor
        assert supervisor is not None
        return TimeoutError(
            f"{what}: not done within {timeout}s (connection {supervisor.state.value}"
            f"{self._last_error_note()}); the messages stay pending in {self.path}"
        )

    async def drain(self, timeout: float | None = None) -> None:
        """Return once no row is pending or in flight (dead rows do not count)."""
        store = self._open_store()

        async def drained() -> None:
            # Counts as of now, also what another connection changed (a requeue in the
            # sqlite3 shell): an idle store would notice only at its next check.
            await store.refresh()
            while store.counts.pending or store.queued_rows:
                await store.wait_commit()

        await self._unless_given_up(drained(), timeout, "drain()")

    async def requeue_dead(self, ids: Sequence[int] | None = None) -> int:
        """Put dead rows (all, or these ids) back in the queue; returns how many."""
        return await self._open_store().requeue_dead(ids)

    # -- background upkeep -------------------------------------------------------------------

    async def _purge_loop(self) -> None:
        options = self.options
        if options.acked_retention is None and options.acked_retention_count is None:
            return
        store = self._store
        assert store is not None
        while True:
            # Ages by the monotonic clock (store.ack_ages): no clock step purges early.
            try:
                purged = await store.purge_expired(
                    options.acked_retention, options.acked_retention_count
                )
            except Exception as exc:
                logger.warning("purge of acked rows failed (will retry): %s", exc)
            else:
                if purged:
                    logger.debug("purged %d acked rows", purged)
                if purged >= PURGE_CHUNK:
                    continue  # more to delete: go on at once, one short transaction at a time
            await asyncio.sleep(options.purge_interval)

    # -- looking in --------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The connection state (CONNECTING, CONNECTED, BACKING_OFF, GAVE_UP, CLOSED)."""
        if self._supervisor is None:
            return State.CLOSED
        return self._supervisor.state

    @property
    def client_id(self) -> str:
        """The stable id this database sends in the Outbox-Client-Id header."""
        return self._open_store().client_id

    def stats(self) -> Stats:
        """Counts by status, in flight, connection state, reconnects and running totals."""
        store = self._store
        counts = store.counts if store is not None else None
        return Stats(
            pending=counts.pending if counts else 0,
            acked=counts.acked if counts else 0,
            dead=counts.dead if counts else 0,
            expired=counts.expired if counts else 0,
            in_flight=len(self.window),
            connected=self.state is State.CONNECTED,
            state=self.state.value,
            reconnects=self.counters.reconnects,
            counters=self.counters,
            last_error=self._supervisor.last_error if self._supervisor is not None else None,
            role=self._lease.role,
        )
