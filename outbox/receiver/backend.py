"""What the writer needs from an inbox, as a small typed Protocol both backends implement.

The SQLite inbox (``inbox.Inbox``) and the PostgreSQL one (``postgres.PostgresInbox``) keep
the same rules: one row per ``(identity, message id)`` written in the handler's transaction,
answers only after ``COMMIT``, repeats answered from the row (or refused as a conflict when
the payload digest differs). ``open_inbox`` picks the backend from ``db``: a
``postgresql://`` (or ``postgres://``) URL is PostgreSQL, anything else a SQLite file.

Fencing (PostgreSQL only): ``claim`` gives a connection a new epoch for its identity at the
handshake, and ``fence`` tells a group commit the current epoch of each identity it carries,
with their rows locked until COMMIT; a connection whose epoch is older was superseded and its
work is dropped (see docs/protocol.md, "Receiver"). SQLite has one writer per file and does
not fence: its ``claim`` is None and its ``fence`` answers ``{}`` without any I/O.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from .inbox import InboxRow, Key, Recorded

__all__ = [
    "SUPERSEDED",
    "HandlerTransaction",
    "InboxBackend",
    "StatementFailed",
    "is_postgres_url",
    "open_inbox",
]

SUPERSEDED = 4409
"""Close code of a connection whose identity connected again (to this receiver or another
sharing the database): its work is dropped unhandled and unacked, the client resends it on
its newest connection. In the application range (4000-4999), after HTTP 409 Conflict."""

SetupHook = Callable[[Any], Awaitable[None]]


class StatementFailed(Exception):
    """A handler returned after one of its statements failed (PostgreSQL aborts the rest of
    the transaction then): its SAVEPOINT was undone and the message counts as a handler
    failure (1011), so the other messages of the group still commit."""


class HandlerTransaction(Protocol):
    """``message.tx``: the handler's statements inside the group's open transaction, under a
    SAVEPOINT of the message's own (opened on first use)."""

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Any: ...

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any]]) -> Any: ...

    async def execute_fetchall(self, sql: str, parameters: Sequence[Any] = ()) -> Any: ...

    async def _finish(self, keep: bool) -> None: ...


class InboxBackend(Protocol):
    """The inbox as the writer and the handshake use it: one transaction at a time."""

    path: str
    """What to call the database in log lines (a URL's password is never in it)."""

    claim: Callable[[str], Awaitable[int]] | None
    """Take a new epoch for an identity (the handshake); None: this backend does not fence."""

    @property
    def in_transaction(self) -> bool: ...

    def transaction(self) -> HandlerTransaction: ...

    async def setup(self, setup: SetupHook) -> None: ...

    async def begin(self) -> None: ...

    async def fence(self, client_ids: Sequence[str]) -> Mapping[str, int]:
        """The current epoch of each identity (rows locked until the transaction ends)."""
        ...

    async def seen(self, keys: Sequence[Key]) -> dict[Key, Recorded]: ...

    async def record(self, rows: Sequence[InboxRow]) -> None: ...

    async def commit(self) -> None: ...

    async def rollback(self) -> None: ...

    async def high_water(self, client_id: str) -> int: ...

    async def close(self) -> None: ...

    def describe_error(self, exc: BaseException) -> BaseException:
        """An error of this database as an outbox error that says what to do (StoreError),
        or ``exc`` itself when it is not one of the database's."""
        ...


def is_postgres_url(db: str | os.PathLike[str]) -> bool:
    """Whether ``db`` names a PostgreSQL database rather than a SQLite file."""
    return isinstance(db, str) and db.lower().startswith(("postgresql://", "postgres://"))


async def open_inbox(
    db: str | os.PathLike[str], *, synchronous: Any = "FULL", busy_timeout: float = 5.0
) -> InboxBackend:
    """The backend for ``db``, migrated and connected."""
    if is_postgres_url(db):
        from .postgres import PostgresInbox

        return await PostgresInbox.open(str(db))
    from .inbox import Inbox

    return await Inbox.open(os.fspath(db), synchronous=synchronous, busy_timeout=busy_timeout)
