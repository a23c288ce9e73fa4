"""The transactional outbox: enqueue messages inside the application's own transaction.

    conn = sqlite3.connect("app.db")
    outbox.migrate(conn)                     # once: the outbox tables, in the app's database
    with conn:                               # the application's transaction
        conn.execute("INSERT INTO orders (id, total) VALUES (?, ?)", (42, 9.5))
        outbox.enqueue(conn, {"type": "order", "id": 42}, key="order-42")

``enqueue`` and ``enqueue_many`` write pending rows with the caller's ``sqlite3`` connection,
inside whatever transaction it has open, and never commit or roll back: the message commits
with the order or not at all. A sender (an ``Outbox`` or ``outbox relay`` on the same file)
picks the rows up once they commit. ``enqueue_async`` and ``enqueue_many_async`` do the same
on an ``aiosqlite.Connection``, in one call on its thread.

Transactions, as ``sqlite3`` has them:

- The default connection (``isolation_level=""``, Python's legacy mode) opens a transaction
  implicitly before an INSERT; enqueue opens one the same way (``BEGIN`` plus the
  connection's isolation level) if none is open, and leaves it open for the caller.
- A connection in autocommit mode (``isolation_level=None``, or ``autocommit=True`` on
  Python 3.12+) with no transaction open is refused with NoTransactionError: each statement
  would commit alone, so the message would not share the fate of the caller's writes. Open
  one first (``conn.execute("BEGIN")``) or use ``Outbox.send`` / ``Producer.send``.
- The first statement enqueue runs is a write, so it waits for the write lock under the
  connection's busy timeout. A transaction that *read* before its first write can still fail
  with "database is locked" when another process committed in between (SQLite's rule for
  WAL snapshots): with several writing processes, open it with ``BEGIN IMMEDIATE``.

The payload rule and the errors are ``Outbox.send()``'s (PayloadNotJSONError,
PayloadTooLargeError over ``max_message_size``), and so is idempotency: a key already in the
outbox (committed, or written earlier in this transaction) returns the existing row's id.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import aiosqlite

from .errors import (
    NoTransactionError,
    OutboxClosedError,
    OutboxError,
    PayloadNotJSONError,
    PayloadTooLargeError,
    SchemaMissingError,
)
from .protocol import codec
from .storage import schema, sqlite

DEFAULT_MAX_MESSAGE_SIZE = 1 << 20
"""``Options.max_message_size``'s default: the largest payload, in bytes of its JSON text."""

_INSERT = (
    "INSERT INTO outbox (payload, key, created_at, updated_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (key) DO NOTHING RETURNING id"
)


def check_max_message_size(value: object) -> int:
    """``max_message_size`` as given to enqueue or Producer: a positive int of bytes."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_message_size must be an int (bytes), got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"max_message_size must be at least 1 byte, got {value}")
    return value


def check_busy_timeout(value: object) -> float:
    """``busy_timeout`` as given to Producer: seconds, a number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"busy_timeout must be a number of seconds, got {type(value).__name__}")
    if not value >= 0:
        raise ValueError(f"busy_timeout must be >= 0 seconds, got {value!r}")
    return float(value)


def encode_payload(payload: Any, max_message_size: int) -> str:
    """The payload's JSON text, or PayloadNotJSONError / PayloadTooLargeError (send()'s rule)."""
    if type(max_message_size) is not int:  # the hot path pays one type check
        check_max_message_size(max_message_size)
    try:
        text = codec.dumps(payload)
    except TypeError as exc:
        raise PayloadNotJSONError(
            f"payload is not JSON-serializable ({exc}); send dicts, lists, strings, "
            "numbers, booleans or None"
        ) from None
    if len(text) * 4 > max_message_size:  # only measure bytes when it could matter
        size = len(text.encode())
        if size > max_message_size:
            raise PayloadTooLargeError(
                f"payload is {size} bytes of JSON, over max_message_size={max_message_size}; "
                "split it or raise max_message_size"
            )
    return text


def check_key(key: object) -> None:
    if key is not None and not isinstance(key, str):
        raise TypeError(f"an idempotency key must be a str or None, got {key!r}")


def encode_rows(
    payloads: Iterable[Any], keys: Sequence[str | None] | None, max_message_size: int
) -> list[tuple[str, str | None]]:
    """``(payload_json, key)`` rows, every check done before anything is written."""
    texts = [encode_payload(payload, max_message_size) for payload in payloads]
    if keys is None:
        return [(text, None) for text in texts]
    if len(keys) != len(texts):
        raise ValueError(f"got {len(texts)} payloads but {len(keys)} keys")
    for key in keys:
        check_key(key)
    return list(zip(texts, keys, strict=True))


# -- migrate --------------------------------------------------------------------------------


def _with_client_id(conn: sqlite3.Connection) -> int:
    """Give the migrated file its client id now, so it is an outbox from the start (the
    operator commands tell an outbox from an inbox by it); returns the schema version."""
    conn.execute(
        "INSERT OR IGNORE INTO outbox_meta (name, value) VALUES ('client_id', ?)",
        (str(uuid.uuid4()),),
    )
    return schema.latest_version()


def migrate(path_or_conn: str | Path | sqlite3.Connection, *, busy_timeout: float = 5.0) -> int:
    """Create or upgrade the outbox tables in an application's database; return its version.

    Also switches the file to WAL (a persistent setting), which lets the sender read while
    the application writes. Idempotent, and safe from several processes at once. Given a
    connection, it must have no transaction open (each migration commits on its own).
    """
    if not isinstance(path_or_conn, sqlite3.Connection):
        path = str(path_or_conn)
        try:
            return sqlite.prepare(path, busy_timeout, _with_client_id)
        except sqlite3.Error as exc:
            raise sqlite.sqlite_error(exc, path) from exc
    conn = path_or_conn
    path = _describe(conn)
    try:
        if conn.in_transaction:
            raise NoTransactionError(
                f"outbox.migrate({path}): commit or roll back the open transaction first; "
                "each migration step runs in a transaction of its own"
            )
        sqlite.prepare_connection(conn, path, allow_memory=True)
        version = _with_client_id(conn)
        if conn.in_transaction:
            conn.commit()
        return version
    except sqlite3.ProgrammingError as exc:
        raise _closed(exc) from None
    except sqlite3.Error as exc:
        raise sqlite.sqlite_error(exc, path) from exc


# -- enqueue --------------------------------------------------------------------------------


def enqueue(
    conn: sqlite3.Connection,
    payload: Any,
    *,
    key: str | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> int:
    """Write one pending message in ``conn``'s transaction; return its id. Never commits."""
    check_key(key)
    rows = [(encode_payload(payload, max_message_size), key)]
    return insert(conn, rows)[0]


def enqueue_many(
    conn: sqlite3.Connection,
    payloads: Iterable[Any],
    *,
    keys: Sequence[str | None] | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> list[int]:
    """Write several pending messages in ``conn``'s transaction; their ids, in order."""
    return insert(conn, encode_rows(payloads, keys, max_message_size))


async def enqueue_async(
    conn: aiosqlite.Connection,
    payload: Any,
    *,
    key: str | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> int:
    """``enqueue`` on an ``aiosqlite.Connection``: same rules, one hop to its thread."""
    check_key(key)
    rows = [(encode_payload(payload, max_message_size), key)]
    return (await _insert_async(conn, rows))[0]


async def enqueue_many_async(
    conn: aiosqlite.Connection,
    payloads: Iterable[Any],
    *,
    keys: Sequence[str | None] | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> list[int]:
    """``enqueue_many`` on an ``aiosqlite.Connection``: same rules, one hop to its thread."""
    return await _insert_async(conn, encode_rows(payloads, keys, max_message_size))


async def _insert_async(
    conn: aiosqlite.Connection, rows: list[tuple[str, str | None]]
) -> list[int]:
    if not isinstance(conn, aiosqlite.Connection):
        raise TypeError(f"enqueue_async needs an aiosqlite.Connection, got {type(conn).__name__}")
    try:
        inner = conn._conn  # the sqlite3 connection, used only on aiosqlite's own thread
    except ValueError as exc:  # aiosqlite: "no active connection"
        raise OutboxClosedError(
            f"enqueue_async: the aiosqlite connection is closed ({exc})"
        ) from None
    try:
        # aiosqlite's queue of (future, function): the whole enqueue is one call, in order
        # with the caller's other statements on this connection.
        run = cast(Callable[..., Awaitable[list[int]]], conn._execute)  # untyped upstream
        ids = await run(insert, inner, rows)
    except ValueError as exc:
        if isinstance(exc, OutboxError):
            raise
        raise OutboxClosedError(
            f"enqueue_async: the aiosqlite connection is closed ({exc})"
        ) from None
    return ids


def insert(conn: sqlite3.Connection, rows: Sequence[tuple[str, str | None]]) -> list[int]:
    """Insert encoded rows inside ``conn``'s transaction (opening one if sqlite3 would)."""
    if not isinstance(conn, sqlite3.Connection):
        raise TypeError(f"enqueue needs a sqlite3.Connection, got {type(conn).__name__}")
    if not rows:
        return []
    try:
        _join_transaction(conn)
        now = time.time()
        ids: list[int] = []
        for payload, key in rows:
            found = conn.execute(_INSERT, (payload, key, now, now)).fetchall()
            if found:
                ids.append(int(found[0][0]))
            else:  # the key is taken (committed, or earlier in this transaction)
                ids.append(
                    int(conn.execute("SELECT id FROM outbox WHERE key = ?", (key,)).fetchone()[0])
                )
        return ids
    except sqlite3.ProgrammingError as exc:
        raise _closed(exc) from None
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc).lower() and "outbox" in str(exc).lower():
            raise SchemaMissingError(
                f"{_describe(conn)} has no outbox tables: call outbox.migrate(conn) (or "
                "outbox.migrate(path)) once, at start-up, before enqueueing"
            ) from None
        raise sqlite.sqlite_error(exc, _describe(conn)) from exc
    except sqlite3.Error as exc:
        raise sqlite.sqlite_error(exc, _describe(conn)) from exc


def _join_transaction(conn: sqlite3.Connection) -> None:
    """Use the caller's transaction; open one as sqlite3 would, or refuse autocommit."""
    if conn.in_transaction:
        return
    autocommit = getattr(conn, "autocommit", -1)  # Python 3.12+; -1: legacy control
    if autocommit is True or (autocommit == -1 and conn.isolation_level is None):
        raise NoTransactionError(
            "enqueue: the connection is in autocommit mode and no transaction is open, so "
            "the message would commit alone instead of with your writes (nothing was "
            "written); open one first (conn.execute('BEGIN')), or use Outbox.send() or "
            "Producer.send() to enqueue on its own"
        )
    # What sqlite3 itself runs before an INSERT in legacy mode ("" means plain BEGIN).
    conn.execute(f"BEGIN {conn.isolation_level or ''}".strip())


def _describe(conn: sqlite3.Connection) -> str:
    try:
        for _, name, file in conn.execute("PRAGMA database_list"):
            if name == "main":
                return str(file) or "the in-memory database"
    except sqlite3.Error:
        pass
    return "the database"


def _closed(exc: sqlite3.ProgrammingError) -> OutboxClosedError:
    return OutboxClosedError(f"enqueue: cannot use this sqlite3 connection ({exc})")
