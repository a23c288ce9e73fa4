"""Reconnect delays: exponential, capped, jittered on every attempt, reset after success.

Pure and synchronous; randomness is injected so the sequence is testable exactly.
The seed article doubles a 1 s delay after each failed attempt; we keep that, add a cap
(the seed has none) and jitter, so a fleet of clients that lost the same server does not
come back in lockstep.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delay before reconnect attempt *n* (counted since the last success).

    ``delay(n) = min(maximum, initial * factor ** (n - 1)) * (1 - jitter * u)`` with ``u``
    drawn uniformly from [0, 1): with the default ``jitter=0.5`` each delay lands in the
    upper half of its exponential step, never below half of it.
    """

    def __init__(
        self,
        initial: float = 1.0,
        maximum: float = 60.0,
        *,
        factor: float = 2.0,
        jitter: float = 0.5,
        max_attempts: int | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if initial < 0 or maximum < initial:
            raise ValueError(f"need 0 <= initial <= maximum, got {initial} and {maximum}")
        if factor < 1:
            raise ValueError(f"factor must be at least 1, got {factor}")
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {jitter}")
        if max_attempts is not None and max_attempts < 0:
            raise ValueError(f"max_attempts must be >= 0 or None, got {max_attempts}")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self.max_attempts = max_attempts
        self._rand = rand
        self.attempts = 0
        """Reconnect attempts since the last success."""

    def next_delay(self) -> float | None:
        """The delay before the next attempt, or None once max_attempts is used up."""
        if self.max_attempts is not None and self.attempts >= self.max_attempts:
            return None
        self.attempts += 1
        try:
            base = min(self.maximum, self.initial * self.factor ** (self.attempts - 1))
        except OverflowError:  # a very long outage: the growth passed the cap long ago
            base = self.maximum if self.initial > 0 else 0.0
        return base * (1.0 - self.jitter * self._rand())

    def reset(self) -> None:
        """A connection worked: the next drop starts again from ``initial``."""
        self.attempts = 0
