"""How old acked rows are, by the monotonic clock: which the retention purge may delete.

The rule: **never purge a row younger than its retention by any clock it has seen.**
``updated_at`` (wall clock) is for people reading the table; a clock step must neither delete
rows early (+2 h: everything acked a second ago) nor stop the purge (-1 day). So, within a
process, an acked row's age comes from the monotonic clock:

* After each commit that acked rows, the store notes ``(monotonic now, through)``: every
  acked row with ``id <= through`` was acked by then. ``through`` is a *low-water mark*:
  the id below the lowest pending row, so a row still pending (acked later, maybe much
  later) is never covered by an earlier mark. The cost: a row that stays pending holds back
  the purge of rows with higher ids until it is acked or dead.
* Dead rows that come back to pending (``requeue_dead()``, or another connection such as the
  sqlite3 shell) may be acked again later: every mark is lowered below them (``clamp``).
* Rows acked before this process opened the file have no monotonic record. They are older
  than the process, so they may go once the process has run for the retention. Before
  that, their ``updated_at`` may say they are older, but only if both the wall clock now
  and the wall clock at open advanced by the monotonic clock agree (a row stamped in the
  future, or a wall clock that went back past it, is kept).

Memory: at most ``max_marks`` pairs (a few tens of kilobytes); beyond that every other mark
is merged into the next one, which only ever keeps rows longer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Cutoff:
    """What a purge may delete now (None: nothing by that rule)."""

    through: int | None
    """Acked rows with ``id <= through`` are older than the retention by the monotonic clock."""
    older_than: float | None
    """...and acked rows from before this process with ``updated_at < older_than``..."""
    older_than_through: int
    """...and ``id <= older_than_through``."""


class AckAges:
    """Monotonic ack times of acked rows, as a short deque of low-water marks. Pure."""

    def __init__(
        self, *, opened_at: float, opened_wall: float, through: int, max_marks: int = 1024
    ) -> None:
        self._opened_at = opened_at
        self._opened_wall = opened_wall
        self._preexisting = through
        """Rows acked before open that the wall-clock rule may judge (clamped like marks)."""
        self._marks: deque[tuple[float, int]] = deque([(opened_at, through)])
        self._max_marks = max(2, max_marks)

    def __len__(self) -> int:
        return len(self._marks)

    def acked(self, now: float, through: int) -> None:
        """Every acked row with ``id <= through`` was acked by monotonic ``now``."""
        marks = self._marks
        if marks and through <= marks[-1][1]:
            return  # nothing new: an earlier mark covers these rows already
        marks.append((now, through))
        if len(marks) > self._max_marks:
            # Merge each pair into its later mark: a row covered at the earlier time is also
            # covered at the later one, so rows are only ever kept longer.
            merged = deque[tuple[float, int]]()
            items = list(marks)
            for index in range(1, len(items), 2):
                merged.append(items[index])
            if len(items) % 2:
                merged.append(items[-1])
            self._marks = merged

    def clamp(self, through: int) -> None:
        """Rows above ``through`` may be acked (again) later: no mark may cover them yet."""
        self._marks = deque((t, min(bound, through)) for t, bound in self._marks)
        self._preexisting = min(self._preexisting, through)

    def cutoff(self, retention: float, now: float, wall_now: float) -> Cutoff:
        """What is older than ``retention`` at monotonic ``now`` (and wall ``wall_now``)."""
        marks = self._marks
        through: int | None = None
        last_time = 0.0
        while marks and marks[0][0] <= now - retention:
            last_time, bound = marks.popleft()
            through = bound if through is None else max(through, bound)
        if through is not None:
            marks.appendleft((last_time, through))  # still true; keeps clamps working
        older_than: float | None = None
        if now - self._opened_at < retention:
            # Only rows from before this process: the earliest of the wall clock now and the
            # wall clock at open moved on by the monotonic clock (a step either way is no
            # reason to delete).
            wall = min(wall_now, self._opened_wall + (now - self._opened_at))
            older_than = wall - retention
        return Cutoff(through, older_than, self._preexisting)
