"""``python -m outbox serve --db postgresql://...`` as a real process, on a real server."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import asyncpg
from websockets.asyncio.client import connect

from outbox.protocol import wire

ROOT = Path(__file__).resolve().parent.parent.parent


async def run_serve(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "outbox",
        "serve",
        "--port",
        "0",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_serve_stores_messages_in_postgresql_and_stops_on_sigterm(pg_url: str) -> None:
    process = await run_serve("--db", pg_url)
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            url = (await process.stdout.readline()).decode().strip()
        assert url.startswith("ws://127.0.0.1:"), url
        headers = {wire.CLIENT_ID_HEADER: "cli-pg", wire.FEATURES_HEADER: "batch, batch-ack"}
        async with connect(url, additional_headers=headers) as ws:
            await ws.send(wire.encode_batch([(1, '{"n":1}'), (2, '{"n":2}')]))
            async with asyncio.timeout(10):
                assert json.loads(await ws.recv()) == {"type": "ack", "messageIds": [1, 2]}
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            _, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT client_id, message_id, payload FROM inbox ORDER BY 2")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("cli-pg", 1, '{"n":1}'), ("cli-pg", 2, '{"n":2}')]


async def test_serve_refuses_synchronous_and_reports_an_unreachable_server() -> None:
    process = await run_serve("--db", "postgresql://u@127.0.0.1:5432/db", "--synchronous", "OFF")
    async with asyncio.timeout(20):
        _, stderr = await process.communicate()
    assert process.returncode == 2
    assert b"synchronous applies to a SQLite inbox only" in stderr
    process = await run_serve("--db", "postgresql://u:pw@127.0.0.1:1/db")
    async with asyncio.timeout(30):
        _, stderr = await process.communicate()
    assert process.returncode == 1
    assert b"cannot reach PostgreSQL at postgresql://u:***@127.0.0.1:1/db" in stderr, stderr
    assert b"pw" not in stderr
