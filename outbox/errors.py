"""Every error outbox raises, under one root.

    OutboxError
    ├── OutboxClosedError        send() or wait on an Outbox that is closed
    ├── OutboxBrokenError        the store's writer loop crashed (a bug): reopen the Outbox
    ├── PayloadError             refused by send() before anything was written
    │   ├── PayloadNotJSONError  not JSON-serializable
    │   └── PayloadTooLargeError larger than max_message_size
    ├── QueueFullError           max_pending rows are already waiting
    ├── MessageDeadError         wait_acked() on a row that became dead
    │   └── MessageExpiredError  ... or that expired (send(ttl=)) before it was acked
    ├── ReconnectLimitError      the supervisor gave up (max_reconnect_attempts)
    ├── NoTransactionError       enqueue() on an autocommit connection with no transaction
    ├── StoreError               the SQLite file cannot be used
    │   ├── SchemaMissingError   no outbox tables in it yet: call outbox.migrate()
    │   ├── SchemaTooNewError    written by a newer outbox than this one
    │   ├── DatabaseCorruptError unreadable, not a database, or damaged
    │   ├── DatabaseMissingError the open file was deleted or replaced: nothing is durable
    │   └── StorageFullError     the disk (or max_page_count) is full
    └── ProtocolError            a peer broke the wire protocol (docs/protocol.md)

Timeouts of ``wait_acked()`` and ``drain()`` raise the builtin ``TimeoutError``.
"""

from __future__ import annotations


class OutboxError(Exception):
    """Root of every error raised by outbox."""


class OutboxClosedError(OutboxError):
    """The Outbox was closed (or never opened); open a new one to send."""


class OutboxBrokenError(OutboxError):
    """The store's writer loop crashed (a bug in outbox); nothing more can be written.

    Unlike OutboxClosedError (you closed it), this one broke elsewhere: every waiting and
    every later write fails with it at once, instead of hanging. Rows committed before are
    on disk; close the Outbox and open a new one on the same file to go on.
    """


class PayloadError(OutboxError, ValueError):
    """send() refused a payload; nothing was written."""


class PayloadNotJSONError(PayloadError, TypeError):
    """The payload is not a JSON value."""


class PayloadTooLargeError(PayloadError):
    """The encoded payload is larger than max_message_size."""


class QueueFullError(OutboxError):
    """max_pending rows are waiting; retry later or raise max_pending."""


class MessageDeadError(OutboxError):
    """The message was given up on (status 'dead'); requeue it to try again."""

    def __init__(self, message_id: int, reason: str | None) -> None:
        super().__init__(
            f"message {message_id} is dead: {reason or 'no reason recorded'}; "
            "Outbox.requeue_dead() puts it back in the queue"
        )
        self.message_id = message_id
        self.reason = reason


class MessageExpiredError(MessageDeadError):
    """The message was not acked before its ttl ran out (status 'expired'); it is kept."""

    def __init__(self, message_id: int, reason: str | None) -> None:
        OutboxError.__init__(
            self,
            f"message {message_id} expired before it was acked: "
            f"{reason or 'its ttl ran out'}; it is kept with status 'expired'",
        )
        self.message_id = message_id
        self.reason = reason


class ReconnectLimitError(OutboxError):
    """The supervisor reached max_reconnect_attempts; rows stay pending on disk."""


class NoTransactionError(OutboxError):
    """enqueue() was given a connection in autocommit mode with no transaction open.

    Its rows would commit on their own, not with the caller's writes; nothing was written.
    """


class StoreError(OutboxError):
    """The SQLite outbox file cannot be used."""


class SchemaMissingError(StoreError):
    """The database has no outbox tables; ``outbox.migrate()`` creates them."""


class SchemaTooNewError(StoreError):
    """The database was written by a newer version of outbox."""


class DatabaseCorruptError(StoreError):
    """The file is not a readable SQLite database."""


class DatabaseMissingError(StoreError):
    """The outbox file (or its -wal) was deleted or replaced while the Outbox had it open.

    Commits since then went into a file no restart will find, so send() refuses from the
    commit that noticed it on (no id is returned for a row that is not on disk). Restore the
    file or restart the application.
    """


class StorageFullError(StoreError):
    """The disk or the database's max_page_count is full; nothing was written."""


class ProtocolError(OutboxError):
    """A frame broke the wire protocol described in docs/protocol.md."""
