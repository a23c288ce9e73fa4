"""Who the client is, decided from the HTTP upgrade request before any frame is exchanged.

The client id is the deduplication key, so it is settled here once per connection: the
``Outbox-Client-Id`` header, else the ``client_id`` query parameter (browsers cannot set
headers), else an anonymous id unique to the connection. An ``authenticate`` hook, if given,
decides instead. A refusal is an HTTP response (400, 401, 403, 500...), never a WebSocket.
"""

from __future__ import annotations

import inspect
import logging
import urllib.parse
import uuid
from collections.abc import Mapping
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from ..protocol import wire
from .api import Authenticate, ConnectRequest, ReceiverStats, Refuse

__all__ = [
    "ANONYMOUS_PREFIX",
    "CLIENT_ID_PARAM",
    "MAX_CLIENT_ID",
    "Handshake",
    "anonymous_id",
    "claimed_client_id",
    "parse_target",
    "refusal_response",
    "run_hook",
    "usable_client_id",
]

logger = logging.getLogger("outbox.receiver")

CLIENT_ID_PARAM = "client_id"
"""Query parameter naming the client, for clients that cannot set the header (browsers)."""

ANONYMOUS_PREFIX = "anonymous:"
"""Client ids given to connections that name no client: this prefix and a fresh UUID."""

MAX_CLIENT_ID = 200
"""Longest client id accepted from a header or query parameter, in characters."""


class _Connection(ServerConnection):
    """A websockets connection carrying what the handshake decided about its client."""

    outbox_client_id: str = ""
    outbox_features: frozenset[str] = frozenset()


def anonymous_id() -> str:
    return f"{ANONYMOUS_PREFIX}{uuid.uuid4().hex}"


def parse_target(target: str) -> tuple[str, dict[str, str]]:
    """Split a request target into its path and its query (the first value of each name)."""
    split = urllib.parse.urlsplit(target)
    query = {
        name: values[0]
        for name, values in urllib.parse.parse_qs(split.query, keep_blank_values=True).items()
    }
    return split.path, query


def claimed_client_id(headers: Headers, query: Mapping[str, str]) -> str | None:
    """The id the client claims: the header, else the query parameter; empty counts as none."""
    return headers.get(wire.CLIENT_ID_HEADER) or query.get(CLIENT_ID_PARAM) or None


def usable_client_id(claimed: str | None) -> bool:
    """None (no claim) or 1 to MAX_CLIENT_ID printable characters: it ends up in logs and rows."""
    return claimed is None or (len(claimed) <= MAX_CLIENT_ID and claimed.isprintable())


async def run_hook(authenticate: Authenticate, request: ConnectRequest) -> str | Refuse:
    """The client id the hook accepts, or the refusal it decided (None/empty means 401).

    Any other exception from the hook propagates: that is a fault on the server, not a no.
    """
    try:
        result = authenticate(request)
        if inspect.isawaitable(result):
            result = await result
    except Refuse as exc:
        return exc
    if not result:
        return Refuse(HTTPStatus.UNAUTHORIZED, "authentication required")
    return str(result)


def refusal_response(connection: ServerConnection, refusal: Refuse) -> Response:
    response = connection.respond(refusal.status, f"{refusal.reason}\n")
    for name, value in refusal.headers.items():
        response.headers[name] = value
    return response


class Handshake:
    """The websockets ``process_request`` / ``process_response`` hooks of one receiver."""

    def __init__(self, authenticate: Authenticate | None, stats: ReceiverStats) -> None:
        self._authenticate = authenticate
        self._stats = stats

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Decide who the client is, or refuse it before the upgrade: 400 for an unusable
        claimed id, 401/403/... from ``authenticate``, 500 if ``authenticate`` fails."""
        assert isinstance(connection, _Connection)
        path, query = parse_target(request.path)
        claimed = claimed_client_id(request.headers, query)
        if not usable_client_id(claimed):
            self._stats.refused += 1
            return connection.respond(
                HTTPStatus.BAD_REQUEST,
                f"the client id must be 1 to {MAX_CLIENT_ID} printable characters\n",
            )
        if self._authenticate is None:
            client_id = claimed or anonymous_id()
        else:
            connect = ConnectRequest(
                path=path,
                query=query,
                headers=request.headers,
                client_id=claimed,
                remote_address=connection.remote_address,
            )
            decided = await self._ask_hook(self._authenticate, connection, connect)
            if isinstance(decided, Response):
                return decided
            client_id = decided
        connection.outbox_client_id = client_id
        connection.outbox_features = wire.parse_features(request.headers.get(wire.FEATURES_HEADER))
        return None

    async def _ask_hook(
        self,
        authenticate: Authenticate,
        connection: ServerConnection,
        connect: ConnectRequest,
    ) -> str | Response:
        """The client id ``authenticate`` accepts, or the response that refuses the client."""
        try:
            decided = await run_hook(authenticate, connect)
        except Exception:
            logger.exception("the authenticate hook failed; answering 500")
            self._stats.refused += 1
            return connection.respond(
                HTTPStatus.INTERNAL_SERVER_ERROR, "authentication failed on the server\n"
            )
        if isinstance(decided, str):
            return decided
        self._stats.refused += 1
        logger.info(
            "refused %s: %s %s", connection.remote_address, int(decided.status), decided.reason
        )
        return refusal_response(connection, decided)

    def process_response(
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
