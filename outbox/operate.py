"""What the operator commands (``outbox stats | list | requeue | purge``) do to a file.

Plain ``sqlite3``, synchronous, no event loop: each command opens the file, does one job in
short transactions and closes it. Safe while an ``Outbox`` (or a receiver) runs on the same
file: reads use WAL snapshots and take no lock; writes take the write lock with ``BEGIN
IMMEDIATE``, wait up to ``busy_timeout`` for it, and hold it for at most one chunk of rows,
so the running sender's group commits wait milliseconds, not seconds. The running process
keeps counts in memory and re-reads them when it sees another connection wrote.

Nothing here creates, migrates or switches the journal mode of a file: a path that is not
an outbox or an inbox is refused as it is.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .storage import schema

Kind = Literal["outbox", "inbox"]

CHUNK = 5000
"""Rows changed per write transaction, so no command holds the write lock for long."""

PREVIEW = 60
"""Characters of a payload or an error shown in a table (JSON output gets 200)."""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class OperateError(Exception):
    """A file the command cannot work on, or a request it cannot do; the message says why."""


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``2h``, ``7d`` -> seconds; ValueError naming the accepted forms."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(
            f"{text!r} is not a duration: use a number and a unit, s, m, h or d "
            "(e.g. 90s, 15m, 2h, 7d)"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def format_age(seconds: float) -> str:
    """A short age for a table: ``42s``, ``17m``, ``5.2h``, ``3.0d``."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def preview(text: str | None, limit: int = PREVIEW) -> str:
    """One line, at most ``limit`` characters (a peer's text is never shown unbounded)."""
    if text is None:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# -- opening ------------------------------------------------------------------------------


@contextlib.contextmanager
def open_file(path: str, *, write: bool, busy_timeout: float = 5.0) -> Iterator[sqlite3.Connection]:
    """Open an existing outbox or inbox file; never creates one. Read-only unless ``write``."""
    if os.path.isdir(path):
        raise OperateError(f"{path} is a directory; give the path of an outbox or inbox file")
    if not os.path.exists(path):
        raise OperateError(f"no such file {path}")
    mode = "rw" if write else "ro"
    try:
        conn = sqlite3.connect(
            f"file:{urllib.parse.quote(path)}?mode={mode}",
            uri=True,
            timeout=busy_timeout,
            isolation_level=None,
        )
    except sqlite3.Error as exc:
        raise OperateError(f"cannot open {path}: {exc}") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        if write:
            schema.refuse_newer(conn, path)  # a newer schema: its rules are not ours
        yield conn
    except sqlite3.Error as exc:
        raise OperateError(f"cannot use {path}: {exc}") from None
    finally:
        conn.close()


def kind_of(conn: sqlite3.Connection, path: str) -> Kind:
    """Which side wrote this file: an Outbox stores its client id, a receiver does not."""
    try:
        tables = {str(row[0]) for row in conn.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as exc:
        raise OperateError(f"{path} is not a usable SQLite database ({exc})") from None
    if "outbox_meta" in tables:
        row = conn.execute("SELECT value FROM outbox_meta WHERE name = 'client_id'").fetchone()
        if row is not None:
            return "outbox"
    if "inbox" in tables:
        return "inbox"
    raise OperateError(
        f"{path} is neither an outbox nor an inbox (no outbox or inbox table written by "
        "outbox); check the path"
    )


def require(kind: Kind, wanted: Kind, path: str, why: str) -> None:
    if kind != wanted:
        raise OperateError(f"{path} is an {kind}, not an {wanted}: {why}")


# -- reading ------------------------------------------------------------------------------


@dataclass(slots=True)
class OutboxStats:
    kind: str
    path: str
    client_id: str
    pending: int
    acked: int
    dead: int
    max_id: int
    """The highest id ever given out (purged rows included): ``max_id - pending - dead`` is
    how many messages were acked in the file's whole life."""
    oldest_pending_id: int | None
    oldest_pending_age: float | None
    dead_rows: list[dict[str, Any]] = field(default_factory=list)
    expired: int = 0
    """Rows not acked before their ttl ran out (``send(ttl=)``), kept like dead ones."""


@dataclass(slots=True)
class InboxStats:
    kind: str
    path: str
    rows: int
    rejected: int
    clients: int
    latest: list[dict[str, Any]] = field(default_factory=list)
    """Per client (the most recent first): its row count, highest message id, last seen."""
    retention: str = (
        "when the receiver prunes (a handler, or serve --prune): rows below each client's "
        "low-water mark (its floor answers stragglers), else after the duplicate_window"
    )
    floors: int = 0
    """Clients with a floor: their rows below it were deleted (migration 0005)."""
    forgotten: int = 0
    """Message ids the floors cover (deleted rows, answered as duplicates if resent)."""


def status_sql(conn: sqlite3.Connection) -> str:
    """A row's status as people see it: 'expired' is stored as 'dead' with ``expired = 1``
    (migration 0004); a file from before that migration has no expired rows."""
    columns = {str(row[1]) for row in conn.execute("PRAGMA table_info(outbox)")}
    return (
        "CASE WHEN status = 'dead' AND expired THEN 'expired' ELSE status END"
        if "expired" in columns
        else "status"
    )


def outbox_stats(conn: sqlite3.Connection, path: str, dead_limit: int) -> OutboxStats:
    now = time.time()
    status = status_sql(conn)
    counts = dict(conn.execute(f"SELECT {status}, count(*) FROM outbox GROUP BY 1").fetchall())
    seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
    client = conn.execute("SELECT value FROM outbox_meta WHERE name = 'client_id'").fetchone()
    oldest = conn.execute(
        "SELECT id, created_at FROM outbox WHERE status = 'pending' ORDER BY id LIMIT 1"
    ).fetchone()
    dead = [
        {"id": n, "attempts": attempts, "last_error": preview(error, 200)}
        for n, attempts, error in conn.execute(
            f"SELECT id, attempts, last_error FROM outbox WHERE {status} = 'dead' "
            "ORDER BY id DESC LIMIT ?",
            (dead_limit,),
        )
    ]
    return OutboxStats(
        kind="outbox",
        path=path,
        client_id=str(client[0]) if client else "",
        pending=int(counts.get("pending", 0)),
        acked=int(counts.get("acked", 0)),
        dead=int(counts.get("dead", 0)),
        max_id=int(seq[0]) if seq else 0,
        oldest_pending_id=int(oldest[0]) if oldest else None,
        oldest_pending_age=round(now - oldest[1], 3) if oldest else None,
        dead_rows=dead,
        expired=int(counts.get("expired", 0)),
    )


def inbox_stats(conn: sqlite3.Connection, path: str, client_limit: int) -> InboxStats:
    now = time.time()
    rows, rejected, clients = conn.execute(
        "SELECT count(*), count(reject_reason), count(DISTINCT client_id) FROM inbox"
    ).fetchone()
    latest = [
        {
            "client_id": client,
            "rows": count,
            "max_message_id": top,
            "last_received_age": round(now - last, 3),
        }
        for client, count, top, last in conn.execute(
            "SELECT client_id, count(*), max(message_id), max(received_at) AS last FROM inbox "
            "GROUP BY client_id ORDER BY last DESC LIMIT ?",
            (client_limit,),
        )
    ]
    floors = forgotten = 0
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'inbox_floor'").fetchone():
        floors, forgotten = conn.execute(
            "SELECT count(*), coalesce(sum(floor - base), 0) FROM inbox_floor WHERE floor > 0"
        ).fetchone()
    return InboxStats(
        "inbox",
        path,
        int(rows),
        int(rejected),
        int(clients),
        latest,
        floors=int(floors),
        forgotten=int(forgotten),
    )


def as_dict(stats: OutboxStats | InboxStats) -> dict[str, Any]:
    return asdict(stats)


OUTBOX_STATUSES = ("pending", "acked", "dead", "expired")
INBOX_STATUSES = ("handled", "rejected")


def list_outbox(
    conn: sqlite3.Connection, status: str | None, limit: int, width: int
) -> list[dict[str, Any]]:
    """Rows, oldest first (the order they are sent in), at most ``limit``."""
    if status is not None and status not in OUTBOX_STATUSES:
        raise OperateError(f"--status {status}: an outbox row is {', '.join(OUTBOX_STATUSES)}")
    now = time.time()
    shown = status_sql(conn)
    where = f"WHERE {shown} = ?" if status else ""
    params: list[Any] = [status] if status else []
    return [
        {
            "id": n,
            "status": state,
            "attempts": attempts,
            "age": round(now - created, 3),
            "last_error": preview(error, width),
            "key": key,
            "payload": preview(payload, width),
        }
        for n, state, attempts, created, error, key, payload in conn.execute(
            f"SELECT id, {shown}, attempts, created_at, last_error, key, payload FROM outbox "
            f"{where} ORDER BY id LIMIT ?",
            [*params, limit],
        )
    ]


def list_inbox(
    conn: sqlite3.Connection, status: str | None, limit: int, width: int
) -> list[dict[str, Any]]:
    """The most recently received rows first, at most ``limit``."""
    if status is not None and status not in INBOX_STATUSES:
        raise OperateError(
            f"--status {status}: an inbox row is {' or '.join(INBOX_STATUSES)} "
            "(pending, acked and dead are outbox states)"
        )
    now = time.time()
    where = {
        None: "",
        "handled": "WHERE reject_reason IS NULL",
        "rejected": "WHERE reject_reason IS NOT NULL",
    }[status]
    return [
        {
            "client_id": client,
            "message_id": n,
            "status": "handled" if reason is None else "rejected",
            "age": round(now - received, 3),
            "reject_reason": preview(reason, width),
            "payload": preview(payload, width),
        }
        for client, n, received, reason, payload in conn.execute(
            "SELECT client_id, message_id, received_at, reject_reason, payload FROM inbox "
            f"{where} ORDER BY received_at DESC LIMIT ?",
            (limit,),
        )
    ]


# -- writing ------------------------------------------------------------------------------


@dataclass(slots=True)
class Requeued:
    requeued: list[int]
    """Ids that went from dead back to pending."""
    skipped: dict[int, str] = field(default_factory=dict)
    """Ids asked for that were not dead, with what they are (``missing`` if not there)."""


def _in_chunks(items: Sequence[int]) -> Iterator[list[int]]:
    for start in range(0, len(items), 500):  # well under SQLite's variable limit
        yield list(items[start : start + 500])


def requeue(
    conn: sqlite3.Connection, ids: Sequence[int] | None, *, expired: bool = False
) -> Requeued:
    """Dead rows (these ids, or all) back to pending with their attempts reset, in chunks.

    Only the status flips (and attempts, updated_at): the running sender finds them pending,
    like rows ``Outbox.requeue_dead()`` put back. ``last_error`` keeps the old reason.
    Expired rows come back too when named by id, or all of them with ``expired`` (instead of
    the dead ones), without a deadline: they are sent until acked or dead.
    """
    result = Requeued([])
    now = time.time()
    status = status_sql(conn)
    revive = ", expired = 0, expires_at = NULL" if status != "status" else ""
    sql = (
        f"UPDATE outbox SET status = 'pending', attempts = 0, updated_at = ?{revive} "
        "WHERE status = 'dead' AND id IN ({}) RETURNING id"
    )
    if ids is None:
        which = "expired" if expired else "dead"
        while True:
            with _write(conn):
                found = conn.execute(
                    sql.format(
                        f"SELECT id FROM outbox WHERE {status} = '{which}' ORDER BY id LIMIT ?"
                    ),
                    (now, CHUNK),
                ).fetchall()
            result.requeued += sorted(int(row[0]) for row in found)
            if len(found) < CHUNK:
                return result
    wanted = sorted(set(ids))
    for chunk in _in_chunks(wanted):
        marks = ",".join("?" * len(chunk))
        with _write(conn):
            found = conn.execute(sql.format(marks), (now, *chunk)).fetchall()
            done = {int(row[0]) for row in found}
            others = dict(
                conn.execute(
                    f"SELECT id, {status} FROM outbox WHERE id IN ({marks})", chunk
                ).fetchall()
            )
        result.requeued += sorted(done)
        for n in chunk:
            if n not in done:
                result.skipped[n] = str(others.get(n, "missing"))
    return result


def purge(conn: sqlite3.Connection, status: str, older_than: float | None) -> int:
    """Delete ``status`` rows last changed more than ``older_than`` seconds ago (None: all),
    CHUNK rows per transaction. Ids stay used: AUTOINCREMENT never gives one out again."""
    if status not in ("acked", "dead"):
        raise OperateError(f"purge deletes acked or dead rows, not {status}")
    cutoff = float("inf") if older_than is None else time.time() - older_than
    total = 0
    while True:
        with _write(conn):
            deleted = conn.execute(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE status = ? "
                "AND updated_at < ? ORDER BY id LIMIT ?)",
                (status, cutoff, CHUNK),
            ).rowcount
        total += deleted
        if deleted < CHUNK:
            return total


@contextlib.contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[None]:
    """One short write transaction: the lock is taken at BEGIN, so busy_timeout applies."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
