"""outbox: WebSocket sending as safe as writing to a database.

Every message is committed to a SQLite outbox before it is sent, and resent until the
server acks it; see README.md and docs/protocol.md.
"""

from __future__ import annotations

import logging

from .client import Outbox, State, Stats
from .errors import (
    DatabaseCorruptError,
    DatabaseMissingError,
    MessageDeadError,
    MessageExpiredError,
    OutboxBrokenError,
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
from .protocol.backoff import Backoff
from .protocol.window import SendWindow
from .receiver import ConnectRequest, Incoming, Receiver, ReceiverStats, Refuse, Reject, serve

# A library installs no handler of its own: without logging configured, nothing reaches
# stderr through Python's last-resort handler (which prints bare messages, no logger name,
# level or time). Configure logging (logging.basicConfig) to see outbox's lines.
logging.getLogger("outbox").addHandler(logging.NullHandler())

__all__ = [
    "Backoff",
    "ConnectRequest",
    "DatabaseCorruptError",
    "DatabaseMissingError",
    "Incoming",
    "MessageDeadError",
    "MessageExpiredError",
    "Outbox",
    "OutboxBrokenError",
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
