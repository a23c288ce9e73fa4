"""The inbox table: all of the receiver's SQL lives here.

The receiver records each ``(client id, message id)`` it handles in the ``inbox`` table
(``migrations/0002_inbox.sql``), in the same transaction as the handler's own writes. That
single transaction is what turns a sender's resends into an exactly-once effect: either the
row and the handler's writes commit together, and every later resend is answered from the
row, or neither commits and the resend is handled as if it were the first.

One aiosqlite connection (one thread) serves the whole receiver; the receiver's writer loop is
its only user, one transaction at a time. Every aiosqlite call is a thread hop (tens of
microseconds alone, about half a millisecond each on a busy 2-core machine, measured), so a
transaction costs two hops whatever the number of messages: ``BEGIN IMMEDIATE`` rides with
the dedup ``SELECT`` (chunked only past SQLite's variable limit), and the ``executemany`` of
the new rows with the ``COMMIT``. The handler's own statements come in between.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import aiosqlite

from ..errors import StoreError
from ..protocol import codec
from ..protocol.floor import Floor, MarkStep, StepDone, advance, raise_mark
from ..storage import sqlite
from ..storage.sqlite import Synchronous as Synchronous  # re-exported for the receiver

Key = tuple[str, int]
"""``(client id, message id)``: the inbox's primary key."""

InboxRow = tuple[str, int, str, float, str | None, str]
"""``(client id, message id, payload JSON, received_at, reject reason or None, digest)``."""

Recorded = tuple[str | None, str]
"""What the inbox holds for a key: ``(reject reason or None, payload digest)``."""

_SAVEPOINT = "outbox_handler"
_PRUNE_SAVEPOINT = "outbox_prune"

_INSERT = (
    "INSERT INTO inbox (client_id, message_id, payload, received_at, reject_reason, "
    "payload_sha256) VALUES (?, ?, ?, ?, ?, ?)"
)


def payload_digest(payload_json: str) -> str:
    """SHA-256 (hex) of the payload JSON text the inbox stores: what a repeat must match."""
    return hashlib.sha256(payload_json.encode("utf-8", "surrogatepass")).hexdigest()


def _dedup_sql(count: int) -> str:
    # A VALUES list joined to the primary key: one index probe per key. (A row-value
    # ``(client_id, message_id) IN (VALUES ...)`` would scan the whole table.)
    values = ",".join(["(?,?)"] * count)
    return (
        f"WITH k(c, m) AS (VALUES {values}) "
        # Rows from before migration 0003 have no digest: their payload is read instead.
        "SELECT i.client_id, i.message_id, i.reject_reason, i.payload_sha256, "
        "CASE WHEN i.payload_sha256 IS NULL THEN i.payload END "
        "FROM k CROSS JOIN inbox AS i ON i.client_id = k.c AND i.message_id = k.m"
    )


def _payload_encoder() -> Callable[[Any], str]:
    """JSON text of a payload for the inbox row: orjson when the wire decoder is orjson.

    The data came out of ``codec.loads``, so whichever library decoded it can encode it; the
    standard library is the fallback for anything orjson refuses.
    """
    if codec.BACKEND != "orjson":
        return codec.dumps
    import orjson

    def dumps(value: Any) -> str:
        try:
            return orjson.dumps(value).decode()
        except TypeError:
            return codec.dumps(value)

    return dumps


encode_payload = _payload_encoder()


translate = sqlite.sqlite_error
"""Turn a sqlite3 error into an outbox error that says what to do about it."""


def _prepare(path: str, busy_timeout: float) -> int:
    """Open synchronously once (``sqlite.prepare``), then probe the inbox table.

    Runs in a worker thread before the async connection opens. Returns how many keys fit in
    one dedup query (half of SQLite's variable limit: two variables per key).
    """
    return sqlite.prepare(path, busy_timeout, _probe)


def _probe(conn: sqlite3.Connection) -> int:
    # Walk down to the first and the last row of the inbox now: a damaged table then fails
    # the start (DatabaseCorruptError) instead of every transaction after it. Two descents
    # of the primary key, so the cost does not grow with the inbox.
    for order in ("", " DESC"):
        conn.execute(
            f"SELECT client_id, message_id, reject_reason FROM inbox "
            f"ORDER BY client_id{order}, message_id{order} LIMIT 1"
        ).fetchall()
    return max(1, min(conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 2, 4000))


class Transaction:
    """The open write transaction that will record one message in the inbox.

    A handler receives this as ``message.tx`` and may read and write its own tables through
    it. Its writes commit in the same ``COMMIT`` as the message's inbox row, so a resend can
    never apply them twice: that is the exactly-once form of a handler.

    The first statement opens a SAVEPOINT for this message, so if the handler then raises
    (or raises :class:`~outbox.receiver.Reject`), only this message's writes are rolled back;
    the other messages of the same transaction keep theirs. A handler that uses no SQL pays
    nothing for this, and one that does pays no extra thread hop: the SAVEPOINT goes to the
    connection's thread with the first statement, and the RELEASE of a kept one waits for
    the next message's first statement (or the COMMIT, which releases every savepoint).

    The inbox rows of a transaction are written after its handlers have run, so a handler
    does not see, in the ``inbox`` table, the messages handled just before it.

    Rules: do not run ``BEGIN``, ``COMMIT``, ``ROLLBACK`` or ``RELEASE`` yourself (the receiver
    detects a transaction that ended under it and fails the whole group), and do not keep
    the handle after the handler returns: it refuses to be used then. A statement issued
    after the transaction ended (SQLite rolls it back on some errors, e.g. a trigger's
    ``RAISE(ROLLBACK)``) is refused with :class:`TransactionEndedError` instead of running
    in autocommit mode.
    """

    __slots__ = ("_db", "_held", "_state")

    _FRESH, _OPEN, _DONE = 0, 1, 2

    def __init__(self, db: aiosqlite.Connection, held: _Held | None = None) -> None:
        self._db = db
        self._held = held
        """Shared by the transactions of one inbox: whether a kept SAVEPOINT still waits for
        its RELEASE. None (the setup hook): RELEASE at once, which commits."""
        self._state = self._FRESH

    def _opening(self) -> tuple[bool, bool] | None:
        """None if open already; else open it now (before any await: a second statement
        issued concurrently then queues behind the first on the connection's thread) and
        say whether the round's deferred BEGIN must run first, and whether a kept SAVEPOINT
        must be released first."""
        if self._state == self._OPEN:
            return None
        if self._state == self._DONE:
            raise RuntimeError(
                "this message's transaction is over: use message.tx only while the handler runs"
            )
        self._state = self._OPEN
        held = self._held
        if held is None:
            return False, False
        begin, release = held.begin, held.pending
        held.begin = held.pending = False
        return begin, release

    @property
    def _inside(self) -> bool:
        """Whether the first statement must find the receiver's transaction open (always,
        but for the setup hook, whose SAVEPOINT opens its transaction)."""
        return self._held is not None

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(sqlite3 connection, *args)`` on the connection's thread: one hop."""
        return await _on_thread(self._db, fn, *args)

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> aiosqlite.Cursor:
        """Run one statement inside the message's transaction (like sqlite3's ``execute``)."""
        opening = self._opening()
        if opening is None:
            cursor = await self._call(_inside_then, sqlite3.Connection.execute, sql, parameters)
        else:
            cursor = await self._call(
                _open_then, self._inside, *opening, sqlite3.Connection.execute, sql, parameters
            )
        return aiosqlite.Cursor(self._db, cursor)

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any]]) -> aiosqlite.Cursor:
        """Run one statement for each parameter tuple, in one thread hop."""
        opening = self._opening()
        if opening is None:
            cursor = await self._call(_inside_then, sqlite3.Connection.executemany, sql, parameters)
        else:
            cursor = await self._call(
                _open_then, self._inside, *opening, sqlite3.Connection.executemany, sql, parameters
            )
        return aiosqlite.Cursor(self._db, cursor)

    async def execute_fetchall(
        self, sql: str, parameters: Sequence[Any] = ()
    ) -> Iterable[sqlite3.Row]:
        """Run a query and return all its rows, in one thread hop."""
        opening = self._opening()
        rows: list[sqlite3.Row]
        if opening is None:
            rows = await self._call(_inside_then, _fetchall, sql, parameters)
        else:
            rows = await self._call(_open_then, self._inside, *opening, _fetchall, sql, parameters)
        return rows

    async def _finish(self, keep: bool) -> None:
        """Called by the receiver when the handler is done: keep or undo its writes."""
        state, self._state = self._state, self._DONE
        if state != self._OPEN:
            return
        if not keep:
            await self._call(_undo)
        elif self._held is not None:
            self._held.pending = True  # released by the next SAVEPOINT's hop, or the COMMIT
        else:
            await self._db.execute(f"RELEASE {_SAVEPOINT}")


class _Held:
    """What the next statement of the round must run first, shared by the inbox and its
    handlers' transactions: the deferred ``BEGIN IMMEDIATE`` (``begin``), or the RELEASE of
    a kept handler SAVEPOINT (``pending``)."""

    __slots__ = ("begin", "pending")

    def __init__(self) -> None:
        self.begin = False
        self.pending = False


class TransactionEndedError(StoreError):
    """A handler's statement found the receiver's transaction over (SQLite rolled it back
    after an error, e.g. a trigger's RAISE(ROLLBACK), or the handler ended it): run now, it
    would autocommit outside the transaction that records its message. The group fails
    (1013) and its clients resend."""


def _ended() -> TransactionEndedError:
    return TransactionEndedError(
        "the inbox transaction has ended (SQLite rolled it back after an error, or the "
        "handler ended it); this statement was not run"
    )


def _inside_then(
    conn: sqlite3.Connection,
    call: Callable[[sqlite3.Connection, str, Any], Any],
    sql: str,
    parameters: Any,
) -> Any:
    """On the connection's thread: run ``call`` only inside the open transaction."""
    if not conn.in_transaction:
        raise _ended()
    return call(conn, sql, parameters)


def _open_then(
    conn: sqlite3.Connection,
    inside: bool,
    begin: bool,
    release: bool,
    call: Callable[[sqlite3.Connection, str, Any], Any],
    sql: str,
    parameters: Any,
) -> Any:
    """On the connection's thread: (the round's deferred BEGIN IMMEDIATE, or the release of
    the kept SAVEPOINT,) open one, run ``call``."""
    if begin:
        conn.execute("BEGIN IMMEDIATE")
    if inside and not conn.in_transaction:
        raise _ended()  # a SAVEPOINT would open a transaction of its own
    if release:
        conn.execute(f"RELEASE {_SAVEPOINT}")
    conn.execute(f"SAVEPOINT {_SAVEPOINT}")
    return call(conn, sql, parameters)


def _fetchall(conn: sqlite3.Connection, sql: str, parameters: Any) -> list[Any]:
    return conn.execute(sql, parameters).fetchall()


def _on_thread(db: aiosqlite.Connection, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    """Run ``fn(sqlite3 connection, *args)`` on the connection's thread: one hop."""
    run = cast(Callable[..., Awaitable[Any]], db._execute)  # untyped upstream
    return run(fn, db._conn, *args)


def _begin_and_find(
    conn: sqlite3.Connection,
    begin: bool,
    queries: list[tuple[str, list[Any]]],
    floor_queries: list[tuple[str, list[Any]]],
) -> tuple[list[Any], list[Any]]:
    """On the connection's thread: (BEGIN IMMEDIATE,) then every dedup query's rows and
    the floor records of their clients."""
    if begin:
        conn.execute("BEGIN IMMEDIATE")
    found: list[Any] = []
    for sql, params in queries:
        found += conn.execute(sql, params).fetchall()
    floors: list[Any] = []
    for sql, params in floor_queries:
        floors += conn.execute(sql, params).fetchall()
    return found, floors


def _floors_sql(count: int) -> str:
    marks = ",".join("?" * count)
    return (
        "SELECT client_id, base, floor, high_water, mark FROM inbox_floor "
        f"WHERE client_id IN ({marks})"
    )


def _run_rows(
    conn: sqlite3.Connection, client_id: str, start: int, end: int, limit: int
) -> list[tuple[int, bool]]:
    """On the connection's thread: see :meth:`Inbox.run`."""
    rows = conn.execute(
        "SELECT message_id, reject_reason IS NOT NULL FROM inbox WHERE client_id = ? "
        "AND message_id >= ? AND message_id < ? ORDER BY message_id LIMIT ?",
        (client_id, start, end, limit),
    ).fetchall()
    return [(int(message_id), bool(rejected)) for message_id, rejected in rows]


def _forget_rows(conn: sqlite3.Connection, client_id: str, floor: Floor, now: float) -> int:
    """On the connection's thread: see :meth:`Inbox.forget`."""
    # The record first (and both in one hop): a high_water() read on this connection (the
    # handshake shares it) never sees the rows gone and the record not yet raised.
    conn.execute(
        "INSERT INTO inbox_floor (client_id, base, floor, high_water, mark, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (client_id) DO UPDATE SET "
        "base = excluded.base, floor = excluded.floor, high_water = excluded.high_water, "
        "mark = excluded.mark, updated_at = excluded.updated_at",
        (client_id, floor.base, floor.floor, floor.high_water, floor.mark, now),
    )
    cursor = conn.execute(
        "DELETE FROM inbox WHERE client_id = ? AND message_id >= ? AND message_id < ?",
        (client_id, floor.base, floor.floor),
    )
    return max(0, cursor.rowcount)


def _mark_step(conn: sqlite3.Connection, step: MarkStep) -> StepDone:
    """On the connection's thread, inside the open transaction: one pruning step (the
    pruner's ``_mark_step``, as one function)."""
    found = conn.execute(_floors_sql(1), (step.client_id,)).fetchall()
    record = Floor(*found[0][1:]) if found else Floor()
    noted = raise_mark(record, step.target)
    end = noted.mark or 0
    run = _run_rows(conn, step.client_id, record.floor, end, step.limit)
    moved = advance(noted, end, run)
    deleted = _forget_rows(conn, step.client_id, moved, step.now) if moved != record else 0
    return StepDone(record, moved, len(run), deleted)


def _folded_step(conn: sqlite3.Connection, step: MarkStep) -> StepDone | sqlite3.Error:
    """A pruning step inside the round's transaction, under a SAVEPOINT of its own: if it
    fails, only its writes are undone and the round commits without them."""
    conn.execute(f"SAVEPOINT {_PRUNE_SAVEPOINT}")
    try:
        done = _mark_step(conn, step)
    except sqlite3.Error as exc:
        if not conn.in_transaction:  # SQLite rolled the whole round back (full, I/O error)
            raise
        conn.execute(f"ROLLBACK TO {_PRUNE_SAVEPOINT}")
        conn.execute(f"RELEASE {_PRUNE_SAVEPOINT}")
        return exc
    conn.execute(f"RELEASE {_PRUNE_SAVEPOINT}")
    return done


def _write_and_commit(
    conn: sqlite3.Connection, begin: bool, rows: Sequence[InboxRow], step: MarkStep | None
) -> StepDone | sqlite3.Error | None:
    """On the connection's thread: the round's inbox rows, a pruning step if one rides
    along (what it did, or why it failed), then COMMIT (which also releases a kept handler
    SAVEPOINT)."""
    if begin:
        if not rows and step is None:
            return None  # nothing ran in the transaction: no lock to take and let go
        conn.execute("BEGIN IMMEDIATE")
    elif not conn.in_transaction:
        raise _ended()  # the rows would commit on their own, outside the handlers' transaction
    if rows:
        conn.executemany(_INSERT, rows)
    done = None if step is None else _folded_step(conn, step)
    conn.execute("COMMIT")
    return done


def _undo(conn: sqlite3.Connection) -> None:
    """On the connection's thread: drop the message's writes and its SAVEPOINT, one hop."""
    conn.execute(f"ROLLBACK TO {_SAVEPOINT}")
    conn.execute(f"RELEASE {_SAVEPOINT}")


class Inbox:
    """The receiver's SQLite file. Open with ``await Inbox.open(path)``.

    One of the two ``backend.InboxBackend`` implementations; SQLite has one writer per file,
    so it does not fence identities (``claim`` is None, ``fence`` answers ``{}``).
    """

    claim: Callable[[str], Awaitable[int]] | None = None

    def __init__(self, path: str, db: aiosqlite.Connection, keys_per_query: int) -> None:
        self.path = path
        self._db = db
        self._keys_per_query = keys_per_query
        self._held = _Held()
        self._floors_seen: tuple[set[str], dict[str, Floor]] | None = None
        """The floors read with this transaction's dedup query, and whose they are."""
        self._rows: list[InboxRow] = []
        """The rows record() was given, written by commit()'s hop."""

    async def fence(self, client_ids: Sequence[str]) -> dict[str, int]:
        return {}

    def describe_error(self, exc: BaseException) -> BaseException:
        return translate(exc, self.path) if isinstance(exc, sqlite3.Error) else exc

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        synchronous: Synchronous = "FULL",
        busy_timeout: float = 5.0,
    ) -> Inbox:
        """Migrate the file (any outbox database works: the chain is shared) and connect."""
        path = str(path)
        pragmas = sqlite.connection_pragmas(synchronous, busy_timeout)
        try:
            keys_per_query = await asyncio.to_thread(_prepare, path, busy_timeout)
        except sqlite3.Error as exc:
            raise translate(exc, path) from exc
        try:
            db = await aiosqlite.connect(path, timeout=busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise translate(exc, path) from exc
        ready = False
        try:
            for pragma in pragmas:
                await db.execute(pragma)
            ready = True
        finally:
            if not ready:
                await db.close()
        return cls(path, db, keys_per_query)

    @property
    def in_transaction(self) -> bool:
        return self._held.begin or self._db.in_transaction

    def transaction(self) -> Transaction:
        """A handle for one message's handler (see :class:`Transaction`)."""
        return Transaction(self._db, self._held)

    async def setup(self, setup: Callable[[Transaction], Awaitable[None]]) -> None:
        """Run the application's setup hook in a transaction of its own; commit it."""
        tx = Transaction(self._db)
        try:
            await setup(tx)
        except BaseException:
            await tx._finish(keep=False)
            raise
        await tx._finish(keep=True)  # the outermost SAVEPOINT: RELEASE commits it

    async def begin(self) -> None:
        """Start a transaction that takes the write lock (``BEGIN IMMEDIATE``, so
        busy_timeout applies there, not at the first write) with the next statement's hop:
        in the writer's rounds, the dedup query of :meth:`seen`."""
        self._held.pending = False
        self._rows = []
        self._floors_seen = None
        self._held.begin = True

    async def _begun(self) -> None:
        """Run a deferred ``BEGIN IMMEDIATE`` on its own, before a statement that does not
        carry it."""
        if self._held.begin:
            self._held.begin = False
            await self._db.execute("BEGIN IMMEDIATE")

    async def seen(self, keys: Sequence[Key]) -> dict[Key, Recorded]:
        """Which of ``keys`` are already recorded, each with its reject reason (None = acked)
        and the digest of its payload. One hop, with a deferred ``BEGIN`` if there is one;
        the floors of the keys' clients come with it (:meth:`floors` then answers for them
        until the transaction ends: under its write lock, nobody else can change them)."""
        step = self._keys_per_query
        queries: list[tuple[str, list[Any]]] = []
        for start in range(0, len(keys), step):
            part = keys[start : start + step]
            queries.append((_dedup_sql(len(part)), [half for key in part for half in key]))
        client_ids = list(dict.fromkeys(key[0] for key in keys))
        begin, self._held.begin = self._held.begin, False
        rows, floor_rows = await self._call(
            _begin_and_find, begin, queries, self._floor_queries(client_ids)
        )
        found: dict[Key, Recorded] = {}
        for client_id, message_id, reason, digest, legacy in rows:
            found[(client_id, message_id)] = (reason, digest or payload_digest(legacy))
        self._floors_seen = (
            set(client_ids),
            {row[0]: Floor(row[1], row[2], row[3], row[4]) for row in floor_rows},
        )
        return found

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await _on_thread(self._db, fn, *args)

    async def high_water(self, client_id: str) -> int:
        """The highest message id recorded for ``client_id`` (0 for none), counting rows the
        floor has deleted: two index descents."""
        rows = list(
            await self._db.execute_fetchall(
                "SELECT max(coalesce((SELECT max(message_id) FROM inbox WHERE client_id = ?), 0),"
                " coalesce((SELECT high_water FROM inbox_floor WHERE client_id = ?), 0))",
                (client_id, client_id),
            )
        )
        return int(rows[0][0] or 0) if rows else 0

    # -- the bounded inbox (docs/protocol.md, "A bounded inbox"; policy in protocol/floor.py) --
    #
    # Contract, for any backend: ``floors`` reads records, ``run`` reads a client's rows in id
    # order, ``forget`` deletes a client's rows below a floor and stores its record, and
    # ``window_rows`` / ``forget_keys`` serve the time window. The caller (the pruner, in the
    # writer task) wraps each chunk in ``begin()`` / ``commit()``; none of them commits.

    async def lock(self, client_id: str) -> None:
        """Nothing to lock: ``BEGIN IMMEDIATE`` already keeps every other writer out."""
        await self._begun()

    async def floors(self, client_ids: Sequence[str]) -> dict[str, Floor]:
        """The floor records of those clients that have one: as read with this transaction's
        dedup query when it covered them all, else read now (with a deferred ``BEGIN``)."""
        if self._floors_seen is not None and self.in_transaction:
            asked, seen = self._floors_seen
            if asked.issuperset(client_ids):
                return {c: seen[c] for c in client_ids if c in seen}
        begin, self._held.begin = self._held.begin, False
        _, rows = await self._call(_begin_and_find, begin, [], self._floor_queries(client_ids))
        return {row[0]: Floor(row[1], row[2], row[3], row[4]) for row in rows}

    def _floor_queries(self, client_ids: Sequence[str]) -> list[tuple[str, list[Any]]]:
        """The queries that read these clients' floor records, chunked under SQLite's
        variable limit."""
        step = self._keys_per_query * 2
        return [
            (_floors_sql(len(client_ids[i : i + step])), list(client_ids[i : i + step]))
            for i in range(0, len(client_ids), step)
        ]

    async def unfinished(self) -> list[tuple[str, int]]:
        """``(client id, mark)`` of the records whose floor has not reached their mark yet:
        the work a receiver stopped in the middle of, resumed at start."""
        rows = await self._db.execute_fetchall(
            "SELECT client_id, mark FROM inbox_floor WHERE mark IS NOT NULL AND mark > floor"
        )
        return [(str(client_id), int(mark)) for client_id, mark in rows]

    async def run(self, client_id: str, start: int, end: int, limit: int) -> list[tuple[int, bool]]:
        """``(message id, rejected)`` of the client's rows with ``start <= id < end``, in id
        order, at most ``limit``: one range of the primary key."""
        await self._begun()
        rows: list[tuple[int, bool]] = await self._call(_run_rows, client_id, start, end, limit)
        return rows

    async def forget(self, client_id: str, floor: Floor, now: float) -> int:
        """Delete the client's rows in ``[floor.base, floor.floor)`` and store ``floor`` as its
        record; returns the rows deleted."""
        await self._begun()
        deleted: int = await self._call(_forget_rows, client_id, floor, now)
        return deleted

    async def window_rows(
        self, after: Key | None, limit: int
    ) -> list[tuple[str, int, float, bool]]:
        """``(client id, message id, received_at, client announced a mark)`` of up to ``limit``
        rows after key ``after`` in key order: the time window's sweep, one range at a time."""
        where, params = (
            ("", ())
            if after is None
            else (
                "WHERE (i.client_id, i.message_id) > (?, ?) ",
                after,
            )
        )
        rows = await self._db.execute_fetchall(
            "SELECT i.client_id, i.message_id, i.received_at, f.mark IS NOT NULL FROM inbox AS i "
            f"LEFT JOIN inbox_floor AS f ON f.client_id = i.client_id {where}"
            "ORDER BY i.client_id, i.message_id LIMIT ?",
            (*params, limit),
        )
        return [(str(c), int(m), float(r), bool(marked)) for c, m, r, marked in rows]

    async def forget_keys(
        self, keys: Sequence[Key], highest: dict[str, int], now: float, cutoff: float
    ) -> int:
        """Delete these rows (the time window's) if received before ``cutoff``, and keep, per
        client, the highest id deleted as its record's high-water mark (creating a record
        with no floor if needed). Returns the rows deleted."""
        await self._begun()
        # The records first: a high_water() read in between (the handshake shares this
        # connection) then never misses the deleted rows.
        await self._db.executemany(
            "INSERT INTO inbox_floor (client_id, base, floor, high_water, mark, updated_at) "
            "VALUES (?, 0, 0, ?, NULL, ?) ON CONFLICT (client_id) DO UPDATE SET "
            "high_water = max(high_water, excluded.high_water), updated_at = excluded.updated_at",
            [(client_id, high, now) for client_id, high in highest.items()],
        )
        # Only if still older than the cutoff: the keys were read before this transaction,
        # and another receiver process on the file may have deleted and recorded one again.
        cursor = await self._db.executemany(
            "DELETE FROM inbox WHERE client_id = ? AND message_id = ? AND received_at < ?",
            [(client_id, message_id, cutoff) for client_id, message_id in keys],
        )
        return max(0, cursor.rowcount)

    async def record(self, rows: Sequence[InboxRow]) -> None:
        """Rows for the inbox, written by :meth:`commit`'s hop just before ``COMMIT``."""
        self._rows += rows

    async def commit(self) -> None:
        await self._commit(None)

    async def commit_with_step(self, step: MarkStep) -> StepDone | sqlite3.Error:
        """COMMIT with a pruning step run just before it, in the same hop and the same
        fsync (``pruner.FoldingStore``). A failed step is undone alone and returned; the
        transaction's other work still commits."""
        done = await self._commit(step)
        assert done is not None
        return done

    async def _commit(self, step: MarkStep | None) -> StepDone | sqlite3.Error | None:
        begin, self._held.begin = self._held.begin, False
        rows, self._rows = self._rows, []
        self._floors_seen = None
        done: StepDone | sqlite3.Error | None = await self._call(
            _write_and_commit, begin, rows, step
        )
        self._held.pending = False
        return done

    async def rollback(self) -> None:
        """Undo the open transaction, if any (SQLite may already have rolled it back)."""
        self._held.pending = False
        self._held.begin = False
        self._rows = []
        self._floors_seen = None
        if self._db.in_transaction:
            await self._db.execute("ROLLBACK")

    async def close(self) -> None:
        await self._db.close()
