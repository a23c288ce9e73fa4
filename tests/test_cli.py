"""The command line, run as a real process: ``python -m outbox serve``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from outbox import Outbox, serve
from outbox.cli import build_parser, main
from outbox.protocol import wire

from .support import ScriptedServer, fast_options, wait_until

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
    assert "no such file" in err and "neither an outbox nor an inbox" in err


# -------------------------------------------------------------------------------------------
# First run: --log-level anywhere, --version, one-line errors
# -------------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``python -m outbox ARGS`` as a real process; its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "outbox", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_log_level_goes_before_or_after_the_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["--log-level", "debug", "stats", "--db", "x"]).log_level == "DEBUG"
    assert parser.parse_args(["stats", "--db", "x", "--log-level", "error"]).log_level == "ERROR"
    assert parser.parse_args(["stats", "--db", "x"]).log_level == "INFO"


def test_version() -> None:
    done = run_cli("--version")
    assert done.returncode == 0 and re.fullmatch(r"outbox \S+\n", done.stdout), done


def test_serve_refuses_a_bad_port_in_one_line(tmp_path: Path) -> None:
    done = run_cli("serve", "--db", str(tmp_path / "inbox.db"), "--port", "99999")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "outbox serve: port must be in 0..65535 (0 picks a free port), got 99999"
    ]
    assert not (tmp_path / "inbox.db").exists()


# -------------------------------------------------------------------------------------------
# Operator commands, against real files, some with an Outbox running on them
# -------------------------------------------------------------------------------------------


async def outbox_with_dead_rows(db: Path, server: ScriptedServer) -> list[int]:
    """Five messages through a real Outbox: ids 2 and 4 nacked (dead), the rest acked."""
    server.nack = {2: "no such order", 4: "no such order"}
    async with Outbox(db, server.url, **fast_options()) as box:
        ids = await box.send_many([{"n": n} for n in range(1, 6)])
        await box.drain(timeout=10)
        await wait_until(lambda: box.stats().dead == 2)
    return ids


async def test_list_shows_rows_as_a_table_and_as_json(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    async with ScriptedServer() as server:
        await outbox_with_dead_rows(db, server)
    table = run_cli("list", "--db", str(db))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["id", "status", "attempts", "age", "last_error", "payload"]
    assert lines[2].split()[:2] == ["2", "dead"] and "nack: no such order" in lines[2]
    assert '{"n":2}' in lines[2] and len(lines) == 6
    dead = run_cli("list", "--db", str(db), "--status", "dead", "--json")
    rows = json.loads(dead.stdout)
    assert [(r["id"], r["status"], r["last_error"]) for r in rows] == [
        (2, "dead", "nack: no such order"),
        (4, "dead", "nack: no such order"),
    ]
    assert run_cli("list", "--db", str(db), "--limit", "1", "--json").stdout.count('"id"') == 1
    assert run_cli("list", "--help").stdout.startswith("usage: outbox list")


async def test_requeue_while_an_outbox_runs_on_the_file(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    async with ScriptedServer() as server:
        await outbox_with_dead_rows(db, server)
        server.nack.clear()
        # The app runs on the file (connected, sending) while the command changes it.
        async with Outbox(db, server.url, **fast_options(busy_timeout=10.0)) as box:
            sending = asyncio.gather(*(box.send({"during": n}) for n in range(200)))
            done = await asyncio.to_thread(
                run_cli, "requeue", "--db", str(db), "--id", "2", "3", "9999"
            )
            new_ids = await sending
            assert done.returncode == 0, done.stderr
            assert done.stdout.splitlines() == [
                "requeued 1 dead row(s) to pending: 2",
                "left 3 as it is: it is acked, not dead",
                "left 9999 as it is: it is missing, not dead",
            ]
            await box.wait_acked(new_ids[-1], timeout=10)  # the app goes on undisturbed
            # The running app sends a requeued row itself, at its next re-check of the pending
            # rows (an old id made pending again is not a new id that its watcher would see).
            await wait_until(lambda: status_of(db, 2) == "acked", timeout=10)
            everything = await asyncio.to_thread(
                run_cli, "requeue", "--db", str(db), "--dead", "--json"
            )
            assert json.loads(everything.stdout) == {"requeued": [4], "skipped": {}}
            await wait_until(lambda: status_of(db, 4) == "acked", timeout=10)


def status_of(db: Path, row_id: int) -> str | None:
    """A row's status, read on a connection of the test's own (None if missing)."""
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT status FROM outbox WHERE id = ?", (row_id,)).fetchone()
    return None if row is None else str(row[0])


async def test_purge_deletes_in_chunks_and_never_reuses_an_id(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    async with Outbox(db, "ws://127.0.0.1:9/", max_reconnect_attempts=0) as box:
        await box.send({"first": True})
    old, now = time.time() - 3 * 86400, time.time()
    with sqlite3.connect(db) as conn:  # 12,000 acked rows, three days old, and one fresh
        conn.executemany(
            "INSERT INTO outbox (payload, status, created_at, updated_at) "
            "VALUES ('{}', 'acked', ?, ?)",
            [(old, old)] * 12_000,
        )
        conn.execute(
            "INSERT INTO outbox (payload, status, created_at, updated_at) "
            "VALUES ('{}', 'acked', ?, ?)",
            (now, now),
        )
        top = conn.execute("SELECT max(id) FROM outbox").fetchone()[0]
    done = run_cli("purge", "--db", str(db), "--acked", "--older-than", "2d")
    assert done.returncode == 0 and done.stdout == "deleted 12000 acked row(s) older than 172800s\n"
    everything = run_cli("purge", "--db", str(db), "--acked", "--json")
    assert json.loads(everything.stdout)["deleted"] == 1
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status FROM outbox").fetchall() == [("pending",)]
    async with Outbox(db, "ws://127.0.0.1:9/", max_reconnect_attempts=0) as box:
        assert await box.send({"after": "purge"}) == top + 1  # not an id handed out before


def test_purge_refuses_what_it_should_not_do(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    for args, complaint in [
        (["--acked", "--older-than", "5x"], "'5x' is not a duration: use a number and a unit"),
        (["--dead"], "--dead needs --older-than DURATION"),
        ([], "one of the arguments --acked --dead is required"),
    ]:
        done = run_cli("purge", "--db", str(db), *args)
        assert done.returncode == 2 and complaint in done.stderr, (args, done.stderr)
    done = run_cli("purge", "--db", str(db), "--acked")
    assert done.returncode == 1 and f"no such file {db}" in done.stderr
    assert not db.exists()  # never created


async def test_stats_list_and_writes_on_an_inbox(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox.db"
    async with (
        serve(None, inbox) as receiver,
        Outbox(tmp_path / "a.db", receiver.url, **fast_options()) as box,
    ):
        await box.send_many([{"n": 1}, {"n": 2}])
        await box.drain(timeout=10)
        client = box.client_id
    stats = run_cli("stats", "--db", str(inbox))
    assert stats.returncode == 0, stats.stderr
    lines = stats.stdout.splitlines()
    assert lines[:4] == [f"inbox      {inbox}", "rows       2", "rejected   0", "clients    1"]
    assert any(line.split()[:3] == [client, "2", "2"] for line in lines)
    as_json = json.loads(run_cli("stats", "--db", str(inbox), "--json").stdout)
    assert as_json["kind"] == "inbox" and as_json["latest"][0]["client_id"] == client
    listed = json.loads(run_cli("list", "--db", str(inbox), "--json").stdout)
    assert sorted(r["message_id"] for r in listed) == [1, 2]  # one commit: same received_at
    for command in (["requeue", "--dead"], ["purge", "--acked"]):
        done = run_cli(*command, "--db", str(inbox))
        assert done.returncode == 1 and "is an inbox, not an outbox" in done.stderr


async def test_stats_watch_prints_counts_and_rates(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    async with Outbox(db, "ws://127.0.0.1:9/", max_reconnect_attempts=0) as box:
        await box.send_many([1, 2, 3])
        done = await asyncio.to_thread(
            run_cli,
            "stats",
            "--db",
            str(db),
            "--watch",
            "--interval",
            "0.05",
            "--count",
            "2",
            "--json",
        )
    assert done.returncode == 0, done.stderr
    first, second = (json.loads(line) for line in done.stdout.splitlines())
    assert first["pending"] == 3 and first["acked_per_second"] is None
    assert second["enqueued_per_second"] == 0.0 and second["oldest_pending_age"] >= 0
    table = run_cli("stats", "--db", str(db), "--watch", "--interval", "0.05", "--count", "1")
    assert table.stdout.splitlines()[0].split()[:4] == ["time", "pending", "acked", "dead"]


def test_stats_says_what_a_file_is_not(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    done = run_cli("stats", "--db", str(other))
    assert done.returncode == 1 and "neither an outbox nor an inbox" in done.stderr
    done = run_cli("list", "--db", str(tmp_path))
    assert done.returncode == 1 and "is a directory" in done.stderr
