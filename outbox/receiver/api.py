"""What handlers and the authenticate hook see: the receiver's public vocabulary.

Everything here is plain data or an exception; nothing touches a socket. The server, the
handshake and the writer build these objects and read them back.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, overload

from websockets.datastructures import Headers

from .backend import HandlerTransaction, InboxBackend

__all__ = [
    "Authenticate",
    "Batch",
    "BatchHandler",
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

    __slots__ = ("_done", "_inbox", "_tx", "client_id", "data", "id")

    def __init__(
        self,
        client_id: str,
        message_id: int,
        data: Any,
        inbox: InboxBackend,
        tx: HandlerTransaction | None = None,
    ) -> None:
        self.client_id = client_id
        self.id = message_id
        self.data = data
        self._inbox = inbox
        self._tx: HandlerTransaction | None = tx
        """In a :class:`Batch`, the batch's shared transaction; else opened on first use."""
        self._done = False
        """The handler is over: a handle not opened by then never will be."""

    @property
    def message_id(self) -> int:
        return self.id

    @property
    def tx(self) -> HandlerTransaction:
        if self._tx is None:
            if self._done:
                raise RuntimeError(
                    "this message's transaction is over: use message.tx only while the handler runs"
                )
            self._tx = self._inbox.transaction()
        return self._tx

    async def _finish(self, keep: bool) -> None:
        self._done = True
        if self._tx is not None:
            await self._tx._finish(keep)

    def __repr__(self) -> str:
        return f"<Incoming {self.client_id!r} #{self.id}>"


Handler = Callable[[Incoming], Awaitable[None]]


class Batch(Sequence[Incoming]):
    """The new messages of one group-commit transaction, as a batch handler sees them.

    ``serve(handler, db, batch=True)`` calls ``handler(batch)`` once per transaction instead
    of once per message, so a handler can write all of them with one
    ``batch.tx.executemany`` (one thread hop) instead of a hop per message. The
    messages are in each client's order (a client's messages are never split around
    another's), with duplicates, conflicts and malformed messages already answered and left
    out.

    ``tx`` is the open transaction shared by the whole batch (the same API as
    ``message.tx``, and each message's ``tx`` is this one): its writes commit in the same
    ``COMMIT`` as the messages' inbox rows. ``reject(message, reason)`` refuses one message
    for good, without touching the others: it is recorded with the reason and nacked, and a
    resend is nacked again without calling the handler. Because the transaction is shared,
    the receiver cannot tell which writes belong to which message, so **writes made for a
    rejected message are kept** (they commit with the batch): decide first, then write only
    the messages you accept.

    If the handler raises, all of the batch's writes are rolled back and its messages are
    handled again one at a time (each as a batch of one) to find the one that fails; see
    :class:`~outbox.receiver.Receiver`. Raising :class:`Reject` from a batch of one rejects
    that message; from a larger batch it is a failure like any other (use ``reject``).
    """

    __slots__ = ("_index", "_messages", "_open", "_rejected", "_tx")

    def __init__(self, messages: Sequence[Incoming], tx: HandlerTransaction) -> None:
        self._messages = tuple(messages)
        self._tx = tx
        self._rejected: dict[int, str] = {}
        """Position in the batch -> reject reason."""
        self._index: dict[int, int] | None = None
        self._open = True

    @property
    def tx(self) -> HandlerTransaction:
        """The transaction shared by every message of the batch."""
        return self._tx

    def reject(self, message: Incoming, reason: str) -> None:
        """Refuse ``message`` for good: recorded with ``reason`` and nacked (see the class)."""
        if not self._open:
            raise RuntimeError(
                "this batch is over: call batch.reject() only while the handler runs"
            )
        if not isinstance(reason, str):
            raise TypeError(f"reject reason must be a str, got {type(reason).__name__}")
        if self._index is None:
            self._index = {id(each): i for i, each in enumerate(self._messages)}
        position = self._index.get(id(message))
        if position is None:
            raise ValueError(
                f"{message!r} is not a message of this batch: reject only the Incoming "
                "objects the batch holds"
            )
        self._rejected[position] = reason or "rejected by the receiver"

    def _close(self) -> list[str | None]:
        """The handler is done: each message's verdict (None = accepted, str = rejected)."""
        self._open = False
        rejected = self._rejected
        return [rejected.get(i) for i in range(len(self._messages))]

    def __len__(self) -> int:
        return len(self._messages)

    @overload
    def __getitem__(self, index: int) -> Incoming: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Incoming]: ...

    def __getitem__(self, index: int | slice) -> Incoming | Sequence[Incoming]:
        return self._messages[index]

    def __iter__(self) -> Iterator[Incoming]:
        return iter(self._messages)

    def __repr__(self) -> str:
        return f"<Batch of {len(self._messages)} message(s)>"


BatchHandler = Callable[[Batch], Awaitable[None]]
"""``serve(handler, db, batch=True)``: called once per transaction with a :class:`Batch`."""


def check_handler(handler: object, batch: object) -> None:
    """Refuse at construction what would fail on every message later: a handler that is
    not an async callable, a ``batch`` that is not a bool, ``batch=True`` without a handler."""
    if not isinstance(batch, bool):
        raise TypeError(f"batch must be True or False, got {type(batch).__name__}")
    if handler is None:
        if batch:
            raise ValueError(
                "batch=True needs a handler: pass an async function taking a Batch, or "
                "batch=False to only store messages in the inbox"
            )
        return
    takes = "a Batch" if batch else "an Incoming"
    if not callable(handler):
        raise TypeError(
            f"handler must be an async function taking {takes} (async def handler(...)), "
            f"or None; got {type(handler).__name__}"
        )
    if not (
        inspect.iscoroutinefunction(handler)
        or inspect.iscoroutinefunction(type(handler).__call__)  # an object with async __call__
    ):
        name = getattr(handler, "__qualname__", type(handler).__name__)
        raise TypeError(
            f"handler {name!r} is not an async function: the receiver awaits it, so define "
            f"it with `async def` (taking {takes}); a blocking call inside it should go "
            "through asyncio.to_thread"
        )


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
    pruned: int = 0
    """Inbox rows deleted below clients' floors or past the duplicate window."""
