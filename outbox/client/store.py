"""The outbox table: all of the client's SQL lives here.

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
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import aiosqlite

from ..errors import OutboxBrokenError, OutboxClosedError
from ..protocol.feed import Row
from ..storage import sqlite
from ..storage.sqlite import Synchronous as Synchronous  # re-exported for Options

logger = logging.getLogger("outbox")

Status = Literal["pending", "acked", "dead"]
_T = TypeVar("_T")
_V = TypeVar("_V")

_CHUNK = 500  # ids per IN (...) list, well under SQLite's variable limit
PURGE_CHUNK = 5000  # acked rows deleted per transaction by the retention purge
_INSERT_CHUNK = 200  # rows per multi-row INSERT (4 variables each, under the old limit of 999)


def _in_lists(items: Sequence[_V]) -> Iterator[tuple[list[_V], str]]:
    """Split ``items`` for ``IN (...)`` queries: each chunk with its ``?,?,...`` placeholders."""
    for start in range(0, len(items), _CHUNK):
        chunk = list(items[start : start + _CHUNK])
        yield chunk, ",".join("?" * len(chunk))


def _keys_sql(marks: str) -> str:
    """The rows idempotency keys already name (read by the writer and by send()'s quota)."""
    return f"SELECT key, id FROM outbox WHERE key IN ({marks})"


# -- the queued writes: one frozen type per kind -------------------------------------------
# Each is applied by its own step on the writer thread (see ``_STEPS``), coalesced across
# the whole batch: all inserts in one pass, one statement per chunk of ids for the others.


@dataclass(frozen=True, slots=True)
class Insert:
    """New rows, ``(payload_json, key)``; the result is their ids, in order."""

    rows: tuple[tuple[str, str | None], ...]


@dataclass(frozen=True, slots=True)
class Ack:
    """Ids the server acked (every ack since the last commit, in one write)."""

    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """``(id, attempts, error)`` after ack timeouts."""

    items: tuple[tuple[int, int, str], ...]


@dataclass(frozen=True, slots=True)
class Dead:
    """``(id, reason)`` rows that become dead."""

    items: tuple[tuple[int, str], ...]


@dataclass(frozen=True, slots=True)
class Requeue:
    """Dead rows back to pending: these ids, or all of them (None); the result is a count."""

    ids: tuple[int, ...] | None


@dataclass(frozen=True, slots=True)
class Purge:
    """Delete acked rows older than ``older_than`` or beyond the newest ``keep``: a count."""

    older_than: float | None
    keep: int | None


@dataclass(frozen=True, slots=True)
class Flush:
    """Nothing to write: done once everything queued before it has committed."""


Write = Insert | Ack | Timeouts | Dead | Requeue | Purge | Flush
Result = list[int] | int | None
"""What a caller's future gets: ids for an Insert, a count for Requeue and Purge."""
_W = TypeVar("_W", Insert, Ack, Timeouts, Dead, Requeue, Purge, Flush)


@dataclass(slots=True)
class _Queued:
    """One queued write. ``future`` is None for writes nobody waits on (acks, timeouts)."""

    write: Write
    future: asyncio.Future[Result] | None = None


@dataclass(slots=True)
class Counts:
    pending: int = 0
    acked: int = 0
    dead: int = 0


@dataclass(slots=True)
class _Batch:
    """What one transaction did, applied to memory only after it commits."""

    results: dict[int, Result] = field(default_factory=dict)
    """By index of the write in the batch, for those that have a result."""
    new_pending: int = 0
    acked: list[int] = field(default_factory=list)
    dead: list[tuple[int, str]] = field(default_factory=list)
    requeued: int = 0
    purged: int = 0
    max_id: int = 0
    inserted: list[tuple[Insert, list[int]]] = field(default_factory=list)
    """Each insert of the batch with its ids (the listeners' new rows come from here)."""
    recount: tuple[Counts, int] | None = None
    """Counts and max id read at BEGIN, when another connection had written since our last
    commit (another process, the sqlite3 shell): memory starts again from the table."""
    data_version: int = 0


_translate = sqlite.translate


def _prepare(path: str, busy_timeout: float) -> tuple[str, Counts, int]:
    """Open synchronously once (``sqlite.prepare``), then read what memory needs.

    Runs in a worker thread before the async connections open. Returns the client id, the
    row counts by status, and the highest id ever assigned.
    """
    return sqlite.prepare(path, busy_timeout, _read_identity)


def _read_identity(conn: sqlite3.Connection) -> tuple[str, Counts, int]:
    conn.execute(
        "INSERT OR IGNORE INTO outbox_meta (name, value) VALUES ('client_id', ?)",
        (str(uuid.uuid4()),),
    )
    client_id = conn.execute("SELECT value FROM outbox_meta WHERE name = 'client_id'").fetchone()
    counts, max_id = _count(conn)
    return str(client_id[0]), counts, max_id


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
        self._ops: list[_Queued] = []
        self._in_commit: list[_Queued] = []
        """The writes of the transaction under way (failed too if the loop crashes)."""
        self._acks: list[int] = []
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._closed = False
        self._crash: Exception | None = None
        """What ended the commit loop, if a bug did."""
        self._waiters: dict[int, list[asyncio.Future[tuple[Status, str | None]]]] = {}
        self._listeners: list[Callable[[list[Row]], None]] = []
        self.requeue_generation = 0
        """Bumped when dead rows return to pending (or a row is renumbered), so a sender
        rescans from the start."""
        self.renumbered: dict[int, int] = {}
        """Old id -> new id of rows renumbered after an id conflict (this process only)."""
        self.commits = 0
        self.foreign_generation = 0
        """Bumped when another connection committed rows past ours (``note_foreign_rows``),
        so a sender queries instead of trusting its memory."""
        self._foreign_seq = 0
        self._data_version = 0
        self._last_now = 0.0
        self._committed = asyncio.Event()
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
    ) -> Store:
        path = str(path)
        pragmas = sqlite.connection_pragmas(synchronous, busy_timeout)
        try:
            client_id, counts, max_id = await asyncio.to_thread(_prepare, path, busy_timeout)
        except sqlite3.Error as exc:
            raise _translate(exc, path) from exc
        thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="outbox-writer")
        loop = asyncio.get_running_loop()
        reader: aiosqlite.Connection | None = None
        try:
            writer, data_version = await loop.run_in_executor(
                thread, _connect_writer, path, pragmas
            )
            reader = await aiosqlite.connect(path, timeout=busy_timeout, isolation_level=None)
            for pragma in pragmas:
                await reader.execute(pragma)
        except sqlite3.Error as exc:
            if reader is not None:
                await reader.close()
            thread.shutdown(wait=False)
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

    @property
    def queued_rows(self) -> int:
        """Rows handed to insert() and not yet committed (for the max_pending quota)."""
        return self._queued_rows

    async def insert(self, rows: Sequence[tuple[str, str | None]]) -> list[int]:
        """Commit ``(payload_json, key)`` rows as pending; return their ids, in order.

        A key that already exists (or repeats within the call) returns the existing id and
        writes nothing. If the caller is cancelled before the transaction starts, nothing is
        written; once it has started, the rows commit even though nobody reads the ids.
        """
        future = self._call(Insert(tuple(rows)))
        self._queued_rows += len(rows)
        ids = await future
        assert isinstance(ids, list)
        return ids

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
        if self._waiters:
            for message_id in ids:
                self._resolve(message_id, ("acked", None))
        self._wakeup.set()

    def record_timeouts(self, items: Sequence[tuple[int, int]], error: str) -> None:
        """Queue ``(id, attempts)`` after ack timeouts, with the error text."""
        if items:
            self._queue(Timeouts(tuple((n, attempts, error) for n, attempts in items)))

    def mark_dead(self, items: Sequence[tuple[int, str]]) -> None:
        """Queue ``(id, reason)`` rows to become dead (kept, never deleted)."""
        if items:
            self._queue(Dead(tuple(items)))

    async def requeue_dead(self, ids: Sequence[int] | None = None) -> int:
        """Dead rows (all, or these ids) back to pending with attempts reset; returns count."""
        count = await self._call(Requeue(None if ids is None else tuple(ids)))
        assert isinstance(count, int)
        return count

    async def purge_acked(self, *, older_than: float | None, keep: int | None) -> int:
        """Delete acked rows last changed before ``older_than`` or beyond the newest ``keep``."""
        count = await self._call(Purge(older_than, keep))
        assert isinstance(count, int)
        return count

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
        except Exception as exc:
            self._crash = exc
            logger.exception(
                "outbox: the commit loop of %s crashed (a bug in outbox, please report it); "
                "every send() now fails with OutboxBrokenError: close the Outbox and open a "
                "new one on the same file to go on",
                self.path,
            )
            self._fail_everything()

    def _broken_error(self) -> OutboxBrokenError:
        """A fresh error for each caller, chained to the crash (not re-raised: one traceback)."""
        crash = self._crash
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
        for item in queued:
            if item.future is not None and not item.future.done():
                item.future.set_exception(self._broken_error())
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(self._broken_error())
        self._waiters.clear()
        self._commit_done()

    async def watch(self) -> None:
        """For the store's owner: wait while the commit loop runs, raise if it crashed.

        Returns when the loop ends after close(); cancelling this leaves the loop running.
        """
        await asyncio.wait({self._task})
        if self._crash is not None:
            raise self._broken_error()

    @property
    def broken(self) -> bool:
        """True once the commit loop has crashed (see OutboxBrokenError)."""
        return self._crash is not None

    def check_broken(self) -> None:
        """Raise OutboxBrokenError if the commit loop has crashed."""
        if self._crash is not None:
            raise self._broken_error()

    async def _commit_loop(self) -> None:
        failures = 0
        while self._ops or self._acks or not self._closed:
            if not (self._ops or self._acks):
                await self._wakeup.wait()
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
                self._ops.clear()
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
        taken, self._ops = self._ops, []
        if self._acks:
            taken.append(_Queued(Ack(tuple(self._acks))))
            self._acks = []
        taken_rows = sum(len(item.write.rows) for item in taken if isinstance(item.write, Insert))
        self._in_commit = queued = [
            item for item in taken if item.future is None or not item.future.cancelled()
        ]
        writes = [item.write for item in queued]
        try:
            # Strictly increasing per transaction, even with a coarse clock: _mark_acked
            # tells this transaction's changes apart by their timestamp.
            self._last_now = now = max(self._clock(), self._last_now + 1e-6)
            # A flush with nothing queued before it needs no transaction, and so no write
            # lock: a reconnect must not wait for another process to let go of the file.
            batch = (
                await self._run_on_writer(_apply, writes, now, self._data_version)
                if any(not isinstance(write, Flush) for write in writes)
                else _Batch(data_version=self._data_version)
            )
        except Exception as exc:
            self._queued_rows -= taken_rows
            self._in_commit = []
            self._fail_commit(queued, _translate(exc, self.path))
            return False
        if queued:
            self.commits += 1
        self._publish(queued, batch)
        self._queued_rows -= taken_rows
        self._in_commit = []
        self._commit_done()
        return True

    def _fail_commit(self, queued: list[_Queued], error: Exception) -> None:
        """The transaction rolled back: waiting callers get the error, the rest is retried."""
        logger.error("outbox: commit of %d queued writes failed: %s", len(queued), error)
        retry = []
        for item in queued:
            if item.future is None:
                retry.append(item)
            elif not item.future.done():
                item.future.set_exception(error)
        self._ops[:0] = retry
        self._commit_done()

    def _commit_done(self) -> None:
        """Wake wait_commit() callers: a commit, or an attempt at one, just ended."""
        self._committed.set()
        self._committed = asyncio.Event()

    def _publish(self, queued: list[_Queued], batch: _Batch) -> None:
        """Bring memory in line with what just committed, then wake whoever waits."""
        previous_max_id = self._update_counts(batch)
        for index, item in enumerate(queued):
            if item.future is not None and not item.future.done():
                item.future.set_result(batch.results.get(index))
        for message_id in batch.acked:
            self._resolve(message_id, ("acked", None))
        for message_id, reason in batch.dead:
            self._resolve(message_id, ("dead", reason))
        if batch.new_pending or batch.requeued:
            if batch.requeued:
                self.requeue_generation += 1
            new_rows = (
                _new_rows(batch, previous_max_id) if batch.new_pending and self._listeners else []
            )
            self._notify(new_rows)

    def _update_counts(self, batch: _Batch) -> int:
        """Apply the batch to the counts and max_id; return the max_id before its new rows."""
        self._data_version = batch.data_version
        counts = self.counts
        if batch.recount is not None:
            fresh, max_id = batch.recount
            counts.pending, counts.acked, counts.dead = fresh.pending, fresh.acked, fresh.dead
            self.max_id = max(self.max_id, max_id)
        previous_max_id = self.max_id
        self.max_id = max(self.max_id, batch.max_id)
        counts.pending += batch.new_pending + batch.requeued - len(batch.acked) - len(batch.dead)
        counts.acked += len(batch.acked) - batch.purged
        counts.dead += len(batch.dead) - batch.requeued
        return previous_max_id

    def _notify(self, new_rows: list[Row]) -> None:
        for listener in list(self._listeners):
            try:
                listener(new_rows)
            except Exception:  # a listener's bug must not stop the commit loop
                logger.exception("outbox: a commit listener failed")

    def _resolve(self, message_id: int, outcome: tuple[Status, str | None]) -> None:
        for future in self._waiters.pop(message_id, ()):
            if not future.done():
                future.set_result(outcome)

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
        for chunk, marks in _in_lists(wanted):
            found = await self._reader.execute_fetchall(
                f"SELECT id, payload, attempts FROM outbox WHERE status = 'pending' "
                f"AND id IN ({marks}) ORDER BY id",
                chunk,
            )
            rows += map(Row._make, found)
        return rows

    async def ids_for_keys(self, keys: Sequence[str]) -> dict[str, int]:
        """The committed rows these idempotency keys already name."""
        found: dict[str, int] = {}
        unique = list(dict.fromkeys(keys))
        for chunk, marks in _in_lists(unique):
            rows = await self._reader.execute_fetchall(_keys_sql(marks), chunk)
            found.update({str(k): int(i) for k, i in rows})
        return found

    async def status(self, message_id: int) -> tuple[Status, str | None]:
        """The status of one message; an acked row that retention purged reads as acked."""
        while message_id in self.renumbered:
            message_id = self.renumbered[message_id]
        found = list(
            await self._reader.execute_fetchall(
                "SELECT status, last_error FROM outbox WHERE id = ?", (message_id,)
            )
        )
        if found:
            return found[0][0], found[0][1]
        if 0 < message_id <= self.max_id:
            return "acked", None  # purged by retention: only acked rows are ever deleted
        raise ValueError(f"no message with id {message_id} in {self.path}")

    async def wait_status(self, message_id: int) -> tuple[Status, str | None]:
        """Wait until the message is acked or dead (returns which, with the reason)."""
        self.check_broken()
        future: asyncio.Future[tuple[Status, str | None]] = (
            asyncio.get_running_loop().create_future()
        )
        # Register before reading, so a commit between the read and the wait is not missed.
        self._waiters.setdefault(message_id, []).append(future)
        try:
            current = await self.status(message_id)
            if current[0] != "pending":
                return current
            return await future
        finally:
            waiters = self._waiters.get(message_id)
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiters[message_id]

    # -- id conflicts (docs/protocol.md, "Reused ids") ----------------------------------------

    async def raise_sequence(self, floor: int) -> int:
        """Make every new id greater than ``floor`` (the receiver's high-water mark for this
        client); returns the previous highest id. A no-op when the sequence is past it."""
        previous: int = await self._run_on_writer(_raise_sequence, floor)
        self.max_id = max(self.max_id, floor)
        return previous

    async def renumber(self, message_id: int, note: str) -> int | None:
        """Give a pending row the next fresh id, keeping its payload, key and creation time,
        in one transaction; None if it is no longer pending. Waiters follow it."""
        try:
            new_id: int | None = await self._run_on_writer(
                _renumber, message_id, note, self._clock()
            )
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc
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
        with contextlib.suppress(Exception):
            await self._reader.close()
        with contextlib.suppress(Exception):
            await self._run_on_writer(sqlite3.Connection.close)
        self._writer_thread.shutdown(wait=False)


# ---------------------------------------------------------------------------------------------
# The writer thread: plain sqlite3, one call per group commit
# ---------------------------------------------------------------------------------------------


def _connect_writer(path: str, pragmas: Sequence[str]) -> tuple[sqlite3.Connection, int]:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in pragmas:
        conn.execute(pragma)
    return conn, int(conn.execute("PRAGMA data_version").fetchone()[0])


def _count(conn: sqlite3.Connection) -> tuple[Counts, int]:
    counts = Counts()
    for status, count in conn.execute("SELECT status, count(*) FROM outbox GROUP BY status"):
        setattr(counts, status, count)
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
    return counts, int(row[0]) if row else 0


def _new_rows(batch: _Batch, previous_max_id: int) -> list[Row]:
    """The rows this batch created, in id order, for the commit listeners."""
    new_rows: list[Row] = []
    for write, ids in batch.inserted:
        for (payload, _), message_id in zip(write.rows, ids, strict=True):
            if message_id > previous_max_id:
                previous_max_id = message_id  # a key repeated in the batch counts once
                new_rows.append(Row(message_id, payload, 0))
    return new_rows


def _apply(
    conn: sqlite3.Connection, writes: Sequence[Write], now: float, data_version: int
) -> _Batch:
    """Apply queued writes in one transaction; runs on the writer thread."""
    batch = _Batch()
    by_kind = _ByKind(writes)
    conn.execute("BEGIN IMMEDIATE")
    try:
        # data_version moves only when *another* connection commits: then our counts may
        # be stale, so read them again (a scan, but only after somebody else wrote).
        batch.data_version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        if batch.data_version != data_version:
            batch.recount = _count(conn)
        for step in _STEPS:
            step(conn, by_kind, now, batch)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return batch


class _ByKind:
    """A batch's writes grouped by kind in one pass, each with its index in the batch."""

    def __init__(self, writes: Sequence[Write]) -> None:
        self._groups: dict[type[Write], list[tuple[int, Write]]] = {}
        for index, write in enumerate(writes):
            self._groups.setdefault(type(write), []).append((index, write))

    def of(self, kind: type[_W]) -> list[tuple[int, _W]]:
        # Safe: every write in the list for ``kind`` was put there because its type is kind.
        return cast(list[tuple[int, _W]], self._groups.get(kind, []))


# Each step coalesces one kind across the whole batch: one statement per chunk of ids, not
# one per queued write. Requeues and purges touch disjoint rows (dead, acked), after the acks
# and dead rows of the same batch, so their order between themselves does not matter.


def _apply_inserts(conn: sqlite3.Connection, by_kind: _ByKind, now: float, batch: _Batch) -> None:
    inserts = by_kind.of(Insert)
    if not inserts:
        return
    rows = [row for _, write in inserts for row in write.rows]
    ids, batch.new_pending = _insert_rows(conn, rows, now)
    offset = 0
    for index, write in inserts:
        batch.results[index] = mine = ids[offset : offset + len(write.rows)]
        batch.inserted.append((write, mine))
        offset += len(write.rows)
    batch.max_id = max(ids, default=0)


def _apply_timeouts(conn: sqlite3.Connection, by_kind: _ByKind, now: float, batch: _Batch) -> None:
    timeouts = [item for _, write in by_kind.of(Timeouts) for item in write.items]
    if timeouts:
        conn.executemany(
            "UPDATE outbox SET attempts = ?, last_error = ?, updated_at = ? "
            "WHERE id = ? AND status = 'pending'",
            [(attempts, error, now, n) for n, attempts, error in timeouts],
        )


def _apply_acks(conn: sqlite3.Connection, by_kind: _ByKind, now: float, batch: _Batch) -> None:
    acked = [n for _, write in by_kind.of(Ack) for n in write.ids]
    if acked:
        batch.acked = _mark_acked(conn, acked, now)


def _apply_dead(conn: sqlite3.Connection, by_kind: _ByKind, now: float, batch: _Batch) -> None:
    reasons = {n: reason for _, write in by_kind.of(Dead) for n, reason in write.items}
    if reasons:
        batch.dead = [(n, reasons[n]) for n in _mark_dead(conn, reasons, now)]


def _apply_requeues(conn: sqlite3.Connection, by_kind: _ByKind, now: float, batch: _Batch) -> None:
    for index, write in by_kind.of(Requeue):
        batch.results[index] = count = _requeue(conn, write.ids, now)
        batch.requeued += count


def _apply_purges(conn: sqlite3.Connection, by_kind: _ByKind, now: float, batch: _Batch) -> None:
    for index, write in by_kind.of(Purge):
        batch.results[index] = count = _purge(conn, write.older_than, write.keep)
        batch.purged += count


_Step = Callable[[sqlite3.Connection, _ByKind, float, _Batch], None]
_STEPS: tuple[_Step, ...] = (
    _apply_inserts,
    _apply_timeouts,
    _apply_acks,
    _apply_dead,
    _apply_requeues,
    _apply_purges,
)
"""In the order the statements have always run: timeouts before acks before dead rows."""


def _insert_rows(
    conn: sqlite3.Connection, rows: list[tuple[str, str | None]], now: float
) -> tuple[list[int], int]:
    """Insert inside the open transaction; return ids in order and how many are new.

    A key that exists already, or repeats within ``rows``, maps to one row and one id.
    """
    keys = list({key for _, key in rows if key is not None})
    existing: dict[str, int] = {}
    for chunk, marks in _in_lists(keys):
        found = conn.execute(_keys_sql(marks), chunk)
        existing.update({str(k): int(i) for k, i in found})
    fresh: list[tuple[str, str | None, float, float]] = []
    slots: list[int] = []  # >= 0: index into fresh; < 0: -(existing id)
    new_key_slot: dict[str, int] = {}
    for payload, key in rows:
        if key is not None and key in existing:
            slots.append(-existing[key])
        elif key is not None and key in new_key_slot:
            slots.append(new_key_slot[key])
        else:
            if key is not None:
                new_key_slot[key] = len(fresh)
            slots.append(len(fresh))
            fresh.append((payload, key, now, now))
    first = 0
    for start in range(0, len(fresh), _INSERT_CHUNK):
        # One multi-row INSERT per chunk rather than executemany: each sqlite3 step lets go
        # of the GIL, and a busy event loop thread can keep it for a whole switch interval.
        part = fresh[start : start + _INSERT_CHUNK]
        conn.execute(
            "INSERT INTO outbox (payload, key, created_at, updated_at) VALUES "
            + ",".join(["(?,?,?,?)"] * len(part)),
            [value for row in part for value in row],
        )
    if fresh:
        last = int(conn.execute("SELECT last_insert_rowid()").fetchone()[0])
        # AUTOINCREMENT under our write lock: the new ids are consecutive, in insert order.
        first = last - len(fresh) + 1
    return [first + slot if slot >= 0 else -slot for slot in slots], len(fresh)


def _mark_acked(conn: sqlite3.Connection, ids: list[int], now: float) -> list[int]:
    """Pending ids to acked; return those that changed (a repeated ack changes nothing)."""
    changed: list[int] = []
    ids = list(dict.fromkeys(ids))  # an id acked twice in one batch counts once
    for chunk, marks in _in_lists(ids):
        still_pending = f"status = 'pending' AND id IN ({marks})"
        updated = conn.execute(
            f"UPDATE outbox SET status = 'acked', updated_at = ? WHERE {still_pending}",
            [now, *chunk],
        ).rowcount
        if updated == len(chunk):
            changed += chunk  # the usual case, known without reading a row per id
            continue
        # Some were acked or dead already: ask which of them this statement changed. It was
        # the only writer since BEGIN IMMEDIATE, so "acked at exactly now" identifies them.
        changed += [
            int(row[0])
            for row in conn.execute(
                f"SELECT id FROM outbox WHERE status = 'acked' AND updated_at = ? "
                f"AND id IN ({marks})",
                [now, *chunk],
            )
        ]
    return changed


def _mark_dead(conn: sqlite3.Connection, reasons: dict[int, str], now: float) -> list[int]:
    """Pending ids to dead with their reasons; return those that changed."""
    ids = list(reasons)
    changed: list[int] = []
    for chunk, marks in _in_lists(ids):
        moving = [
            int(row[0])
            for row in conn.execute(
                f"SELECT id FROM outbox WHERE status = 'pending' AND id IN ({marks})", chunk
            )
        ]
        conn.executemany(
            "UPDATE outbox SET status = 'dead', updated_at = ?, last_error = ? WHERE id = ?",
            [(now, reasons[n], n) for n in moving],
        )
        changed += moving
    return changed


def _requeue(conn: sqlite3.Connection, ids: Sequence[int] | None, now: float) -> int:
    sql = "UPDATE outbox SET status = 'pending', attempts = 0, updated_at = ? "
    sql += "WHERE status = 'dead'"
    if ids is None:
        return conn.execute(sql, (now,)).rowcount
    total = 0
    for chunk, marks in _in_lists(ids):
        total += conn.execute(f"{sql} AND id IN ({marks})", [now, *chunk]).rowcount
    return total


def _purge(conn: sqlite3.Connection, older_than: float | None, keep: int | None) -> int:
    """Delete at most PURGE_CHUNK acked rows per rule, so no transaction grows long."""
    total = 0
    if older_than is not None:
        total += conn.execute(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox "
            "WHERE status = 'acked' AND updated_at < ? LIMIT ?)",
            (older_than, PURGE_CHUNK),
        ).rowcount
    if keep is not None:
        found = conn.execute(
            "SELECT id FROM outbox WHERE status = 'acked' ORDER BY id DESC LIMIT 1 OFFSET ?",
            (keep,),
        ).fetchone()
        if found:
            total += conn.execute(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox "
                "WHERE status = 'acked' AND id <= ? LIMIT ?)",
                (found[0], PURGE_CHUNK),
            ).rowcount
    return total


def _raise_sequence(conn: sqlite3.Connection, floor: int) -> int:
    """Move the outbox's AUTOINCREMENT sequence up to ``floor``; return where it was."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        previous = int(row[0]) if row else 0
        if floor > previous:
            if row:
                conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'outbox'", (floor,))
            else:
                conn.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (floor,)
                )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return previous


def _renumber(conn: sqlite3.Connection, message_id: int, note: str, now: float) -> int | None:
    """Move a pending row to a fresh AUTOINCREMENT id: delete and re-insert, one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute(
            "SELECT payload, key, created_at FROM outbox WHERE id = ? AND status = 'pending'",
            (message_id,),
        ).fetchone()
        new_id: int | None = None
        if row is not None:
            conn.execute("DELETE FROM outbox WHERE id = ?", (message_id,))
            conn.execute(
                "INSERT INTO outbox (payload, key, created_at, updated_at, last_error) "
                "VALUES (?, ?, ?, ?, ?)",
                (row[0], row[1], row[2], now, note),
            )
            new_id = int(conn.execute("SELECT last_insert_rowid()").fetchone()[0])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return new_id
