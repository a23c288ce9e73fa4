"""outbox: WebSocket sending as safe as writing to a database.

Every message is committed to a SQLite outbox before it is sent, and resent until the
server acks it; see README.md and docs/protocol.md.
"""

from __future__ import annotations

from .backoff import Backoff
from .client import Outbox
from .errors import (
    DatabaseCorruptError,
    MessageDeadError,
    OutboxClosedError,
    OutboxError,
    PayloadError,
    PayloadNotJSONError,
    PayloadTooLargeError,
    ProtocolError,
    QueueFullError,
    ReconnectLimitError,
    SchemaTooNewError,
    StorageFullError,
    StoreError,
)
from .receiver import ConnectRequest, Incoming, Receiver, ReceiverStats, Refuse, Reject, serve
from .stats import Stats
from .supervisor import State
from .window import SendWindow

__all__ = [
    "Backoff",
    "ConnectRequest",
    "DatabaseCorruptError",
    "Incoming",
    "MessageDeadError",
    "Outbox",
    "OutboxClosedError",
    "OutboxError",
    "PayloadError",
    "PayloadNotJSONError",
    "PayloadTooLargeError",
    "ProtocolError",
    "QueueFullError",
    "Receiver",
    "ReceiverStats",
    "ReconnectLimitError",
    "Refuse",
    "Reject",
    "SchemaTooNewError",
    "SendWindow",
    "State",
    "Stats",
    "StorageFullError",
    "StoreError",
    "serve",
]
