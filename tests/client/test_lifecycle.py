"""Process and event-loop lifecycles: nothing is lost when the loop or the process ends."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from outbox import Outbox

from ..support import MS, ScriptedServer, fast_options, wait_until

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


# -- close(): a bounded flush ----------------------------------------------------------------


async def test_close_flushes_what_is_pending_while_connected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="outbox")
    async with ScriptedServer() as server:
        async with Outbox(
            tmp_path / "o.db", server.url, **fast_options(close_flush_timeout=10)
        ) as box:
            await box.send_many([{"n": n} for n in range(50)])
            # Leave at once: close() waits for the acks.
        assert sorted(server.unique_ids()) == list(range(1, 51))
    with sqlite3.connect(tmp_path / "o.db") as conn:
        assert conn.execute("SELECT count(*) FROM outbox WHERE status != 'acked'").fetchone() == (
            0,
        )
    assert any("closed: nothing pending" in r.getMessage() for r in caplog.records)


async def test_close_stops_flushing_at_its_timeout_and_logs_what_stays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="outbox")
    async with ScriptedServer(ack=False) as server:
        box = Outbox(tmp_path / "o.db", server.url, **fast_options(close_flush_timeout=50 * MS))
        await box.open()
        await box.send_many([1, 2, 3])
        await wait_until(lambda: len(server.received) == 3)
        await box.close()
    lines = [r for r in caplog.records if "stay pending on disk" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "3 message(s) stay pending" in lines[0].getMessage()


async def test_close_does_not_wait_when_the_server_is_unreachable(tmp_path: Path) -> None:
    server = ScriptedServer()
    await server.start()
    url = server.url
    await server.stop()
    # A flush timeout far beyond the test's own: close() must see the failed connection.
    box = Outbox(tmp_path / "o.db", url, **fast_options(close_flush_timeout=3600))
    await box.open()
    await box.send({"n": 1})
    async with asyncio.timeout(30):
        await box.close()
    assert box.stats().pending == 1


async def test_close_with_a_zero_flush_timeout_sends_nothing_more(tmp_path: Path) -> None:
    async with ScriptedServer(ack=False) as server:
        async with Outbox(tmp_path / "o.db", server.url, **fast_options()) as box:
            await box.send({"n": 1})
        assert box.stats().pending == 1  # fast_options: close_flush_timeout=0
