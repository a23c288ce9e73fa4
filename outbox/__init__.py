"""outbox: WebSocket sending as safe as writing to a database.

Every message is committed to a SQLite outbox before it is sent, and resent until the
server acks it; see README.md and docs/protocol.md.
"""

from __future__ import annotations

import logging

from .client import Outbox, Producer, State, Stats
from .errors import (
    DatabaseCorruptError,
    DatabaseMissingError,
    MessageDeadError,
    MessageExpiredError,
    NoTransactionError,
    OutboxBrokenError,
    OutboxClosedError,
    OutboxError,
    PayloadError,
    PayloadNotJSONError,
    PayloadTooLargeError,
    ProtocolError,
    QueueFullError,
    ReconnectLimitError,
    SchemaMissingError,
    SchemaTooNewError,
    StorageFullError,
    StoreError,
)
from .protocol.backoff import Backoff
from .protocol.window import SendWindow
from .receiver import (
    Batch,
    ConnectRequest,
    Incoming,
    Receiver,
    ReceiverStats,
    Refuse,
    Reject,
    serve,
)
from .transactional import (
    enqueue,
    enqueue_async,
    enqueue_many,
    enqueue_many_async,
    migrate,
)

# A library installs no handler of its own: without logging configured, nothing reaches
# stderr through Python's last-resort handler (which prints bare messages, no logger name,
# level or time). Configure logging (logging.basicConfig) to see outbox's lines.
logging.getLogger("outbox").addHandler(logging.NullHandler())

__all__ = [
    "Backoff",
    "Batch",
    "ConnectRequest",
    "DatabaseCorruptError",
    "DatabaseMissingError",
    "Incoming",
    "MessageDeadError",
    "MessageExpiredError",
    "NoTransactionError",
    "Outbox",
    "OutboxBrokenError",
    "OutboxClosedError",
    "OutboxError",
    "PayloadError",
    "PayloadNotJSONError",
    "PayloadTooLargeError",
    "Producer",
    "ProtocolError",
    "QueueFullError",
    "Receiver",
    "ReceiverStats",
    "ReconnectLimitError",
    "Refuse",
    "Reject",
    "SchemaMissingError",
    "SchemaTooNewError",
    "SendWindow",
    "State",
    "Stats",
    "StorageFullError",
    "StoreError",
    "enqueue",
    "enqueue_async",
    "enqueue_many",
    "enqueue_many_async",
    "migrate",
    "serve",
]
