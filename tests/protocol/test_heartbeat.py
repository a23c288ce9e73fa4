"""Heartbeat: the pure HeartbeatMonitor rules, then run_heartbeat with a fake ping.

The fake ``ping`` hands back futures the test controls; no socket is involved. Intervals are
tens of milliseconds, and timing assertions are lower bounds or outcomes only.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import pytest

from outbox.client.heartbeat import run_heartbeat
from outbox.protocol.heartbeat import HeartbeatMonitor, HeartbeatTimeout

# -- HeartbeatMonitor ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval", "timeout", "max_missed"),
    [(0.0, 1.0, 1), (1.0, 0.0, 1), (-1.0, 1.0, 1), (1.0, 1.0, 0)],
)
def test_monitor_rejects_bad_settings(interval: float, timeout: float, max_missed: int) -> None:
    with pytest.raises(ValueError):
        HeartbeatMonitor(interval=interval, timeout=timeout, max_missed=max_missed)


def test_a_fresh_monitor_has_seen_nothing() -> None:
    monitor = HeartbeatMonitor(interval=1.0, timeout=1.0, max_missed=2)
    assert monitor.quiet_for(1000.0) == math.inf
    assert not monitor.seen_since(-1e9)
    assert (monitor.missed, monitor.total_missed) == (0, 0)


def test_missed_pongs_count_up_to_max_missed() -> None:
    monitor = HeartbeatMonitor(interval=1.0, timeout=1.0, max_missed=3)
    assert monitor.pong_missed(ping_at=0.0, now=1.0) is False
    assert monitor.pong_missed(ping_at=1.0, now=2.0) is False
    assert monitor.missed == 2
    assert monitor.pong_missed(ping_at=2.0, now=3.0) is True
    assert (monitor.missed, monitor.total_missed) == (3, 3)


def test_a_frame_resets_the_missed_count_but_not_the_total() -> None:
    monitor = HeartbeatMonitor(interval=1.0, timeout=1.0, max_missed=2)
    assert monitor.pong_missed(ping_at=0.0, now=1.0) is False
    monitor.frame_received(1.5)
    assert monitor.missed == 0
    assert monitor.quiet_for(4.0) == 2.5
    assert monitor.pong_missed(ping_at=2.0, now=3.0) is False
    assert monitor.pong_missed(ping_at=3.0, now=4.0) is True
    assert monitor.total_missed == 3


def test_any_frame_after_the_ping_counts_as_the_pong() -> None:
    monitor = HeartbeatMonitor(interval=1.0, timeout=1.0, max_missed=1)
    monitor.frame_received(5.0)  # exactly at ping time: counts
    assert monitor.pong_missed(ping_at=5.0, now=6.0) is False
    assert monitor.missed == 0
    # A frame from before the ping does not.
    assert monitor.pong_missed(ping_at=5.5, now=6.5) is True


def test_a_deadline_seen_more_than_twice_late_is_a_blocked_loop_not_a_miss() -> None:
    monitor = HeartbeatMonitor(interval=1.0, timeout=1.0, max_missed=2)
    assert monitor.pong_missed(ping_at=0.0, now=1.0) is False
    assert monitor.pong_missed(ping_at=1.0, now=3.001) is False  # blocked: not counted
    assert (monitor.missed, monitor.total_missed) == (1, 1)
    assert monitor.pong_missed(ping_at=10.0, now=12.0) is True  # exactly 2x late: counted


# -- run_heartbeat ---------------------------------------------------------------------------

INTERVAL = 0.01
TIMEOUT = 0.03  # round trips slower than 2 * TIMEOUT on a busy machine would not count


class FakePeer:
    """A ``ping`` callable: records each ping and returns a pong future the test controls."""

    def __init__(
        self,
        *,
        answer: bool = False,
        on_ping: Callable[[int], None] | None = None,
        stop_after: int | None = None,
    ) -> None:
        self.answer = answer
        self.on_ping = on_ping
        self.stop_after = stop_after
        self.pings: list[float] = []
        self.enough = asyncio.Event()

    async def ping(self) -> asyncio.Future[None]:
        self.pings.append(time.monotonic())
        pong: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.answer:
            pong.set_result(None)
        if self.on_ping is not None:
            self.on_ping(len(self.pings))
        if self.stop_after is not None and len(self.pings) >= self.stop_after:
            self.enough.set()
        return pong


def monitor(max_missed: int, interval: float = INTERVAL) -> HeartbeatMonitor:
    return HeartbeatMonitor(interval=interval, timeout=TIMEOUT, max_missed=max_missed)


async def run_until_enough(mon: HeartbeatMonitor, peer: FakePeer) -> None:
    """Run the heartbeat until the peer saw enough pings; fail if it ended on its own."""
    task = asyncio.create_task(run_heartbeat(mon, peer.ping, time.monotonic))
    enough = asyncio.create_task(peer.enough.wait())
    try:
        done, _ = await asyncio.wait({task, enough}, timeout=5, return_when="FIRST_COMPLETED")
        assert enough in done, "the peer never got enough pings"
        assert not task.done(), f"the heartbeat ended: {task.exception()!r}"
    finally:
        task.cancel()
        enough.cancel()
        await asyncio.gather(task, enough, return_exceptions=True)
    assert task.cancelled()


async def test_silence_raises_after_max_missed_pings() -> None:
    mon, peer = monitor(max_missed=3), FakePeer()
    start = time.monotonic()
    with pytest.raises(HeartbeatTimeout, match="3 heartbeats"):
        await asyncio.wait_for(run_heartbeat(mon, peer.ping, time.monotonic), 5)
    assert len(peer.pings) >= 3
    assert mon.total_missed == 3
    assert time.monotonic() - start >= 3 * TIMEOUT


async def test_a_missed_pong_is_followed_by_a_ping_at_once_not_after_the_interval() -> None:
    # With a 10 s interval, three misses within 2 s means no pause between the pings.
    mon, peer = monitor(max_missed=3, interval=10.0), FakePeer()
    with pytest.raises(HeartbeatTimeout):
        await asyncio.wait_for(run_heartbeat(mon, peer.ping, time.monotonic), 2)
    assert len(peer.pings) >= 3


async def test_pongs_keep_the_connection_alive_and_pings_wait_for_silence() -> None:
    mon, peer = monitor(max_missed=1), FakePeer(answer=True, stop_after=6)
    await run_until_enough(mon, peer)
    assert (mon.missed, mon.total_missed) == (0, 0)
    gaps = [b - a for a, b in zip(peer.pings, peer.pings[1:], strict=False)]
    assert all(gap >= INTERVAL for gap in gaps), gaps


async def test_a_recent_frame_delays_the_first_ping_by_the_interval() -> None:
    mon, peer = monitor(max_missed=1, interval=0.05), FakePeer(answer=True, stop_after=1)
    seen = time.monotonic()
    mon.frame_received(seen)
    await run_until_enough(mon, peer)
    assert peer.pings[0] - seen >= 0.05


async def test_frames_arriving_while_a_pong_is_awaited_count_as_pongs() -> None:
    mon = monitor(max_missed=1)

    def ack_arrives_soon(_: int) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(TIMEOUT / 3, lambda: mon.frame_received(time.monotonic()))

    peer = FakePeer(answer=False, on_ping=ack_arrives_soon, stop_after=5)
    await run_until_enough(mon, peer)
    assert mon.total_missed == 0


def block_inside_ping(blocked: int) -> Callable[[int], None]:
    def on_ping(n: int) -> None:
        if n <= blocked:
            time.sleep(2.5 * TIMEOUT)

    return on_ping


def block_right_after_ping(blocked: int) -> Callable[[int], None]:
    def on_ping(n: int) -> None:
        if n <= blocked:
            asyncio.get_running_loop().call_soon(time.sleep, 2.5 * TIMEOUT)

    return on_ping


@pytest.mark.parametrize("blocker", [block_inside_ping, block_right_after_ping])
async def test_a_round_in_which_the_loop_was_blocked_does_not_count(
    blocker: Callable[[int], Callable[[int], None]],
) -> None:
    blocked, max_missed = 2, 2
    mon, peer = monitor(max_missed=max_missed), FakePeer(on_ping=blocker(blocked))
    with pytest.raises(HeartbeatTimeout):
        await asyncio.wait_for(run_heartbeat(mon, peer.ping, time.monotonic), 5)
    # Had the blocked rounds counted, it would have given up after max_missed pings.
    assert len(peer.pings) >= blocked + max_missed
    assert mon.total_missed == max_missed


async def test_a_ping_slow_to_send_on_a_dead_connection_still_times_out() -> None:
    # websockets' ping() awaits drain(): on a dead peer with a full write buffer it is
    # suspended (the loop runs), which must count as a miss, not as a blocked loop.
    mon = monitor(max_missed=2)

    async def slow_ping() -> asyncio.Future[None]:
        await asyncio.sleep(3 * TIMEOUT)  # the write buffer drains slowly; the loop runs
        return asyncio.get_running_loop().create_future()  # the pong never comes

    with pytest.raises(HeartbeatTimeout):
        await asyncio.wait_for(run_heartbeat(mon, slow_ping, time.monotonic), 0.5)
    assert mon.total_missed == 2


async def test_a_ping_that_never_gets_sent_times_out() -> None:
    # The write buffer never drains: the send itself is inside the pong deadline.
    mon = monitor(max_missed=2)

    async def stuck_ping() -> asyncio.Future[None]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    with pytest.raises(HeartbeatTimeout):
        await asyncio.wait_for(run_heartbeat(mon, stuck_ping, time.monotonic), 0.5)
    assert mon.total_missed == 2
