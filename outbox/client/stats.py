"""What an Outbox reports about itself: ``Outbox.stats()`` returns a ``Stats``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Counters:
    """Running totals since the Outbox was opened (this process only)."""

    connects: int = 0
    reconnects: int = 0
    frames_sent: int = 0
    messages_sent: int = 0
    resends: int = 0
    """Messages sent again: after an ack timeout or after a reconnect."""
    acks: int = 0
    nacks: int = 0
    unknown_acks: int = 0
    protocol_errors: int = 0
    heartbeat_misses: int = 0
    dead: int = 0
    """Rows that became dead (nack, max_attempts, 1009), counted as they commit."""
    expired: int = 0
    """Rows that expired (``send(ttl=)``), counted as they commit."""


@dataclass(frozen=True, slots=True)
class Stats:
    pending: int
    """Rows not yet acked (includes those in flight)."""
    acked: int
    """Acked rows still kept (retention deletes older ones)."""
    dead: int
    in_flight: int
    connected: bool
    state: str
    reconnects: int
    counters: Counters
    last_error: str | None = None
    """Why the last connection attempt failed or the last connection ended (e.g. ``connection
    closed by the server (code 1011, reason 'handler failed on message 1')``); None if none
    has failed yet. Kept after a later connection succeeds: compare with ``state``."""
    role: str = "active"
    """"active": this process holds the file's sender lease and sends; "standby": another
    process sends from the file, this one only commits (see ``lease.py``)."""
    expired: int = 0
    """Rows not acked before their ttl ran out (``send(ttl=)``), kept like dead ones."""
