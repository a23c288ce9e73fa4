"""The outbox table: the durable queue behind an Outbox, its group commit and its reads.

Every write (new messages, acks, timeouts, dead rows, requeues, purges) goes through a single
*group commit* loop: whatever was queued while the previous transaction was committing is
applied in the next ``BEGIN IMMEDIATE ... COMMIT``. So a hundred concurrent ``send()`` calls
share one fsync, and acks ride along with new rows.

The writer is one plain ``sqlite3`` connection on one thread of its own, and a whole group
commit is **one** call to that thread. (aiosqlite would cost a thread hop per statement, and
under load each hop waits for a busy event loop to come round: measured here, four hops per
commit made the commit four times slower than the transaction itself.) Reads go through an
aiosqlite connection, which sees only committed rows (a WAL snapshot), so the sender can
never put a message on the wire that might still roll back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import aiosqlite

from ..errors import DatabaseMissingError, OutboxBrokenError, OutboxClosedError
from ..protocol.feed import Row
from ..storage import sqlite
from ..storage.sqlite import Synchronous as Synchronous  # re-exported for Options
from . import commit, file_guard, lowwater
from .commit import (
    Ack,
    Counts,
    Dead,
    Expire,
    Flush,
    Insert,
    Purge,
    Requeue,
    Result,
    Timeouts,
    Write,
)
from .retention import AckAges
from .stats import Counters

logger = logging.getLogger("outbox")

Status = Literal["pending", "acked", "dead", "expired"]
_T = TypeVar("_T")
_V = TypeVar("_V")
_O = TypeVar("_O")

WAL_CHECK_INTERVAL = 0.5
"""Seconds (monotonic) between two looks at the -wal file's size after commits."""
WAL_TRUNCATE_BYTES = 4 << 20
"""A -wal file past this is checkpointed and truncated (``wal_checkpoint(TRUNCATE)``)."""
POLL_INTERVAL = 1.0
"""Seconds an idle store waits before checking whether another connection wrote."""


# The queued writes are typed (one frozen dataclass per kind, in ``writes``), applied by
# their own steps on the writer thread, coalesced across the whole batch.


@dataclass(slots=True)
class _Queued:
    """One queued write. ``future`` is None for writes nobody waits on (acks, timeouts).

    ``group``: the single-row inserts of many ``send()`` calls gathered into one write (its
    ``write`` is built from the group when the commit takes it).
    """

    write: Write
    future: asyncio.Future[Result] | None = None
    group: _Group | None = None


class _Group:
    """The rows of every ``insert_one()`` queued since the last commit began, one write.

    Each caller still has a future of its own (so cancelling one caller cancels nobody
    else), but the commit sees one ``Insert`` and sets every id in one tight loop, instead
    of a queued write, a result list and a slice per message.
    """

    __slots__ = ("expiries", "futures", "rows", "timed")

    def __init__(self) -> None:
        self.rows: list[tuple[str, str | None]] = []
        self.futures: list[asyncio.Future[int]] = []
        self.expiries: list[float | None] = []
        self.timed = False
        """Some row has a deadline (else the commit ignores ``expiries``)."""

    def write(self) -> Insert:
        """The Insert of the rows whose callers are still waiting (cancelled ones are not
        written: their transaction had not started)."""
        futures = self.futures
        if any(map(asyncio.Future.cancelled, futures)):
            keep = [i for i, future in enumerate(futures) if not future.cancelled()]
            self.rows = [self.rows[i] for i in keep]
            self.expiries = [self.expiries[i] for i in keep]
            self.futures = [futures[i] for i in keep]
        expiries = tuple(self.expiries) if self.timed else None
        return Insert(tuple(self.rows), expiries=expiries)

    def publish(self, ids: Result) -> None:
        assert isinstance(ids, list)
        for future, message_id in zip(self.futures, cast(list[int], ids), strict=True):
            if not future.done():
                future.set_result(message_id)

    def fail(self, error: BaseException | Callable[[], BaseException]) -> None:
        """Every caller still waiting gets the error (or, from a factory, one each)."""
        for future in self.futures:
            if not future.done():
                future.set_exception(error if isinstance(error, BaseException) else error())


_translate = sqlite.translate


def _settle(futures: list[asyncio.Future[_O]], outcome: _O) -> None:
    for future in futures:
        if not future.done():
            future.set_result(outcome)


def _fail(futures: list[asyncio.Future[Any]], error: Exception) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)


_EMPTY_INSERT = Insert(())
"""The placeholder write of a group of insert_one() rows until its commit takes it."""


def _prepare(path: str, busy_timeout: float) -> tuple[str, Counts, int, int]:
    """Open synchronously once (``sqlite.prepare``), then read what memory needs.

    Runs in a worker thread before the async connections open. Returns the client id, the
    row counts by status, the highest id ever assigned and the low-water mark of acks.
    """
    return sqlite.prepare(path, busy_timeout, _read_identity)


def _read_identity(conn: sqlite3.Connection) -> tuple[str, Counts, int, int]:
    conn.execute(
        "INSERT OR IGNORE INTO outbox_meta (name, value) VALUES ('client_id', ?)",
        (str(uuid.uuid4()),),
    )
    client_id = conn.execute("SELECT value FROM outbox_meta WHERE name = 'client_id'").fetchone()
    counts, max_id = commit.count_rows(conn)
    return str(client_id[0]), counts, max_id, commit.read_low_water(conn)


class Store:
    """The durable queue behind an Outbox. Open with ``await Store.open(path)``.

    The group commit loop runs in a task of the store's own, started here. If it crashes (a
    bug), every waiting and every later write fails with OutboxBrokenError instead of
    hanging, the traceback is logged once, and ``watch()`` raises for the owner to see.
    """

    def __init__(
        self,
        path: str,
        writer: sqlite3.Connection,
        writer_thread: concurrent.futures.ThreadPoolExecutor,
        reader: aiosqlite.Connection,
        *,
        client_id: str,
        counts: Counts,
        max_id: int,
        clock: Callable[[], float],
        monotonic: Callable[[], float] = time.monotonic,
        low_water: int = 0,
        identity: tuple[tuple[int, int], tuple[int, int] | None] = ((0, 0), None),
        busy_timeout: float = 5.0,
        wal_warn_bytes: int = 64 << 20,
        wal_truncate_bytes: int = WAL_TRUNCATE_BYTES,
        wal_check_interval: float = WAL_CHECK_INTERVAL,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.path = path
        self.client_id = client_id
        self.counts = counts
        """Rows by status, kept in step with each commit (read by stats() and drain())."""
        self.max_id = max_id
        self._writer = writer
        self._writer_thread = writer_thread
        self._reader = reader
        self._clock = clock
        """Wall clock: stamps created_at/updated_at (for people), never decides a purge."""
        self._monotonic = monotonic
        self.ack_ages = AckAges(opened_at=monotonic(), opened_wall=clock(), through=low_water)
        """Monotonic ages of acked rows: what retention may purge (see retention.py)."""
        self._identity = identity
        """(st_dev, st_ino) of the file and of its -wal as opened: a path that names another
        file now (deleted, replaced) fails the commit before any caller hears of it."""
        self._busy_timeout_ms = int(busy_timeout * 1000)
        self.wal_warn_bytes = wal_warn_bytes
        self._wal_warn_at = wal_warn_bytes
        self._wal_truncate_bytes = wal_truncate_bytes
        self._wal_check_interval = wal_check_interval
        self._wal_checked_at = float("-inf")
        self._poll_interval = poll_interval
        self._ops: list[_Queued] = []
        self._group: _Group | None = None
        """Where insert_one() adds its rows until the next commit takes them."""
        self._loop = asyncio.get_running_loop()
        self._in_commit: list[_Queued] = []
        """The writes of the transaction under way (failed too if the loop crashes)."""
        self._acks: list[int] = []
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._closed = False
        self._crash: Exception | None = None
        """What ended the commit loop, if a bug did."""
        self._waiters: dict[int, list[asyncio.Future[tuple[Status, str | None]]]] = {}
        self._status_queue: list[int] = []
        """Ids whose waiters registered since the last status read was taken."""
        self._status_reads: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[list[Row]], None]] = []
        self.requeue_generation = 0
        """Bumped when dead rows return to pending (or a row is renumbered), so a sender
        rescans from the start."""
        self.renumbered: dict[int, int] = {}
        """Old id -> new id of rows renumbered after an id conflict (this process only)."""
        self._renumbering: set[int] = set()
        """Ids whose renumbering transaction is under way (their row may be gone already)."""
        self.commits = 0
        self.foreign_generation = 0
        """Bumped when another connection committed rows past ours (``note_foreign_rows``),
        so a sender queries instead of trusting its memory."""
        self._foreign_seq = 0
        self.counters: Counters | None = None
        """The Outbox's running totals: rows that became dead or expired are counted here."""
        self._data_version = 0
        self._last_now = 0.0
        self._committed = asyncio.Event()
        self._poll_requested = False
        self._polled = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(
            self._run_writer(), name=f"outbox-store:{path}"
        )

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        synchronous: Synchronous = "FULL",
        busy_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        wal_warn_bytes: int = 64 << 20,
        wal_truncate_bytes: int = WAL_TRUNCATE_BYTES,
        wal_check_interval: float = WAL_CHECK_INTERVAL,
        poll_interval: float = POLL_INTERVAL,
    ) -> Store:
        """Open (creating and migrating) the outbox file.

        ``clock`` is the wall clock that stamps rows; ``monotonic`` measures the ages that
        decide purges and checks. ``wal_warn_bytes``: warn (once per doubling) when the -wal
        file grows past it; ``wal_truncate_bytes``: checkpoint and truncate it past this,
        looked at most every ``wal_check_interval`` seconds. An idle store checks every
        ``poll_interval`` seconds whether another connection wrote (e.g. a requeue).
        """
        path = str(path)
        pragmas = sqlite.connection_pragmas(synchronous, busy_timeout)
        try:
            client_id, counts, max_id, low_water = await asyncio.to_thread(
                _prepare, path, busy_timeout
            )
        except sqlite3.Error as exc:
            raise _translate(exc, path) from exc
        thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="outbox-writer")
        loop = asyncio.get_running_loop()
        reader: aiosqlite.Connection | None = None
        try:
            writer, data_version = await loop.run_in_executor(
                thread, commit.connect_writer, path, pragmas
            )
            reader = await aiosqlite.connect(path, timeout=busy_timeout, isolation_level=None)
            for pragma in pragmas:
                await reader.execute(pragma)
            identity = file_guard.file_identity(path)
        except (sqlite3.Error, OSError) as exc:
            if reader is not None:
                await reader.close()
            thread.shutdown(wait=False)
            if isinstance(exc, OSError):
                raise DatabaseMissingError(f"{path} vanished while opening it: {exc}") from exc
            raise _translate(exc, path) from exc
        store = cls(
            path,
            writer,
            thread,
            reader,
            client_id=client_id,
            counts=counts,
            max_id=max_id,
            clock=clock,
            monotonic=monotonic,
            low_water=low_water,
            identity=identity,
            busy_timeout=busy_timeout,
            wal_warn_bytes=wal_warn_bytes,
            wal_truncate_bytes=wal_truncate_bytes,
            wal_check_interval=wal_check_interval,
            poll_interval=poll_interval,
        )
        store._data_version = data_version
        return store

    # -- queueing writes ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._crash is not None:
            raise self._broken_error()
        if self._closed:
            raise OutboxClosedError(f"the outbox store {self.path} is closed")

    def _queue(self, write: Write) -> None:
        """Queue a write nobody waits on (timeouts, dead rows)."""
        self._check_open()
        self._ops.append(_Queued(write))
        self._wakeup.set()

    def _call(self, write: Write) -> asyncio.Future[Result]:
        """Queue a write; the future gets its result once it commits (or the error)."""
        self._check_open()
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._ops.append(_Queued(write, future))
        self._wakeup.set()
        return future

    def insert_one(
        self, payload: str, key: str | None, expires_at: float | None = None
    ) -> asyncio.Future[int]:
        """Queue one ``(payload_json, key)`` row; the future gets its id once it commits.

        The hot path of ``send()``: the rows of every caller queued before the next commit
        begins share one write. Same rules as :meth:`insert` (a known key returns its id;
        a caller cancelled before the transaction starts writes nothing).
        """
        group = self._group
        if group is None:
            self._check_open()
            group = self._group = _Group()
            self._ops.append(_Queued(_EMPTY_INSERT, group=group))
            self._wakeup.set()
        elif self._crash is not None or self._closed:
            self._check_open()
        future: asyncio.Future[int] = self._loop.create_future()
        group.rows.append((payload, key))
        group.futures.append(future)
        group.expiries.append(expires_at)
        if expires_at is not None:
            group.timed = True
        self._queued_rows += 1
        return future

    @property
    def queued_rows(self) -> int:
        """Rows handed to insert() and not yet committed (for the max_pending quota)."""
        return self._queued_rows

    async def insert(
        self, rows: Sequence[tuple[str, str | None]], expires_at: float | None = None
    ) -> list[int]:
        """Commit ``(payload_json, key)`` rows as pending; return their ids, in order.

        A key that already exists (or repeats within the call) returns the existing id and
        writes nothing. If the caller is cancelled before the transaction starts, nothing is
        written; once it has started, the rows commit even though nobody reads the ids.
        """
        future = self._call(Insert(tuple(rows), expires_at))
        self._queued_rows += len(rows)
        ids = await future
        assert isinstance(ids, list)
        return cast(list[int], ids)  # an Insert's result is its ids

    def mark_acked(self, ids: Sequence[int]) -> None:
        """The server acked these ids: wake their waiters now, write them with the next commit.

        Acks from many frames pile into one list and one UPDATE. ``wait_acked`` returns on
        the server's ack rather than on our own bookkeeping commit: if that commit is lost
        in a crash, the message is only sent again and the receiver answers from its inbox.
        """
        if not ids:
            return
        self._check_open()
        self._acks.extend(ids)
        self._resolve_acked(ids)
        self._wakeup.set()

    def record_timeouts(self, items: Sequence[tuple[int, int]], error: str) -> None:
        """Queue ``(id, attempts)`` after ack timeouts, with the error text."""
        if items:
            self._queue(Timeouts(tuple((n, attempts, error) for n, attempts in items)))

    def mark_dead(self, items: Sequence[tuple[int, str]]) -> None:
        """Queue ``(id, reason)`` rows to become dead (kept, never deleted)."""
        if items:
            self._queue(Dead(tuple(items)))

    async def expire(self, through: float) -> list[tuple[int, str]]:
        """Pending rows with ``expires_at <= through`` become expired; returns them."""
        found = await self._call(Expire(through))
        assert isinstance(found, list)
        return [item for item in found if isinstance(item, tuple)]

    async def next_expiry(self) -> float | None:
        """The earliest ``expires_at`` of a pending row (committed), or None."""
        try:
            found = list(
                await self._reader.execute_fetchall(
                    "SELECT min(expires_at) FROM outbox "
                    "WHERE status = 'pending' AND expires_at IS NOT NULL"
                )
            )
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc
        return None if not found or found[0][0] is None else float(found[0][0])

    async def requeue_dead(self, ids: Sequence[int] | None = None) -> int:
        """Dead rows (all, or these ids) back to pending with attempts reset; returns count."""
        count = await self._call(Requeue(None if ids is None else tuple(ids)))
        assert isinstance(count, int)
        return count

    async def purge_acked(self, *, older_than: float | None, keep: int | None) -> int:
        """Delete acked rows stamped before wall ``older_than`` or beyond the newest ``keep``.

        A low-level tool (tests, the command line): the Outbox's retention uses
        ``purge_expired``, which no clock step can make delete early.
        """
        count = await self._call(Purge(older_than, keep))
        assert isinstance(count, int)
        return count

    async def purge_expired(self, retention: float | None, keep: int | None) -> int:
        """Delete acked rows older than ``retention`` seconds, or beyond the newest ``keep``.

        Ages are monotonic (``retention.py``): never purge a row younger than its retention
        by any clock it has seen. Returns how many rows were deleted.
        """
        count = await self._call(Purge(None, keep, retention=retention))
        assert isinstance(count, int)
        return count

    async def refresh(self) -> None:
        """Re-read the counts now if another connection wrote (e.g. a requeue in the shell).

        The check runs in the commit loop, between two commits, so that a recount never
        overlaps a transaction whose changes memory has yet to apply.
        """
        self._check_open()
        polled = self._polled
        self._poll_requested = True
        self._wakeup.set()
        await polled.wait()
        self.check_broken()

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        await self._call(Flush())

    async def wait_commit(self) -> None:
        """Wait for the next commit (or failed attempt) of the group commit loop."""
        if self._crash is None:
            await self._committed.wait()
        if self._crash is not None:
            raise self._broken_error()

    def subscribe(self, listener: Callable[[list[Row]], None]) -> Callable[[], None]:
        """Call ``listener(new_rows)`` after each commit that added or requeued pending rows.

        ``new_rows`` are the rows this commit created, in id order (empty for a requeue), so
        a sender that has read everything before them can send them without a query.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def note_foreign_rows(self, seq: int) -> None:
        """The outbox's id sequence is at ``seq`` (read by ``watch.py``): if that is past
        every id this process knows, another connection added rows: wake the sender."""
        if seq > self.max_id and seq > self._foreign_seq and not self._closed:
            self._foreign_seq = seq
            self.foreign_generation += 1
            self._notify([])

    # -- the group commit loop ---------------------------------------------------------------

    async def _run_writer(self) -> None:
        """Run the commit loop; if it crashes, fail every write at once and say so, once.

        An error of SQLite (disk full, file locked) never gets here: ``_commit_queued`` hands
        it to the callers and the loop retries. What gets here is a bug, and a loop that is
        gone must not leave ``send()`` waiting forever for a commit that never comes.
        """
        try:
            await self._commit_loop()
        except DatabaseMissingError as exc:
            self._crash = exc
            logger.error("outbox: %s", exc)
            self._fail_everything()
        except Exception as exc:
            self._crash = exc
            logger.exception(
                "outbox: the commit loop of %s crashed (a bug in outbox, please report it); "
                "every send() now fails with OutboxBrokenError: close the Outbox and open a "
                "new one on the same file to go on",
                self.path,
            )
            self._fail_everything()

    def _broken_error(self) -> OutboxBrokenError | DatabaseMissingError:
        """A fresh error for each caller, chained to the crash (not re-raised: one traceback)."""
        crash = self._crash
        if isinstance(crash, DatabaseMissingError):
            return DatabaseMissingError(str(crash))
        what = f"{type(crash).__name__}: {crash}"[:300]
        error = OutboxBrokenError(
            f"the outbox store {self.path} can no longer write: its commit loop crashed "
            f"({what}), a bug in outbox whose traceback is in the log. Rows committed before "
            "are safe on disk; a write under way at the crash may or may not have committed. "
            "Close this Outbox and open a new one on the same file (retry a send with the "
            "same key to find out whether it committed)."
        )
        error.__cause__ = crash
        return error

    def _fail_everything(self) -> None:
        """After a crash: every queued write and every waiter gets OutboxBrokenError."""
        queued = [*self._in_commit, *self._ops]
        self._in_commit, self._ops, self._acks, self._queued_rows = [], [], [], 0
        self._group = None
        for item in queued:
            if item.group is not None:
                item.group.fail(self._broken_error)  # a fresh error for each caller
            if item.future is not None and not item.future.done():
                item.future.set_exception(self._broken_error())
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(self._broken_error())
        self._waiters.clear()
        self._commit_done()
        self._poll_done()

    async def watch(self) -> None:
        """For the store's owner: wait while the commit loop runs, raise if it crashed.

        Returns when the loop ends after close(); cancelling this leaves the loop running.
        """
        await asyncio.wait({self._task})
        if self._crash is not None:
            raise self._broken_error()

    @property
    def broken(self) -> bool:
        """True once the commit loop has ended for good: a crash (OutboxBrokenError) or a
        file that was deleted or replaced (DatabaseMissingError)."""
        return self._crash is not None

    def failure(self) -> Exception | None:
        """What ended the commit loop for good (a fresh error to raise), or None."""
        return None if self._crash is None else self._broken_error()

    def check_broken(self) -> None:
        """Raise OutboxBrokenError (or DatabaseMissingError) if the commit loop has ended."""
        if self._crash is not None:
            raise self._broken_error()

    async def _commit_loop(self) -> None:
        failures = 0
        while self._ops or self._acks or not self._closed:
            if not (self._ops or self._acks) and self._poll_requested:
                await self._poll()
                continue
            if not (self._ops or self._acks):
                try:
                    async with asyncio.timeout(self._poll_interval):
                        await self._wakeup.wait()
                except TimeoutError:
                    # Idle: did another connection write (a requeue in the sqlite3 shell)?
                    # Is the file still ours, is the WAL still growing? One cheap hop.
                    await self._poll()
                    continue
                self._wakeup.clear()
                # One turn of the loop lets every producer that is ready to send (e.g. all
                # those the last commit just woke) queue its rows: they share this commit.
                await asyncio.sleep(0)
                continue
            if await self._commit_queued():
                failures = 0
            elif self._closed:
                logger.error(
                    "outbox: closing with %d writes uncommitted (acks: resent later)",
                    len(self._ops) + len(self._acks),
                )
                for item in self._ops:
                    if item.group is not None:
                        item.group.fail(OutboxClosedError("the outbox was closed"))
                self._ops.clear()
                self._group = None
                self._acks.clear()
            else:
                failures += 1
                # Back off so a full disk does not turn into a hot loop.
                await asyncio.sleep(min(1.0, 0.01 * 2**failures))

    async def _commit_queued(self) -> bool:
        """Commit everything queued in one transaction; False if it failed.

        On failure, callers waiting on their writes get the error at once; acks and
        timeouts (nobody waits on them) go back in the queue for the next attempt.
        """
        taken, self._ops, self._group = self._ops, [], None
        taken_rows = 0
        for item in taken:
            if item.group is not None:
                taken_rows += len(item.group.rows)  # cancelled callers counted too
                item.write = item.group.write()
            elif isinstance(item.write, Insert):
                taken_rows += len(item.write.rows)
        if self._acks:
            taken.append(_Queued(Ack(tuple(self._acks))))
            self._acks = []
        self._in_commit = queued = [
            item
            for item in taken
            if (item.future is None or not item.future.cancelled())
            and (item.group is None or item.group.futures)
        ]
        writes = [item.write for item in queued]
        try:
            # Strictly increasing per transaction, even with a coarse clock: _mark_acked
            # tells this transaction's changes apart by their timestamp.
            self._last_now = now = self._stamp()
            writes = [self._resolve_purge(write) for write in writes]
            # A flush with nothing queued before it needs no transaction, and so no write
            # lock: a reconnect must not wait for another process to let go of the file.
            batch = (
                await self._run_on_writer(
                    commit.apply_writes, writes, now, self._data_version, self._after_commit()
                )
                if any(not isinstance(write, Flush) for write in writes)
                else commit.Batch(data_version=self._data_version)
            )
        except Exception as exc:
            self._queued_rows -= taken_rows
            self._in_commit = []
            self._fail_commit(queued, _translate(exc, self.path))
            return False
        if batch.missing is not None:
            # Committed into a file nobody will find again: nobody may hear "committed".
            raise DatabaseMissingError(batch.missing)
        if queued:
            self.commits += 1
        self._publish(queued, batch)
        self._wal_seen(batch.wal_bytes)
        self._queued_rows -= taken_rows
        self._in_commit = []
        self._commit_done()
        return True

    def _stamp(self) -> float:
        """The wall-clock stamp of the next transaction, for updated_at / created_at.

        It follows the wall clock, also backwards after a real step (it is only for people
        to read), but stays strictly increasing across a coarse clock's ticks or a jitter of
        under a second: ``_mark_acked`` tells its own changes apart by their stamp.
        """
        wall = self._clock()
        last = self._last_now
        if last - 1.0 < wall <= last:
            return last + 1e-6
        return wall

    def _resolve_purge(self, write: Write) -> Write:
        """A retention purge gets its cutoffs now, after every earlier commit's clamps."""
        if not isinstance(write, Purge) or write.retention is None:
            return write
        cut = self.ack_ages.cutoff(write.retention, self._monotonic(), self._clock())
        return dataclasses.replace(
            write,
            through=cut.through,
            older_than=cut.older_than,
            older_than_through=cut.older_than_through,
        )

    def _after_commit(self) -> file_guard.AfterCommit:
        now = self._monotonic()
        check_wal = now - self._wal_checked_at >= self._wal_check_interval
        if check_wal:
            self._wal_checked_at = now
        return file_guard.AfterCommit(
            self.path,
            self._identity,
            check_wal,
            self._wal_truncate_bytes,
            self._busy_timeout_ms,
        )

    async def _poll(self) -> None:
        """Without writing: re-read counts if another connection wrote; check the file."""
        self._poll_requested = False
        try:
            batch = await self._run_on_writer(
                commit.poll_writer, self._data_version, self._after_commit()
            )
        except sqlite3.Error as exc:
            logger.debug("outbox: idle check of %s failed: %s", self.path, exc)
            self._poll_done()
            return
        if batch.missing is not None:
            raise DatabaseMissingError(batch.missing)  # _run_writer wakes everyone
        if batch.recount is not None:
            self._publish([], batch)
            self._commit_done()  # drain() looks at the counts again
        self._wal_seen(batch.wal_bytes)
        self._poll_done()

    def _poll_done(self) -> None:
        self._polled.set()
        self._polled = asyncio.Event()

    def _wal_seen(self, size: int | None) -> None:
        """Warn once per doubling of the -wal file past wal_warn_bytes (it cannot shrink
        while a reader holds a snapshot: typically a sqlite3 shell inside BEGIN)."""
        if size is None:
            return
        if size < self.wal_warn_bytes:
            if self._wal_warn_at > self.wal_warn_bytes:
                logger.info("outbox: the -wal file of %s is back to %d bytes", self.path, size)
            self._wal_warn_at = self.wal_warn_bytes
            return
        if size < self._wal_warn_at:
            return
        while self._wal_warn_at <= size:
            self._wal_warn_at *= 2
        logger.warning(
            "outbox: the -wal file of %s is %.1f MiB and cannot be checkpointed: another "
            "connection holds a read transaction open (a sqlite3 shell after BEGIN, or a "
            "long query in another process); end it (COMMIT or quit) and the file shrinks",
            self.path,
            size / (1 << 20),
        )

    def _fail_commit(self, queued: list[_Queued], error: Exception) -> None:
        """The transaction rolled back: waiting callers get the error, the rest is retried."""
        logger.error("outbox: commit of %d queued writes failed: %s", len(queued), error)
        retry = []
        for item in queued:
            if item.group is not None:
                item.group.fail(error)
            elif item.future is None:
                retry.append(item)
            elif not item.future.done():
                item.future.set_exception(error)
        self._ops[:0] = retry
        self._commit_done()

    def _commit_done(self) -> None:
        """Wake wait_commit() callers: a commit, or an attempt at one, just ended."""
        self._committed.set()
        self._committed = asyncio.Event()

    def _publish(self, queued: list[_Queued], batch: commit.Batch) -> None:
        """Bring memory in line with what just committed, then wake whoever waits."""
        came_back = self._came_back(batch)
        if batch.clamp is not None:
            self.ack_ages.clamp(batch.clamp)
        foreign = self.foreign_generation
        previous_max_id = self._update_counts(batch)
        for index, item in enumerate(queued):
            if item.group is not None:
                item.group.publish(batch.results.get(index))
            elif item.future is not None and not item.future.done():
                item.future.set_result(batch.results.get(index))
        self._resolve_acked(batch.acked)
        if self.counters is not None:
            self.counters.dead += len(batch.dead)
            self.counters.expired += len(batch.expired)
        for message_id, reason in batch.dead:
            self._resolve(message_id, ("dead", reason))
        for message_id, reason in batch.expired:
            self._resolve(message_id, ("expired", reason))
        if batch.expired:
            self.requeue_generation += 1  # a sender holding them in memory must rescan
        if batch.acked and batch.low_water is not None:
            self.ack_ages.acked(self._monotonic(), batch.low_water)
        if batch.new_pending or batch.requeued or came_back:
            if batch.requeued or came_back:
                self.requeue_generation += 1
            new_rows = (
                commit.rows_created(batch, previous_max_id)
                if batch.new_pending and self._listeners
                else []
            )
            self._notify(new_rows)
        elif foreign != self.foreign_generation:
            self._notify([])  # rows of another connection: the sender queries for them

    def _came_back(self, batch: commit.Batch) -> bool:
        """Did another connection put rows back to pending (dead rows requeued in the shell)?

        More pending rows than the new ids explain, or fewer dead ones: the sender must
        rescan from the start, as after our own requeue_dead().
        """
        if batch.recount is None:
            return False
        fresh, max_id = batch.recount
        new_ids = max(0, max_id - self.max_id)
        return fresh.dead < self.counts.dead or fresh.pending - self.counts.pending > new_ids

    def _update_counts(self, batch: commit.Batch) -> int:
        """Apply the batch to the counts and max_id; return the max_id before its new rows."""
        self._data_version = batch.data_version
        counts = self.counts
        if batch.recount is not None:
            fresh, max_id = batch.recount
            counts.pending, counts.acked, counts.dead = fresh.pending, fresh.acked, fresh.dead
            counts.expired = fresh.expired
            if max_id > self.max_id:
                # Another connection added rows: say so here too, or the watch's next look
                # (which compares with max_id) would find nothing new and wake nobody.
                self._foreign_seq = max(self._foreign_seq, max_id)
                self.foreign_generation += 1
            self.max_id = max(self.max_id, max_id)
        previous_max_id = self.max_id
        self.max_id = max(self.max_id, batch.max_id)
        counts.pending += batch.new_pending + batch.requeued - len(batch.acked) - len(batch.dead)
        counts.pending -= len(batch.expired)
        counts.expired += len(batch.expired)
        counts.acked += len(batch.acked) - batch.purged
        counts.dead += len(batch.dead) - batch.requeued
        return previous_max_id

    def _notify(self, new_rows: list[Row]) -> None:
        for listener in list(self._listeners):
            try:
                listener(new_rows)
            except Exception:  # a listener's bug must not stop the commit loop
                logger.exception("outbox: a commit listener failed")

    def _resolve_acked(self, ids: Sequence[int]) -> None:
        """Wake the waiters of these acked ids: a look per waiter or per id, the fewer."""
        waiters = self._waiters
        if not waiters:
            return
        if len(waiters) < len(ids):
            acked = set(ids)
            hits = [message_id for message_id in waiters if message_id in acked]
        else:
            hits = [message_id for message_id in ids if message_id in waiters]
        for message_id in hits:
            self._resolve(message_id, ("acked", None))

    def _resolve(self, message_id: int, outcome: tuple[Status, str | None]) -> None:
        _settle(self._waiters.pop(message_id, []), outcome)

    async def _run_on_writer(self, function: Callable[..., _T], *args: Any) -> _T:
        """Run ``function(writer_connection, *args)`` on the writer thread: one hop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer_thread, function, self._writer, *args)

    # -- reads (committed data only) ---------------------------------------------------------

    async def fetch_pending(self, after: int, limit: int) -> list[Row]:
        """Pending rows with id > ``after``, in id order: the sender's page."""
        try:
            found = await self._reader.execute_fetchall(
                "SELECT id, payload, attempts FROM outbox "
                "WHERE status = 'pending' AND id > ? ORDER BY id LIMIT ?",
                (after, limit),
            )
            return list(map(Row._make, found))
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc

    async def fetch_ids(self, ids: Iterable[int]) -> list[Row]:
        """These rows if they are still pending, in id order (for resends after a timeout)."""
        wanted = sorted(ids)
        rows: list[Row] = []
        for chunk, marks in commit.in_lists(wanted):
            found = await self._reader.execute_fetchall(
                f"SELECT id, payload, attempts FROM outbox WHERE status = 'pending' "
                f"AND id IN ({marks}) ORDER BY id",
                chunk,
            )
            rows += map(Row._make, found)
        return rows

    async def low_water_mark(self) -> int:
        """Every id below this is acked and will never be sent again (``lowwater.py``)."""
        try:
            found = list(await self._reader.execute_fetchall(lowwater.MARK_SQL))
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc
        return lowwater.mark(*found[0])

    async def ids_for_keys(self, keys: Sequence[str]) -> dict[str, int]:
        """The committed rows these idempotency keys already name."""
        found: dict[str, int] = {}
        unique = list(dict.fromkeys(keys))
        for chunk, marks in commit.in_lists(unique):
            rows = await self._reader.execute_fetchall(commit.keys_sql(marks), chunk)
            found.update({str(k): int(i) for k, i in rows})
        return found

    async def status(self, message_id: int) -> tuple[Status, str | None]:
        """The status of one message; an acked row that retention purged reads as acked."""
        while message_id in self.renumbered:
            message_id = self.renumbered[message_id]
        found = list(
            await self._reader.execute_fetchall(
                f"SELECT {commit.STATUS_SQL}, last_error FROM outbox WHERE id = ?", (message_id,)
            )
        )
        if found:
            return found[0][0], found[0][1]
        if 0 < message_id <= self.max_id:
            return "acked", None  # purged by retention: only acked rows are ever deleted
        raise ValueError(f"no message with id {message_id} in {self.path}")

    async def wait_status(self, message_id: int) -> tuple[Status, str | None]:
        """Wait until the message is acked or dead (returns which, with the reason)."""
        future = self.status_future(message_id)
        try:
            return await future
        finally:
            self.forget_waiter(message_id, future)

    def status_future(self, message_id: int) -> asyncio.Future[tuple[Status, str | None]]:
        """A future that gets the message's status once it is acked or dead (ValueError for
        an id this file never had); give it back with :meth:`forget_waiter` when done.

        It is registered before the row is read, so a commit in between is not missed. The
        reads of every waiter registered meanwhile share one query and one thread hop: a
        hop per ``wait_acked()`` capped the rate of send-then-wait producers at the reader
        thread's (about 3,000 a second on 2 cores, with seconds of queueing behind it).
        """
        self.check_broken()
        if self._closed:
            raise OutboxClosedError(f"the outbox store {self.path} is closed")
        while message_id in self.renumbered:
            message_id = self.renumbered[message_id]
        future: asyncio.Future[tuple[Status, str | None]] = self._loop.create_future()
        self._waiters.setdefault(message_id, []).append(future)
        self._status_queue.append(message_id)
        if self._status_reads is None:
            self._status_reads = self._loop.create_task(self._read_statuses())
        return future

    def forget_waiter(
        self, message_id: int, future: asyncio.Future[tuple[Status, str | None]]
    ) -> None:
        """Unregister a future of :meth:`status_future` (done, or its caller gave up)."""
        while message_id in self.renumbered:
            message_id = self.renumbered[message_id]
        waiters = self._waiters.get(message_id)
        if waiters is not None and future in waiters:
            waiters.remove(future)
            if not waiters:
                del self._waiters[message_id]

    async def _read_statuses(self) -> None:
        """Read the rows of every queued waiter, a chunk of ids per query, until none is
        left; settle the waiters of rows that are no longer pending.

        A read settles only the futures registered before it was issued, judged by what
        was known then: a waiter that registered while it ran (after a requeue, or after
        the row was inserted) has a read of its own queued, and gets that one's answer.
        """
        try:
            while self._status_queue:
                ids = [n for n in dict.fromkeys(self._status_queue) if n in self._waiters]
                self._status_queue = []
                for chunk, marks in commit.in_lists(ids):
                    asked = {n: list(self._waiters.get(n, ())) for n in chunk}
                    max_id = self.max_id
                    try:
                        rows = await self._reader.execute_fetchall(
                            f"SELECT id, {commit.STATUS_SQL}, last_error FROM outbox "
                            f"WHERE id IN ({marks})",
                            chunk,
                        )
                    except Exception as exc:  # the caller of wait_acked() gets it, as before
                        error = (
                            _translate(exc, self.path) if isinstance(exc, sqlite3.Error) else exc
                        )
                        for futures in asked.values():
                            _fail(futures, error)
                        continue
                    found = {int(row[0]): (row[1], row[2]) for row in rows}
                    for message_id, futures in asked.items():
                        self._settle_read(message_id, found.get(message_id), futures, max_id)
        finally:
            self._status_reads = None

    def _settle_read(
        self,
        message_id: int,
        row: tuple[Status, str | None] | None,
        futures: list[asyncio.Future[tuple[Status, str | None]]],
        max_id: int,
    ) -> None:
        """Settle the futures that asked about ``message_id`` with what the read found;
        ``max_id`` is the store's when the read was issued."""
        if row is None and (message_id in self._renumbering or message_id in self.renumbered):
            return  # moved to a new id, pending there: its waiters follow it (renumber)
        if row is None and not 0 < message_id <= max_id:
            _fail(futures, ValueError(f"no message with id {message_id} in {self.path}"))
        elif row is None:
            _settle(futures, ("acked", None))  # purged: only acked rows are ever deleted
        elif row[0] != "pending":
            _settle(futures, row)

    def fail_waiters(self, error: Callable[[int], Exception]) -> None:
        """Every status waiter gets ``error(its message id)`` (the connection was given up)."""
        for message_id in list(self._waiters):
            _fail(self._waiters.pop(message_id), error(message_id))

    # -- id conflicts (docs/protocol.md, "Reused ids") ----------------------------------------

    async def raise_sequence(self, floor: int) -> int:
        """Make every new id greater than ``floor`` (the receiver's high-water mark for this
        client); returns the previous highest id. A no-op when the sequence is past it."""
        previous: int = await self._run_on_writer(commit.raise_sequence, floor)
        self.max_id = max(self.max_id, floor)
        return previous

    async def renumber(self, message_id: int, note: str) -> int | None:
        """Give a pending row the next fresh id, keeping its payload, key and creation time,
        in one transaction; None if it is no longer pending. Waiters follow it."""
        self._renumbering.add(message_id)
        try:
            new_id: int | None = await self._run_on_writer(
                commit.renumber, message_id, note, self._clock()
            )
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc
        finally:
            self._renumbering.discard(message_id)
        if new_id is None:
            return None
        self.renumbered[message_id] = new_id
        self.max_id = max(self.max_id, new_id)
        moved = self._waiters.pop(message_id, None)
        if moved:
            self._waiters.setdefault(new_id, []).extend(moved)
        self.requeue_generation += 1
        return new_id

    # -- closing -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Commit what is queued, stop the loop, close both connections.

        Also works while the event loop is shutting down (``asyncio.run`` returning with the
        Outbox still open): if the commit loop was cancelled, what it left is committed here.
        """
        if self._closed:
            return
        self._closed = True  # refuse new writes; the loop commits what is queued, then ends
        self._wakeup.set()
        await asyncio.wait({self._task}, timeout=30)  # never raises, whatever ended the task
        if not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task})
        if self._ops or self._acks:
            try:
                await self._commit_queued()
            except Exception as exc:
                logger.error("outbox: could not commit queued acks before closing: %s", exc)
        for future_list in self._waiters.values():
            for future in future_list:
                if not future.done():
                    future.set_exception(OutboxClosedError("the outbox was closed"))
        self._waiters.clear()
        self._poll_done()
        # Shielded: even if close() is cancelled here, both connections still close. The
        # reader's thread is not a daemon, and a process with it left running never exits.
        await asyncio.shield(self._close_connections())

    async def _close_connections(self) -> None:
        with contextlib.suppress(Exception):
            await self._reader.close()
        with contextlib.suppress(Exception):
            await self._run_on_writer(sqlite3.Connection.close)
        self._writer_thread.shutdown(wait=False)


# ---------------------------------------------------------------------------------------------
# The writer thread: plain sqlite3, one call per group commit
# ---------------------------------------------------------------------------------------------


# Each step coalesces one kind across the whole batch: one statement per chunk of ids, not
# one per queued write. Requeues and purges touch disjoint rows (dead, acked), after the acks
# and dead rows of the same batch, so their order between themselves does not matter.
