"""The client's low-water mark: the id below which everything is acked, read cheaply.

Every id below the mark is acked (or was acked and then purged) and will never be sent
again: acked rows are never resent, while pending and dead rows may be (``requeue_dead()``
and ``outbox requeue`` send dead and expired rows again), so the lowest of them holds the
mark down. With none, the mark is the next id the file will give out: new rows, a
renumbered row (it moves to a fresh id) and rows other processes commit all get ids above
the sequence. A restored backup brings an older, lower mark, never a higher one. The receiver
may forget its inbox rows below the mark (docs/protocol.md, "A bounded inbox").

Read from committed rows only, in one statement (one snapshot): an ack the store has not
committed yet keeps its row pending here, which only keeps the mark lower. The cost is two
descents of partial indexes (``outbox_pending``, ``outbox_dead``) and one sequence read,
however large the table, so it can be read for every announcement.
"""

from __future__ import annotations

from ..protocol.wire import MAX_MESSAGE_ID

__all__ = ["MARK_SQL", "mark"]

MARK_SQL = (
    "SELECT (SELECT min(id) FROM outbox WHERE status = 'pending'), "
    "(SELECT min(id) FROM outbox WHERE status = 'dead'), "
    "(SELECT seq FROM sqlite_sequence WHERE name = 'outbox')"
)


def mark(lowest_pending: int | None, lowest_dead: int | None, sequence: int | None) -> int:
    """The mark from ``MARK_SQL``'s row: the lowest row not acked, else the next id."""
    held = [int(i) for i in (lowest_pending, lowest_dead) if i is not None]
    value = min(held) if held else int(sequence or 0) + 1
    return max(1, min(value, MAX_MESSAGE_ID))
