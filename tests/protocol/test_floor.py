"""The bounded inbox's rules (outbox/protocol/floor.py) and the client's mark
(outbox/client/lowwater.py): what may be forgotten, synchronously, without a database."""

from __future__ import annotations

import pytest

from outbox.client import lowwater
from outbox.errors import ProtocolError
from outbox.protocol import wire
from outbox.protocol.floor import (
    Floor,
    MarkStep,
    StepDone,
    advance,
    covers,
    raise_mark,
    sweep_resume,
    window_cutoff,
    window_victims,
)
from outbox.protocol.wire import MAX_MESSAGE_ID

ACKED = False
REJECTED = True


def rows(*ids: int) -> list[tuple[int, bool]]:
    return [(i, ACKED) for i in ids]


def test_the_first_floor_starts_at_the_lowest_row_and_stops_at_the_mark() -> None:
    moved = advance(Floor(mark=8), 8, rows(5, 6, 7, 8, 9))
    assert moved == Floor(base=5, floor=8, high_water=7, mark=8)
    assert [i for i in range(1, 11) if covers(moved, i)] == [5, 6, 7]


def test_a_mark_beyond_the_highest_row_is_clipped_to_it() -> None:
    """A peer announcing 10**18 forgets only what the receiver holds: its next message,
    id 4, is still handled as new (not covered), never acked unhandled."""
    moved = advance(Floor(), 10**18, rows(1, 2, 3))
    assert moved.floor == 4 and moved.high_water == 3
    assert not covers(moved, 4) and not covers(moved, 10**17)


def test_the_floor_stops_before_a_rejected_row() -> None:
    """Only the rejected row can answer its resend with the same nack: it is kept."""
    run = [(1, ACKED), (2, ACKED), (3, REJECTED), (4, ACKED)]
    moved = advance(Floor(), 10, run)
    assert moved.floor == 3 and not covers(moved, 3)


def test_the_floor_is_never_lowered() -> None:
    floor = Floor(base=1, floor=50, high_water=49, mark=50)
    assert advance(floor, 10, rows()) == floor  # a lower mark: nothing moves
    assert advance(floor, 60, rows()) == floor  # nothing recorded above: nothing moves
    assert raise_mark(floor, 20) == floor
    assert raise_mark(floor, 70).mark == 70


def test_the_floor_continues_from_where_it_was_and_keeps_its_base() -> None:
    floor = Floor(base=1, floor=50, high_water=49, mark=100)
    moved = advance(floor, 100, rows(50, 51, 53))  # 52 never sent (a gap): passed
    assert moved == Floor(base=1, floor=54, high_water=53, mark=100)


def test_a_mark_step_is_finished_at_the_mark_at_a_short_run_or_when_stuck() -> None:
    step = MarkStep("c", target=100, limit=10, now=0.0)
    start = Floor(1, 50, 49, 100)
    reached = StepDone(start, Floor(1, 100, 99, 100), rows=10, deleted=50)
    short = StepDone(start, Floor(1, 55, 54, 100), rows=5, deleted=5)  # no rows past 54
    stuck = StepDone(start, start, rows=10, deleted=0)  # a rejected row at 50
    more = StepDone(start, Floor(1, 60, 59, 100), rows=10, deleted=10)  # a full chunk
    assert reached.finished(step) and short.finished(step) and stuck.finished(step)
    assert not more.finished(step)


def test_no_floor_covers_nothing() -> None:
    assert not covers(Floor(), 0) and not covers(Floor(), 1)


def test_the_window_cutoff_ignores_a_wall_clock_step_forward() -> None:
    kwargs = {"wall_at_start": 1000.0, "monotonic_at_start": 5.0, "window": 60.0}
    steady = window_cutoff(wall_now=1100.0, monotonic_now=105.0, **kwargs)
    assert steady == 1100.0 - 60.0
    stepped = window_cutoff(wall_now=1100.0 + 7200, monotonic_now=105.0, **kwargs)
    assert stepped == steady  # two hours ahead: nothing looks older than it is
    back = window_cutoff(wall_now=1100.0 - 7200, monotonic_now=105.0, **kwargs)
    assert back < steady  # behind: rows are kept longer, which is safe


def test_the_window_spares_clients_that_announced_a_mark() -> None:
    found = [
        ("seed", 1, 10.0, False),
        ("seed", 2, 99.0, False),
        ("ours", 1, 10.0, True),
        ("other", 7, 20.0, False),
    ]
    keys, highest = window_victims(found, cutoff=50.0)
    assert keys == [("seed", 1), ("other", 7)]
    assert highest == {"seed": 1, "other": 7}


@pytest.mark.parametrize(
    ("pending", "dead", "sequence", "expected"),
    [
        (None, None, None, 1),  # an empty file: nothing was ever given out
        (None, None, 40, 41),  # all acked: the next id
        (12, None, 40, 12),  # the oldest pending row holds it
        (12, 7, 40, 7),  # a dead (or expired) row may be requeued: it holds it too
        (None, 30, 40, 30),
        (None, None, 2**63 - 1, 2**63 - 1),  # never past the largest id
    ],
)
def test_the_client_mark_is_the_lowest_row_not_acked(
    pending: int | None, dead: int | None, sequence: int | None, expected: int
) -> None:
    assert lowwater.mark(pending, dead, sequence) == expected


def test_low_water_frames_and_header() -> None:
    assert wire.parse_client_frame(wire.encode_low_water(42)) == wire.LowWater(42)
    for bad in (
        '{"type":"low-water"}',
        '{"type":"low-water","mark":0}',
        '{"type":"low-water","mark":"9"}',
    ):
        with pytest.raises(ProtocolError, match="'mark' must be a positive integer"):
            wire.parse_client_frame(bad)
    assert wire.parse_low_water("17") == 17
    for bad_header in (None, "", "0", "-3", "x", str(2**63)):
        assert wire.parse_low_water(bad_header) is None
    assert wire.FEATURE_LOW_WATER in wire.CLIENT_FEATURES


def test_a_pass_goes_on_after_a_range_or_past_a_client_whose_rows_it_keeps() -> None:
    """After a full range, the sweep resumes right after its last row if that row was the
    window's to delete; past all of that client's rows if the window keeps it (a mark, or
    younger than the cutoff): the rest of that client's rows are newer still."""
    assert sweep_resume(("a", 7, 10.0, False), cutoff=20.0) == ("a", 7)
    assert sweep_resume(("a", 7, 30.0, False), cutoff=20.0) == ("a", MAX_MESSAGE_ID)
    assert sweep_resume(("a", 7, 10.0, True), cutoff=20.0) == ("a", MAX_MESSAGE_ID)
    assert ("a", MAX_MESSAGE_ID) < ("a0", 1) and ("a", MAX_MESSAGE_ID) < ("b", 0)
