"""The receiving side: an embeddable asyncio WebSocket server with exactly-once effects.

::

    async def handler(message: Incoming) -> None:
        await message.tx.execute("INSERT INTO orders VALUES (?, ?)", (message.id, ...))

    async with serve(handler, "inbox.db", port=0) as receiver:
        print(receiver.url)

See ``server`` for the design; the rules are in docs/protocol.md.
"""

from __future__ import annotations

from ..protocol.wire import Close, Malformed, ack_frames, close_reason, salvage
from .server import (
    ANONYMOUS_PREFIX,
    CLIENT_ID_PARAM,
    DEFAULT_MAX_SIZE,
    Authenticate,
    ConnectRequest,
    Handler,
    Incoming,
    Receiver,
    ReceiverStats,
    Refuse,
    Reject,
    serve,
)

__all__ = [
    "ANONYMOUS_PREFIX",
    "CLIENT_ID_PARAM",
    "DEFAULT_MAX_SIZE",
    "Authenticate",
    "Close",
    "ConnectRequest",
    "Handler",
    "Incoming",
    "Malformed",
    "Receiver",
    "ReceiverStats",
    "Refuse",
    "Reject",
    "ack_frames",
    "close_reason",
    "salvage",
    "serve",
]
