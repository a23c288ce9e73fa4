"""``max_pending`` with ``max_pending_wait``: send() waits for acks to make room, bounded.

A real receiver whose handler waits on a gate holds the acks back; real SQLite files.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from outbox import Outbox, QueueFullError, serve
from outbox.receiver import Incoming

from ..support import MS, fast_options, wait_until

NOWHERE = "ws://127.0.0.1:9/"  # nothing accepts: rows stay pending


async def test_send_waits_for_room_when_max_pending_wait_is_set(tmp_path: Path) -> None:
    gate = asyncio.Event()
    handled: list[object] = []

    async def handler(message: Incoming) -> None:
        handled.append(message.data)
        await gate.wait()

    options = fast_options(max_pending=3, max_pending_wait=30.0)
    async with (
        serve(handler, tmp_path / "inbox.db") as receiver,
        Outbox(tmp_path / "o.db", receiver.url, **options) as box,
    ):
        first = await box.send_many([1, 2, 3])
        blocked = asyncio.create_task(box.send(4))
        await wait_until(lambda: len(handled) >= 1)
        assert not blocked.done()  # nothing is acked while the handler waits: no room
        assert box.stats().pending == 3
        gate.set()
        fourth = await asyncio.wait_for(blocked, timeout=10)
        assert fourth == first[-1] + 1
        await box.drain(timeout=10)


async def test_send_raises_queue_full_after_max_pending_wait(tmp_path: Path) -> None:
    options = fast_options(max_pending=2, max_pending_wait=20 * MS)
    async with Outbox(tmp_path / "o.db", NOWHERE, **options) as box:
        await box.send_many([1, 2])
        with pytest.raises(QueueFullError, match="after waiting"):
            await box.send(3)
        assert box.stats().pending == 2


async def test_raising_at_once_stays_the_default(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db", NOWHERE, **fast_options(max_pending=1)) as box:
        await box.send(1)
        with pytest.raises(QueueFullError) as info:
            await box.send(2)
        assert "after waiting" not in str(info.value) and "max_pending_wait" in str(info.value)


async def test_more_than_the_whole_quota_is_refused_without_waiting(tmp_path: Path) -> None:
    options = fast_options(max_pending=2, max_pending_wait=None)
    async with Outbox(tmp_path / "o.db", NOWHERE, **options) as box:
        with pytest.raises(QueueFullError):
            await box.send_many([1, 2, 3])


def test_max_pending_wait_is_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="max_pending_wait"):
        Outbox("o.db", NOWHERE, max_pending_wait=-1)
    with pytest.raises(TypeError, match="max_pending_wait"):
        Outbox("o.db", NOWHERE, max_pending_wait="1")
