"""The command line, run as a real process: ``python -m outbox serve``."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from outbox import wire
from outbox.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def test_serve_needs_a_database() -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve"])
    assert info.value.code == 2


def test_a_command_is_required() -> None:
    with pytest.raises(SystemExit):
        main([])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_serve_prints_its_url_stores_messages_and_stops_on_a_signal(
    tmp_path: Path, signum: signal.Signals
) -> None:
    db = tmp_path / "inbox.db"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "outbox",
        "serve",
        "--db",
        str(db),
        "--port",
        "0",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(10):
            url = (await process.stdout.readline()).decode().strip()
        assert url.startswith("ws://127.0.0.1:") and url.endswith("/")
        headers = {wire.CLIENT_ID_HEADER: "cli-test", wire.FEATURES_HEADER: "batch, batch-ack"}
        async with connect(url, additional_headers=headers) as ws:
            await ws.send(wire.encode_batch([(1, '{"n":1}'), (2, '{"n":2}')]))
            async with asyncio.timeout(5):
                assert json.loads(await ws.recv()) == {"type": "ack", "messageIds": [1, 2]}
        process.send_signal(signum)
        async with asyncio.timeout(10):
            _, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT client_id, message_id, payload FROM inbox").fetchall()
    assert rows == [("cli-test", 1, '{"n":1}'), ("cli-test", 2, '{"n":2}')]


async def test_serve_reports_an_unusable_database(tmp_path: Path) -> None:
    db = tmp_path / "not-a-db"
    db.write_bytes(b"this is not sqlite" * 100)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "outbox",
        "serve",
        "--db",
        str(db),
        "--port",
        "0",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(10):
        stdout, stderr = await process.communicate()
    assert process.returncode == 1
    assert stdout == b""
    assert b"not a usable SQLite database" in stderr
