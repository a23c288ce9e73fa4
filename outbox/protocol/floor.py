"""The inbox floor: what a receiver may forget of a client's inbox rows, and when. Pure.

A receiver must answer every resend from its record, so it cannot simply delete old rows: a
straggler of a deleted message would be handled again. Two rules bound the inbox instead
(docs/protocol.md, "A bounded inbox"):

* **The low-water mark.** A client that announces ``low-water`` tells the receiver ``mark``:
  every id below it is acked and will never be sent again. The receiver then deletes that
  client's rows below the mark and keeps one small record per client, the *floor*: a message
  with ``base <= id < floor`` is a resend of a message it handled, answered as a duplicate
  (an ack) without calling the handler. The floor only ever rises, and only over rows that
  exist: it moves just past the highest row below the mark and stops before a rejected one
  (only its row can answer a resend with the same nack). So a mark beyond what the receiver
  holds is clipped to it. A straggler below the floor from a client that announced
  ``id-conflict`` is refused as a conflict instead (our client renumbers it): our client
  never sends a pending row below its own mark, so such a message comes from a restored
  backup or a peer spoofing its client id, and acking it unhandled would lose it.
* **The time window.** Clients that never announced a mark (the seed article's, whose ids may
  restart) keep their rows for ``duplicate_window`` seconds; older rows are deleted, and a
  resend after that is handled again. Ages are judged by the earlier of two clocks, the wall
  clock now and the wall clock at start advanced by the monotonic clock, so a wall-clock step
  forward never deletes a row early.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .wire import MAX_MESSAGE_ID

__all__ = [
    "Floor",
    "MarkStep",
    "StepDone",
    "advance",
    "covers",
    "raise_mark",
    "sweep_resume",
    "window_cutoff",
    "window_victims",
]


@dataclass(frozen=True, slots=True)
class Floor:
    """One client's record (table ``inbox_floor``); ``Floor()`` is "no record yet"."""

    base: int = 0
    """The lowest id the floor covers (the first row it moved over); 0 = none."""
    floor: int = 0
    """Every id in ``[base, floor)`` was recorded, acked, and its row deleted; 0 = none."""
    high_water: int = 0
    """The highest id ever recorded for the client, kept when its row is deleted."""
    mark: int | None = None
    """The highest low-water mark the client announced; None: never (the time window applies)."""


def covers(floor: Floor, message_id: int) -> bool:
    """Is ``message_id`` a straggler of a forgotten message (answer it as a duplicate)?"""
    return floor.base <= message_id < floor.floor


def advance(floor: Floor, target: int, run: Sequence[tuple[int, bool]]) -> Floor:
    """The floor raised towards ``target`` over ``run``; deletes ids ``[base, floor)``.

    ``run`` is ``(message id, rejected)`` of the client's rows from ``floor.floor`` upwards
    (from its lowest row when there is no floor yet), in id order. The floor moves just past
    each row below ``target`` in turn and stops before the first rejected one (only its row
    can answer a resend with the same nack). So it never passes the highest id recorded (a
    mark beyond it is clipped there) and is never lowered. Ids the client never sent (gaps)
    may end up below it: the client said it will never send them.
    """
    moved = floor.floor
    first = 0
    for message_id, rejected in run:
        if message_id >= target or rejected:
            break
        first = first or message_id
        moved = message_id + 1
    if moved <= floor.floor:
        return floor
    return Floor(floor.base or first, moved, max(floor.high_water, moved - 1), floor.mark)


def raise_mark(floor: Floor, announced: int) -> Floor:
    """Note an announced mark; a mark is never lowered."""
    if floor.mark is not None and floor.mark >= announced:
        return floor
    return Floor(floor.base, floor.floor, floor.high_water, announced)


@dataclass(frozen=True, slots=True)
class MarkStep:
    """One chunk of work towards a client's announced mark: read its record, note the
    mark, raise the floor over at most ``limit`` of its rows and delete them."""

    client_id: str
    target: int
    """The mark the client announced."""
    limit: int
    """Most rows this step moves the floor over."""
    now: float
    """Wall clock, for the record's ``updated_at``."""


@dataclass(frozen=True, slots=True)
class StepDone:
    """What a :class:`MarkStep` did, once its transaction committed."""

    record: Floor
    """The client's record as the step found it."""
    moved: Floor
    """The record it stored (``record`` itself if nothing moved)."""
    rows: int
    """Rows of the run it read (at most the step's ``limit``)."""
    deleted: int

    def finished(self, step: MarkStep) -> bool:
        """Whether the mark needs no further step: the floor reached it, or stopped short
        of the chunk (a missing or rejected id; a newer mark will try again)."""
        return (
            self.moved.floor >= step.target
            or self.rows < step.limit
            or self.moved.floor == self.record.floor
        )


def window_cutoff(
    *,
    wall_now: float,
    wall_at_start: float,
    monotonic_now: float,
    monotonic_at_start: float,
    window: float,
) -> float:
    """Rows received (``received_at``, wall clock) before this may be deleted.

    The earlier of the wall clock now and the wall clock at start advanced by the monotonic
    clock: a wall clock stepped forward does not make rows look older than they are; one
    stepped back keeps them longer, which is safe.
    """
    since_start = wall_at_start + max(0.0, monotonic_now - monotonic_at_start)
    return min(wall_now, since_start) - window


def window_victims(
    rows: Iterable[tuple[str, int, float, bool]], cutoff: float
) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """Of ``(client id, message id, received_at, client announced a mark)`` rows, the keys the
    time window deletes (received before ``cutoff``, from clients without a mark) and, per
    client, the highest id deleted (the floor record keeps it as the high-water mark)."""
    keys: list[tuple[str, int]] = []
    highest: dict[str, int] = {}
    for client_id, message_id, received_at, marked in rows:
        if marked or received_at >= cutoff:
            continue
        keys.append((client_id, message_id))
        if message_id > highest.get(client_id, 0):
            highest[client_id] = message_id
    return keys, highest


def sweep_resume(last: tuple[str, int, float, bool], cutoff: float) -> tuple[str, int]:
    """Where the time window's pass goes on after a full range that ended with row ``last``
    (as ``window_victims`` takes it): right after it, or, where the window keeps that row
    (its client announced a mark, or it was received after ``cutoff``), after all of that
    client's rows. A client's ids grow as its messages arrive, so the window keeps the rest
    of them too; passing over them keeps a pass from chasing a busy client's new rows for
    ever. A client whose ids do not grow with time (the seed's, restarting them) may have
    an old row wait until the rows before it are old too; nothing is deleted early
    (``forget_keys`` checks each age again)."""
    client_id, message_id, received_at, marked = last
    if marked or received_at >= cutoff:
        return (client_id, MAX_MESSAGE_ID)
    return (client_id, message_id)
