"""Every code block of README.md runs as pasted, so the README cannot rot.

The ```python blocks run for real, each in its own process in a fresh directory: the
receiver example is started and waited for, then the client example runs against it, and the
files they leave are checked. The only change made to a block is its port (8765 becomes a
free one), so tests in parallel never collide. The ```sh block of "Operating it" then runs,
line by line, against those files. The first ```sh block (pip install, the benchmark, the
test suite) is what CI runs as its own steps, and the sqlite3 shell lines run only where the
sqlite3 program is installed.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README) if lang == language]


def section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else len(README)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def python_examples() -> tuple[str, str]:
    """(receiver, client): the Quickstart's two blocks."""
    found = [b for b in blocks("python") if b not in section("Metrics")]
    receivers = [b for b in found if "serve(" in b]
    clients = [b for b in found if "Outbox(" in b]
    transactional = [b for b in found if "outbox.enqueue(" in b]
    assert len(receivers) == 1 and len(clients) == 1 and len(transactional) == 1, found
    assert len(found) == 3, found
    return receivers[0], clients[0]


def transactional_example() -> str:
    """The "Use it as a transactional outbox" block."""
    [block] = [b for b in blocks("python") if "outbox.enqueue(" in b]
    return block


def test_the_transactional_example_runs_as_pasted(tmp_path: Path) -> None:
    (tmp_path / "example.py").write_text(transactional_example())
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    with sqlite3.connect(tmp_path / "app.db") as conn:
        assert conn.execute("SELECT id, total FROM orders").fetchall() == [(42, 9.5)]
        rows = conn.execute("SELECT status, key FROM outbox").fetchall()
    assert rows == [("pending", "order-42")]


def test_every_python_block_is_known() -> None:
    python_examples()  # a new block must get a place in this file


def test_the_metrics_example_runs_as_pasted(tmp_path: Path) -> None:
    (example,) = [b for lang, b in BLOCK.findall(section("Metrics")) if lang == "python"]
    (tmp_path / "metrics_example.py").write_text(example.replace("8765", str(free_port())))
    done = subprocess.run(
        [sys.executable, "metrics_example.py"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert 'outbox_rows{db="app-outbox.db",status="pending"} 1.0' in done.stdout, done.stdout
    assert "outbox_connection_state" in done.stdout


def sh_lines(body: str) -> list[str]:
    return [line for line in body.splitlines() if line.strip() and not line.startswith("#")]


async def test_the_readme_examples_run_as_pasted(tmp_path: Path) -> None:
    receiver_code, client_code = python_examples()
    port = str(free_port())
    (tmp_path / "receiver.py").write_text(receiver_code.replace("8765", port))
    (tmp_path / "client.py").write_text(client_code.replace("8765", port))
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    receiver = await asyncio.create_subprocess_exec(
        sys.executable,
        "-u",
        "receiver.py",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert receiver.stdout is not None
        async with asyncio.timeout(20):
            line = (await receiver.stdout.readline()).decode()
        assert line == f"listening on ws://127.0.0.1:{port}/\n", line
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            "client.py",
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            out, err = await client.communicate()
        assert client.returncode == 0, err.decode()
        assert out.decode().startswith("Stats(pending=0, acked=3, dead=0"), out.decode()
        assert b"WARNING" not in err and b"ERROR" not in err, err.decode()
    finally:
        receiver.kill()
        await receiver.wait()
    with sqlite3.connect(tmp_path / "inbox.db") as conn:
        orders = sorted(n for (n,) in conn.execute("SELECT n FROM orders"))
    assert orders == [1, 2, 42]  # the idempotent retry added nothing
    with sqlite3.connect(tmp_path / "app-outbox.db") as conn:
        statuses = conn.execute("SELECT status, count(*) FROM outbox GROUP BY status").fetchall()
    assert statuses == [("acked", 3)]

    # "Operating it", against the files the examples left.
    (operating,) = [b for lang, b in BLOCK.findall(section("Operating it")) if lang == "sh"]
    for line in sh_lines(operating):
        args = shlex.split(line, comments=True)
        assert args[:3] == ["python", "-m", "outbox"], line
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, *args[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            timeout=30,
        )
        assert done.returncode == 0, (line, done.stderr.decode())
        assert done.stdout, line
        if "--json" in args:
            json.loads(done.stdout)

    # The sqlite3 shell lines of "Inspecting the queue", where the program exists.
    (inspecting,) = [
        b for lang, b in BLOCK.findall(section("Inspecting the queue")) if lang == "sh"
    ]
    if shutil.which("sqlite3") is None:
        pytest.skip("the sqlite3 program is not installed: the shell lines were not run")
    done = await asyncio.to_thread(
        subprocess.run, inspecting, shell=True, cwd=tmp_path, capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stderr.decode()
