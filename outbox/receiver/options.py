"""Every tunable of a Receiver, with its default and its check, in one place.

Checked when the Receiver is built, so a bad value fails at ``serve(...)`` with a message that
names the option, not later at ``start()`` (or never: ``max_backlog=0`` used to be accepted
and then stopped the reader after one message).
"""

from __future__ import annotations

import ssl as ssl_module
from dataclasses import dataclass
from typing import cast

from .inbox import Synchronous

__all__ = ["DEFAULT_DUPLICATE_WINDOW", "DEFAULT_MAX_SIZE", "ReceiverOptions"]

DEFAULT_MAX_SIZE = 4 * 1024 * 1024
"""Largest frame accepted: the client's 1 MiB message limit plus envelope, with room for
batch frames (the client caps those at 256 KiB of payload); larger frames close with 1009."""

DEFAULT_DUPLICATE_WINDOW = 7 * 24 * 3600.0
"""A week: longer than any client should stay offline with a message whose ack was lost."""

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_COMPRESSION = (None, "deflate")


@dataclass(frozen=True, slots=True)
class ReceiverOptions:
    host: str | None = "127.0.0.1"
    """Address to listen on; None = every interface."""
    port: int = 0
    """TCP port; 0 picks a free one (read it back from ``Receiver.port``)."""
    ssl: ssl_module.SSLContext | None = None
    """TLS context: serve wss:// instead of ws://."""
    synchronous: Synchronous = "FULL"
    """SQLite durability of the inbox: FULL survives power loss, NORMAL a process crash."""
    busy_timeout: float = 5.0
    """Seconds to wait for another process's lock on the inbox file."""
    max_size: int = DEFAULT_MAX_SIZE
    """Largest frame accepted, in bytes; larger ones close the connection with 1009."""
    max_backlog: int = 10_000
    """Messages and answers one connection may have waiting before its reader stops reading
    (TCP then slows the client down)."""
    max_backlog_bytes: int = 16 * 1024 * 1024
    """The same bound in bytes of frames (messages read, answers not yet sent): reading stops
    at whichever comes first, so a connection holds at most about this plus one frame."""
    max_frame_messages: int = 1000
    """Most messages one batch frame may carry (ours sends at most 500); a larger batch
    closes the connection with 1009, so one frame cannot queue more than this."""
    max_transaction_messages: int = 1000
    """Most messages one group commit takes; with several clients ready, each gets an equal
    share, so one client's backlog cannot hold another's acks behind it."""
    max_transaction_time: float = 0.1
    """Seconds of handler time after which a group commit stops calling handlers and
    commits what it has (the rest goes first in the next one), so acks keep flowing while a
    slow handler works through a backlog."""
    send_timeout: float | None = 30.0
    """Seconds an answer may wait for a client that does not read before the connection is
    dropped; None = wait forever."""
    compression: str | None = None
    """None, or "deflate" for permessage-deflate (it costs more CPU than it saves on small
    JSON messages)."""
    ping_interval: float | None = 20.0
    """Seconds between protocol pings; None = no keepalive."""
    ping_timeout: float | None = 20.0
    """Seconds to wait for the pong before closing; None = wait forever."""
    close_timeout: float = 5.0
    """Seconds for closing handshakes, and for the transaction in progress to finish when
    the receiver closes."""
    duplicate_window: float | None = DEFAULT_DUPLICATE_WINDOW
    """Seconds the inbox keeps the rows of clients that never announced a low-water mark
    (seed-style clients); a resend after it is handled again. None = keep them forever.
    Clients that announce a mark are pruned below it instead, whatever their age."""
    drain_timeout: float = 10.0
    """Seconds ``close()`` (SIGTERM for ``outbox serve``) lets the work already read be
    handled and acked before it closes the connections with 1012 anyway; what was not
    committed by then is not acked, so its client resends it."""
    health_path: str | None = "/healthz"
    """HTTP path answered 200 "ready" while serving and 503 "draining" during a drain, for
    an orchestrator's probe; None = no health endpoint (the path is then a WebSocket path
    like any other)."""

    def __post_init__(self) -> None:
        if self.host is not None and not isinstance(self.host, str):
            raise TypeError(f"host must be a str or None, got {type(self.host).__name__}")
        if self.ssl is not None and not isinstance(self.ssl, ssl_module.SSLContext):
            raise TypeError(f"ssl must be an ssl.SSLContext or None, got {type(self.ssl).__name__}")
        port = _integer("port", self.port)
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535 (0 picks a free port), got {port!r}")
        for name in (
            "max_size",
            "max_backlog",
            "max_backlog_bytes",
            "max_frame_messages",
            "max_transaction_messages",
        ):
            count = _integer(name, getattr(self, name))
            if count < 1:
                raise ValueError(f"{name} must be at least 1, got {count!r}")
        for name in ("busy_timeout", "close_timeout", "drain_timeout"):
            seconds = _number(name, getattr(self, name))
            if not seconds >= 0:  # also refuses NaN
                raise ValueError(f"{name} must be a number of seconds >= 0, got {seconds!r}")
        if not _number("max_transaction_time", self.max_transaction_time) > 0:
            raise ValueError(
                "max_transaction_time must be a positive number of seconds, "
                f"got {self.max_transaction_time!r}"
            )
        for name in ("ping_interval", "ping_timeout", "send_timeout", "duplicate_window"):
            value = getattr(self, name)
            if value is not None and not _number(name, value) > 0:
                raise ValueError(
                    f"{name} must be a positive number of seconds or None, got {value!r}"
                )
        self._check_synchronous()
        self._check_health_path()
        if self.compression not in _COMPRESSION:
            raise ValueError(f"compression must be None or 'deflate', got {self.compression!r}")

    def _check_health_path(self) -> None:
        path = self.health_path
        if path is None:
            return
        if not isinstance(path, str):
            raise TypeError(f"health_path must be a str or None, got {type(path).__name__}")
        if not path.startswith("/") or "?" in path or "#" in path or not path.isprintable():
            raise ValueError(
                "health_path must be a URL path starting with '/' (no query, no fragment), "
                f"e.g. '/healthz', or None for no health endpoint; got {path!r}"
            )
        if path == "/":
            raise ValueError(
                "health_path must not be '/': clients connect there (ws://host:port/) and "
                "would be answered 'ready' instead of upgraded; use e.g. '/healthz'"
            )

    def _check_synchronous(self) -> None:
        value = self.synchronous
        if not isinstance(value, str):
            kind = type(value).__name__
            raise TypeError(f"synchronous must be a str (OFF, NORMAL, FULL or EXTRA), got {kind}")
        level = value.upper()
        if level not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be OFF, NORMAL, FULL or EXTRA (any case), got {value!r}"
            )
        # Frozen: store the canonical spelling the PRAGMA takes.
        object.__setattr__(self, "synchronous", cast(Synchronous, level))


def _integer(name: str, value: object) -> int:
    # bool is an int subclass: True would otherwise pass as 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    return value
