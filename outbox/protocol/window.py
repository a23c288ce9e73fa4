"""The ack window: which messages are on the wire, and what to do when their acks are late.

A pure, synchronous core (no socket, no clock, no database): the sender loop feeds it what
it sent and what the server acked, passes ``now`` in, and acts on what it returns. That keeps
the rules testable in microseconds, including against a model server that drops, duplicates
and reorders acks.

Rules:
- at most ``max_inflight`` messages are un-acked at once;
- a message with no ack ``ack_timeout`` seconds after it was (re)sent has *timed out*: its
  attempt count goes up by one, and it is sent again, or, once ``max_attempts`` timeouts are
  reached, it is given up on (the caller marks the row ``dead``);
- a dropped connection is not a timeout: ``clear()`` forgets the window without counting;
- nor is a deadline that passes before the server has answered anything sent *after* the
  message. Two cases, neither counted, nothing resent; the message waits another
  ``ack_timeout``:
  - *behind a queue*: acks keep coming for messages sent before it. A receiver handles a
    client's messages in the order they arrived, so the server is visibly working through
    the queue ahead of this one (a slow handler with a backlog many times ``max_inflight``);
  - *unheard*: nothing at all sent after it has been answered, not even a ping. The
    connection may be slow or dead: the caller asks the heartbeat to find out. Otherwise a
    silent partition longer than ``ack_timeout * max_attempts`` would dead-letter
    everything in flight.
  A deadline does count once the server acks a message sent after this one (it was
  skipped), or, while acking nothing for a whole ``ack_timeout``, answers a ping sent at
  least ``ack_timeout`` after the message (so the server had held it that long; a pong
  answered at once must not overtake an ack that waits for the receiver's commit). So
  ``max_attempts`` still dead-letters a message that a live server skips or ignores.
- a frame the server refuses as too big (it closes with 1009) is a failed attempt of the
  message it held, counted like a timeout (``refused_too_big``), so a message no server
  will take becomes dead after ``max_attempts`` closes and the queue behind it moves on. A
  batch frame of several messages is not blamed on any of them: its messages go one per
  frame from then on (``solo``), and the one that is still too big alone is counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class InFlight:
    """One message on the wire."""

    id: int
    sent_at: float
    attempts: int
    """Ack timeouts so far, including those of earlier connections and processes."""
    seq: int = 0
    """Place in the order this connection put messages on the wire (a resend moves it)."""
    wire_at: float = 0.0
    """When it last went on the wire (``sent_at`` also moves when a deadline is extended)."""


@dataclass(slots=True)
class Expired:
    """What ``SendWindow.expire`` decided."""

    resend: list[InFlight] = field(default_factory=list)
    """Timed out, to be sent again (already restamped as sent at ``now``)."""
    dead: list[InFlight] = field(default_factory=list)
    """Timed out for the last time; no longer in the window."""
    unheard: list[InFlight] = field(default_factory=list)
    """Nothing sent after it was answered: not counted, one more ``ack_timeout``."""
    behind: list[InFlight] = field(default_factory=list)
    """Acks for earlier messages kept coming: not counted, one more ``ack_timeout``."""

    def __bool__(self) -> bool:
        return bool(self.resend or self.dead)


@dataclass(slots=True)
class TooBig:
    """What ``SendWindow.refused_too_big`` decided about the messages of a refused frame."""

    counted: list[tuple[int, int]] = field(default_factory=list)
    """``(id, attempts)`` with the refusal counted, still to be sent again."""
    dead: list[tuple[int, int]] = field(default_factory=list)
    """``(id, attempts)`` refused for the last time: the caller marks them dead."""
    split: list[int] = field(default_factory=list)
    """The messages of a batch frame: not counted, sent one per frame from now on."""


class SendWindow:
    """Un-acked messages in the order they were last sent (oldest deadline first)."""

    def __init__(self, *, max_inflight: int, ack_timeout: float, max_attempts: int | None) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        if ack_timeout <= 0:
            raise ValueError(f"ack_timeout must be positive, got {ack_timeout}")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1 or None, got {max_attempts}")
        self.max_inflight = max_inflight
        self.ack_timeout = ack_timeout
        self.max_attempts = max_attempts
        # Insertion order == send order == deadline order, because a resend moves the
        # message to the end. So expiry only ever looks at the front.
        self._inflight: dict[int, InFlight] = {}
        self._seq = 0
        self._max_acked_seq = 0
        """The latest-sent message the server acked: everything sent before it was read."""
        self._progress_at = float("-inf")
        """When the server last acked a message in flight (acked() given ``now``)."""
        self.solo: set[int] = set()
        """Messages to send one per frame (a batch frame holding them was refused as too
        big). Kept across connections; an id leaves once acked or given up on."""

    def __len__(self) -> int:
        return len(self._inflight)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._inflight

    @property
    def capacity(self) -> int:
        """How many more messages may be sent before the window is full."""
        return max(0, self.max_inflight - len(self._inflight))

    def ids(self) -> list[int]:
        return list(self._inflight)

    def attempts(self, message_id: int) -> int | None:
        """Ack timeouts so far of a message in flight; None if it is not in flight."""
        message = self._inflight.get(message_id)
        return None if message is None else message.attempts

    def sent(self, messages: Iterable[tuple[int, int]], now: float) -> None:
        """Record ``(id, attempts so far)`` pairs as sent at ``now``."""
        for message_id, attempts in messages:
            self._inflight.pop(message_id, None)
            self._seq += 1
            self._inflight[message_id] = InFlight(message_id, now, attempts, self._seq, now)

    def acked(self, ids: Iterable[int], now: float | None = None) -> tuple[list[int], list[int]]:
        """Remove acked ids; return (ids that were in flight, ids that were not).

        ``now`` records the acks as progress through the queue (see the module's rules).
        """
        known: list[int] = []
        unknown: list[int] = []
        pop, solo, max_seq = self._inflight.pop, self.solo, self._max_acked_seq
        for message_id in ids:
            message = pop(message_id, None)
            if message is not None:
                known.append(message_id)
                if solo:
                    solo.discard(message_id)
                if message.seq > max_seq:
                    max_seq = message.seq
            else:
                unknown.append(message_id)
        self._max_acked_seq = max_seq
        if known and now is not None:
            self._progress_at = now
        return known, unknown

    def discard(self, message_id: int) -> bool:
        """Forget one message (nacked by the server); True if it was in flight."""
        self.solo.discard(message_id)
        return self._inflight.pop(message_id, None) is not None

    def refused_too_big(self, ids: Iterable[int]) -> TooBig:
        """The server closed with 1009 on the frame that held ``ids`` (see the rules).

        Only messages still in flight are considered; the connection is over, so the caller
        ``clear()``s the window next, and the counted attempts must reach the store.
        """
        held = [self._inflight[n] for n in ids if n in self._inflight]
        result = TooBig()
        if len(held) > 1:
            result.split = [m.id for m in held]
            self.solo.update(result.split)
            return result
        for message in held:
            message.attempts += 1
            if self.max_attempts is not None and message.attempts >= self.max_attempts:
                del self._inflight[message.id]
                self.solo.discard(message.id)
                result.dead.append((message.id, message.attempts))
            else:
                result.counted.append((message.id, message.attempts))
        return result

    def expire(self, now: float, last_heard: float = float("inf")) -> Expired:
        """Apply the ack timeout at ``now`` (the rules in the module docstring).

        ``last_heard`` is when the latest ping that the server answered was *sent* (not when
        its pong came): a pong for a ping sent before a message says nothing about that
        message. The default counts every deadline that passes without progress.
        """
        result = Expired()
        while self._inflight:
            oldest = next(iter(self._inflight.values()))
            if oldest.sent_at + self.ack_timeout > now:
                break
            del self._inflight[oldest.id]
            if self._max_acked_seq < oldest.seq:  # nothing sent after it was acked
                if self._progress_at >= oldest.sent_at:
                    result.behind.append(oldest)
                    continue
                if last_heard < oldest.wire_at + self.ack_timeout:
                    result.unheard.append(oldest)
                    continue
            oldest.attempts += 1
            if self.max_attempts is not None and oldest.attempts >= self.max_attempts:
                self.solo.discard(oldest.id)
                result.dead.append(oldest)
            else:
                result.resend.append(oldest)
        for message in (*result.unheard, *result.behind):
            message.sent_at = now
            self._inflight[message.id] = message
        for message in result.resend:  # sent again now: after everything already out
            message.sent_at = message.wire_at = now
            self._seq += 1
            message.seq = self._seq
            self._inflight[message.id] = message
        return result

    def next_deadline(self) -> float | None:
        """When the oldest un-acked message times out, or None if nothing is in flight."""
        if not self._inflight:
            return None
        return next(iter(self._inflight.values())).sent_at + self.ack_timeout

    def clear(self) -> list[int]:
        """Forget everything (the connection dropped); return the ids that were in flight."""
        ids = list(self._inflight)
        self._inflight.clear()
        self._progress_at = float("-inf")
        return ids
