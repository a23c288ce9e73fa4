"""The client's low-water mark on a real outbox file: only acked rows are below it."""

from __future__ import annotations

from pathlib import Path

from outbox import Outbox

from ..support import ScriptedServer, fast_options

NOWHERE = "ws://127.0.0.1:9/"


async def mark(box: Outbox) -> int:
    store = box._store
    assert store is not None
    return await store.low_water_mark()


async def test_an_empty_file_and_pending_rows_hold_the_mark(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "outbox.db", NOWHERE, **fast_options()) as box:
        assert await mark(box) == 1
        await box.send_many([{"n": n} for n in range(5)])
        assert await mark(box) == 1  # nothing acked: every row may still be sent


async def test_dead_rows_hold_the_mark_they_may_be_requeued(tmp_path: Path) -> None:
    async with (
        ScriptedServer(nack={3: "no"}) as server,
        Outbox(tmp_path / "outbox.db", server.url, **fast_options()) as box,
    ):
        await box.send_many([{"n": n} for n in range(10)])
        await box.drain(timeout=10)
        assert box.stats().dead == 1
        assert await mark(box) == 3  # 1, 2 acked; 3 dead and may come back
        server.nack.clear()
        assert await box.requeue_dead() == 1
        await box.drain(timeout=10)
        await box._store.flush()  # type: ignore[union-attr]
        assert await mark(box) == 11  # all acked: the next id


async def test_expired_rows_hold_the_mark(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "outbox.db", NOWHERE, **fast_options()) as box:
        await box.send({"n": 1}, ttl=0.001)
        await box.send({"n": 2})
        store = box._store
        assert store is not None
        await store.expire(through=float("inf"))
        await store.flush()
        assert (await store.status(1))[0] == "expired"
        assert await mark(box) == 1
