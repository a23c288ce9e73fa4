"""Per-message expiry (``send(payload, ttl=...)``): pending rows past their deadline expire.

An expired row is terminal and kept, like a dead one: it is never sent again, ``wait_acked``
raises ``MessageExpiredError``, and ``stats()`` and the operator commands count it. A row in
flight when its deadline passes expires too (the spec: "not acked by then"), so the
receiver may still have handled it: expired means *not confirmed in time*, not *not
delivered*.

The clock rule. The deadline is stored in ``expires_at`` as unix seconds, for people and for
whichever process opens the file next. Within a process the monotonic clock decides:
``ExpiryClock`` reads the wall clock once, when the Outbox opens, and from then on counts
``anchor + monotonic elapsed``. A wall-clock step while the process runs neither expires rows
early nor keeps them late; a step between two processes shifts the deadlines of rows the
first one wrote by the size of the step (the only clock two processes share is the wall's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable

from ..errors import OutboxBrokenError
from ..protocol.window import SendWindow
from .store import Store

logger = logging.getLogger("outbox")

EXPIRY_RECHECK = 1.0
"""Seconds between two looks at the file when no deadline of ours is nearer: rows other
processes commit with a ttl are found within this."""


def check_ttl(ttl: object) -> float | None:
    """``ttl`` as a number of seconds (None: never expires); TypeError/ValueError otherwise."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise TypeError(f"ttl must be a number of seconds or None, got {ttl!r}")
    if not math.isfinite(ttl) or ttl <= 0:
        raise ValueError(f"ttl must be a positive, finite number of seconds, got {ttl!r}")
    return float(ttl)


class ExpiryClock:
    """Unix seconds as this process counts them: the wall clock at open plus monotonic time."""

    def __init__(self, clock: Callable[[], float], wall_clock: Callable[[], float]) -> None:
        self._clock = clock
        self._offset = wall_clock() - clock()

    def now(self) -> float:
        return self._clock() + self._offset

    def deadline(self, ttl: float) -> float:
        return self.now() + ttl


async def run_expiry(
    store: Store, window: SendWindow, clock: ExpiryClock, wake: asyncio.Event
) -> None:
    """Expire pending rows as their deadlines pass, until cancelled.

    ``wake`` is set by a send with a ttl (its deadline may be the nearest).
    """
    while True:
        wake.clear()
        delay = EXPIRY_RECHECK
        try:
            next_at = await store.next_expiry()
            now = clock.now()
            if next_at is not None and next_at <= now:
                expired = await store.expire(now)
                for message_id, _ in expired:
                    window.discard(message_id)  # no resend of a row that has expired
                if expired:
                    logger.warning(
                        "%d message(s) expired before they were acked (ttl): %s",
                        len(expired),
                        ", ".join(str(n) for n, _ in expired[:10]),
                    )
                continue
            if next_at is not None:
                delay = min(delay, next_at - now)
        except OutboxBrokenError:
            raise
        except Exception as exc:  # a locked or full file: try again after the delay
            logger.warning("the expiry check failed (will retry): %s", exc)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, delay)):
                await wake.wait()
