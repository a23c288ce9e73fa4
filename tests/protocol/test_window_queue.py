"""The dead-letter rule for a slow but healthy server (docs/protocol.md, "Dead letters").

A deadline that passes while acks keep coming for messages sent before it is not a failed
attempt; one that passes after a later message was acked (skipped), or with no ack at all
from a server that answered a ping sent ``ack_timeout`` after the message, is.
"""

from __future__ import annotations

from outbox.protocol.window import SendWindow


def window(max_attempts: int | None = 3) -> SendWindow:
    return SendWindow(max_inflight=10, ack_timeout=1.0, max_attempts=max_attempts)


def test_acks_for_earlier_messages_hold_later_deadlines_without_counting() -> None:
    w = window()
    w.sent([(1, 0), (2, 0), (3, 0)], now=0.0)
    w.acked([1], now=0.9)  # the server is working through the queue
    expired = w.expire(now=1.0, last_heard=0.9)
    assert [m.id for m in expired.behind] == [2, 3]
    assert not expired.resend and not expired.dead and not expired  # nothing to act on
    assert all(m.attempts == 0 for m in expired.behind)
    assert w.next_deadline() == 2.0  # one more ack_timeout


def test_a_long_queue_never_dead_letters_while_acks_keep_coming() -> None:
    w = window(max_attempts=1)
    w.sent([(n, 0) for n in range(1, 11)], now=0.0)
    now = 0.0
    for message_id in range(1, 11):  # one ack every 0.9 s: each later deadline passes
        now += 0.9
        w.acked([message_id], now=now)
        expired = w.expire(now, last_heard=now)
        assert not expired.dead and not expired.resend
    assert len(w) == 0


def test_a_skipped_message_counts_as_a_failed_attempt() -> None:
    w = window()
    w.sent([(1, 0), (2, 0)], now=0.0)
    w.acked([2], now=0.5)  # a message sent after 1 was acked: 1 was skipped
    expired = w.expire(now=1.0, last_heard=0.5)
    assert [m.id for m in expired.resend] == [1]
    assert expired.resend[0].attempts == 1


def test_a_live_server_that_acks_nothing_still_dead_letters() -> None:
    w = window(max_attempts=2)
    w.sent([(1, 0)], now=0.0)
    assert [m.id for m in w.expire(now=1.0, last_heard=0.5).unheard] == [1]  # too soon
    assert [m.id for m in w.expire(now=2.0, last_heard=1.0).resend] == [1]  # held 1 s
    assert [m.id for m in w.expire(now=3.0, last_heard=2.5).unheard] == [1]
    assert [m.id for m in w.expire(now=4.0, last_heard=3.0).dead] == [1]


def test_a_pong_that_overtakes_a_pending_ack_is_not_evidence() -> None:
    """Pings are answered at once, acks after the receiver's commit: a ping sent right
    after a message may come back first. Only one sent ack_timeout later counts."""
    w = window()
    w.sent([(1, 0)], now=0.0)
    expired = w.expire(now=1.0, last_heard=0.2)
    assert [m.id for m in expired.unheard] == [1] and not expired


def test_a_resend_goes_behind_what_is_already_on_the_wire() -> None:
    w = window()
    w.sent([(1, 0), (2, 0)], now=0.0)
    w.acked([2], now=0.5)
    assert [m.id for m in w.expire(now=1.0, last_heard=0.5).resend] == [1]
    w.sent([(3, 0)], now=1.2)
    w.acked([3], now=1.5)  # 3 went out after 1's resend: 1 was skipped again
    expired = w.expire(now=2.0, last_heard=1.5)
    assert [m.id for m in expired.resend] == [1] and expired.resend[0].attempts == 2


def test_progress_before_the_send_does_not_count() -> None:
    w = window()
    w.sent([(1, 0)], now=0.0)
    w.acked([1], now=0.1)
    w.sent([(2, 0)], now=0.5)  # sent after the last progress
    expired = w.expire(now=1.5, last_heard=1.5)
    assert [m.id for m in expired.resend] == [2]


def test_a_new_connection_forgets_the_progress_of_the_old_one() -> None:
    w = window()
    w.sent([(1, 0), (2, 0)], now=0.0)
    w.acked([1], now=0.9)
    w.clear()
    w.sent([(2, 0)], now=0.9)
    expired = w.expire(now=1.9, last_heard=1.9)  # a pong, no ack on this connection
    assert [m.id for m in expired.resend] == [2]


def test_acks_without_a_time_are_not_progress() -> None:
    """Callers that pass no ``now`` keep the old rule (every heard deadline counts)."""
    w = window()
    w.sent([(1, 0), (2, 0)], now=0.0)
    w.acked([1])
    assert [m.id for m in w.expire(now=1.0, last_heard=1.0).resend] == [2]
