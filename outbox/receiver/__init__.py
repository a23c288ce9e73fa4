"""The receiving side: an embeddable asyncio WebSocket server with exactly-once effects.

::

    async def handler(message: Incoming) -> None:
        await message.tx.execute("INSERT INTO orders VALUES (?, ?)", (message.id, ...))

    async with serve(handler, "inbox.db", port=0) as receiver:
        print(receiver.url)

See ``server`` for the design and the module list; the rules are in docs/protocol.md.
"""

from __future__ import annotations

from ..protocol.wire import Close, Malformed, ack_frames, close_reason, salvage
from .api import (
    Authenticate,
    Batch,
    BatchHandler,
    ConnectRequest,
    Handler,
    Incoming,
    ReceiverStats,
    Refuse,
    Reject,
    Setup,
)
from .handshake import ANONYMOUS_PREFIX, CLIENT_ID_PARAM
from .inbox import Transaction
from .options import DEFAULT_MAX_SIZE, ReceiverOptions
from .server import Receiver, serve

__all__ = [
    "ANONYMOUS_PREFIX",
    "CLIENT_ID_PARAM",
    "DEFAULT_MAX_SIZE",
    "Authenticate",
    "Batch",
    "BatchHandler",
    "Close",
    "ConnectRequest",
    "Handler",
    "Incoming",
    "Malformed",
    "Receiver",
    "ReceiverOptions",
    "ReceiverStats",
    "Refuse",
    "Reject",
    "Setup",
    "Transaction",
    "ack_frames",
    "close_reason",
    "salvage",
    "serve",
]
