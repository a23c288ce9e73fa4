"""Fixtures shared across test modules (a module's own fixture of the same name wins).

``db`` and ``server``: an outbox file and a scripted seed-style server for client tests.
``inbox_db``, ``outbox_db`` and ``receiver``: for the fault suites, a receiver whose handler
records an effect per message through the inbox transaction, and the two SQLite files
``chaos_support.check_end_state`` reads at the end of a scenario.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from outbox import Receiver, logs, serve

from .chaos_support import create_effects_table, record_effect
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


@pytest.fixture(autouse=True)
def fresh_log_limits() -> None:
    """Each test starts with fresh rate limits on the peer-caused log lines (outbox.logs):
    what earlier tests logged must not hide the lines a later test looks for."""
    for name in (logs.PEERS, logs.WEBSOCKETS):
        logger = logging.getLogger(name)
        logger.filters = [
            logs.RateLimit() if isinstance(f, logs.RateLimit) else f for f in logger.filters
        ]
