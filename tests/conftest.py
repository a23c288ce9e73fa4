"""Fixtures shared across test modules (a module's own fixture of the same name wins).

``db`` and ``server``: an outbox file and a scripted seed-style server for client tests.
``inbox_db``, ``outbox_db`` and ``receiver``: for the fault suites, a receiver whose handler
records an effect per message through the inbox transaction, and the two SQLite files
``chaos_support.check_end_state`` reads at the end of a scenario.
``postgres`` (session) and ``pg_url`` (a fresh database per test): a throwaway PostgreSQL server
(tests/postgres_server.py); they skip where no PostgreSQL binaries exist, and fail instead
under ``OUTBOX_REQUIRE_POSTGRES=1`` (CI).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from outbox import Receiver, logs, serve

from .chaos_support import create_effects_table, record_effect
from .postgres_server import PostgresServer, Unavailable, required
from .support import ScriptedServer


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    async with ScriptedServer() as srv:
        yield srv


@pytest.fixture
def inbox_db(tmp_path: Path) -> Path:
    path = tmp_path / "inbox.db"
    create_effects_table(path)
    return path


@pytest.fixture
def outbox_db(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


@pytest.fixture
async def receiver(inbox_db: Path) -> AsyncIterator[Receiver]:
    async with serve(record_effect, inbox_db) as rx:
        yield rx


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the whole session, stopped (no process left) at the
    end. Skips without binaries; with OUTBOX_REQUIRE_POSTGRES=1 a missing server fails."""
    server = PostgresServer()
    try:
        server.start()
    except Unavailable as exc:
        if required():
            pytest.fail(f"OUTBOX_REQUIRE_POSTGRES=1 but {exc}", pytrace=False)
        pytest.skip(f"PostgreSQL tests skipped: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A fresh, empty database on the session's server, as a postgresql:// URL."""
    return postgres.create_database()


@pytest.fixture(autouse=True)
def fresh_log_limits() -> None:
    """Each test starts with fresh rate limits on the peer-caused log lines (outbox.logs):
    what earlier tests logged must not hide the lines a later test looks for."""
    for name in (logs.PEERS, logs.WEBSOCKETS):
        logger = logging.getLogger(name)
        logger.filters = [
            logs.RateLimit() if isinstance(f, logs.RateLimit) else f for f in logger.filters
        ]


def pytest_unconfigure(config: pytest.Config) -> None:
    """Fail, not hang, when a test left a non-daemon thread running (an aiosqlite connection
    or an executor nobody closed): the interpreter would wait for it forever at exit."""
    stray = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for thread in stray:
        thread.join(timeout=5)
    alive = [t.name for t in stray if t.is_alive()]
    if alive:
        sys.stdout.flush()
        sys.stderr.write(
            f"\nthreads still running after the tests: {alive}: a connection or executor was "
            "not closed; exiting with status 1 instead of waiting for them forever\n"
        )
        sys.stderr.flush()
        os._exit(1)
