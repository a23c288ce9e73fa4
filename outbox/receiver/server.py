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

This module only starts, wires and stops the parts, each in its own module:

- ``handshake``: who the client is, decided from the HTTP upgrade request.
- ``connection``: one **reader** per connection turns frames into messages for the writer;
  one **sender** per connection sends the acks, nacks, pongs and the closing frame in order.
- ``writer``: one **writer** per receiver, the group commit: every connection's pending
  messages handled in one SQLite transaction.
- ``inbox``: all the SQL. ``options``: every tunable and its check. ``api``: what handlers
  and the authenticate hook see.
"""

from __future__ import annotations

import logging
import os
import ssl as ssl_module
from collections.abc import Callable
from typing import Any, cast

from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve

from ..logs import WEBSOCKETS, rate_limited
from ..protocol import wire
from . import connection
from .api import Authenticate, BatchHandler, Handler, ReceiverStats, Setup, check_handler
from .backend import InboxBackend, is_postgres_url, open_inbox
from .connection import Peer
from .drain import RESTART, Connections, drain
from .handshake import Handshake, _Connection, anonymous_id
from .inbox import Synchronous
from .options import DEFAULT_DUPLICATE_WINDOW, DEFAULT_MAX_SIZE, ReceiverOptions
from .pruner import FloorStore, Pruner
from .writer import Writer

__all__ = ["Receiver", "serve"]

logger = logging.getLogger("outbox.receiver")


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

    With ``batch=True`` the handler is called once per transaction with a
    :class:`~outbox.receiver.Batch` of every new message; a batch that raises is rolled back
    and retried one message at a time, and the failing message's connection is then treated
    as above (see :class:`~outbox.receiver.Batch`).

    Other close codes: 1003 for a binary frame, 1007 for a frame that is not a JSON object or
    has no usable message id, 1009 for a frame over ``max_size`` (sent by websockets), 1013
    when the inbox itself fails (locked past ``busy_timeout``, disk full), 1012 (service
    restart) when the receiver drains (``close()``). None of them affects other connections.

    Who the client is (the deduplication key): the id it claims, i.e. the
    ``Outbox-Client-Id`` header; else the ``client_id`` query parameter, for clients that
    cannot set headers (browsers); else an anonymous id unique to the connection, so
    deduplication holds only within it. An ``authenticate`` hook, if given, returns the
    principal the peer proved to be, and the key becomes the claim scoped under it
    (``principal/claimed``, see :func:`~outbox.receiver.handshake.dedup_key`). Without a
    hook claimed ids are trusted (a warning is logged at start). A repeat of a recorded id
    with other content is refused as a conflict, never acked as a duplicate. See
    docs/protocol.md, "Receiver".
    """

    def __init__(
        self,
        handler: Handler | BatchHandler | None,
        db_path: str | os.PathLike[str],
        *,
        batch: bool = False,
        host: str | None = "127.0.0.1",
        port: int = 0,
        authenticate: Authenticate | None = None,
        ssl: ssl_module.SSLContext | None = None,
        synchronous: Synchronous = "FULL",
        busy_timeout: float = 5.0,
        max_size: int = DEFAULT_MAX_SIZE,
        max_backlog: int = 10_000,
        max_backlog_bytes: int = 16 * 1024 * 1024,
        max_frame_messages: int = 1000,
        max_transaction_messages: int = 1000,
        max_transaction_time: float = 0.1,
        send_timeout: float | None = 30.0,
        compression: str | None = None,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        close_timeout: float = 5.0,
        drain_timeout: float = 10.0,
        health_path: str | None = "/healthz",
        setup: Setup | None = None,
        duplicate_window: float | None = DEFAULT_DUPLICATE_WINDOW,
        prune: bool | None = None,
    ) -> None:
        """``max_backlog``: messages and answers one connection may have waiting before its
        reader stops reading (TCP then slows the client down). ``compression``: None, or
        "deflate" for permessage-deflate (off by default: it costs more CPU than it saves on
        small JSON messages). ``close_timeout``: seconds for closing handshakes, and for the
        transaction in progress to finish when the receiver closes. ``setup``: an async
        callable run once at start with a transaction on the inbox (create the handler's
        tables there, see :data:`~outbox.receiver.api.Setup`). ``batch``: call ``handler``
        once per transaction with a :class:`~outbox.receiver.Batch` of every new message
        instead of once per message (see the class docstring). ``drain_timeout``: seconds
        ``close()`` lets the work already read be handled before closing with 1012 anyway
        (see :mod:`~outbox.receiver.drain`). ``health_path``: answered 200 "ready" / 503
        "draining" to plain HTTP probes; None for none. ``duplicate_window``: seconds the rows
        of clients that announce no low-water mark are kept (a week; None = forever),
        docs/protocol.md "A bounded inbox". ``prune``: bound the inbox (below clients'
        low-water marks, and by ``duplicate_window``); None = only with a handler, since
        without one the inbox rows are the messages themselves. See
        :class:`~outbox.receiver.options.ReceiverOptions`; a bad value raises here."""
        check_handler(handler, batch)
        if setup is not None and not callable(setup):
            raise TypeError(f"setup must be an async callable or None, got {type(setup).__name__}")
        self._handler = handler
        self._batch = batch
        self._setup = setup
        self._db_path = os.fspath(db_path)
        if is_postgres_url(self._db_path):
            from .postgres import check_url  # asyncpg itself is imported at start()

            check_url(self._db_path)
            _refuse_sqlite_options(synchronous, busy_timeout)
        self._authenticate = authenticate
        self._options = ReceiverOptions(
            host=host,
            port=port,
            ssl=ssl,
            synchronous=synchronous,
            busy_timeout=busy_timeout,
            max_size=max_size,
            max_backlog=max_backlog,
            max_backlog_bytes=max_backlog_bytes,
            max_frame_messages=max_frame_messages,
            max_transaction_messages=max_transaction_messages,
            max_transaction_time=max_transaction_time,
            send_timeout=send_timeout,
            compression=compression,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            close_timeout=close_timeout,
            duplicate_window=duplicate_window,
            drain_timeout=drain_timeout,
            health_path=health_path,
        )

        self.stats = ReceiverStats()
        self._handshake = Handshake(authenticate, self.stats, health_path=self._options.health_path)
        self._inbox: InboxBackend | None = None
        self._server: Server | None = None
        self._writer: Writer | None = None
        if prune is not None and not isinstance(prune, bool):
            raise TypeError(f"prune must be True, False or None, got {type(prune).__name__}")
        wanted = handler is not None if prune is None else prune
        self._pruner = Pruner(window=self._options.duplicate_window) if wanted else None
        self._handshake.low_water = self._pruner is not None
        self.transaction_observers: list[Callable[[float], None]] = []
        """Called with each inbox transaction's duration in seconds (``outbox.metrics``)."""
        self._connections = Connections()
        self._peers: set[Peer] = self._connections.peers
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
        opts = self._options
        self._inbox = await open_inbox(
            self._db_path, synchronous=opts.synchronous, busy_timeout=opts.busy_timeout
        )
        if self._setup is not None:
            try:
                await self._inbox.setup(self._setup)
            except BaseException:
                await self._inbox.close()
                raise
        self._handshake.high_water = self._inbox.high_water
        self._handshake.claim = self._inbox.claim
        if self._pruner is not None:
            try:  # both backends are a FloorStore
                await self._pruner.resume(cast(FloorStore, self._inbox))
            except BaseException:
                await self._inbox.close()
                raise
        self._writer = Writer(
            self._inbox,
            self._handler,
            self.stats,
            batch=self._batch,
            max_messages=self._options.max_transaction_messages,
            max_time=self._options.max_transaction_time,
            observers=self.transaction_observers,
            pruner=self._pruner,
        )
        self._writer.start(name=f"outbox-receiver-writer:{self._inbox.path}")
        listening = False
        try:
            self._server = await ws_serve(
                self._serve_connection,
                opts.host,
                opts.port,
                process_request=self._handshake.process_request,
                process_response=self._handshake.process_response,
                create_connection=_Connection,
                compression=opts.compression,
                max_size=opts.max_size,
                ping_interval=opts.ping_interval,
                ping_timeout=opts.ping_timeout,
                close_timeout=opts.close_timeout,
                ssl=opts.ssl,
                logger=rate_limited(WEBSOCKETS),  # a handshake flood logs a line each
            )
            listening = True
        finally:
            if not listening:  # e.g. the port is taken: leave nothing running
                await self._stop_writer()
                await self._inbox.close()
        logger.info("receiving on %s (inbox %s)", self.url, self._inbox.path)
        if self._authenticate is None:
            logger.warning(
                "no authenticate hook: claimed client ids are trusted without authentication, "
                "so any peer can send under any client id (python -m outbox serve: use "
                "--token-file)"
            )

    async def close(self) -> None:
        """Drain, then stop: refuse new connections (503, the health endpoint says
        "draining"), stop reading, handle and ack what was already read (for at most
        ``drain_timeout`` seconds), close every connection with 1012 (service restart; for
        at most ``close_timeout``, then drop it), stop listening, close the inbox.
        Idempotent. See :mod:`~outbox.receiver.drain`."""
        if self._closing:
            return
        self._closing = True
        self._handshake.draining = True
        try:
            if self._server is not None:
                if self._writer is not None:
                    await drain(
                        self._connections,
                        self._writer,
                        drain_timeout=self._options.drain_timeout,
                        close_timeout=self._options.close_timeout,
                    )
                self._server.close(code=RESTART.code, reason=RESTART.reason)
                # Before waiting for the handshakes in progress: on PostgreSQL a claim waits
                # for the fence rows the round in progress holds (up to 10 s); stopping the
                # writer (close_timeout at most) ends that round and frees them.
                await self._stop_writer()
                await self._server.wait_closed()
        finally:
            await self._stop_writer()
            if self._inbox is not None:
                try:
                    await self._inbox.rollback()
                except Exception:
                    logger.exception("rollback failed while closing %s", self.db_path)
                finally:
                    await self._inbox.close()

    async def _stop_writer(self) -> None:
        if self._writer is not None:
            await self._writer.stop(self._options.close_timeout)

    @property
    def draining(self) -> bool:
        """True once ``close()`` began: new connections are refused, the health endpoint
        answers 503 "draining"."""
        return self._handshake.draining

    # -- where it listens ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the real one when started with port 0)."""
        return int(self._sockname()[1])

    @property
    def host(self) -> str:
        """The host for URLs: the one asked for, else the bound address."""
        host = self._options.host
        if host and host not in ("0.0.0.0", "::"):
            return host
        return str(self._sockname()[0])

    @property
    def db_path(self) -> str:
        """The inbox file, or the PostgreSQL URL without its password."""
        if is_postgres_url(self._db_path):
            from .postgres import display_url

            return display_url(self._db_path)
        return self._db_path

    @property
    def url(self) -> str:
        """``ws://host:port/`` (``wss://`` with TLS)."""
        host = self.host
        if ":" in host:
            host = f"[{host}]"
        return f"{'wss' if self._options.ssl else 'ws'}://{host}:{self.port}/"

    def _sockname(self) -> Any:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the receiver is not listening; use `async with serve(...)`")
        return self._server.sockets[0].getsockname()

    # -- one connection ------------------------------------------------------------------------

    async def _serve_connection(self, ws: ServerConnection) -> None:
        assert isinstance(ws, _Connection)
        writer = self._writer
        assert writer is not None
        if self._handshake.draining:  # its handshake finished as the drain began
            await ws.close(RESTART.code, RESTART.reason)
            return
        peer = Peer(
            ws,
            ws.outbox_client_id or anonymous_id(),
            wire.FEATURE_BATCH_ACK in ws.outbox_features,
        )
        self.stats.connections += 1
        self.stats.open_connections += 1
        self._connections.add(peer)
        logger.debug("client %r connected from %s", peer.client_id, ws.remote_address)
        if ws.outbox_low_water is not None and self._pruner is not None:
            self._announce(peer, ws.outbox_low_water)
        try:
            await connection.run(
                peer,
                stats=self.stats,
                submit=writer.submit,
                limits=connection.Limits(
                    messages=self._options.max_backlog,
                    bytes=self._options.max_backlog_bytes,
                    send_timeout=self._options.send_timeout,
                    frame_messages=self._options.max_frame_messages,
                ),
                closing=lambda: self._closing,
                announce=self._announce if self._pruner is not None else None,
            )
        finally:
            self._connections.discard(peer)
            self.stats.open_connections -= 1
            logger.debug(
                "client %r disconnected (%s %s)",
                peer.client_id,
                ws.close_code,
                ws.close_reason or "",
            )

    def _announce(self, peer: Peer, mark: int) -> None:
        """A connection's low-water mark: it prunes that connection's own identity only."""
        if self._pruner is None:
            return
        self._pruner.announce(peer.client_id, mark)
        if self._writer is not None:
            self._writer.wake()


def _refuse_sqlite_options(synchronous: str, busy_timeout: float) -> None:
    """synchronous and busy_timeout tune the SQLite file; on PostgreSQL they would be
    silently meaningless, so anything but their defaults is refused."""
    if str(synchronous).upper() != "FULL":
        raise ValueError(
            "synchronous applies to a SQLite inbox only; on PostgreSQL durability is the "
            "server's synchronous_commit setting: leave synchronous at its default"
        )
    if busy_timeout != 5.0:
        raise ValueError(
            "busy_timeout applies to a SQLite inbox only; on PostgreSQL set lock_timeout or "
            "statement_timeout on the server or in the URL (?options=...): leave busy_timeout "
            "at its default"
        )


serve = Receiver
"""``async with serve(handler, "inbox.db", port=0) as receiver:`` reads like websockets'
``serve``; it is the :class:`Receiver` class itself, so its signature is fully typed."""
