"""Process and event-loop lifecycles: nothing is lost when the loop or the process ends."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from outbox import Outbox

from ..support import ScriptedServer

LEAVE_WITHOUT_CLOSING = textwrap.dedent(
    """
    import asyncio, sys
    from outbox import Outbox

    async def main():
        box = Outbox(sys.argv[1], sys.argv[2], reconnect_interval=0.01,
                     reconnect_max_interval=0.02)
        await box.open()
        await box.send_many([{"n": i} for i in range(10)])
        print("sent", flush=True)
        # No close(): asyncio.run() cancels the remaining tasks and closes the loop.

    asyncio.run(main())
    """
)


async def test_loop_closed_without_close_keeps_rows_and_exits(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    server = ScriptedServer()
    await server.start()
    url = server.url
    await server.stop()  # nobody listens: the rows must wait on disk
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", LEAVE_WITHOUT_CLOSING, str(db), url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "sent" in done.stdout
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM outbox WHERE status = 'pending'").fetchone() == (
            10,
        )
    await server.start()
    try:
        async with Outbox(db, url, reconnect_interval=0.01) as box:
            await box.drain(timeout=5)
    finally:
        await server.stop()
    assert [r.data for r in server.received] == [{"n": i} for i in range(10)]


async def test_close_is_idempotent_and_stops_every_task(tmp_path: Path) -> None:
    async with ScriptedServer() as server:
        box = Outbox(tmp_path / "o.db", server.url)
        before = asyncio.all_tasks()
        await box.open()
        await box.wait_acked(await box.send("x"), timeout=5)
        await box.close()
        await box.close()
        assert asyncio.all_tasks() - before == set()
