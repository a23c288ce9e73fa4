"""Who the client is, decided from the HTTP upgrade request before any frame is exchanged.

The deduplication key is settled here once per connection. The client *claims* an id: the
``Outbox-Client-Id`` header, else the ``client_id`` query parameter (browsers cannot set
headers), else it gets an anonymous id unique to the connection. An ``authenticate`` hook, if
given, returns who the peer *proved* to be (the principal), and the key is the claim scoped
under the principal (:func:`dedup_key`), so no principal can reach another's records. A
refusal is an HTTP response (400, 401, 403, 500...), never a WebSocket.
"""

from __future__ import annotations

import inspect
import logging
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers, MultipleValuesError
from websockets.http11 import Request, Response

from ..logs import PEERS, rate_limited
from ..protocol import wire
from .api import Authenticate, ConnectRequest, ReceiverStats, Refuse

__all__ = [
    "ANONYMOUS_PREFIX",
    "CLIENT_ID_PARAM",
    "MAX_CLIENT_ID",
    "Handshake",
    "anonymous_id",
    "claimed_client_id",
    "dedup_key",
    "describe_peer",
    "parse_target",
    "refusal_response",
    "run_hook",
    "usable_client_id",
]

logger = logging.getLogger("outbox.receiver")
peer_log = rate_limited(PEERS)
"""Lines a client's own behaviour causes (refused handshakes): rate-limited."""

CLIENT_ID_PARAM = "client_id"
"""Query parameter naming the client, for clients that cannot set the header (browsers)."""

ANONYMOUS_PREFIX = "anonymous:"
"""Client ids given to connections that name no client: this prefix and a fresh UUID."""

MAX_CLIENT_ID = 200
"""Longest client id accepted from a header or query parameter, in characters."""


class _Connection(ServerConnection):
    """A websockets connection carrying what the handshake decided about its client."""

    outbox_client_id: str = ""
    """The deduplication key (see :func:`dedup_key`)."""
    outbox_principal: str | None = None
    """Who the ``authenticate`` hook said the peer is; None without a hook."""
    outbox_claimed: str = ""
    """The id the client claimed (or the anonymous id it was given)."""
    outbox_features: frozenset[str] = frozenset()
    outbox_high_water: int | None = None
    """The highest message id recorded under this key, for clients that asked."""
    outbox_epoch: int | None = None
    """The epoch claimed for this key (PostgreSQL fencing); None: not fenced."""


def dedup_key(principal: str | None, claimed: str) -> str:
    """The inbox's ``client_id`` for a claimed id, scoped under the authenticated principal.

    Without authentication (``principal`` None) it is the claim itself, as it always was.
    With it, ``principal + "/" + claimed`` with every ``%`` and ``/`` of the principal
    percent-escaped: the first ``/`` always ends the principal, so no principal and claim
    can produce the key of another principal, whatever either contains.
    """
    if principal is None:
        return claimed
    return principal.replace("%", "%25").replace("/", "%2F") + "/" + claimed


def describe_peer(connection: ServerConnection) -> str:
    """Both identities of a connection, clipped, for a log line."""
    principal = getattr(connection, "outbox_principal", None)
    claimed = wire.clip(getattr(connection, "outbox_claimed", "") or "?")
    if principal is None:
        return f"unauthenticated peer claiming client id {claimed!r}"
    return f"principal {wire.clip(principal)!r} claiming client id {claimed!r}"


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
    """The id the client claims: the header, else the query parameter; empty counts as none.

    Raises ValueError if the header is given more than once: which one would be the claim?
    """
    try:
        header = headers.get(wire.CLIENT_ID_HEADER)
    except MultipleValuesError:
        raise ValueError(f"send one {wire.CLIENT_ID_HEADER} header, not several") from None
    return header or query.get(CLIENT_ID_PARAM) or None


def usable_client_id(claimed: str | None) -> bool:
    """None (no claim) or 1 to MAX_CLIENT_ID printable characters: it ends up in logs and rows."""
    return claimed is None or (len(claimed) <= MAX_CLIENT_ID and claimed.isprintable())


async def run_hook(authenticate: Authenticate, request: ConnectRequest) -> str | Refuse:
    """The principal the hook accepts, or the refusal it decided (None/empty means 401).

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
        self.high_water: Callable[[str], Awaitable[int]] | None = None
        """Reads the highest recorded message id of a key (set once the inbox is open)."""
        self.claim: Callable[[str], Awaitable[int]] | None = None
        """Takes a new epoch for a key, fencing out its older connections (PostgreSQL)."""

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Decide who the client is, or refuse it before the upgrade: 400 for an unusable
        or repeated claimed id, 401/403/... from ``authenticate``, 500 if it fails."""
        assert isinstance(connection, _Connection)
        path, query = parse_target(request.path)
        try:
            claimed = claimed_client_id(request.headers, query)
        except ValueError as exc:
            self._stats.refused += 1
            return connection.respond(HTTPStatus.BAD_REQUEST, f"{exc}\n")
        if not usable_client_id(claimed):
            self._stats.refused += 1
            return connection.respond(
                HTTPStatus.BAD_REQUEST,
                f"the client id must be 1 to {MAX_CLIENT_ID} printable characters\n",
            )
        principal: str | None = None
        if self._authenticate is not None:
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
            principal = decided
        connection.outbox_principal = principal
        anonymous = claimed is None
        connection.outbox_claimed = claimed = claimed or anonymous_id()
        connection.outbox_client_id = key = dedup_key(principal, claimed)
        if self.claim is not None and not anonymous:
            # Before the high-water mark: the claim waits for the commits in flight of the
            # older connections, so the mark read after it includes them.
            try:
                connection.outbox_epoch = await self.claim(key)
            except Exception as exc:
                logger.warning("could not claim client id %r in the inbox: %s", key, exc)
                self._stats.refused += 1
                return connection.respond(
                    HTTPStatus.SERVICE_UNAVAILABLE, "inbox unavailable, try again later\n"
                )
        try:
            features = wire.parse_features(request.headers.get(wire.FEATURES_HEADER))
        except MultipleValuesError:
            features = frozenset()
        connection.outbox_features = features
        if wire.FEATURE_ID_CONFLICT in features and self.high_water is not None:
            try:
                connection.outbox_high_water = await self.high_water(key)
            except Exception as exc:  # the inbox is locked or broken: go on without it
                logger.warning("could not read the high-water mark of %r: %s", key, exc)
        return None

    async def _ask_hook(
        self,
        authenticate: Authenticate,
        connection: ServerConnection,
        connect: ConnectRequest,
    ) -> str | Response:
        """The principal ``authenticate`` accepts, or the response that refuses the client."""
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
        peer_log.info(
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
            if connection.outbox_high_water is not None:
                accepted.add(wire.FEATURE_ID_CONFLICT)
                response.headers[wire.HIGH_WATER_HEADER] = str(connection.outbox_high_water)
            response.headers[wire.FEATURES_HEADER] = wire.format_features(accepted)
        return None
