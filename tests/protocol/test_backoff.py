"""Backoff: exponential, capped, jittered reconnect delays; randomness injected."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox.protocol.backoff import Backoff


def fixed(value: float) -> Callable[[], float]:
    return lambda: value


def script(values: list[float]) -> Callable[[], float]:
    it: Iterator[float] = iter(values)
    return lambda: next(it)


def delays(backoff: Backoff, count: int) -> list[float | None]:
    return [backoff.next_delay() for _ in range(count)]


def test_without_jitter_doubles_from_initial_up_to_the_cap() -> None:
    backoff = Backoff(1.0, 60.0, jitter=0.0, rand=fixed(0.9))
    assert delays(backoff, 9) == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert backoff.attempts == 9


def test_factor_and_initial_are_honoured() -> None:
    backoff = Backoff(0.5, 10.0, factor=3.0, jitter=0.0)
    assert delays(backoff, 5) == [0.5, 1.5, 4.5, 10.0, 10.0]


def test_factor_one_is_a_constant_delay() -> None:
    backoff = Backoff(2.0, 60.0, factor=1.0, jitter=0.0)
    assert delays(backoff, 4) == [2.0, 2.0, 2.0, 2.0]


def test_jitter_scales_each_delay_down_by_jitter_times_rand() -> None:
    backoff = Backoff(1.0, 60.0, jitter=0.5, rand=script([0.0, 0.5, 0.999, 0.25]))
    assert delays(backoff, 4) == pytest.approx([1.0, 1.5, 4 * (1 - 0.4995), 7.0])


def test_rand_is_drawn_once_per_delay() -> None:
    calls = itertools.count()
    backoff = Backoff(1.0, 60.0, rand=lambda: next(calls) * 0.0)
    delays(backoff, 7)
    assert next(calls) == 7


@settings(max_examples=100, deadline=None)
@given(
    initial=st.floats(0.0, 5.0),
    extra=st.floats(0.0, 100.0),
    factor=st.floats(1.0, 4.0),
    jitter=st.floats(0.0, 1.0),
    draws=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=30),
)
def test_every_delay_lies_in_its_jitter_band_below_the_cap(
    initial: float, extra: float, factor: float, jitter: float, draws: list[float]
) -> None:
    maximum = initial + extra
    backoff = Backoff(initial, maximum, factor=factor, jitter=jitter, rand=script(draws))
    for attempt, draw in enumerate(draws, start=1):
        delay = backoff.next_delay()
        assert delay is not None
        base = min(maximum, initial * factor ** (attempt - 1))
        assert delay == pytest.approx(base * (1 - jitter * draw))
        assert base * (1 - jitter) - 1e-9 <= delay <= base <= maximum
        assert backoff.attempts == attempt


def test_default_jitter_keeps_each_delay_in_the_upper_half_of_its_step() -> None:
    low = Backoff(1.0, 60.0, rand=fixed(0.999999))
    high = Backoff(1.0, 60.0, rand=fixed(0.0))
    for base in [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0]:
        lo, hi = low.next_delay(), high.next_delay()
        assert lo is not None and hi is not None
        assert base / 2 < lo < hi == base


def test_max_attempts_gives_none_and_stops_counting() -> None:
    backoff = Backoff(1.0, 60.0, jitter=0.0, max_attempts=3)
    assert delays(backoff, 5) == [1.0, 2.0, 4.0, None, None]
    assert backoff.attempts == 3


def test_max_attempts_zero_never_retries() -> None:
    backoff = Backoff(1.0, 60.0, max_attempts=0)
    assert backoff.next_delay() is None
    assert backoff.attempts == 0


def test_reset_starts_again_from_initial_and_restores_the_budget() -> None:
    backoff = Backoff(1.0, 60.0, jitter=0.0, max_attempts=2)
    assert delays(backoff, 3) == [1.0, 2.0, None]
    backoff.reset()
    assert backoff.attempts == 0
    assert delays(backoff, 3) == [1.0, 2.0, None]


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((-1.0, 60.0), {}, "initial"),
        ((10.0, 5.0), {}, "initial <= maximum"),
        ((1.0, 60.0), {"factor": 0.5}, "factor"),
        ((1.0, 60.0), {"jitter": -0.1}, "jitter"),
        ((1.0, 60.0), {"jitter": 1.5}, "jitter"),
        ((1.0, 60.0), {"max_attempts": -1}, "max_attempts"),
    ],
)
def test_rejects_bad_settings(
    args: tuple[float, float], kwargs: dict[str, float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        Backoff(*args, **kwargs)  # type: ignore[arg-type]


def test_a_long_outage_keeps_returning_the_capped_delay() -> None:
    # max_attempts=None retries forever; 2000 attempts at a 60 s cap is a day-long outage, and
    # 2.0 ** 1024 overflows a float.
    backoff = Backoff(1.0, 60.0, jitter=0.0)
    assert set(delays(backoff, 2000)[6:]) == {60.0}


def test_a_zero_initial_delay_stays_zero_however_long_the_outage() -> None:
    backoff = Backoff(0.0, 60.0, jitter=0.0)
    assert set(delays(backoff, 1100)) == {0.0}
