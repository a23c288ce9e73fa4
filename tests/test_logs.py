"""Peer-caused log lines are rate-limited: a flood of bad frames cannot flood the log."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from outbox import serve
from outbox.logs import PEERS, RateLimit

from .support import wait_until


def record(msg: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("outbox.test", level, __file__, 1, msg, args, None)


def test_at_most_burst_records_of_a_kind_per_interval_then_a_count() -> None:
    now = [0.0]
    limit = RateLimit(burst=3, interval=10.0, clock=lambda: now[0])
    passed = [limit.filter(record("client %r: bad frame", n)) for n in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert limit.filter(record("another kind %s", 1))  # counted apart
    now[0] = 10.0
    first = record("client %r: bad frame", 99)
    assert limit.filter(first)
    assert "[7 more like this in the last 10s]" in first.getMessage()


def test_levels_count_apart() -> None:
    limit = RateLimit(burst=1, interval=10.0, clock=lambda: 0.0)
    assert limit.filter(record("x"))
    assert limit.filter(record("x", level=logging.ERROR))
    assert not limit.filter(record("x"))


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        RateLimit(burst=0)


async def test_a_flood_of_bad_frames_logs_a_bounded_number_of_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="outbox")
    # A fresh limit: earlier tests in this process may have used up the shared one's window.
    monkeypatch.setattr(logging.getLogger(PEERS), "filters", [RateLimit()])
    async with serve(None, tmp_path / "inbox.db") as rx, connect(rx.url) as ws:
        for n in range(1, 501):
            try:
                await ws.send(f'{{"id": {n}, "type": "nonsense"}}')  # nacked, not fatal
            except ConnectionClosed:
                break
        await wait_until(lambda: rx.stats.protocol_errors >= 500, timeout=10)
        # Read the 500 nacks: a client that never reads is held back by the receiver (it
        # stops reading it), so its close frame would wait out the 10 s close timeout.
        nacks = 0
        async with asyncio.timeout(10):
            while nacks < 500:
                nacks += '"type":"nack"' in await ws.recv()
    lines = [r for r in caplog.records if r.name == PEERS and "nacked" in r.getMessage()]
    assert 1 <= len(lines) <= 40, len(lines)
    assert rx.stats.protocol_errors == 500  # counted in full, only the log is limited
