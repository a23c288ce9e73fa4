"""Found by an adversarial review of the transactional outbox, the lease and the watch; each
failed before its fix."""
# ruff: noqa: SIM117  (explicit nesting reads better here)

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sqlite3
import time
from pathlib import Path

import pytest

import outbox
from outbox import Outbox
from outbox.client import lease as lease_mod
from outbox.client import session as session_module
from outbox.protocol.feed import CommittedRows
from outbox.receiver import Incoming, serve

from ..support import wait_until


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def test_unleasable_file_does_not_make_two_active_senders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "app.db"
    outbox.migrate(db)
    real_open = os.open

    def read_only_dir_open(path, flags, *args):  # what a non-root user gets in a 0555 dir
        if str(path).endswith(lease_mod.LEASE_SUFFIX):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(lease_mod.os, "open", read_only_dir_open)
    url = f"ws://127.0.0.1:{_closed_port()}/"
    async with Outbox(str(db), url, close_flush_timeout=0) as a:
        async with Outbox(str(db), url, close_flush_timeout=0) as b:
            # Long enough for the second one to retry the lease at least once.
            await asyncio.sleep(2 * lease_mod.RETRY_INTERVAL)
            roles = sorted([a.stats().role, b.stats().role])
    assert roles != ["active", "active"], "two active senders on one file"


async def test_foreign_row_committed_just_before_an_ack_is_picked_up_promptly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "app.db"
    outbox.migrate(db)
    arrived: dict[str, float] = {}
    conn = sqlite3.connect(db)
    committed: dict[str, float] = {}

    async def handle(message: Incoming) -> None:
        who = message.data["who"]
        arrived[who] = time.monotonic()
        if who.startswith("own"):
            # another writer (a web request) commits right now; our ack follows within ms
            with conn:
                outbox.enqueue(conn, {"who": "foreign" + who[3:]})
            committed["foreign" + who[3:]] = time.monotonic()

    # The sender's own once-a-second re-check pushed out of reach: only the watch's wake-up
    # can deliver the foreign rows within the wait below (before the fix: never).
    monkeypatch.setattr(
        session_module,
        "CommittedRows",
        lambda *, limit: CommittedRows(limit=limit, max_age=3600.0),
    )
    async with serve(handle, str(tmp_path / "in.db"), host="127.0.0.1", port=0) as rc:
        async with Outbox(str(db), rc.url) as box:
            for n in range(5):
                await box.send({"who": f"own{n}"})
                await wait_until(lambda n=n: f"foreign{n}" in arrived, timeout=5)
    conn.close()
    assert set(arrived) == {f"{who}{n}" for who in ("own", "foreign") for n in range(5)}


def test_producer_checks_max_message_size_when_opened(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    outbox.migrate(db)
    with pytest.raises((TypeError, ValueError), match="max_message_size"):
        producer = outbox.Producer(str(db), max_message_size="1MB")  # type: ignore[arg-type]
        try:
            producer.send({"a": 1})
        finally:
            producer.close()


def test_producer_checks_busy_timeout(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    outbox.migrate(db)
    for bad in ("x", -5):
        with pytest.raises((TypeError, ValueError), match="busy_timeout"):
            outbox.Producer(str(db), busy_timeout=bad).close()  # type: ignore[arg-type]


def test_enqueue_bad_max_message_size_names_the_argument(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    outbox.migrate(db)
    conn = sqlite3.connect(db)
    try:
        with pytest.raises((TypeError, ValueError), match="max_message_size"):
            outbox.enqueue(conn, {"a": 1}, max_message_size="1MB")  # type: ignore[arg-type]
    finally:
        conn.rollback()
        conn.close()


async def test_send_many_over_the_whole_quota_says_why(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    url = f"ws://127.0.0.1:{_closed_port()}/"
    async with Outbox(
        str(db), url, close_flush_timeout=0, max_pending=3, max_pending_wait=2
    ) as box:
        t0 = time.monotonic()
        with pytest.raises(outbox.QueueFullError) as info:
            await box.send_many([{"i": n} for n in range(5)])
        assert time.monotonic() - t0 < 1.0
    text = str(info.value)
    assert "after waiting" not in text, text
    assert "5" in text, text
