"""``outbox relay`` and the sender line of ``outbox stats``: flags, bad input, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import outbox
from outbox.cli import build_parser, main
from outbox.relay import options_from_args

from .chaos_support import ROOT
from .support import ScriptedServer, fast_options


def relay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outbox", "relay", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )


def test_a_missing_database_is_refused_and_not_created(tmp_path: Path) -> None:
    db = tmp_path / "missing.db"
    done = relay("--db", str(db), "--url", "ws://127.0.0.1:1/")
    assert done.returncode == 1
    assert "no such database" in done.stderr
    assert not db.exists()


def test_a_bad_url_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    outbox.migrate(db)
    done = relay("--db", str(db), "--url", "http://example.com/")
    assert done.returncode == 2
    assert "not a WebSocket URL" in done.stderr


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "junk.db"
    db.write_bytes(b"not a database at all" * 100)
    done = relay("--db", str(db), "--url", "ws://127.0.0.1:1/")
    assert done.returncode == 1
    assert "not a usable SQLite database" in done.stderr


def test_every_option_is_a_flag() -> None:
    args = build_parser().parse_args(
        ["relay", "--db", "a.db", "--url", "ws://h/", "--ack-timeout", "2", "--no-batch",
         "--max-attempts", "none", "--synchronous", "normal", "--header", "Authorization: x"]
    )  # fmt: skip
    options = options_from_args(args)
    assert set(options) == {f for f in outbox.client.Options.__dataclass_fields__}
    assert options["ack_timeout"] == 2.0 and options["batch"] is False
    assert options["max_attempts"] is None and options["synchronous"] == "NORMAL"
    assert options["additional_headers"] == {"Authorization": "x"}
    assert outbox.client.Options(**options).ack_timeout == 2.0
    defaults = options_from_args(build_parser().parse_args(["relay", "--db", "a", "--url", "u"]))
    assert outbox.client.Options(**defaults) == outbox.client.Options()


async def test_stats_names_the_active_sender(
    tmp_path: Path, server: ScriptedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "app.db"
    outbox.migrate(db)
    assert main(["stats", "--db", str(db)]) == 0
    assert "sender     none" in capsys.readouterr().out
    async with outbox.Outbox(db, server.url, **fast_options()) as box:
        assert main(["stats", "--db", str(db)]) == 0
        assert "sender     active (pid" in capsys.readouterr().out
        assert box.stats().role == "active"  # the probe did not take the lease away
