"""Log lines a peer can cause, rate-limited so that a flood of them cannot flood the log.

A hostile or broken client can make the receiver log once per bad frame, and thousands of
half-open handshakes make websockets log a traceback each. :class:`RateLimit` lets through
at most ``burst`` records of one kind (logger, level and message template, not the
arguments) per ``interval`` seconds of the monotonic clock, and notes on the next one let
through how many it held back. It is attached to the loggers that carry peer-caused lines:
:data:`PEERS` (``outbox.receiver.peers``) and the logger the receiver hands to websockets
(:data:`WEBSOCKETS`, ``outbox.receiver.websockets``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["PEERS", "WEBSOCKETS", "RateLimit", "rate_limited"]

PEERS = "outbox.receiver.peers"
WEBSOCKETS = "outbox.receiver.websockets"


@dataclass(slots=True)
class _Window:
    started: float
    passed: int = 0
    held: int = 0


class RateLimit(logging.Filter):
    """At most ``burst`` records of each kind per ``interval`` seconds."""

    def __init__(
        self,
        burst: int = 20,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if burst < 1 or interval <= 0:
            raise ValueError("RateLimit needs burst >= 1 and interval > 0")
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._windows: dict[tuple[str, int, str], _Window] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = self._clock()
        key = (record.name, record.levelno, str(record.msg))
        window = self._windows.get(key)
        if window is None or now - window.started >= self.interval:
            held = window.held if window is not None else 0
            window = self._windows[key] = _Window(now)
            if len(self._windows) > 1000:  # kinds are few; never let the table grow
                self._windows = {key: window}
            if held:
                record.msg = f"{record.msg} [{held} more like this in the last {self.interval:g}s]"
        if window.passed >= self.burst:
            window.held += 1
            return False
        window.passed += 1
        return True


def rate_limited(name: str, **limits: float) -> logging.Logger:
    """The logger ``name`` with a :class:`RateLimit` attached (once)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, RateLimit) for f in logger.filters):
        logger.addFilter(RateLimit(**limits))  # type: ignore[arg-type]
    return logger
