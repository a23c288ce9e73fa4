"""Prompt pickup of rows that other connections commit (other processes, ``enqueue``).

The sender learns of this process's own rows from the store's commit listeners; rows that
another process commits used to wait for its once-a-second re-check. While this process is
the active sender, a small thread polls ``PRAGMA data_version`` on a connection of its own
every ``POLL_INTERVAL`` seconds. That pragma reads the WAL index header only (a few
microseconds, no disk I/O) and changes whenever any other connection commits. Only then does
the thread read the outbox's AUTOINCREMENT sequence: an id past what this process knows means
somebody else added rows, and the store wakes the sender to query for them
(``Store.note_foreign_rows``). Our own commits (acks, our rows) change the version too, but
their ids are known, so they cost one small read and wake nobody.

Measured on one idle relay: p99 pickup 21 ms at 20 ms, 12 ms at 10 ms (at twice the CPU).
See the README, "Use it as a transactional outbox".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Awaitable
from typing import TypeVar

from .store import Store

logger = logging.getLogger("outbox")

POLL_INTERVAL = 0.02
"""Seconds between two looks at ``PRAGMA data_version``."""

_T = TypeVar("_T")


class ForeignRowsWatcher:
    """The polling thread; ``start()`` then ``stop()`` (joins it)."""

    def __init__(self, store: Store, *, interval: float = POLL_INTERVAL) -> None:
        self.store = store
        self.interval = interval
        self._loop = asyncio.get_running_loop()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"outbox-watch:{store.path}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.store.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            logger.warning("outbox: cannot watch %s for other writers: %s", self.store.path, exc)
            return
        try:
            version = None
            while not self._stop.wait(self.interval):
                try:
                    now = conn.execute("PRAGMA data_version").fetchone()[0]
                    if now == version:
                        continue
                    version = now
                    row = conn.execute(
                        "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'"
                    ).fetchone()
                except sqlite3.Error:
                    continue  # busy or mid-checkpoint: the next look will tell
                if row is None:
                    continue
                try:
                    self._loop.call_soon_threadsafe(self.store.note_foreign_rows, int(row[0]))
                except RuntimeError:
                    return  # the event loop is closed
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


async def run_watched(store: Store, work: Awaitable[_T]) -> _T:
    """Await ``work`` with a ForeignRowsWatcher running on ``store`` meanwhile."""
    watcher = ForeignRowsWatcher(store)
    watcher.start()
    try:
        return await work
    finally:
        watcher.stop()  # at most one poll interval
