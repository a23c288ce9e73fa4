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
from websockets.exceptions import InvalidStatus

from outbox import Outbox
from outbox.cli import build_parser, main
from outbox.protocol import wire

ROOT = Path(__file__).resolve().parent.parent


def test_serve_needs_a_database() -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve"])
    assert info.value.code == 2


def test_a_command_is_required() -> None:
    with pytest.raises(SystemExit):
        main([])


async def start_serve(db: Path, *extra: str) -> asyncio.subprocess.Process:
    """``python -m outbox serve`` on a free port, its output piped for the test to read."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "outbox",
        "serve",
        "--db",
        str(db),
        "--port",
        "0",
        *extra,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_serve_prints_its_url_stores_messages_and_stops_on_a_signal(
    tmp_path: Path, signum: signal.Signals
) -> None:
    db = tmp_path / "inbox.db"
    process = await start_serve(db)
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
        assert b"trusted without authentication" in stderr  # no --token-file
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT client_id, message_id, payload FROM inbox").fetchall()
    assert rows == [("cli-test", 1, '{"n":1}'), ("cli-test", 2, '{"n":2}')]


async def stop(process: asyncio.subprocess.Process) -> bytes:
    """SIGTERM, wait, return stderr."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        _, stderr = await process.communicate()
    return stderr


async def test_serve_with_a_token_file_requires_a_known_bearer_token(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# token principal\n\ns3cret-a alice\n  s3cret-b   bob  \n")
    db = tmp_path / "inbox.db"
    process = await start_serve(db, "--token-file", str(tokens))
    try:
        assert process.stdout is not None
        async with asyncio.timeout(10):
            url = (await process.stdout.readline()).decode().strip()
        for auth in (None, "Bearer wrong", "Bearer s3cret-a extra", "Basic s3cret-a"):
            extra = {wire.CLIENT_ID_HEADER: "laptop"}
            if auth is not None:
                extra["Authorization"] = auth
            with pytest.raises(InvalidStatus) as info:
                await connect(url, additional_headers=extra)
            assert info.value.response.status_code == 401
        outbox_db = tmp_path / "outbox.db"
        headers = {"Authorization": "Bearer s3cret-b"}
        async with Outbox(outbox_db, url, additional_headers=headers) as box:
            await box.send({"from": "bob"})
            await box.drain(timeout=10)
            client = box.client_id
        stderr = await stop(process)
        assert process.returncode == 0, stderr.decode()
        assert b"trusted without authentication" not in stderr
        assert b"s3cret" not in stderr  # tokens are never logged
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT client_id, payload FROM inbox").fetchall()
    assert rows == [(f"bob/{client}", '{"from":"bob"}')]


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ("# ok\ngood alice\njust-a-token\n", b"line 3: expected 'TOKEN PRINCIPAL'"),
        ("a alice\nb bob carol\n", b"line 2: expected 'TOKEN PRINCIPAL'"),
        ("a alice\na bob\n", b"line 2: this token is already listed"),
        ("# nothing\n\n", b"lists no tokens"),
    ],
)
async def test_serve_refuses_a_malformed_token_file(
    tmp_path: Path, content: str, complaint: bytes
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(content)
    process = await start_serve(tmp_path / "inbox.db", "--token-file", str(tokens))
    async with asyncio.timeout(10):
        stdout, stderr = await process.communicate()
    assert process.returncode == 2
    assert stdout == b""
    assert complaint in stderr, stderr.decode()


async def test_serve_reports_an_unusable_database(tmp_path: Path) -> None:
    db = tmp_path / "not-a-db"
    db.write_bytes(b"this is not sqlite" * 100)
    process = await start_serve(db)
    async with asyncio.timeout(10):
        stdout, stderr = await process.communicate()
    assert process.returncode == 1
    assert stdout == b""
    assert b"not a usable SQLite database" in stderr


async def test_stats_reads_an_outbox_while_it_is_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "app-outbox.db"
    async with Outbox(db, "ws://127.0.0.1:9/", max_reconnect_attempts=0) as box:
        await box.send_many([1, 2, 3])
        client = box.client_id
        assert main(["stats", "--db", str(db)]) == 0  # read-only, beside the running app
    out = capsys.readouterr().out
    assert f"client id  {client}" in out and "pending    3" in out and "acked      0" in out
    assert "oldest pending: id 1" in out


def test_stats_says_when_the_file_is_missing_or_not_an_outbox(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stats", "--db", str(tmp_path / "nope.db")]) == 1
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    assert main(["stats", "--db", str(other)]) == 1
    err = capsys.readouterr().err
    assert "no such file" in err and "cannot read" in err
