"""The inbox on PostgreSQL (asyncpg): the SQLite inbox's rules, plus fencing for a fleet.

``serve(handler, "postgresql://user@host/db")`` uses this module instead of ``inbox``. The rules
are the same: one row per ``(identity, message id)`` in the ``inbox`` table, written in the
handler's transaction; answers after ``COMMIT``; a repeat is answered from its row, or refused
as a conflict when its payload digest differs.

Group commit on one dedicated connection, a fixed number of round trips whatever the number of
messages: ``BEGIN``, the fence (``SELECT ... FOR SHARE`` of the identities carried, skipped
when there are none), one dedup ``SELECT`` over ``unnest`` of the keys (with the floors of
their clients: the bounded inbox costs no extra round trip), one ``INSERT ...
SELECT FROM unnest(...)`` of the new rows, ``COMMIT`` (plus whatever SQL the handlers run, and
one round trip per message that uses ``message.tx`` for its SAVEPOINT: a kept SAVEPOINT is
released in the same round trip as the next one opens, or by the COMMIT).
asyncpg over psycopg 3 by measurement: README, "PostgreSQL".

Fencing: several receivers may share the database. ``claim`` (the handshake, on a small pool
of other connections) takes a new epoch for the identity, ``epoch = epoch + 1``; that UPDATE
waits for the row lock every group commit carrying the identity holds until its COMMIT. A
group commit locks the rows of its identities (``FOR SHARE``, in client id order so two
commits never deadlock on each other) before its dedup query, and a connection whose epoch is
no longer the row's has its items dropped: so once a newer connection is claimed, no older
one commits anything for that identity, and the newer one's dedup sees all that the older
ones committed. Anonymous identities (unique per connection) are not fenced.

The bounded inbox in a fleet (the pruner, ``pruner.py``, with the rules of
``protocol/floor.py``): every receiver sharing the database may raise a client's floor and
delete the rows below it, so a floor one receiver remembers can be stale: another one raised
it and deleted the rows under it since. A straggler below the real floor checked against a
stale floor would find neither its row nor the floor covering it, and be handled again. So no
floor is ever trusted from memory (the pruner asks ``floors`` for every group commit), and on
PostgreSQL it is read in *the same statement* as the dedup query (``seen``): one
statement is one snapshot, and a pruner raises the floor and deletes the rows below it in one
transaction, so that snapshot holds either the rows (committed before the pruning) or the
raised floor (after it), never neither. A floor read in a later statement would be as safe
(floors only rise, a later snapshot sees at least as much pruning); one read before the dedup
query, or kept from an earlier transaction, is not. The pruner itself takes the client's fence
row ``FOR UPDATE`` (``lock``) before it reads the floor record, so two receivers' pruners of
one client never both start from the same old record (the second would write back a floor
derived from rows the first already deleted), and no group commit carrying the client (it
holds that row ``FOR SHARE``) runs while a chunk is deleted: each sees the chunk entirely or not
at all. The upsert keeps the floor, the high-water mark and the mark from ever going down, even
so. The time window's sweep needs no lock: it deletes only rows older than the window of
clients without a mark, which no straggler rule protects.

Migrations: numbered files in ``postgres_migrations/``, each applied in its own transaction
with its row in ``outbox_schema``, under ``pg_advisory_xact_lock`` so receivers that start
at once apply each one once. ``setup`` hooks run under the same lock.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

from ..errors import SchemaTooNewError, StoreError
from ..protocol.floor import Floor
from ..storage.schema import Migration, read_migrations
from .backend import StatementFailed
from .inbox import InboxRow, Key, Recorded

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "DriverMissingError",
    "PostgresInbox",
    "PostgresTransaction",
    "check_url",
    "display_url",
]

LOCK_KEY = 0x6F7574626F78  # "outbox": the advisory lock of migrations and setup hooks
CONNECT_TIMEOUT = 10.0
HANDSHAKE_POOL = 4
"""Connections for handshakes (claim, high-water mark), apart from the writer's."""
CLAIM_LOCK_TIMEOUT = 10.0
"""Seconds a handshake's claim waits for the group commit in flight for its identity (on any
receiver) before it answers 503 and the client retries."""

_SAVEPOINT = "outbox_handler"

_FENCE = (
    "SELECT client_id, epoch FROM outbox_fence WHERE client_id = ANY($1::text[]) "
    "ORDER BY client_id FOR SHARE"
)
_SEEN_AND_FLOORS = (
    # One statement, one snapshot: the rows and the floors that replaced deleted rows agree.
    "SELECT i.client_id, i.message_id, i.reject_reason, i.payload_sha256, "
    "NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint "
    "FROM unnest($1::text[], $2::bigint[]) AS k(c, m) "
    "JOIN inbox AS i ON i.client_id = k.c AND i.message_id = k.m "
    "UNION ALL SELECT f.client_id, NULL, NULL, NULL, f.base, f.floor, f.high_water, f.mark "
    "FROM inbox_floor AS f WHERE f.client_id = ANY($3::text[])"
)
_FLOORS = (
    "SELECT client_id, base, floor, high_water, mark FROM inbox_floor "
    "WHERE client_id = ANY($1::text[])"
)
_UNFINISHED = "SELECT client_id, mark FROM inbox_floor WHERE mark IS NOT NULL AND mark > floor"
_LOCK = "SELECT 1 FROM outbox_fence WHERE client_id = $1 FOR UPDATE"
_RUN = (
    "SELECT message_id, reject_reason IS NOT NULL FROM inbox WHERE client_id = $1 "
    "AND message_id >= $2 AND message_id < $3 ORDER BY message_id LIMIT $4"
)
_FORGET_RECORD = (
    "INSERT INTO inbox_floor (client_id, base, floor, high_water, mark, updated_at) "
    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (client_id) DO UPDATE SET "
    "base = CASE WHEN inbox_floor.floor > 0 THEN inbox_floor.base ELSE excluded.base END, "
    "floor = GREATEST(inbox_floor.floor, excluded.floor), "
    "high_water = GREATEST(inbox_floor.high_water, excluded.high_water), "
    "mark = GREATEST(inbox_floor.mark, excluded.mark), updated_at = excluded.updated_at"
)
_FORGET_ROWS = "DELETE FROM inbox WHERE client_id = $1 AND message_id >= $2 AND message_id < $3"
_WINDOW_ROWS = (
    "SELECT i.client_id, i.message_id, i.received_at, f.mark IS NOT NULL FROM inbox AS i "
    "LEFT JOIN inbox_floor AS f ON f.client_id = i.client_id "
    "WHERE ($1::text IS NULL OR (i.client_id, i.message_id) > ($1::text, $2::bigint)) "
    "ORDER BY i.client_id, i.message_id LIMIT $3"
)
_WINDOW_RECORD = (
    "INSERT INTO inbox_floor (client_id, base, floor, high_water, mark, updated_at) "
    "SELECT c, 0, 0, h, NULL, $3 FROM unnest($1::text[], $2::bigint[]) AS k(c, h) "
    "ON CONFLICT (client_id) DO UPDATE SET "
    "high_water = GREATEST(inbox_floor.high_water, excluded.high_water), "
    "updated_at = excluded.updated_at"
)
_WINDOW_DELETE = (
    # Read before this transaction: only if still older than the cutoff (another receiver
    # may have deleted it and recorded it again), and never a row of a client that announced
    # a mark meanwhile (on another receiver): the floor protects those.
    "DELETE FROM inbox AS i USING unnest($1::text[], $2::bigint[]) AS k(c, m) "
    "WHERE i.client_id = k.c AND i.message_id = k.m AND i.received_at < $3 AND NOT EXISTS "
    "(SELECT 1 FROM inbox_floor AS f WHERE f.client_id = k.c AND f.mark IS NOT NULL)"
)
_INSERT = (
    "INSERT INTO inbox (client_id, message_id, payload, received_at, reject_reason, "
    "payload_sha256) SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], "
    "$4::float8[], $5::text[], $6::text[])"
)
_CLAIM = (
    "INSERT INTO outbox_fence (client_id, epoch) VALUES ($1, 1) ON CONFLICT (client_id) "
    "DO UPDATE SET epoch = outbox_fence.epoch + 1, claimed_at = now() RETURNING epoch"
)
_HIGH_WATER = (
    # Counting rows the floor has deleted; one statement, so never between the two.
    "SELECT GREATEST(coalesce((SELECT max(message_id) FROM inbox WHERE client_id = $1), 0), "
    "coalesce((SELECT high_water FROM inbox_floor WHERE client_id = $1), 0))"
)


class DriverMissingError(StoreError, ImportError):
    """A postgresql:// inbox without asyncpg installed."""


def _driver() -> Any:
    try:
        import asyncpg
    except ImportError as exc:
        raise DriverMissingError(
            "a postgresql:// inbox needs the asyncpg driver: pip install 'outbox[postgres]'"
        ) from exc
    return asyncpg


def display_url(url: str) -> str:
    """The URL without its password, for logs, metrics labels and errors."""
    try:
        split = urllib.parse.urlsplit(url)
        if split.password is None:
            return url
        netloc = split.netloc.rsplit("@", 1)[1]
        user = split.username or ""
        return urllib.parse.urlunsplit(split._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "postgresql://(unparsable URL)"


def check_url(url: str) -> None:
    """Refuse a URL asyncpg would misread, naming what is wrong."""
    try:
        split = urllib.parse.urlsplit(url)
        split.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as exc:
        raise ValueError(
            f"not a usable PostgreSQL URL ({display_url(url)}): {exc}; "
            "expected postgresql://user[:password]@host[:port]/dbname"
        ) from None
    if split.scheme.lower() not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {display_url(url)}")
    if not split.path.strip("/") and "dbname" not in split.query:
        raise ValueError(
            f"the PostgreSQL URL {display_url(url)} names no database; "
            "expected postgresql://user[:password]@host[:port]/dbname"
        )


def available() -> list[Migration]:
    """The PostgreSQL migrations shipped with this version of outbox, in order."""
    return read_migrations(resources.files("outbox.receiver.postgres_migrations"), "PostgreSQL")


class PostgresTransaction:
    """``message.tx`` on PostgreSQL: statements inside the group's open transaction.

    The same rules as the SQLite :class:`~outbox.receiver.inbox.Transaction`: the first
    statement opens a SAVEPOINT for this message, undone if the handler raises (or rejects);
    writes commit with the message's inbox row; no BEGIN/COMMIT/ROLLBACK/RELEASE of your own;
    the handle refuses to be used after the handler returns. SQL uses asyncpg's placeholders
    (``$1``, ``$2``...), and one statement at a time (an asyncpg connection runs no two at
    once). A statement that fails aborts the message: even if the handler catches the error
    and returns, its writes are undone and the message fails like a raise (1011), since
    PostgreSQL refuses every statement after an error until the SAVEPOINT is rolled back.
    """

    __slots__ = ("_conn", "_failed", "_inbox", "_state", "_unsure")

    _FRESH, _OPEN, _DONE = 0, 1, 2

    def __init__(self, inbox: PostgresInbox) -> None:
        self._inbox = inbox
        self._conn = inbox._conn
        self._state = self._FRESH
        self._failed: BaseException | None = None
        """A statement of the handler's that did not complete: raised, or was cancelled (a
        cancelled statement leaves the transaction aborted), so the SAVEPOINT is undone."""
        self._unsure = False
        """Releasing the earlier message's kept SAVEPOINT failed (see ``_enter``)."""

    async def _enter(self) -> None:
        if self._state == self._OPEN:
            return
        if self._state == self._DONE:
            raise RuntimeError(
                "this message's transaction is over: use message.tx only while the handler runs"
            )
        self._state = self._OPEN
        if self._inbox._held:
            # The savepoint an earlier message kept: released in this same round trip.
            self._inbox._held = False
            try:
                await self._conn.execute(f"RELEASE SAVEPOINT {_SAVEPOINT}; SAVEPOINT {_SAVEPOINT}")
            except BaseException as exc:
                # Whether the earlier savepoint is still open is unknown now: a ROLLBACK TO
                # could undo that message's kept writes. ``_finish`` fails the group instead.
                self._failed = exc
                self._unsure = True
                raise
        else:
            try:
                await self._conn.execute(f"SAVEPOINT {_SAVEPOINT}")
            except BaseException as exc:
                self._failed = exc
                raise

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> str:
        """Run one statement; returns its status (``"INSERT 0 1"``), like asyncpg's."""
        await self._enter()
        try:
            return await self._conn.execute(sql, *parameters)
        except BaseException as exc:  # a cancellation too: PostgreSQL aborts the statement
            self._failed = exc
            raise

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any]]) -> None:
        """Run one statement for each parameter tuple (asyncpg pipelines them)."""
        await self._enter()
        try:
            await self._conn.executemany(sql, parameters)
        except BaseException as exc:  # a cancellation too: PostgreSQL aborts the statement
            self._failed = exc
            raise

    async def execute_fetchall(
        self, sql: str, parameters: Sequence[Any] = ()
    ) -> list[asyncpg.Record]:
        """Run a query and return all its rows."""
        await self._enter()
        try:
            return await self._conn.fetch(sql, *parameters)
        except BaseException as exc:  # a cancellation too: PostgreSQL aborts the statement
            self._failed = exc
            raise

    async def _finish(self, keep: bool) -> None:
        state, self._state = self._state, self._DONE
        if state != self._OPEN:
            return
        if self._unsure:
            raise StoreError(
                f"releasing the previous message's SAVEPOINT failed ({self._failed!r}); the "
                "transaction is failed as a whole so that no kept write is undone"
            )
        if keep and self._failed is None:
            # Kept: released by the next message's SAVEPOINT, or simply by the COMMIT (a
            # round trip per message saved).
            self._inbox._held = True
            return
        await self._conn.execute(
            f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}; RELEASE SAVEPOINT {_SAVEPOINT}"
        )
        if keep:
            raise StatementFailed(
                f"the handler returned after its statement failed ({self._failed!r}); "
                "PostgreSQL aborts the transaction after an error, so its writes were undone"
            )


class PostgresInbox:
    """The receiver's PostgreSQL database. Open with ``await PostgresInbox.open(url)``."""

    def __init__(self, url: str, conn: asyncpg.Connection, pool: asyncpg.Pool) -> None:
        self.url = url
        self.path = display_url(url)
        self._conn = conn
        self._pool = pool
        self.claim: Callable[[str], Awaitable[int]] | None = self._claim
        self._held = False
        """A handler's SAVEPOINT is still open (kept, not yet released)."""
        self._floors_seen: tuple[set[str], dict[str, Floor]] | None = None
        """The floors the last ``seen`` of this transaction read with its rows (clients
        asked about, records found): what ``floors`` answers for them until it ends."""

    @classmethod
    async def open(cls, url: str, *, timeout: float = CONNECT_TIMEOUT) -> PostgresInbox:
        """Check the URL, connect, apply the migrations (under the advisory lock)."""
        check_url(url)
        asyncpg = _driver()
        try:
            conn = await asyncpg.connect(url, timeout=timeout)
        except Exception as exc:
            raise _connect_error(exc, url) from exc
        try:
            await _migrate(conn, display_url(url))
            # A claim waits for the group commits in flight for its identity; a receiver
            # whose handler hangs must not hang every handshake here: 503 after this.
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=HANDSHAKE_POOL,
                timeout=timeout,
                server_settings={"lock_timeout": f"{int(CLAIM_LOCK_TIMEOUT * 1000)}"},
            )
        except BaseException as exc:
            await conn.close()
            if isinstance(exc, Exception) and not isinstance(exc, StoreError):
                raise _connect_error(exc, url) from exc
            raise
        return cls(url, conn, pool)

    # -- the handshake (pool connections) ----------------------------------------------------

    async def _claim(self, client_id: str) -> int:
        """A new epoch for ``client_id``: waits for any group commit in flight for it."""
        epoch = await self._pool.fetchval(_CLAIM, client_id)
        return int(epoch)

    async def high_water(self, client_id: str) -> int:
        value = await self._pool.fetchval(_HIGH_WATER, client_id)
        return int(value or 0)

    # -- the writer (its own connection) -----------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        return not self._conn.is_closed() and self._conn.is_in_transaction()

    def transaction(self) -> PostgresTransaction:
        return PostgresTransaction(self)

    async def setup(self, setup: Callable[[Any], Awaitable[None]]) -> None:
        """Run the application's setup hook in a transaction of its own, under the advisory
        lock (two receivers starting at once must not race on CREATE TABLE IF NOT EXISTS)."""
        await self.begin()
        try:
            await self._conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
            tx = PostgresTransaction(self)
            await setup(tx)
            await tx._finish(keep=True)
        except BaseException:
            await self.rollback()
            raise
        await self.commit()

    async def begin(self) -> None:
        if self._conn.is_closed():  # lost earlier (the group got 1013): connect afresh
            self._conn = await _driver().connect(self.url, timeout=CONNECT_TIMEOUT)
        self._held = False
        self._floors_seen = None
        await self._conn.execute("BEGIN")

    async def fence(self, client_ids: Sequence[str]) -> dict[str, int]:
        if not client_ids:
            return {}
        rows = await self._conn.fetch(_FENCE, sorted(set(client_ids)))
        return {row[0]: int(row[1]) for row in rows}

    async def seen(self, keys: Sequence[Key]) -> dict[Key, Recorded]:
        """The rows of those keys, and (same statement, same snapshot) the floors of their
        clients, which ``floors`` then answers for this transaction (see the module's
        docstring, "The bounded inbox in a fleet")."""
        client_ids = [k[0] for k in keys]
        rows = await self._conn.fetch(
            _SEEN_AND_FLOORS, client_ids, [k[1] for k in keys], sorted(set(client_ids))
        )
        found: dict[Key, Recorded] = {}
        floors: dict[str, Floor] = {}
        for row in rows:
            if row[1] is None:
                floors[row[0]] = Floor(int(row[4]), int(row[5]), int(row[6]), _int(row[7]))
            else:
                found[(row[0], int(row[1]))] = (row[2], row[3])
        self._floors_seen = (set(client_ids), floors)
        return found

    # -- the bounded inbox (``pruner.FloorStore``; the SQLite inbox's contract) ---------------

    async def floors(self, client_ids: Sequence[str]) -> dict[str, Floor]:
        """The floor records of those clients that have one: as read with this transaction's
        dedup query when it covered them all, else read now."""
        if self._floors_seen is not None and self.in_transaction:
            asked, floors = self._floors_seen
            if asked.issuperset(client_ids):
                return {c: floors[c] for c in client_ids if c in floors}
        rows = await self._conn.fetch(_FLOORS, list(dict.fromkeys(client_ids)))
        return {row[0]: Floor(int(row[1]), int(row[2]), int(row[3]), _int(row[4])) for row in rows}

    async def unfinished(self) -> list[tuple[str, int]]:
        """``(client id, mark)`` of the records whose floor has not reached their mark yet:
        resumed at start (by every receiver of the fleet; the lock makes that harmless)."""
        rows = await self._pool.fetch(_UNFINISHED)
        return [(str(row[0]), int(row[1])) for row in rows]

    async def lock(self, client_id: str) -> None:
        """Hold the client's fence row ``FOR UPDATE`` until the transaction ends: no other
        pruner of it, and no group commit carrying it, on any receiver meanwhile."""
        await self._conn.execute(_LOCK, client_id)

    async def run(self, client_id: str, start: int, end: int, limit: int) -> list[tuple[int, bool]]:
        """``(message id, rejected)`` of the client's rows with ``start <= id < end``, in id
        order, at most ``limit``."""
        rows = await self._conn.fetch(_RUN, client_id, start, end, limit)
        return [(int(row[0]), bool(row[1])) for row in rows]

    async def forget(self, client_id: str, floor: Floor, now: float) -> int:
        """Store ``floor`` as the client's record (never lowering it) and delete its rows in
        ``[floor.base, floor.floor)``, in the caller's transaction; returns the rows deleted."""
        await self._conn.execute(
            _FORGET_RECORD,
            client_id,
            floor.base,
            floor.floor,
            floor.high_water,
            floor.mark,
            now,
        )
        status = await self._conn.execute(_FORGET_ROWS, client_id, floor.base, floor.floor)
        return int(status.rsplit(" ", 1)[-1])

    async def window_rows(
        self, after: Key | None, limit: int
    ) -> list[tuple[str, int, float, bool]]:
        """``(client id, message id, received_at, client announced a mark)`` of up to ``limit``
        rows after key ``after`` in key order."""
        first, second = after if after is not None else (None, None)
        rows = await self._conn.fetch(_WINDOW_ROWS, first, second, limit)
        return [(str(r[0]), int(r[1]), float(r[2]), bool(r[3])) for r in rows]

    async def forget_keys(
        self, keys: Sequence[Key], highest: dict[str, int], now: float, cutoff: float
    ) -> int:
        """Delete these rows (the time window's) if still received before ``cutoff``, and
        keep, per client, the highest id deleted as its record's high-water mark; the record
        first, in the same transaction. Returns the rows deleted."""
        await self._conn.execute(_WINDOW_RECORD, list(highest), list(highest.values()), now)
        status = await self._conn.execute(
            _WINDOW_DELETE, [k[0] for k in keys], [k[1] for k in keys], cutoff
        )
        return int(status.rsplit(" ", 1)[-1])

    async def record(self, rows: Sequence[InboxRow]) -> None:
        await self._conn.execute(_INSERT, *(list(column) for column in zip(*rows, strict=True)))

    async def commit(self) -> None:
        self._held = False
        self._floors_seen = None
        await self._conn.execute("COMMIT")

    async def rollback(self) -> None:
        self._held = False
        self._floors_seen = None
        if self.in_transaction:
            await self._conn.execute("ROLLBACK")

    async def close(self) -> None:
        try:
            await self._pool.close()
        finally:
            await self._conn.close()

    def describe_error(self, exc: BaseException) -> BaseException:
        asyncpg = _driver()
        if isinstance(exc, asyncpg.DeadlockDetectedError):
            return StoreError(f"PostgreSQL on {self.path} detected a deadlock ({exc}); resend")
        if isinstance(exc, asyncpg.PostgresError):
            return StoreError(f"PostgreSQL error on {self.path}: {exc}")
        if isinstance(exc, OSError | asyncpg.InterfaceError | asyncpg.ConnectionDoesNotExistError):
            return StoreError(
                f"lost the connection to PostgreSQL at {self.path} ({exc}); the next "
                "transaction reconnects"
            )
        return exc


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


async def _migrate(conn: asyncpg.Connection, where: str) -> int:
    """Apply the missing migrations, each in its own transaction; returns the version."""
    migrations = available()
    latest = len(migrations)
    version = 0
    for migration in [None, *migrations]:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS outbox_schema (version integer PRIMARY KEY, "
                "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            found = await conn.fetchval("SELECT coalesce(max(version), 0) FROM outbox_schema")
            version = int(found)
            if version > latest:
                raise SchemaTooNewError(
                    f"{where} has inbox schema version {version}, but this outbox knows only "
                    f"up to {latest}; upgrade the outbox package (pip install -U outbox)"
                )
            if migration is None or migration.version <= version:
                continue
            try:
                await conn.execute(migration.sql)
            except _driver().DuplicateTableError as exc:
                raise StoreError(
                    f"{where} already has a table the outbox inbox needs ({exc}) but no "
                    f"record of migration {migration.name} in outbox_schema: it is not ours; "
                    "use another database (or schema) for the receiver"
                ) from exc
            await conn.execute(
                "INSERT INTO outbox_schema (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            version = migration.version
    return version


def _connect_error(exc: BaseException, url: str) -> BaseException:
    """Why we could not connect, and what to do, naming the server without its password."""
    asyncpg = _driver()
    where = display_url(url)
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return StoreError(f"{where}: {exc}; create it first (CREATE DATABASE) or fix the URL")
    refused = asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    if isinstance(exc, refused):
        return StoreError(f"{where}: PostgreSQL refused the login ({exc}); check user and password")
    if isinstance(exc, OSError | TimeoutError | asyncpg.CannotConnectNowError):
        detail = str(exc) or type(exc).__name__
        return StoreError(
            f"cannot reach PostgreSQL at {where} ({detail}); is the server running and the "
            "host and port right?"
        )
    if isinstance(exc, asyncpg.PostgresError):
        return StoreError(f"PostgreSQL error on {where}: {exc}")
    return exc
