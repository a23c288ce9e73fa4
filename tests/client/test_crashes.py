"""A bug in the store's commit loop: every write fails at once, loudly, instead of hanging.

The bug is injected by making ``Store._publish`` (called by the commit loop after the
transaction, outside the ``except`` that handles SQLite's errors) raise.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from outbox import Outbox, OutboxBrokenError, OutboxError, State
from outbox.client.store import Store

from ..support import ScriptedServer, wait_until


def inject_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_publish(self: Store, queued: object, batch: object) -> None:
        raise RuntimeError("injected bug")

    monkeypatch.setattr(Store, "_publish", broken_publish)


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.exc_info]


def test_the_error_is_an_outbox_error() -> None:
    assert issubclass(OutboxBrokenError, OutboxError)


async def test_a_crashed_commit_loop_fails_every_write_of_a_store(
    db: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = await Store.open(db)
    try:
        [first] = await store.insert([('{"n": 0}', None)])
        inject_bug(monkeypatch)
        caplog.set_level(logging.ERROR, logger="outbox")
        waiting = asyncio.ensure_future(store.wait_status(first))
        async with asyncio.timeout(5):
            with pytest.raises(OutboxBrokenError, match="commit loop crashed") as caught:
                await store.insert([('{"n": 1}', None)])
            assert isinstance(caught.value.__cause__, RuntimeError)
            assert "open a new one" in str(caught.value)
            with pytest.raises(OutboxBrokenError):
                await waiting
            with pytest.raises(OutboxBrokenError):
                await store.watch()
            for call in (
                store.insert([('{"n": 2}', None)]),
                store.flush(),
                store.requeue_dead(),
                store.purge_acked(older_than=None, keep=1),
                store.wait_commit(),
                store.wait_status(first),
            ):
                with pytest.raises(OutboxBrokenError):
                    await call
            with pytest.raises(OutboxBrokenError):
                store.mark_acked([first])
            with pytest.raises(OutboxBrokenError):
                store.mark_dead([(first, "x")])
            assert store.queued_rows == 0
    finally:
        await store.close()
    [record] = tracebacks(caplog)
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
    assert "crashed" in record.getMessage() and "bug" in record.getMessage()


async def test_an_outbox_whose_store_crashed_fails_sends_at_once_and_closes(
    db: Path,
    server: ScriptedServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="outbox")
    async with Outbox(db, server.url, reconnect_interval=0.01) as box:
        await box.wait_acked(await box.send({"n": 0}), timeout=5)
        inject_bug(monkeypatch)
        async with asyncio.timeout(5):
            pending = asyncio.ensure_future(box.send({"n": 1}, key="k1"))
            with pytest.raises(OutboxBrokenError, match="commit loop crashed"):
                await pending
            with pytest.raises(OutboxBrokenError):
                await box.send({"n": 2})
            # The Outbox's runner saw it: supervisor stopped, store closed.
            await wait_until(lambda: box.state is State.CLOSED)
            with pytest.raises(OutboxBrokenError):
                await box.send({"n": 3})
            with pytest.raises(OutboxBrokenError):
                await box.requeue_dead()
            with pytest.raises(OutboxBrokenError):
                await box.drain(timeout=1)
    assert caplog.text.count("Traceback (most recent call last)") == 1
    [record] = tracebacks(caplog)
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
    assert any("stopped sending" in r.getMessage() for r in caplog.records)
    # As the error says, a write under way may or may not have committed (here: whether the
    # crash came with the commit of n=0's ack or with k1's). A retry with the key tells.
    monkeypatch.undo()
    async with Outbox(db, server.url, reconnect_interval=0.01) as box:
        await box.send({"n": 1}, key="k1")
        await box.drain(timeout=5)
        assert box.stats().pending == 0
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM outbox WHERE key = 'k1'").fetchone() == (1,)
