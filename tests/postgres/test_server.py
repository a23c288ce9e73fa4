"""The throwaway PostgreSQL server itself: it answers on 127.0.0.1, each test gets its own
database, and stopping it leaves no process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from ..postgres_server import PostgresServer

ROOT = Path(__file__).resolve().parent.parent.parent


def test_fresh_database_per_test(postgres: PostgresServer, pg_url: str) -> None:
    dbname = pg_url.rsplit("/", 1)[1]
    assert postgres.psql("SELECT current_database()", dbname).strip() == dbname
    assert postgres.psql("SELECT count(*) FROM pg_class WHERE relname = 'inbox'", dbname) == "0\n"
    assert pg_url.startswith("postgresql://") and "127.0.0.1" in pg_url


def test_a_second_server_stops_without_leaving_a_process(postgres: PostgresServer) -> None:
    with PostgresServer() as other:
        assert other.port != postgres.port
        pid = int(other.psql("SELECT pg_backend_pid()"))
        data = other._dir
        assert data is not None
        postmaster = int((data / "data" / "postmaster.pid").read_text().split()[0])
    assert not data.exists()
    for gone in (pid, postmaster):
        try:
            status = psutil.Process(gone).status()
        except psutil.NoSuchProcess:
            continue
        # A zombie has exited; init reaps it when it gets round to it.
        assert status == psutil.STATUS_ZOMBIE, f"process {gone} still {status} after stop()"


def test_no_binaries_is_a_clear_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no binaries exist the fixtures skip (or fail under CI) with this reason."""
    from .. import postgres_server

    monkeypatch.setenv("OUTBOX_PG_BINDIR", "/nonexistent")
    monkeypatch.setattr(postgres_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(postgres_server.glob, "glob", lambda pattern: [])
    with pytest.raises(postgres_server.Unavailable, match="postgresql-15"):
        postgres_server.find_bindir()


@pytest.mark.parametrize(("require", "outcome"), [("", "1 skipped"), ("1", "1 error")])
def test_fixtures_skip_without_binaries_unless_required(
    tmp_path: Path, require: str, outcome: str
) -> None:
    """A pytest run where no server can start: skipped with the reason, or (CI,
    OUTBOX_REQUIRE_POSTGRES=1) an error saying so."""
    plugin = tmp_path / "no_binaries.py"
    plugin.write_text(
        "from tests import postgres_server\n"
        "def start(self):\n"
        "    raise postgres_server.Unavailable('no PostgreSQL server binaries (test)')\n"
        "postgres_server.PostgresServer.start = start\n"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no_binaries",
            "-p",
            "no:randomly",
            "tests/postgres/test_server.py::test_fresh_database_per_test",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", **_require(require)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert outcome in run.stdout, run.stdout + run.stderr
    assert "no PostgreSQL server binaries (test)" in run.stdout
    if require:
        assert "OUTBOX_REQUIRE_POSTGRES=1" in run.stdout


def _require(value: str) -> dict[str, str]:
    return {"OUTBOX_REQUIRE_POSTGRES": value}
