"""Heartbeat: notice a connection that is silently dead, and only one that is.

``HeartbeatMonitor`` is the pure rule set (time passed in); ``outbox.client.heartbeat`` is
the thin loop that pings over a real connection. Two things keep it from declaring a healthy
connection dead:

- any frame from the server (an ack, a pong) is a sign of life: the connection is pinged
  only after ``interval`` seconds of silence, and a frame arriving while a pong is awaited
  counts as the pong;
- a blocked event loop is not a missed pong: when the pong deadline is observed much later
  than it was due, the loop itself was stalled (the pong may sit unread in the socket
  buffer), so that round does not count.
"""

from __future__ import annotations

import logging

from ..errors import OutboxError

logger = logging.getLogger("outbox")


class HeartbeatTimeout(OutboxError):
    """max_missed_heartbeats pongs in a row did not come: the connection is presumed dead."""


class HeartbeatMonitor:
    """Counts missed pongs; ``frame_received`` resets the count."""

    def __init__(self, *, interval: float, timeout: float, max_missed: int) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("heartbeat_interval and heartbeat_timeout must be positive")
        if max_missed < 1:
            raise ValueError(f"max_missed_heartbeats must be at least 1, got {max_missed}")
        self.interval = interval
        self.timeout = timeout
        self.max_missed = max_missed
        self.missed = 0
        self.total_missed = 0
        self.last_seen = float("-inf")
        self.answered_ping_at = float("-inf")
        """When the latest ping whose pong came back was sent (the ack window's evidence
        that the server read everything sent before it)."""

    def frame_received(self, now: float) -> None:
        self.last_seen = now
        self.missed = 0

    def pong_received(self, *, ping_at: float, now: float) -> None:
        """The pong for the ping sent at ``ping_at`` came back at ``now``."""
        self.frame_received(now)
        self.answered_ping_at = max(self.answered_ping_at, ping_at)

    def quiet_for(self, now: float) -> float:
        return now - self.last_seen

    def seen_since(self, when: float) -> bool:
        return self.last_seen >= when

    def pong_missed(self, *, ping_at: float, now: float) -> bool:
        """Record a pong deadline passing; True when the connection should be dropped.

        A deadline noticed more than twice as late as it was due means the event loop was
        blocked, so it is not counted (the caller pings again).
        """
        if self.seen_since(ping_at):
            self.missed = 0
            return False
        if now - ping_at > 2 * self.timeout:
            logger.warning(
                "heartbeat: the event loop was blocked for %.3fs; not counting a missed pong",
                now - ping_at - self.timeout,
            )
            return False
        self.missed += 1
        self.total_missed += 1
        return self.missed >= self.max_missed
