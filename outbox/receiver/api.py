"""What handlers and the authenticate hook see: the receiver's public vocabulary.

Everything here is plain data or an exception; nothing touches a socket. The server, the
handshake and the writer build these objects and read them back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from websockets.datastructures import Headers

from .backend import HandlerTransaction, InboxBackend

__all__ = [
    "Authenticate",
    "ConnectRequest",
    "Handler",
    "Incoming",
    "ReceiverStats",
    "Refuse",
    "Reject",
    "Setup",
]


class Reject(Exception):
    """Raise from a handler to refuse a message for good.

    The message is nacked with ``reason`` (the client marks its row dead and never resends it
    on its own), any writes the handler made through ``message.tx`` are rolled back, and its
    inbox row is recorded with the reason, so a resend is nacked again without calling the
    handler. Any other exception means "not now": see :class:`Receiver`.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Refuse(Exception):
    """Raise from ``authenticate`` to refuse a connection with an HTTP status (default 403).

    The client sees it as ``websockets.exceptions.InvalidStatus`` before any WebSocket frame
    is exchanged. ``headers`` are added to the response (e.g. ``WWW-Authenticate`` with 401).
    """

    def __init__(
        self,
        status: int = HTTPStatus.FORBIDDEN,
        reason: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = HTTPStatus(status)  # ValueError now, not a 500 later
        self.reason = reason or self.status.phrase
        self.headers = dict(headers or {})
        super().__init__(f"{int(self.status)} {self.reason}")


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """The opening handshake, as the ``authenticate`` hook sees it."""

    path: str
    """Request path without the query string."""
    query: Mapping[str, str]
    """Query parameters (the first value of each)."""
    headers: Headers
    """Request headers (case-insensitive)."""
    client_id: str | None
    """The id the client claims: the Outbox-Client-Id header, else the client_id query
    parameter, else None."""
    remote_address: Any
    """The peer's address, as the socket reports it."""


Authenticate = Callable[[ConnectRequest], str | Awaitable[str | None] | None]
"""Returns the authenticated principal (who the peer proved to be, e.g. a user id); None
refuses with 401; raising :class:`Refuse` refuses with its status. Messages are then
deduplicated under the principal *and* the id the client claims (see
:func:`~outbox.receiver.handshake.dedup_key`), so a principal reaches only its own records
and two devices of one user never collide."""


class Incoming:
    """One message, as the handler sees it.

    ``tx`` is the open write transaction that will record this message in the inbox (see
    :class:`~outbox.receiver.inbox.Transaction`, or on PostgreSQL
    :class:`~outbox.receiver.postgres.PostgresTransaction`, whose SQL uses ``$1`` placeholders):
    writes made through it commit atomically with that record, which is what makes their
    effect exactly-once.
    """

    __slots__ = ("_inbox", "_tx", "client_id", "data", "id")

    def __init__(self, client_id: str, message_id: int, data: Any, inbox: InboxBackend) -> None:
        self.client_id = client_id
        self.id = message_id
        self.data = data
        self._inbox = inbox
        self._tx: HandlerTransaction | None = None

    @property
    def message_id(self) -> int:
        return self.id

    @property
    def tx(self) -> HandlerTransaction:
        if self._tx is None:
            self._tx = self._inbox.transaction()
        return self._tx

    async def _finish(self, keep: bool) -> None:
        if self._tx is not None:
            await self._tx._finish(keep)

    def __repr__(self) -> str:
        return f"<Incoming {self.client_id!r} #{self.id}>"


Handler = Callable[[Incoming], Awaitable[None]]

Setup = Callable[[Any], Awaitable[None]]
"""``serve(..., setup=...)``: run once at start, before listening, with a transaction on the
inbox connection (the same handle as ``message.tx``: a ``Transaction`` on SQLite, a
``PostgresTransaction`` on PostgreSQL): create the handler's tables here
(``CREATE TABLE IF NOT EXISTS``). Its writes commit before the first message is handled; if
it raises, they are rolled back and ``start()`` fails with that error."""


@dataclass(slots=True)
class ReceiverStats:
    """Counters since the receiver started. Message counters move when a transaction commits."""

    connections: int = 0
    """WebSocket connections accepted."""
    open_connections: int = 0
    refused: int = 0
    """Handshakes refused (authenticate, or an unusable client id)."""
    frames: int = 0
    """Frames received on accepted connections."""
    messages: int = 0
    """First deliveries handled, committed and acked."""
    rejected: int = 0
    """First deliveries the handler rejected (recorded and nacked)."""
    duplicates: int = 0
    """Resends answered again from the inbox, without calling the handler."""
    conflicts: int = 0
    """Repeats of a recorded (client, message id) with other content: refused with a nack
    (a reused id, e.g. from a restored outbox file, or a peer using another's client id)."""
    nacks: int = 0
    """Nacks queued: rejections, resends of rejected messages, malformed messages."""
    handler_errors: int = 0
    """Handler exceptions (message not acked, connection closed with 1011)."""
    protocol_errors: int = 0
    """Malformed frames or messages (nacked, or closed with 1003, 1007 or 1009)."""
    transactions: int = 0
    """Group commits."""
    superseded: int = 0
    """Connections fenced out (PostgreSQL) because their identity connected again: their
    work dropped unhandled and unacked, closed with 4409."""
    storage_errors: int = 0
    """Transactions that failed in SQLite (connections involved closed with 1013)."""
