"""Every tunable of an Outbox, with its default and its check, in one place.

The names and defaults follow the seed article where it has one (30 s heartbeat, 5 s pong
and ack timeouts, 3 missed beats, 3 attempts, 1 s doubling reconnect delay).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, fields
from typing import Any, Literal

from ..storage.sqlite import Synchronous, check_synchronous

HeartbeatMode = Literal["protocol", "json"]


@dataclass(frozen=True, slots=True)
class Options:
    heartbeat_interval: float = 30.0
    """Seconds of silence from the server before a ping."""
    heartbeat_timeout: float = 5.0
    """Seconds to wait for the pong."""
    max_missed_heartbeats: int = 3
    """Missed pongs in a row before the socket is closed and reopened."""
    heartbeat: HeartbeatMode = "protocol"
    """"protocol": RFC 6455 ping frames; "json": the seed's {"type": "ping"} frames."""
    reconnect_interval: float = 1.0
    """First reconnect delay; doubles after each failed attempt."""
    reconnect_max_interval: float = 60.0
    """Cap on the reconnect delay."""
    reconnect_jitter: float = 0.5
    """Each delay is scaled by a random factor in [1 - jitter, 1]."""
    max_reconnect_attempts: int | None = None
    """Failed attempts in a row before giving up (state GAVE_UP); None keeps trying."""
    ack_timeout: float = 5.0
    """Seconds before an un-acked message is sent again."""
    max_attempts: int | None = 3
    """Ack timeouts on a live connection before the row becomes dead; None = never."""
    max_inflight: int = 1000
    """Un-acked messages on the wire at once."""
    max_pending: int | None = None
    """Quota of rows not yet acked; send() raises QueueFullError beyond it. None = no quota."""
    max_pending_wait: float | None = 0.0
    """Seconds send() waits for room under ``max_pending`` (acks make room) before it raises
    QueueFullError: 0 = raise at once (the default), None = wait as long as it takes."""
    max_message_size: int = 1 << 20
    """Largest payload, in bytes of its JSON text; send() refuses larger ones."""
    max_server_frame: int = 1 << 20
    """Largest frame read from the server, in bytes (after decompression: websockets'
    ``max_size`` bounds the inflated size too). Acks are small; a larger frame closes the
    connection with 1009 and counts as a failed attempt (the backoff grows, it is not reset
    by acks that came before it)."""
    synchronous: Synchronous = "FULL"
    """SQLite durability: FULL survives power loss, NORMAL survives a process crash."""
    busy_timeout: float = 5.0
    """Seconds to wait for another process's lock on the database file."""
    batch: bool = True
    """Pack many messages per frame when the server announces support for it."""
    max_batch_messages: int = 500
    """Most messages in one batch frame."""
    max_batch_bytes: int = 256 * 1024
    """Most payload bytes in one batch frame (one larger message still goes alone)."""
    page_size: int = 1000
    """Pending rows the sender reads per query."""
    compression: bool = False
    """permessage-deflate; off because it costs more CPU than it saves on small messages."""
    open_timeout: float = 10.0
    """Seconds for the TCP + TLS + WebSocket handshake."""
    close_timeout: float = 2.0
    """Seconds to wait for the closing handshake when the Outbox closes."""
    close_flush_timeout: float = 5.0
    """Seconds close() waits for pending rows to be acked while connected; 0 = no wait."""
    acked_retention: float | None = 3600.0
    """Seconds acked rows are kept before the background purge deletes them; None = forever.

    Measured by the monotonic clock, so a step of the wall clock neither purges early nor
    stops the purge: never purge a row younger than its retention by any clock it has seen.
    Rows acked before the process started count as old once it has run for the retention
    (earlier if ``updated_at`` says so by the wall clock now and at open). A row that stays
    pending holds back rows with higher ids, which are purged once it is acked or dead."""
    acked_retention_count: int | None = None
    """Keep at most this many acked rows (newest); None = no count limit."""
    wal_warn_bytes: int = 64 << 20
    """Warn (once per doubling) when the -wal file grows past this many bytes: a reader
    holding a transaction open (a sqlite3 shell after BEGIN) stops every checkpoint."""
    purge_interval: float = 60.0
    """Seconds between background purges of acked rows."""
    low_water_interval: float = 1.0
    """Seconds between checks of the low-water mark; a risen one is sent to receivers that
    accepted ``low-water``, so they can prune their inbox (docs/protocol.md)."""
    additional_headers: dict[str, str] | None = None
    """Extra request headers for the handshake (e.g. Authorization)."""
    ssl: ssl.SSLContext | None = None
    """TLS context for wss:// URLs (None = the default context for wss)."""

    def __post_init__(self) -> None:
        self._check_types()
        positive = (
            "heartbeat_interval heartbeat_timeout ack_timeout open_timeout "
            "purge_interval reconnect_max_interval low_water_interval"
        )
        for name in positive.split():
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        at_least_one = "max_missed_heartbeats max_inflight max_message_size max_batch_messages"
        at_least_one += " max_server_frame wal_warn_bytes"
        for name in (*at_least_one.split(), "page_size", "max_batch_bytes"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        check_synchronous(self.synchronous)  # at construction, not first at open()
        if self.heartbeat not in ("protocol", "json"):
            raise ValueError(f"heartbeat must be 'protocol' or 'json', got {self.heartbeat!r}")
        if not 0 < self.reconnect_interval <= self.reconnect_max_interval:
            # Zero would make every refused attempt retry at once: a hot loop.
            raise ValueError("need 0 < reconnect_interval <= reconnect_max_interval")
        for name in ("max_attempts", "max_pending", "acked_retention_count"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 or None, got {value!r}")
        if self.max_reconnect_attempts is not None and self.max_reconnect_attempts < 0:
            raise ValueError("max_reconnect_attempts must be >= 0 or None")
        if self.acked_retention is not None and self.acked_retention < 0:
            raise ValueError("acked_retention must be >= 0 or None")
        if self.max_pending_wait is not None and not self.max_pending_wait >= 0:
            raise ValueError(
                f"max_pending_wait must be >= 0 seconds or None, got {self.max_pending_wait!r}"
            )
        for name in ("close_timeout", "close_flush_timeout", "busy_timeout"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {getattr(self, name)!r}")
        if not 0 <= self.reconnect_jitter <= 1:
            raise ValueError(f"reconnect_jitter must be in [0, 1], got {self.reconnect_jitter!r}")

    def _check_types(self) -> None:
        """TypeError naming the option and what it accepts, before any comparison.

        bool is an int subclass, so ``ack_timeout=True`` is refused explicitly; a str such
        as ``"5"`` would otherwise fail later as ``'>' not supported between str and int``.
        """
        for name, kind in _KINDS.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if kind == "bool":
                ok = isinstance(value, bool)
            elif kind == "str":
                ok = isinstance(value, str)
            elif kind == "headers":
                ok = isinstance(value, dict) and all(
                    isinstance(k, str) and isinstance(v, str) for k, v in value.items()
                )
            elif kind == "ssl":
                ok = isinstance(value, ssl.SSLContext)
            else:
                numeric = (int,) if kind == "int" else (int, float)
                ok = isinstance(value, numeric) and not isinstance(value, bool)
            if not ok:
                accepted = _ACCEPTS[kind] + (" or None" if name in _OPTIONAL else "")
                shown = repr(value)[:100]
                raise TypeError(f"{name} must be {accepted}, got {type(value).__name__} {shown}")

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> Options:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"Outbox got unknown option(s) {', '.join(unknown)}; "
                f"the options are: {', '.join(sorted(known))}"
            )
        return cls(**kwargs)


_SECONDS = (
    "heartbeat_interval",
    "heartbeat_timeout",
    "reconnect_interval",
    "reconnect_max_interval",
    "reconnect_jitter",
    "ack_timeout",
    "busy_timeout",
    "open_timeout",
    "close_timeout",
    "close_flush_timeout",
    "acked_retention",
    "purge_interval",
    "max_pending_wait",
    "low_water_interval",
)
_INTEGERS = (
    "max_missed_heartbeats",
    "max_reconnect_attempts",
    "max_attempts",
    "max_inflight",
    "max_pending",
    "max_message_size",
    "max_batch_messages",
    "max_batch_bytes",
    "page_size",
    "acked_retention_count",
    "max_server_frame",
    "wal_warn_bytes",
)
_KINDS = {
    **dict.fromkeys(_SECONDS, "seconds"),
    **dict.fromkeys(_INTEGERS, "int"),
    "heartbeat": "str",
    "synchronous": "str",
    "batch": "bool",
    "compression": "bool",
    "additional_headers": "headers",
    "ssl": "ssl",
}
"""What type each option takes (checked first, so value checks can compare safely)."""

_OPTIONAL = frozenset(
    (
        "max_reconnect_attempts",
        "max_attempts",
        "max_pending",
        "max_pending_wait",
        "acked_retention",
        "acked_retention_count",
        "additional_headers",
        "ssl",
    )
)

_ACCEPTS = {
    "seconds": "a number of seconds (int or float)",
    "int": "an int",
    "str": "a str",
    "bool": "True or False",
    "headers": "a dict of str to str",
    "ssl": "an ssl.SSLContext",
}
