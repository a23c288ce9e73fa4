"""What the writer thread runs: plain ``sqlite3``, one call per group commit.

The store queues typed writes (one frozen dataclass per kind: ``Insert``, ``Ack``,
``Timeouts``, ``Dead``, ``Expire``, ``Requeue``, ``Purge``, ``Flush``); :func:`apply_writes`
applies a whole batch of them in one ``BEGIN IMMEDIATE ... COMMIT``, each kind coalesced across the
batch by its own step (one statement per chunk of ids, not per write), and returns a
:class:`Batch` saying what changed, which the store applies to memory only after COMMIT.
Nothing here touches the event loop.
"""

from __future__ import annotations

import functools
import itertools
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

from ..protocol.feed import Row
from . import file_guard

_V = TypeVar("_V")


_CHUNK = 500  # ids per IN (...) list, well under SQLite's variable limit


PURGE_CHUNK = 5000  # acked rows deleted per transaction by the retention purge


_INSERT_CHUNK_BITS = 8
"""At most 2**8 rows per multi-row INSERT: at most 3 variables each and one shared, 769 in
all, under SQLite's old limit of 999."""


@functools.cache
def _insert_sql(rows: int, timed: bool) -> str:
    """The INSERT of ``rows`` rows: ?1 is the time (both stamps), then per row the payload,
    the key and (``timed``) the deadline."""
    width = 3 if timed else 2
    values = ",".join(
        f"(?{width * i + 2},?{width * i + 3},?1,?1," + (f"?{width * i + 4})" if timed else "NULL)")
        for i in range(rows)
    )
    return f"INSERT INTO outbox (payload, key, created_at, updated_at, expires_at) VALUES {values}"


def in_lists(items: Sequence[_V]) -> Iterator[tuple[list[_V], str]]:
    """Split ``items`` for ``IN (...)`` queries: each chunk with its ``?,?,...`` placeholders."""
    for start in range(0, len(items), _CHUNK):
        chunk = list(items[start : start + _CHUNK])
        yield chunk, ",".join("?" * len(chunk))


def keys_sql(marks: str) -> str:
    """The rows idempotency keys already name (read by the writer and by send()'s quota)."""
    return f"SELECT key, id FROM outbox WHERE key IN ({marks})"


@dataclass(frozen=True, slots=True)
class Insert:
    """New rows, ``(payload_json, key)``; the result is their ids, in order."""

    rows: tuple[tuple[str, str | None], ...]
    expires_at: float | None = None
    """The rows' deadline in unix seconds (``send(ttl=)``), or None: they never expire."""
    expiries: tuple[float | None, ...] | None = None
    """A deadline per row instead (the rows of many ``send()`` calls in one write)."""


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
class Expire:
    """Pending rows whose deadline (``expires_at``) is ``<= through``: they become expired
    (stored as status 'dead' with ``expired = 1``, see migration 0004). The result is their
    ``(id, reason)``."""

    through: float


@dataclass(frozen=True, slots=True)
class Requeue:
    """Dead rows back to pending: these ids, or all of them (None); the result is a count."""

    ids: tuple[int, ...] | None


@dataclass(frozen=True, slots=True)
class Purge:
    """Delete acked rows by age or beyond the newest ``keep``: the result is a count.

    ``retention`` (seconds) is turned into ``through`` and ``older_than`` by the store just
    before the transaction (``AckAges``: monotonic ages). ``older_than`` alone compares
    ``updated_at`` (wall clock) for rows with ``id <= older_than_through``.
    """

    older_than: float | None
    keep: int | None
    retention: float | None = None
    through: int | None = None
    older_than_through: int | None = None


@dataclass(frozen=True, slots=True)
class Flush:
    """Nothing to write: done once everything queued before it has committed."""


Write = Insert | Ack | Timeouts | Dead | Expire | Requeue | Purge | Flush


Result = list[int] | int | list[tuple[int, str]] | None
"""What a caller's future gets: ids for an Insert, a count for Requeue and Purge."""


_W = TypeVar("_W", Insert, Ack, Timeouts, Dead, Expire, Requeue, Purge, Flush)


@dataclass(slots=True)
class Counts:
    pending: int = 0
    acked: int = 0
    dead: int = 0
    expired: int = 0
    """Rows with status 'dead' and expired = 1 (not counted in ``dead``)."""


@dataclass(slots=True)
class Batch:
    """What one transaction did, applied to memory only after it commits."""

    results: dict[int, Result] = field(default_factory=dict)
    """By index of the write in the batch, for those that have a result."""
    new_pending: int = 0
    acked: list[int] = field(default_factory=list)
    dead: list[tuple[int, str]] = field(default_factory=list)
    expired: list[tuple[int, str]] = field(default_factory=list)
    requeued: int = 0
    purged: int = 0
    max_id: int = 0
    inserted: list[tuple[Insert, list[int]]] = field(default_factory=list)
    """Each insert of the batch with its ids (the listeners' new rows come from here)."""
    recount: tuple[Counts, int] | None = None
    """Counts and max id read at BEGIN, when another connection had written since our last
    commit (another process, the sqlite3 shell): memory starts again from the table."""
    data_version: int = 0
    low_water: int | None = None
    """Below the lowest pending row at COMMIT (read when rows were acked or came back)."""
    clamp: int | None = None
    """Rows above this may be acked again later (requeued here or by another connection)."""
    missing: str | None = None
    """Why the path no longer names the file this store opened (checked after COMMIT)."""
    wal_bytes: int | None = None
    """The -wal file's size after the commit, when it was looked at."""


def connect_writer(path: str, pragmas: Sequence[str]) -> tuple[sqlite3.Connection, int]:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in pragmas:
        conn.execute(pragma)
    return conn, int(conn.execute("PRAGMA data_version").fetchone()[0])


STATUS_SQL = "CASE WHEN status = 'dead' AND expired THEN 'expired' ELSE status END"
"""A row's status as people and the API see it: 'pending', 'acked', 'dead' or 'expired'."""

COUNT_SQL = f"SELECT {STATUS_SQL}, count(*) FROM outbox GROUP BY 1"


def count_rows(conn: sqlite3.Connection) -> tuple[Counts, int]:
    counts = Counts()
    for status, count in conn.execute(COUNT_SQL):
        setattr(counts, status, count)
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
    return counts, int(row[0]) if row else 0


def rows_created(batch: Batch, previous_max_id: int) -> list[Row]:
    """The rows this batch created, in id order, for the commit listeners."""
    new_rows: list[Row] = []
    for write, ids in batch.inserted:
        for (payload, _), message_id in zip(write.rows, ids, strict=True):
            if message_id > previous_max_id:
                previous_max_id = message_id  # a key repeated in the batch counts once
                new_rows.append(Row(message_id, payload, 0))
    return new_rows


def read_low_water(conn: sqlite3.Connection) -> int:
    """The id below the lowest pending row (every row up to it is acked, dead or gone)."""
    row = conn.execute("SELECT min(id) FROM outbox WHERE status = 'pending'").fetchone()
    if row[0] is not None:
        return int(row[0]) - 1
    seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
    return int(seq[0]) if seq else 0


def apply_writes(
    conn: sqlite3.Connection,
    writes: Sequence[Write],
    now: float,
    data_version: int,
    after: file_guard.AfterCommit | None = None,
) -> Batch:
    """Apply queued writes in one transaction; runs on the writer thread.

    After COMMIT and before returning (so before any caller hears of it), the path is
    checked to still name the file this store opened, and the -wal is looked at.
    """
    batch = Batch()
    by_kind = ByKind(writes)
    if after is not None:
        # Before writing too: a main file replaced under its -wal would pair our new frames
        # with somebody else's database, where a reader would find them.
        batch.missing = file_guard.check_identity(after)
        if batch.missing is not None:
            return batch
    conn.execute("BEGIN IMMEDIATE")
    try:
        # data_version moves only when *another* connection commits: then our counts may
        # be stale, so read them again (a scan, but only after somebody else wrote).
        batch.data_version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        if batch.data_version != data_version:
            batch.recount = count_rows(conn)
            batch.clamp = read_low_water(conn)  # rows may have come back to pending
        for step in _STEPS:
            step(conn, by_kind, now, batch)
        if batch.acked or batch.requeued or batch.recount is not None:
            batch.low_water = read_low_water(conn)
            if batch.requeued:
                clamp = batch.clamp
                batch.clamp = batch.low_water if clamp is None else min(clamp, batch.low_water)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if after is not None:
        batch.missing = file_guard.check_identity(after)
        if batch.missing is None:
            batch.wal_bytes = file_guard.wal_after(conn, after)
    return batch


def poll_writer(
    conn: sqlite3.Connection, data_version: int, after: file_guard.AfterCommit
) -> Batch:
    """An idle store's check, without a write lock: did another connection write?"""
    batch = Batch(data_version=int(conn.execute("PRAGMA data_version").fetchone()[0]))
    if batch.data_version != data_version:
        conn.execute("BEGIN")  # one snapshot for the counts and the low-water mark
        try:
            batch.recount = count_rows(conn)
            batch.clamp = batch.low_water = read_low_water(conn)
        finally:
            conn.execute("COMMIT")
    batch.missing = file_guard.check_identity(after)
    if batch.missing is None:
        batch.wal_bytes = file_guard.wal_after(conn, after)
    return batch


class ByKind:
    """A batch's writes grouped by kind in one pass, each with its index in the batch."""

    def __init__(self, writes: Sequence[Write]) -> None:
        self._groups: dict[type[Write], list[tuple[int, Write]]] = {}
        for index, write in enumerate(writes):
            self._groups.setdefault(type(write), []).append((index, write))

    def of(self, kind: type[_W]) -> list[tuple[int, _W]]:
        # Safe: every write in the list for ``kind`` was put there because its type is kind.
        return cast(list[tuple[int, _W]], self._groups.get(kind, []))


_Step = Callable[[sqlite3.Connection, ByKind, float, Batch], None]


def _apply_inserts(conn: sqlite3.Connection, by_kind: ByKind, now: float, batch: Batch) -> None:
    inserts = by_kind.of(Insert)
    if not inserts:
        return
    if len(inserts) == 1:  # the usual case under load: one group of send() rows
        write = inserts[0][1]
        rows = list(write.rows)
        expiries: Sequence[float | None] | None = _expiries(write)
    else:
        rows = [row for _, write in inserts for row in write.rows]
        expiries = [expiry for _, write in inserts for expiry in _expiries(write)]
    ids, batch.new_pending = insert_rows(conn, rows, now, expiries)
    offset = 0
    for index, write in inserts:
        batch.results[index] = mine = ids[offset : offset + len(write.rows)]
        batch.inserted.append((write, mine))
        offset += len(write.rows)
    batch.max_id = max(ids, default=0)


def _expiries(write: Insert) -> Sequence[float | None]:
    """The deadline of each row of an insert."""
    if write.expiries is not None:
        return write.expiries
    return [write.expires_at] * len(write.rows)


def _apply_timeouts(conn: sqlite3.Connection, by_kind: ByKind, now: float, batch: Batch) -> None:
    timeouts = [item for _, write in by_kind.of(Timeouts) for item in write.items]
    if timeouts:
        conn.executemany(
            "UPDATE outbox SET attempts = ?, last_error = ?, updated_at = ? "
            "WHERE id = ? AND status = 'pending'",
            [(attempts, error, now, n) for n, attempts, error in timeouts],
        )


def _apply_acks(conn: sqlite3.Connection, by_kind: ByKind, now: float, batch: Batch) -> None:
    acked = [n for _, write in by_kind.of(Ack) for n in write.ids]
    if acked:
        batch.acked = _mark_acked(conn, acked, now)


def _apply_dead(conn: sqlite3.Connection, by_kind: ByKind, now: float, batch: Batch) -> None:
    reasons = {n: reason for _, write in by_kind.of(Dead) for n, reason in write.items}
    if reasons:
        batch.dead = [(n, reasons[n]) for n in _mark_dead(conn, reasons, now)]


def _apply_expiry(conn: sqlite3.Connection, by_kind: ByKind, now: float, batch: Batch) -> None:
    for index, write in by_kind.of(Expire):
        batch.results[index] = found = _expire(conn, write.through, now)
        batch.expired += found


def _apply_requeues(conn: sqlite3.Connection, by_kind: ByKind, now: float, batch: Batch) -> None:
    for index, write in by_kind.of(Requeue):
        batch.results[index] = count = _requeue(conn, write.ids, now)
        batch.requeued += count


def _apply_purges(conn: sqlite3.Connection, by_kind: ByKind, now: float, batch: Batch) -> None:
    for index, write in by_kind.of(Purge):
        batch.results[index] = count = _purge(conn, write)
        batch.purged += count


_STEPS: tuple[_Step, ...] = (
    _apply_inserts,
    _apply_timeouts,
    _apply_acks,
    _apply_dead,
    _apply_expiry,
    _apply_requeues,
    _apply_purges,
)
"""In the order the statements have always run: timeouts before acks before dead rows."""


def insert_rows(
    conn: sqlite3.Connection,
    rows: list[tuple[str, str | None]],
    now: float,
    expiries: Sequence[float | None] | None = None,
) -> tuple[list[int], int]:
    """Insert inside the open transaction; return ids in order and how many are new.

    A key that exists already, or repeats within ``rows``, maps to one row and one id.
    """
    keys = list({key for _, key in rows if key is not None})
    existing: dict[str, int] = {}
    for chunk, marks in in_lists(keys):
        found = conn.execute(keys_sql(marks), chunk)
        existing.update({str(k): int(i) for k, i in found})
    timed = expiries is not None and any(expires_at is not None for expires_at in expiries)
    if not keys and not timed:  # the usual case: every row is new, none expires
        fresh: Sequence[tuple[object, ...]] = rows
        slots: list[int] | None = None
    else:
        if expiries is None:
            expiries = [None] * len(rows)
        fresh = []
        found_slots: list[int] = []  # >= 0: index into fresh; < 0: -(existing id)
        slots = found_slots
        new_key_slot: dict[str, int] = {}
        for (payload, key), expires_at in zip(rows, expiries, strict=True):
            if key is not None and key in existing:
                found_slots.append(-existing[key])
            elif key is not None and key in new_key_slot:
                found_slots.append(new_key_slot[key])
            else:
                if key is not None:
                    new_key_slot[key] = len(fresh)
                found_slots.append(len(fresh))
                fresh.append((payload, key, expires_at) if timed else (payload, key))
    first = 0
    start = 0
    while start < len(fresh):
        # One multi-row INSERT per chunk rather than executemany: each sqlite3 step lets go
        # of the GIL, and a busy event loop thread can keep it for a whole switch interval.
        # Chunks of a power of two rows: a handful of statement texts, each prepared once
        # (sqlite3 caches them), where a text per row count would be prepared every time.
        size = 1 << min(_INSERT_CHUNK_BITS, (len(fresh) - start).bit_length() - 1)
        part = fresh[start : start + size]
        params: list[object] = [now]  # ?1: created_at and updated_at, bound once
        params += itertools.chain.from_iterable(part)
        conn.execute(_insert_sql(size, timed), params)
        start += size
    if fresh:
        last = int(conn.execute("SELECT last_insert_rowid()").fetchone()[0])
        # AUTOINCREMENT under our write lock: the new ids are consecutive, in insert order.
        first = last - len(fresh) + 1
    if slots is None:
        return list(range(first, first + len(fresh))), len(fresh)
    return [first + slot if slot >= 0 else -slot for slot in slots], len(fresh)


def _mark_acked(conn: sqlite3.Connection, ids: list[int], now: float) -> list[int]:
    """Pending ids to acked; return those that changed (a repeated ack changes nothing)."""
    changed: list[int] = []
    ids = list(dict.fromkeys(ids))  # an id acked twice in one batch counts once
    for chunk, marks in in_lists(ids):
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
    for chunk, marks in in_lists(ids):
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


def _expire(conn: sqlite3.Connection, through: float, now: float) -> list[tuple[int, str]]:
    """Pending rows with ``expires_at <= through`` to expired; return them with the reason."""
    found = conn.execute(
        "SELECT id FROM outbox "
        "WHERE status = 'pending' AND expires_at IS NOT NULL AND expires_at <= ? ORDER BY id",
        (through,),
    ).fetchall()
    reason = "expired: not acked before its ttl ran out"
    items = [(int(n), reason) for (n,) in found]
    conn.executemany(
        "UPDATE outbox SET status = 'dead', expired = 1, updated_at = ?, last_error = ? "
        "WHERE id = ?",
        [(now, reason, n) for n, _ in items],
    )
    return items


def _requeue(conn: sqlite3.Connection, ids: Sequence[int] | None, now: float) -> int:
    # Expired rows stay as they are: their deadline has passed (operate.requeue can revive them).
    sql = "UPDATE outbox SET status = 'pending', attempts = 0, updated_at = ? "
    sql += "WHERE status = 'dead' AND NOT expired"
    if ids is None:
        return conn.execute(sql, (now,)).rowcount
    total = 0
    for chunk, marks in in_lists(ids):
        total += conn.execute(f"{sql} AND id IN ({marks})", [now, *chunk]).rowcount
    return total


def _purge(conn: sqlite3.Connection, purge: Purge) -> int:
    """Delete at most PURGE_CHUNK acked rows per rule, so no transaction grows long."""
    total = 0
    older_than, keep = purge.older_than, purge.keep
    if purge.through is not None:
        total += conn.execute(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox "
            "WHERE status = 'acked' AND id <= ? LIMIT ?)",
            (purge.through, PURGE_CHUNK),
        ).rowcount
    if older_than is not None:
        through = purge.older_than_through
        total += conn.execute(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox "
            "WHERE status = 'acked' AND updated_at < ? AND id <= ? LIMIT ?)",
            (older_than, (1 << 63) - 1 if through is None else through, PURGE_CHUNK),
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


def raise_sequence(conn: sqlite3.Connection, floor: int) -> int:
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


def renumber(conn: sqlite3.Connection, message_id: int, note: str, now: float) -> int | None:
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
