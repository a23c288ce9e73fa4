"""What the sender may take from memory instead of querying the store: pure, no I/O.

``Row`` is a pending message as the sender needs it. ``CommittedRows`` holds the rows this
process committed since the sender's last query, and says when memory can no longer vouch
for the store (a gap in the ids, an overflow, a requeue, or simply too long since the last
query).
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple


class Row(NamedTuple):
    """A pending message as the sender needs it (a tuple: cheap to make by the thousand)."""

    id: int
    payload: str
    attempts: int


class CommittedRows:
    """Rows this process committed since the sender's last query, so it can skip the next.

    After a query that reached the end of the pending rows, every row committed later
    arrives here too (``Store.subscribe``), so the sender can take them from memory: no
    thread hop, no SELECT. Any doubt sends it back to the store: a gap in the ids (another
    process wrote to the file), an overflow, a requeue, or ``max_age`` seconds since the last
    query (a cheap re-check that also picks up what other processes committed).
    """

    def __init__(self, *, limit: int, max_age: float = 1.0) -> None:
        self._rows: deque[Row] = deque()
        self._limit = limit
        self._max_age = max_age
        self._complete = False
        self._scanned_at = float("-inf")
        self.epoch = 0
        """Bumped by every invalidate(): a query that overlapped one cannot vouch for memory."""

    def add(self, rows: list[Row]) -> None:
        if len(self._rows) + len(rows) > self._limit:
            self.invalidate()  # the store has them; memory need not
        else:
            self._rows.extend(rows)

    def invalidate(self) -> None:
        self._rows.clear()
        self._complete = False
        self.epoch += 1

    def scanned(self, cursor: int, reached_end: bool, now: float) -> None:
        """A query read everything up to ``cursor``; ``reached_end``: nothing more was there."""
        while self._rows and self._rows[0].id <= cursor:
            self._rows.popleft()
        self._complete = reached_end
        self._scanned_at = now

    def stale_at(self) -> float | None:
        """When memory stops vouching for the store (time for a re-check), if it does now."""
        return self._scanned_at + self._max_age if self._complete else None

    def take(self, cursor: int, limit: int, now: float) -> list[Row] | None:
        """Up to ``limit`` rows after ``cursor`` from memory, or None: query the store."""
        if not self._complete or now - self._scanned_at > self._max_age:
            return None
        rows = self._rows
        while rows and rows[0].id <= cursor:
            rows.popleft()
        if rows and rows[0].id != cursor + 1:
            self.invalidate()
            return None
        taken = [rows.popleft() for _ in range(min(limit, len(rows)))]
        if taken and taken[-1].id - taken[0].id != len(taken) - 1:
            self.invalidate()  # a gap: somebody else's rows lie in between
            return None
        return taken
