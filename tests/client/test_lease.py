"""One sender per file: the lease, the standby, the takeover, and prompt pickup of rows
committed by other connections."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import outbox
from outbox.client import lease

from ..support import ScriptedServer, fast_options, wait_until


def test_the_lease_is_exclusive_and_released(tmp_path: Path) -> None:
    db = str(tmp_path / "app.db")
    first, second = lease.Lease(db), lease.Lease(db)
    assert lease.holder(db) == (False, None)
    assert first.try_acquire() and first.role == "active"
    assert not second.try_acquire() and second.role == "standby"
    held, pid = lease.holder(db)
    assert held and pid is not None
    assert not second.try_acquire()  # the probe did not disturb the holder
    first.release()
    assert lease.holder(db)[0] is False
    assert second.try_acquire()
    second.release()


async def test_a_second_outbox_is_a_standby_that_takes_over(
    db: Path, server: ScriptedServer
) -> None:
    active = await outbox.Outbox(db, server.url, **fast_options()).open()
    standby = await outbox.Outbox(db, server.url, **fast_options()).open()
    try:
        assert active.stats().role == "active"
        assert standby.stats().role == "standby"
        first = await active.send({"n": 1})
        await active.wait_acked(first, timeout=5)
        queued = await standby.send({"n": 2})  # commits; the active one sends it
        await wait_until(lambda: queued in server.unique_ids())
        assert server.connections == 1
        await active.close()
        await wait_until(lambda: standby.stats().role == "active")
        later = await standby.send({"n": 3})
        await standby.wait_acked(later, timeout=5)
    finally:
        await active.close()
        await standby.close()
    assert server.ids().count(queued) == 1


async def test_rows_from_other_connections_are_picked_up_without_a_rescan_wait(
    db: Path, server: ScriptedServer
) -> None:
    async with outbox.Outbox(db, server.url, **fast_options()) as box:
        await box.wait_acked(await box.send("warm-up"), timeout=5)
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            ids = outbox.enqueue_many(conn, ["a", "b"])
        # (A 1 s re-check would also deliver them; the latency is measured in the benchmark.)
        await wait_until(lambda: server.unique_ids() >= set(ids))
        assert box.stats().role == "active"
