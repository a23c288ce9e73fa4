"""SendWindow, the pure ack-window core: examples, then a model server that loses acks.

Synchronous and clock-free: ``now`` is just a number the test passes in.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from outbox.protocol.window import Expired, InFlight, SendWindow

# -- examples --------------------------------------------------------------------------------


def window(max_inflight: int = 3, ack_timeout: float = 1.0, max_attempts: int | None = 3):
    return SendWindow(max_inflight=max_inflight, ack_timeout=ack_timeout, max_attempts=max_attempts)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_inflight": 0, "ack_timeout": 1.0, "max_attempts": 3}, "max_inflight"),
        ({"max_inflight": 1, "ack_timeout": 0.0, "max_attempts": 3}, "ack_timeout"),
        ({"max_inflight": 1, "ack_timeout": -1.0, "max_attempts": 3}, "ack_timeout"),
        ({"max_inflight": 1, "ack_timeout": 1.0, "max_attempts": 0}, "max_attempts"),
    ],
)
def test_rejects_bad_settings(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SendWindow(**kwargs)  # type: ignore[arg-type]


def test_capacity_counts_down_and_never_goes_negative() -> None:
    w = window(max_inflight=3)
    assert w.capacity == 3
    w.sent([(1, 0), (2, 0)], now=0.0)
    assert (w.capacity, len(w)) == (1, 2)
    # The window does not police the caller; capacity just reports zero when over.
    w.sent([(3, 0), (4, 0)], now=0.0)
    assert w.capacity == 0
    assert w.ids() == [1, 2, 3, 4]


def test_acked_splits_known_from_unknown_and_ignores_duplicates() -> None:
    w = window()
    w.sent([(1, 0), (2, 0), (3, 0)], now=0.0)
    assert w.acked([2, 9, 2]) == ([2], [9, 2])
    assert 2 not in w
    assert w.ids() == [1, 3]
    assert w.capacity == 1


def test_discard_forgets_one_message() -> None:
    w = window()
    w.sent([(1, 0), (2, 0)], now=0.0)
    assert w.discard(1) is True
    assert w.discard(1) is False
    assert w.ids() == [2]


def test_resending_an_inflight_id_moves_it_to_the_back_with_a_new_deadline() -> None:
    w = window(ack_timeout=1.0)
    w.sent([(1, 0), (2, 0)], now=0.0)
    w.sent([(1, 0)], now=0.5)
    assert w.ids() == [2, 1]
    assert w.next_deadline() == 1.0  # message 2's
    assert w.acked([2]) == ([2], [])
    assert w.next_deadline() == 1.5


def test_expire_is_inclusive_at_the_deadline_and_restamps_resends() -> None:
    w = window(ack_timeout=1.0, max_attempts=None)
    w.sent([(1, 0)], now=0.0)
    w.sent([(2, 0)], now=0.5)
    assert not w.expire(0.999)
    result = w.expire(1.0)
    assert [m.id for m in result.resend] == [1]
    assert result.resend[0].attempts == 1
    assert result.resend[0].sent_at == 1.0
    assert result.dead == []
    assert w.ids() == [2, 1]
    assert w.next_deadline() == 1.5


def test_dead_after_max_attempts_counting_earlier_attempts() -> None:
    w = window(ack_timeout=1.0, max_attempts=3)
    w.sent([(1, 0), (2, 2)], now=0.0)  # message 2 already timed out twice before
    first = w.expire(1.0)
    assert [(m.id, m.attempts) for m in first.resend] == [(1, 1)]
    assert [(m.id, m.attempts) for m in first.dead] == [(2, 3)]
    assert 2 not in w
    assert [(m.id, m.attempts) for m in w.expire(2.0).resend] == [(1, 2)]
    last = w.expire(3.0)
    assert (last.resend, [(m.id, m.attempts) for m in last.dead]) == ([], [(1, 3)])
    assert len(w) == 0
    assert w.next_deadline() is None


def test_no_max_attempts_means_never_dead() -> None:
    w = window(ack_timeout=1.0, max_attempts=None)
    w.sent([(1, 0)], now=0.0)
    for step in range(1, 50):
        result = w.expire(float(step))
        assert result.dead == []
        assert [(m.id, m.attempts) for m in result.resend] == [(1, step)]


def test_clear_forgets_without_counting_an_attempt() -> None:
    w = window(ack_timeout=1.0, max_attempts=2)
    w.sent([(1, 1), (2, 0)], now=0.0)
    assert w.clear() == [1, 2]
    assert (len(w), w.capacity, w.next_deadline()) == (0, 3, None)
    assert not w.expire(100.0)
    # Back on a new connection with the attempts the store kept: one more timeout kills 1.
    w.sent([(1, 1), (2, 0)], now=100.0)
    result = w.expire(101.0)
    assert [(m.id, m.attempts) for m in result.dead] == [(1, 2)]
    assert [(m.id, m.attempts) for m in result.resend] == [(2, 1)]


def test_expired_truthiness() -> None:
    assert not Expired()
    assert Expired(resend=[InFlight(1, 0.0, 1)])
    assert Expired(dead=[InFlight(1, 0.0, 1)])


# -- a model server that drops, duplicates and reorders acks ---------------------------------


@dataclass
class Model:
    """What the test believes about one message."""

    attempts: int  # as given at the last send, plus expiries since
    first_attempts: int  # attempts the message came with (earlier processes)
    expiries: int = 0
    sent_at: float | None = None  # None: not in the window
    seq: int = 0  # send order, to break deadline ties


class WindowMachine(RuleBasedStateMachine):
    """The sender's view of one outbox, with a lossy server and a clock that jumps."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.next_id = 1
        self.seq = 0
        self.messages: dict[int, Model] = {}
        self.backlog: list[int] = []  # pending rows not in the window (new or cleared)
        self.server_acks: list[int] = []  # acks the server still owes (it may drop them)
        self.acked: set[int] = set()
        self.dead: set[int] = set()
        self.nacked: set[int] = set()

    @initialize(
        max_inflight=st.integers(1, 5),
        ack_timeout=st.sampled_from([0.25, 1.0, 2.5]),
        max_attempts=st.none() | st.integers(1, 4),
    )
    def setup(self, max_inflight: int, ack_timeout: float, max_attempts: int | None) -> None:
        self.window = SendWindow(
            max_inflight=max_inflight, ack_timeout=ack_timeout, max_attempts=max_attempts
        )

    # -- helpers --

    def in_window(self) -> list[int]:
        """Model ids in the window, in deadline order."""
        live = [(m.sent_at, m.seq, i) for i, m in self.messages.items() if m.sent_at is not None]
        return [i for _, _, i in sorted(live)]

    def deadline(self, message_id: int) -> float:
        sent_at = self.messages[message_id].sent_at
        assert sent_at is not None
        return sent_at + self.window.ack_timeout

    def put_on_wire(self, ids: list[int]) -> None:
        for message_id in ids:
            model = self.messages[message_id]
            model.sent_at = self.now
            self.seq += 1
            model.seq = self.seq
            self.server_acks.append(message_id)  # the server will ack it, unless dropped

    # -- rules --

    @rule(count=st.integers(1, 4), data=st.data())
    def new_messages(self, count: int, data: st.DataObject) -> None:
        max_attempts = self.window.max_attempts
        for _ in range(count):
            top = 0 if max_attempts is None else max_attempts - 1
            attempts = data.draw(st.integers(0, min(top, 2)), label="earlier attempts")
            self.messages[self.next_id] = Model(attempts=attempts, first_attempts=attempts)
            self.backlog.append(self.next_id)
            self.next_id += 1

    @precondition(lambda self: self.backlog)
    @rule(want=st.integers(1, 6))
    def send(self, want: int) -> None:
        batch = self.backlog[: min(want, self.window.capacity)]
        del self.backlog[: len(batch)]
        self.window.sent([(i, self.messages[i].attempts) for i in batch], self.now)
        self.put_on_wire(batch)

    @precondition(lambda self: self.server_acks)
    @rule(data=st.data())
    def deliver_acks(self, data: st.DataObject) -> None:
        """Some owed acks arrive, in any order, some of them twice."""
        picks = data.draw(
            st.lists(st.sampled_from(range(len(self.server_acks))), min_size=1, max_size=6),
            label="ack indices",
        )
        ids = [self.server_acks[p] for p in picks]
        if not data.draw(st.booleans(), label="server will ack these again"):
            delivered = set(picks)
            self.server_acks = [a for n, a in enumerate(self.server_acks) if n not in delivered]
        # Known: the first ack of an id in flight; unknown: every other ack, in order.
        expected_known: list[int] = []
        expected_unknown: list[int] = []
        for message_id in ids:
            if message_id not in expected_known and self.messages[message_id].sent_at is not None:
                expected_known.append(message_id)
            else:
                expected_unknown.append(message_id)
        assert self.window.acked(ids) == (expected_known, expected_unknown)
        for message_id in expected_known:
            self.messages[message_id].sent_at = None
            self.acked.add(message_id)

    @precondition(lambda self: self.server_acks)
    @rule(data=st.data())
    def drop_acks(self, data: st.DataObject) -> None:
        lost = data.draw(st.sets(st.sampled_from(range(len(self.server_acks)))), label="lost")
        self.server_acks = [a for n, a in enumerate(self.server_acks) if n not in lost]

    @rule(step=st.sampled_from([0.0, 0.1, 0.25, 0.7, 1.0, 2.5, 4.0]))
    def advance(self, step: float) -> None:
        self.now += step

    @rule()
    def expire(self) -> None:
        due = [i for i in self.in_window() if self.deadline(i) <= self.now]
        deadlines = [self.deadline(i) for i in due]
        assert deadlines == sorted(deadlines)
        result = self.window.expire(self.now)
        dead_ids = [m.id for m in result.dead]
        resend_ids = [m.id for m in result.resend]
        assert sorted(resend_ids + dead_ids) == sorted(due)
        # Both lists keep deadline order; resends are restamped as sent at now.
        assert resend_ids == [i for i in due if i not in dead_ids]
        assert dead_ids == [i for i in due if i in dead_ids]
        assert all(m.sent_at == self.now for m in result.resend)
        max_attempts = self.window.max_attempts
        for message in [*result.resend, *result.dead]:
            model = self.messages[message.id]
            model.attempts += 1
            model.expiries += 1
            assert message.attempts == model.attempts
            is_dead = max_attempts is not None and model.attempts >= max_attempts
            assert (message.id in dead_ids) == is_dead
        for message_id in dead_ids:
            model = self.messages[message_id]
            # Dead after exactly the timeouts it had left, never before.
            assert model.first_attempts + model.expiries == max_attempts
            model.sent_at = None
            self.dead.add(message_id)
        self.put_on_wire(resend_ids)

    @precondition(lambda self: len(self.window) > 0)
    @rule(data=st.data())
    def nack(self, data: st.DataObject) -> None:
        message_id = data.draw(st.sampled_from(self.in_window()), label="nacked")
        assert self.window.discard(message_id)
        self.messages[message_id].sent_at = None
        self.nacked.add(message_id)

    @rule()
    def connection_dropped(self) -> None:
        before = {i: m.attempts for i, m in self.messages.items()}
        cleared = self.window.clear()
        assert cleared == self.in_window()
        for message_id in cleared:
            self.messages[message_id].sent_at = None
        # The next connection sends them again, first, with the attempts the store kept.
        self.backlog[:0] = cleared
        self.server_acks.clear()  # acks owed on the old connection never come
        assert {i: m.attempts for i, m in self.messages.items()} == before

    # -- invariants --

    @invariant()
    def window_matches_model(self) -> None:
        w = self.window
        assert len(w) <= w.max_inflight
        assert w.capacity == w.max_inflight - len(w)
        assert w.ids() == self.in_window()
        # Finished messages are never in flight (none of them is ever sent again).
        assert not (set(w.ids()) & (self.acked | self.dead | self.nacked))
        deadlines = [self.deadline(i) for i in w.ids()]
        assert w.next_deadline() == (min(deadlines) if deadlines else None)

    def teardown(self) -> None:
        """From now on the server acks everything: every message ends acked or dead."""
        if not hasattr(self, "window"):
            return
        for _ in range(len(self.messages) + 10):
            if not self.backlog and not len(self.window):
                break
            self.expire()
            if self.backlog and self.window.capacity:
                self.send(self.window.capacity)
            owed = self.window.ids()
            if owed:
                known, unknown = self.window.acked(owed)
                assert (known, unknown) == (owed, [])
                for message_id in known:
                    self.messages[message_id].sent_at = None
                    self.acked.add(message_id)
        assert not self.backlog
        assert len(self.window) == 0
        finished = [self.acked, self.dead, self.nacked]
        assert set(self.messages) == set().union(*finished)
        assert sum(len(s) for s in finished) == len(self.messages)  # each ends exactly once


TestWindowModel = WindowMachine.TestCase
TestWindowModel.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_a_single_message_refused_as_too_big_counts_an_attempt_then_dies() -> None:
    window = SendWindow(max_inflight=10, ack_timeout=1.0, max_attempts=2)
    window.sent([(1, 0)], now=0.0)
    first = window.refused_too_big([1])
    assert first.counted == [(1, 1)] and not first.dead and not first.split
    window.clear()
    window.sent([(1, 1)], now=1.0)
    second = window.refused_too_big([1])
    assert second.dead == [(1, 2)] and not second.counted and 1 not in window


def test_a_batch_refused_as_too_big_is_split_not_blamed() -> None:
    window = SendWindow(max_inflight=10, ack_timeout=1.0, max_attempts=1)
    window.sent([(1, 0), (2, 0), (3, 0)], now=0.0)
    decided = window.refused_too_big([1, 2, 3])
    assert decided.split == [1, 2, 3] and not decided.counted and not decided.dead
    assert window.solo == {1, 2, 3}
    window.acked([2], now=1.0)
    assert window.solo == {1, 3}


def test_too_big_with_no_attempt_limit_never_dies() -> None:
    window = SendWindow(max_inflight=10, ack_timeout=1.0, max_attempts=None)
    window.sent([(1, 99)], now=0.0)
    assert window.refused_too_big([1]).counted == [(1, 100)]


def test_messages_not_in_flight_are_not_blamed() -> None:
    window = SendWindow(max_inflight=10, ack_timeout=1.0, max_attempts=1)
    assert not window.refused_too_big([7]).counted
