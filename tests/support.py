"""Test doubles with real sockets: a scriptable seed-style server, and waiting helpers.

Time: every short interval the tests give an ``Outbox`` is a multiple of ``MS``, one
millisecond of test time, as in websockets' own tests. On a slow machine set
``OUTBOX_TEST_TIME_SCALE`` (e.g. ``3``) to stretch them all by the same factor.
``fast_options()`` holds the intervals most client tests run with; a module or a test states
only what it changes, as overrides.

``ScriptedServer`` is a real ``websockets`` server on 127.0.0.1 that speaks the seed
article's protocol (and optionally the batch extension). Tests switch its behaviour with
flags and counters, never with sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from outbox.protocol import wire

MS = 0.001 * float(os.environ.get("OUTBOX_TEST_TIME_SCALE", "1"))
"""One millisecond of test time: the unit of every short interval in the tests."""


def fast_options(**overrides: Any) -> dict[str, Any]:
    """``Outbox`` keyword arguments scaled down for tests, with ``overrides`` applied.

    Reconnects back off from 10 ms to 50 ms; resends and heartbeats are far enough away
    (2 s, 5 s) that only a test which shortens them sees them; nothing is purged, so a test
    can read every row afterwards; ``close()`` does not wait for acks (``close_flush_timeout``
    0), so a test whose server never acks still closes at once (the flush has tests of its
    own, which set it).
    """
    options: dict[str, Any] = {
        "reconnect_interval": 10 * MS,
        "reconnect_max_interval": 50 * MS,
        "ack_timeout": 2000 * MS,
        "heartbeat_interval": 5000 * MS,
        "acked_retention": None,
        "close_flush_timeout": 0,
    }
    options.update(overrides)
    return options


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` every millisecond until it holds; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.001)


@dataclass
class Received:
    client_id: str | None
    id: int
    data: Any
    connection: int


@dataclass
class ScriptedServer:
    """A seed-style server whose behaviour tests switch at runtime."""

    ack: bool = True
    """Ack each message (one seed-style ack per message, or batched if announced)."""
    batch: bool = False
    """Announce the batch extension in the handshake response."""
    answer_json_ping: bool = True
    nack: dict[int, str] = field(default_factory=dict)
    """Message ids to refuse, with the reason."""
    close_after: int | None = None
    """Close (abort the TCP connection) after receiving this many more messages."""
    close_code: int | None = None
    """Close every new connection at once with this code (e.g. 1013)."""
    refuse_status: int | None = None
    """Answer the handshake with this HTTP status (401, 403, 500...)."""
    extra_frames: list[str | bytes] = field(default_factory=list)
    """Frames sent to each new connection before anything else (bad frames for tests)."""

    received: list[Received] = field(default_factory=list)
    handshakes: list[float] = field(default_factory=list)
    """Monotonic times of every connection attempt (including refused ones)."""
    connections: int = 0
    port: int = 0
    _server: Server | None = None
    _live: set[ServerConnection] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def ids(self) -> list[int]:
        return [r.id for r in self.received]

    def unique_ids(self) -> set[int]:
        return {r.id for r in self.received}

    async def start(self) -> ScriptedServer:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            self.port,
            process_request=self._process_request,
            process_response=self._process_response,
            compression=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """The server process is gone: listener closed and every connection dropped."""
        if self._server is not None:
            self._server.close(close_connections=False)
            for ws in list(self._live):
                ws.transport.abort()
            await self._server.wait_closed()
            self._server = None

    def drop_connections(self) -> None:
        """Abort every live connection (the socket dies mid-stream)."""
        for ws in list(self._live):
            ws.transport.abort()

    async def __aenter__(self) -> ScriptedServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.handshakes.append(time.monotonic())
        if self.refuse_status is not None:
            return connection.respond(self.refuse_status, "refused by the test server\n")
        return None

    def _process_response(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> Response | None:
        if self.batch:
            response.headers[wire.FEATURES_HEADER] = wire.FEATURE_BATCH
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        number = self.connections
        self._live.add(ws)
        headers: Headers = ws.request.headers if ws.request else Headers()
        client_id = headers.get(wire.CLIENT_ID_HEADER)
        batch_acks = wire.FEATURE_BATCH_ACK in wire.parse_features(
            headers.get(wire.FEATURES_HEADER)
        )
        try:
            if self.close_code is not None:
                await ws.close(self.close_code, "scripted close")
                return
            for frame in self.extra_frames:
                await ws.send(frame)
            async for frame in ws:
                obj = json.loads(frame)
                if obj.get("type") == "ping":
                    if self.answer_json_ping:
                        await ws.send(wire.PONG_FRAME)
                    continue
                items = obj["messages"] if obj.get("type") == "batch" else [obj]
                acks = []
                for item in items:
                    self.received.append(Received(client_id, item["id"], item["data"], number))
                    if item["id"] in self.nack:
                        await ws.send(wire.encode_nack(item["id"], self.nack[item["id"]]))
                    elif self.ack:
                        acks.append(item["id"])
                    if self.close_after is not None:
                        self.close_after -= 1
                        if self.close_after <= 0:
                            self.close_after = None
                            ws.transport.abort()
                            return
                if acks:
                    if batch_acks:
                        await ws.send(wire.encode_acks(acks))
                    else:
                        for message_id in acks:
                            await ws.send(wire.encode_ack(message_id))
        except Exception:
            pass  # the connection died: that is what these tests provoke
        finally:
            self._live.discard(ws)
