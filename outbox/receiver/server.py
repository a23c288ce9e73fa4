"""The receiving end: an embeddable asyncio WebSocket server with exactly-once effects.

::

    async def handler(message: Incoming) -> None:
        await message.tx.execute("INSERT INTO orders VALUES (?, ?)", (message.id, ...))

    async with serve(handler, "inbox.db", port=0) as receiver:
        print(receiver.url)
        ...

The rules it implements are in docs/protocol.md ("What a receiver must do" and "Receiver"):
record ``(client id, message id)`` in the ``inbox`` table in the same transaction as the
handler's writes, ack only after that transaction commits, and answer a resend from the
record without calling the handler again.

Three kinds of task, each with one job:

- one **reader** per connection turns frames into messages (``outbox.wire`` parses them) and
  appends them to that connection's pending list. JSON pings are answered at once.
- one **writer** per receiver is the group commit: it takes every connection's pending
  messages and handles them all in one SQLite transaction (``BEGIN IMMEDIATE``, one dedup
  query, the handlers, one ``executemany``, ``COMMIT``). While it commits, readers keep
  reading, so the busier the receiver, the more messages share each fsync.
- one **sender** per connection sends the acks, nacks, pongs and the closing frame, in the
  order the writer produced them, so a slow client never stalls the writer.

Why a single writer rather than a lock per client: SQLite has one writer at a time anyway, so
a second one would only wait on the file lock. Running every transaction in one task also
gives the per-client guarantee for free: two connections with the same client id (a client
that reconnected before the server noticed its old connection died) cannot interleave, and
each client's messages are handled in the order they arrived, which for a conforming client
is id order. The cost is that handlers run one at a time: a handler that needs long I/O
should record the work in its own table through ``message.tx`` and do it elsewhere.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sqlite3
import ssl as ssl_module
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from ..errors import ProtocolError, StoreError
from ..protocol import wire
from ..protocol.wire import Close, Item, Malformed, ack_frames, salvage
from .inbox import (
    Inbox,
    InboxRow,
    Key,
    Synchronous,
    Transaction,
    encode_payload,
    translate,
)

__all__ = [
    "ANONYMOUS_PREFIX",
    "CLIENT_ID_PARAM",
    "Authenticate",
    "ConnectRequest",
    "Handler",
    "Incoming",
    "Receiver",
    "ReceiverStats",
    "Refuse",
    "Reject",
    "serve",
]

logger = logging.getLogger("outbox.receiver")

CLIENT_ID_PARAM = "client_id"
"""Query parameter naming the client, for clients that cannot set the header (browsers)."""

ANONYMOUS_PREFIX = "anonymous:"
"""Client ids given to connections that name no client: this prefix and a fresh UUID."""

MAX_CLIENT_ID = 200
"""Longest client id accepted from a header or query parameter, in characters."""

DEFAULT_MAX_SIZE = 4 * 1024 * 1024
"""Largest frame accepted: the client's 1 MiB message limit plus envelope, with room for
batch frames (the client caps those at 256 KiB of payload); larger frames close with 1009."""


# ---------------------------------------------------------------------------------------------
# What handlers and the authenticate hook see
# ---------------------------------------------------------------------------------------------


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
"""Returns the client id to accept the connection under (the key messages are deduplicated
by); None refuses with 401; raising :class:`Refuse` refuses with its status."""


class Incoming:
    """One message, as the handler sees it.

    ``tx`` is the open write transaction that will record this message in the inbox (see
    :class:`~outbox.inbox.Transaction`): writes made through it commit atomically with that
    record, which is what makes their effect exactly-once.
    """

    __slots__ = ("_inbox", "_tx", "client_id", "data", "id")

    def __init__(self, client_id: str, message_id: int, data: Any, inbox: Inbox) -> None:
        self.client_id = client_id
        self.id = message_id
        self.data = data
        self._inbox = inbox
        self._tx: Transaction | None = None

    @property
    def message_id(self) -> int:
        return self.id

    @property
    def tx(self) -> Transaction:
        if self._tx is None:
            self._tx = self._inbox.transaction()
        return self._tx

    async def _finish(self, keep: bool) -> None:
        if self._tx is not None:
            await self._tx._finish(keep)

    def __repr__(self) -> str:
        return f"<Incoming {self.client_id!r} #{self.id}>"


Handler = Callable[[Incoming], Awaitable[None]]


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
    nacks: int = 0
    """Nacks queued: rejections, resends of rejected messages, malformed messages."""
    handler_errors: int = 0
    """Handler exceptions (message not acked, connection closed with 1011)."""
    protocol_errors: int = 0
    """Malformed frames or messages (nacked, or closed with 1003, 1007 or 1009)."""
    transactions: int = 0
    """Group commits."""
    storage_errors: int = 0
    """Transactions that failed in SQLite (connections involved closed with 1013)."""


# ---------------------------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------------------------


class _Connection(ServerConnection):
    """A websockets connection carrying what the handshake decided about its client."""

    outbox_client_id: str = ""
    outbox_features: frozenset[str] = frozenset()


class _Peer:
    """One connection's state, shared by its reader, its sender and the writer."""

    __slots__ = (
        "batch_ack",
        "client_id",
        "closed",
        "failed",
        "halted",
        "outgoing",
        "pending",
        "queued",
        "room",
        "wake",
        "ws",
    )

    def __init__(self, ws: ServerConnection, client_id: str, batch_ack: bool) -> None:
        self.ws = ws
        self.client_id = client_id
        self.batch_ack = batch_ack
        self.pending: list[Item] = []
        """Work the writer has not taken yet, in arrival order."""
        self.queued = False
        """In the writer's ready list."""
        self.outgoing: deque[str | Close] = deque()
        self.wake = asyncio.Event()
        """Set when there is something for the sender to do."""
        self.room = asyncio.Event()
        """Set when pending or outgoing shrank (the reader waits on it when they are full)."""
        self.halted = False
        """The reader queued a Close: ignore further frames."""
        self.failed = False
        """The writer is closing this connection: drop its pending work."""
        self.closed = False
        """The connection is over: nothing more can be sent."""

    def send(self, frame: str | Close) -> None:
        self.outgoing.append(frame)
        self.wake.set()

    def backlog(self) -> int:
        return len(self.pending) + len(self.outgoing)


@dataclass(slots=True)
class _Outcome:
    """What one transaction decided for one connection; sent only after COMMIT."""

    acks: list[int] = field(default_factory=list)
    nacks: list[tuple[int, str]] = field(default_factory=list)
    close: Close | None = None
    handled: int = 0
    rejected: int = 0
    duplicates: int = 0
    handler_failed: bool = False


class Receiver:
    """An embeddable WebSocket server that stores every message in an inbox, exactly once.

    Start and stop it with ``async with`` (or ``await start()`` / ``await close()``).

    ``handler`` is called once per new message with an :class:`Incoming`; None stores the
    message in the inbox and does nothing else. What a handler's outcome means:

    - returns: the message's inbox row and the handler's writes through ``message.tx``
      commit together, then the message is acked.
    - raises :class:`Reject`: its writes are rolled back, the row is recorded with the
      reason, the message is nacked; later messages go on being handled.
    - raises anything else: its writes are rolled back, the message is not recorded and not
      acked, and the connection is closed with 1011 (internal error) once the messages before
      it are committed and acked. Later messages of the connection are not handled:
      handling them would break the client's order. The client reconnects and resends from
      its oldest un-acked message, so nothing is lost; a handler that always fails on a
      message stalls that client (with its backoff) until the handler is fixed or rejects it.
      We close rather than skip the message because the protocol has no "retry this" frame:
      an un-acked message in the middle would wait for the client's ack timeout while later
      ones got handled first. 1011 (internal error) rather than 1013 (try again later)
      because the fault is in the handler, not in load; our client backs off and reconnects
      on either.

    Other close codes: 1003 for a binary frame, 1007 for a frame that is not a JSON object or
    has no usable message id, 1009 for a frame over ``max_size`` (sent by websockets), 1013
    when the inbox itself fails (locked past ``busy_timeout``, disk full), 1001 when the
    receiver shuts down. None of them affects other connections.

    Who the client is (the deduplication key): the ``Outbox-Client-Id`` header; else the
    ``client_id`` query parameter, for clients that cannot set headers (browsers); else an
    anonymous id unique to the connection, so deduplication holds only within it. An
    ``authenticate`` hook, if given, decides instead: it returns the client id. See
    docs/protocol.md, "Receiver", for what this means for seed-style clients.
    """

    def __init__(
        self,
        handler: Handler | None,
        db_path: str | os.PathLike[str],
        *,
        host: str | None = "127.0.0.1",
        port: int = 0,
        authenticate: Authenticate | None = None,
        ssl: ssl_module.SSLContext | None = None,
        synchronous: Synchronous = "FULL",
        busy_timeout: float = 5.0,
        max_size: int = DEFAULT_MAX_SIZE,
        max_backlog: int = 10_000,
        compression: str | None = None,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        close_timeout: float = 5.0,
    ) -> None:
        """``max_backlog``: messages and answers one connection may have waiting before its
        reader stops reading (TCP then slows the client down). ``compression``: None, or
        "deflate" for permessage-deflate (off by default: it costs more CPU than it saves on
        small JSON messages). ``close_timeout``: seconds for closing handshakes, and for the
        transaction in progress to finish when the receiver closes."""
        self._handler = handler
        self._db_path = os.fspath(db_path)
        self._host = host
        self._requested_port = port
        self._authenticate = authenticate
        self._ssl = ssl
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._max_size = max_size
        self._max_backlog = max_backlog
        self._compression = compression
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._close_timeout = close_timeout

        self.stats = ReceiverStats()
        self._inbox: Inbox | None = None
        self._server: Server | None = None
        self._writer: asyncio.Task[None] | None = None
        self._peers: set[_Peer] = set()
        self._ready: list[_Peer] = []
        self._work = asyncio.Event()
        self._stopping = False
        self._closing = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Receiver:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open (and migrate) the inbox, start the writer, listen. Returns once listening."""
        if self._inbox is not None:
            raise RuntimeError("this receiver was already started")
        self._inbox = await Inbox.open(
            self._db_path, synchronous=self._synchronous, busy_timeout=self._busy_timeout
        )
        self._writer = asyncio.get_running_loop().create_task(
            self._write_loop(), name=f"outbox-receiver-writer:{self._db_path}"
        )
        listening = False
        try:
            self._server = await ws_serve(
                self._serve_connection,
                self._host,
                self._requested_port,
                process_request=self._process_request,
                process_response=self._process_response,
                create_connection=_Connection,
                compression=self._compression,
                max_size=self._max_size,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_timeout,
                close_timeout=self._close_timeout,
                ssl=self._ssl,
            )
            listening = True
        finally:
            if not listening:  # e.g. the port is taken: leave nothing running
                await self._stop_writer()
                await self._inbox.close()
        logger.info("receiving on %s (inbox %s)", self.url, self._db_path)

    async def close(self) -> None:
        """Stop listening, close connections with 1001, finish the transaction in progress
        (for at most ``close_timeout`` seconds), close the inbox. Idempotent."""
        if self._closing:
            return
        self._closing = True
        try:
            if self._server is not None:
                self._server.close()
                for peer in self._peers:  # readers held by backpressure go back to recv()
                    peer.room.set()
                await self._server.wait_closed()
        finally:
            await self._stop_writer()
            if self._inbox is not None:
                try:
                    await self._inbox.rollback()
                except Exception:
                    logger.exception("rollback failed while closing %s", self._db_path)
                finally:
                    await self._inbox.close()

    async def _stop_writer(self) -> None:
        task = self._writer
        if task is None:
            return
        self._stopping = True
        self._work.set()
        done, _ = await asyncio.wait({task}, timeout=self._close_timeout)
        if not done:
            logger.warning("the transaction in progress did not finish in time; cancelling it")
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # we are being cancelled ourselves
        except Exception:
            logger.exception("the receiver's writer failed")

    # -- where it listens ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the real one when started with port 0)."""
        return int(self._sockname()[1])

    @property
    def host(self) -> str:
        """The host for URLs: the one asked for, else the bound address."""
        if self._host and self._host not in ("0.0.0.0", "::"):
            return self._host
        return str(self._sockname()[0])

    @property
    def url(self) -> str:
        """``ws://host:port/`` (``wss://`` with TLS)."""
        host = self.host
        if ":" in host:
            host = f"[{host}]"
        return f"{'wss' if self._ssl else 'ws'}://{host}:{self.port}/"

    def _sockname(self) -> Any:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the receiver is not listening; use `async with serve(...)`")
        return self._server.sockets[0].getsockname()

    # -- handshake -----------------------------------------------------------------------------

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Decide who the client is (see the class docstring), or refuse it before the
        upgrade: 400 for an unusable claimed id, 401/403/... from ``authenticate``."""
        assert isinstance(connection, _Connection)
        split = urllib.parse.urlsplit(request.path)
        query = {
            name: values[0]
            for name, values in urllib.parse.parse_qs(split.query, keep_blank_values=True).items()
        }
        claimed = request.headers.get(wire.CLIENT_ID_HEADER) or query.get(CLIENT_ID_PARAM) or None
        if claimed is not None and (len(claimed) > MAX_CLIENT_ID or not claimed.isprintable()):
            self.stats.refused += 1
            return connection.respond(
                HTTPStatus.BAD_REQUEST,
                f"the client id must be 1 to {MAX_CLIENT_ID} printable characters\n",
            )
        if self._authenticate is None:
            client_id = claimed or f"{ANONYMOUS_PREFIX}{uuid.uuid4().hex}"
        else:
            refusal = None
            try:
                result = self._authenticate(
                    ConnectRequest(
                        path=split.path,
                        query=query,
                        headers=request.headers,
                        client_id=claimed,
                        remote_address=connection.remote_address,
                    )
                )
                if inspect.isawaitable(result):
                    result = await result
            except Refuse as exc:
                refusal = exc
            except Exception:
                logger.exception("the authenticate hook failed; answering 500")
                self.stats.refused += 1
                return connection.respond(
                    HTTPStatus.INTERNAL_SERVER_ERROR, "authentication failed on the server\n"
                )
            else:
                if not result:
                    refusal = Refuse(HTTPStatus.UNAUTHORIZED, "authentication required")
            if refusal is not None:
                self.stats.refused += 1
                logger.info(
                    "refused %s: %s %s",
                    connection.remote_address,
                    int(refusal.status),
                    refusal.reason,
                )
                response = connection.respond(refusal.status, f"{refusal.reason}\n")
                for name, value in refusal.headers.items():
                    response.headers[name] = value
                return response
            client_id = str(result)
        connection.outbox_client_id = client_id
        connection.outbox_features = wire.parse_features(request.headers.get(wire.FEATURES_HEADER))
        return None

    def _process_response(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> Response | None:
        """Announce the features we accept: ``batch`` always, ``batch-ack`` when the client
        asked for it (we then send batched acks)."""
        if response.status_code == HTTPStatus.SWITCHING_PROTOCOLS:
            assert isinstance(connection, _Connection)
            accepted = {wire.FEATURE_BATCH}
            if wire.FEATURE_BATCH_ACK in connection.outbox_features:
                accepted.add(wire.FEATURE_BATCH_ACK)
            response.headers[wire.FEATURES_HEADER] = wire.format_features(accepted)
        return None

    # -- one connection: reader and sender ------------------------------------------------------

    async def _serve_connection(self, connection: ServerConnection) -> None:
        assert isinstance(connection, _Connection)
        peer = _Peer(
            connection,
            connection.outbox_client_id or f"{ANONYMOUS_PREFIX}{uuid.uuid4().hex}",
            wire.FEATURE_BATCH_ACK in connection.outbox_features,
        )
        self.stats.connections += 1
        self.stats.open_connections += 1
        self._peers.add(peer)
        logger.debug("client %r connected from %s", peer.client_id, connection.remote_address)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._send(peer), name=f"outbox-receiver-sender:{peer.client_id}")
                try:
                    await self._read(peer)
                finally:
                    peer.closed = True
                    peer.wake.set()
        finally:
            self._peers.discard(peer)
            self.stats.open_connections -= 1
            logger.debug(
                "client %r disconnected (%s %s)",
                peer.client_id,
                connection.close_code,
                connection.close_reason or "",
            )

    async def _read(self, peer: _Peer) -> None:
        ws = peer.ws
        while True:
            try:
                frame = await ws.recv()
            except ConnectionClosed as exc:
                # websockets itself closes with 1009 (too big) or 1007 (bad UTF-8).
                sent = exc.sent
                if (
                    sent is not None
                    and not peer.halted
                    and sent.code in (CloseCode.MESSAGE_TOO_BIG, CloseCode.INVALID_DATA)
                ):
                    self.stats.protocol_errors += 1
                    logger.warning(
                        "client %r: %s; closed with %s", peer.client_id, sent.reason, sent.code
                    )
                return
            self.stats.frames += 1
            if peer.halted or peer.failed:
                continue  # a close is on its way; keep reading so its handshake can finish
            items: Sequence[Item]
            try:
                parsed = wire.parse_client_frame(frame)
            except ProtocolError as exc:
                items = salvage(frame, exc)
                self._note_protocol_errors(peer, items)
            else:
                if isinstance(parsed, wire.Ping):
                    peer.send(wire.PONG_FRAME)
                    continue
                items = parsed
            self._submit(peer, items)
            while peer.backlog() >= self._max_backlog and not (peer.failed or self._closing):
                peer.room.clear()
                await peer.room.wait()

    def _note_protocol_errors(self, peer: _Peer, items: Sequence[Item]) -> None:
        for item in items:
            if isinstance(item, Malformed):
                self.stats.protocol_errors += 1
                logger.warning(
                    "client %r: message %s nacked: %s", peer.client_id, item.id, item.reason
                )
            elif isinstance(item, Close):
                self.stats.protocol_errors += 1
                peer.halted = True
                logger.warning(
                    "client %r: closing with %s: %s", peer.client_id, item.code, item.reason
                )

    def _submit(self, peer: _Peer, items: Sequence[Item]) -> None:
        peer.pending.extend(items)
        if not peer.queued:
            peer.queued = True
            self._ready.append(peer)
            self._work.set()

    async def _send(self, peer: _Peer) -> None:
        ws = peer.ws
        try:
            while True:
                if not peer.outgoing:
                    if peer.closed:
                        return
                    peer.wake.clear()
                    await peer.wake.wait()
                    continue
                item = peer.outgoing.popleft()
                if isinstance(item, Close):
                    await ws.close(item.code, item.reason)
                    return
                await ws.send(item)
                peer.room.set()
        except ConnectionClosed:
            return

    # -- the writer: group commit ---------------------------------------------------------------

    async def _write_loop(self) -> None:
        while not self._stopping:
            await self._work.wait()
            self._work.clear()
            if self._stopping:
                return
            ready, self._ready = self._ready, []
            batch: list[tuple[_Peer, list[Item]]] = []
            for peer in ready:
                peer.queued = False
                items, peer.pending = peer.pending, []
                peer.room.set()
                if items and not peer.failed:
                    batch.append((peer, items))
            if not batch:
                continue
            try:
                await self._commit(batch)
            except Exception:  # a bug here must not stop every other connection's messages
                logger.exception("the receiver's writer failed; closing the connections involved")
                for peer, _ in batch:
                    self._fail(peer, Close(CloseCode.INTERNAL_ERROR, "receiver error"))

    async def _commit(self, batch: list[tuple[_Peer, list[Item]]]) -> None:
        inbox = self._inbox
        assert inbox is not None
        try:
            results = await self._transaction(inbox, batch)
        except Exception as exc:
            self.stats.storage_errors += 1
            clients = sorted({peer.client_id for peer, _ in batch})
            logger.error(
                "inbox transaction failed for %d connection(s) (%s): %s; closing them with "
                "1013 so their clients resend later",
                len(batch),
                ", ".join(clients[:5]) + (", ..." if len(clients) > 5 else ""),
                # Say what to do about it (locked, full, corrupt), not only what SQLite said.
                translate(exc, inbox.path) if isinstance(exc, sqlite3.Error) else exc,
                exc_info=not isinstance(exc, StoreError | sqlite3.Error),
            )
            for peer, _ in batch:
                self._fail(
                    peer, Close(CloseCode.TRY_AGAIN_LATER, "inbox unavailable, resend later")
                )
            return
        finally:
            if inbox.in_transaction:
                try:
                    await inbox.rollback()
                except Exception:
                    logger.exception("rollback failed on %s", inbox.path)
        stats = self.stats
        for peer, out in results:
            stats.messages += out.handled
            stats.rejected += out.rejected
            stats.duplicates += out.duplicates
            stats.nacks += len(out.nacks)
            stats.handler_errors += int(out.handler_failed)
            for frame in ack_frames(out.acks, out.nacks, peer.batch_ack):
                peer.send(frame)
            if out.close is not None:
                self._fail(peer, out.close)

    def _fail(self, peer: _Peer, close: Close) -> None:
        """Handle nothing more from this connection; close it after what is already queued."""
        if peer.failed:
            return
        peer.failed = True
        peer.pending.clear()
        peer.room.set()
        peer.send(close)

    async def _transaction(
        self, inbox: Inbox, batch: list[tuple[_Peer, list[Item]]]
    ) -> list[tuple[_Peer, _Outcome]]:
        keys = [
            (peer.client_id, item.id)
            for peer, items in batch
            for item in items
            if isinstance(item, wire.Message)
        ]
        known: dict[Key, str | None] = {}
        if keys:
            await inbox.begin()
            known = await inbox.seen(keys)
        rows: list[InboxRow] = []
        now = time.time()
        results = [
            (peer, await self._apply(inbox, peer, items, known, rows, now)) for peer, items in batch
        ]
        if keys:
            if rows:
                await inbox.record(rows)
            await inbox.commit()
            self.stats.transactions += 1
        return results

    async def _apply(
        self,
        inbox: Inbox,
        peer: _Peer,
        items: list[Item],
        known: dict[Key, str | None],
        rows: list[InboxRow],
        now: float,
    ) -> _Outcome:
        """Handle one connection's share of the transaction, in order.

        ``known`` maps every key already recorded, including by earlier messages of this
        same transaction, to its reject reason (None = acked).
        """
        out = _Outcome()
        client_id = peer.client_id
        handler = self._handler
        for item in items:
            if isinstance(item, Malformed):
                out.nacks.append((item.id, item.reason))
                continue
            if isinstance(item, Close):
                out.close = item
                break
            key = (client_id, item.id)
            if key in known:
                out.duplicates += 1
                reason = known[key]
                if reason is None:
                    out.acks.append(item.id)
                else:
                    out.nacks.append((item.id, reason))
                continue
            reason = None
            if handler is not None:
                message = Incoming(client_id, item.id, item.data, inbox)
                try:
                    await handler(message)
                except Reject as exc:
                    self._check_transaction(inbox, item.id)
                    await message._finish(keep=False)
                    reason = exc.reason or "rejected by the receiver"
                except Exception:
                    logger.exception(
                        "handler failed on message %s from client %r; not acked, closing the "
                        "connection with 1011 so the client resends it",
                        item.id,
                        client_id,
                    )
                    self._check_transaction(inbox, item.id)
                    await message._finish(keep=False)
                    out.handler_failed = True
                    out.close = Close(
                        CloseCode.INTERNAL_ERROR, f"handler failed on message {item.id}"
                    )
                    break
                else:
                    self._check_transaction(inbox, item.id)
                    await message._finish(keep=True)
            rows.append((client_id, item.id, encode_payload(item.data), now, reason))
            known[key] = reason
            if reason is None:
                out.acks.append(item.id)
                out.handled += 1
            else:
                out.nacks.append((item.id, reason))
                out.rejected += 1
        return out

    @staticmethod
    def _check_transaction(inbox: Inbox, message_id: int) -> None:
        if not inbox.in_transaction:
            raise StoreError(
                f"the inbox transaction ended while handling message {message_id}: the handler "
                "committed or rolled back through message.tx, or SQLite rolled back after an "
                "error"
            )


serve = Receiver
"""``async with serve(handler, "inbox.db", port=0) as receiver:`` reads like websockets'
``serve``; it is the :class:`Receiver` class itself, so its signature is fully typed."""
