"""SIGTERM on a real ``python -m outbox serve`` drains and exits 0; ``outbox health`` probes
it. A real Outbox client streams across the restart: nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import pytest

from outbox import Outbox

from .chaos_support import check_end_state
from .support import MS, fast_options, wait_until
from .test_cli import ROOT, run_cli, start_serve


async def outbox_health(*args: str) -> tuple[int, str]:
    """``python -m outbox health ...`` as a process: its exit status and stdout."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "outbox",
        "health",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        stdout, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode()


async def url_of(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(10):
        return (await process.stdout.readline()).decode().strip()


async def terminate(process: asyncio.subprocess.Process) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        _, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stderr.decode()


async def test_sigterm_drains_a_streaming_client_and_exits_0(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="outbox")
    inbox = tmp_path / "inbox.db"
    outbox_db = tmp_path / "outbox.db"
    first = await start_serve(inbox, "--drain-timeout", "5")
    second: asyncio.subprocess.Process | None = None
    stop = asyncio.Event()
    try:
        url = await url_of(first)
        port = url.rsplit(":", 1)[1].rstrip("/")
        assert await outbox_health(url) == (0, "ready (HTTP 200)\n")
        options = fast_options(reconnect_interval=50 * MS, reconnect_max_interval=200 * MS)
        async with Outbox(outbox_db, url, **options) as box:

            async def produce() -> None:
                while not stop.is_set():
                    await box.send_many([{"n": n} for n in range(5)])
                    await asyncio.sleep(10 * MS)

            producer = asyncio.ensure_future(produce())
            await wait_until(lambda: box.stats().acked >= 100, timeout=20)
            code, stderr = await terminate(first)
            assert code == 0, stderr
            assert "draining 1 connection(s)" in stderr and "drained in" in stderr, stderr
            status, said = await outbox_health(url)
            assert status == 1 and said.startswith("unreachable:"), said
            acked_before = box.stats().acked
            second = await start_serve(inbox, "--port", port)
            assert await url_of(second) == url
            await wait_until(lambda: box.stats().acked >= acked_before + 100, timeout=20)
            stop.set()
            await producer
            await box.drain(timeout=30)
        code, stderr = await terminate(second)
        assert code == 0, stderr
    finally:
        stop.set()
        for process in (first, second):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()
    state = check_end_state(outbox_db, inbox, context="SIGTERM drain")
    assert state.acked == state.delivered == state.messages
    assert any("(code 1012," in r.getMessage() for r in caplog.records)


async def test_health_command_refuses_a_bad_url() -> None:
    status, _ = await outbox_health("not-a-url")
    assert status == 2


async def test_serve_health_path_moves_the_probe(tmp_path: Path) -> None:
    process = await start_serve(tmp_path / "inbox.db", "--health-path", "/up")
    try:
        url = await url_of(process)
        assert await outbox_health(url, "--path", "/up") == (0, "ready (HTTP 200)\n")
        status, said = await outbox_health(url)  # /healthz is a WebSocket path again
        assert status == 1 and "HTTP 426" in said, said
        code, stderr = await terminate(process)
        assert code == 0, stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_serve_refuses_a_bad_health_path_or_drain_timeout(tmp_path: Path) -> None:
    for flag, value, words in [
        ("--health-path", "up", "health_path must be a URL path starting with '/'"),
        ("--drain-timeout", "-1", "drain_timeout must be a number of seconds >= 0"),
    ]:
        done = run_cli("serve", "--db", str(tmp_path / "inbox.db"), flag, value)
        assert done.returncode == 2 and words in done.stderr, done.stderr
