"""The heartbeat loop: ping after each interval of silence, by the rules of
``outbox.protocol.heartbeat``, until pongs are missed too often."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from ..protocol.heartbeat import HeartbeatMonitor, HeartbeatTimeout

logger = logging.getLogger("outbox")


async def run_heartbeat(
    monitor: HeartbeatMonitor,
    ping: Callable[[], Awaitable[Awaitable[object]]],
    clock: Callable[[], float],
    check_now: asyncio.Event | None = None,
) -> None:
    """Ping after each ``interval`` of silence until a pong is missed too often.

    ``ping`` sends one ping and returns an awaitable that completes on its pong. Setting
    ``check_now`` asks for a ping at once (the sender does, when acks are late and nothing
    else has come back). Raises HeartbeatTimeout when the connection should be closed and
    reopened.
    """
    ping_again = False  # after a missed pong, ping again at once rather than after a pause
    while True:
        quiet = monitor.quiet_for(clock())
        if check_now is not None and check_now.is_set():
            check_now.clear()
            ping_again = True
        if not ping_again and quiet < monitor.interval:
            if check_now is None:
                await asyncio.sleep(monitor.interval - quiet)
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(monitor.interval - quiet):  # not wait_for (3.11)
                        await check_now.wait()
            continue
        ping_again = False
        ping_at = clock()
        try:
            # Sending the ping is inside the deadline too: on a dead peer the write buffer
            # may never drain, and a ping that cannot be sent is as missed as its pong.
            async with asyncio.timeout(monitor.timeout):
                pong = await ping()
                await pong
        except TimeoutError:
            # Let frames already in the socket buffer reach the reader before judging.
            for _ in range(3):
                await asyncio.sleep(0)
            if monitor.pong_missed(ping_at=ping_at, now=clock()):
                raise HeartbeatTimeout(
                    f"no pong and no other frame for {monitor.missed} heartbeats in a row "
                    f"({monitor.timeout}s each); closing the connection to reconnect"
                ) from None
            if monitor.missed:
                logger.info("heartbeat: missed pong %d of %d", monitor.missed, monitor.max_missed)
            ping_again = not monitor.seen_since(ping_at)
        else:
            monitor.pong_received(ping_at=ping_at, now=clock())
