"""``Producer``: commit messages from code that is not asyncio (threads, WSGI workers, scripts).

    producer = outbox.Producer("app.db")
    msg_id = producer.send({"type": "order", "id": 42}, key="order-42")  # committed now
    producer.close()

``send()`` blocks until its row is committed and returns the id, like ``Outbox.send()``, and
it is safe from any number of threads at once: one writer thread of the producer's own takes
whatever every caller queued while the previous transaction was committing and commits it in
the next ``BEGIN IMMEDIATE ... COMMIT`` (group commit), so a hundred threads share one fsync.
Payloads are checked in the caller's thread, before anything is queued, so a bad payload
fails its own call only.

A producer only writes: a sender (an ``Outbox`` or ``outbox relay`` on the same file) puts
the rows on the wire. To write in the application's own transaction, use
``outbox.enqueue(conn, ...)`` instead.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import OutboxClosedError
from ..storage import sqlite
from ..storage.sqlite import Synchronous
from ..transactional import (
    DEFAULT_MAX_MESSAGE_SIZE,
    check_busy_timeout,
    check_key,
    check_max_message_size,
    encode_payload,
    encode_rows,
)
from .commit import insert_rows

logger = logging.getLogger("outbox")

_Rows = list[tuple[str, str | None]]


class Producer:
    """A thread-safe, synchronous writer of pending messages into an outbox file.

    Opening migrates the file (like ``Outbox``). ``commits`` counts the transactions so far.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Synchronous = "FULL",
        busy_timeout: float = 5.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.path = str(path)
        self.max_message_size = check_max_message_size(max_message_size)
        busy_timeout = check_busy_timeout(busy_timeout)
        pragmas = sqlite.connection_pragmas(synchronous, busy_timeout)
        try:
            sqlite.prepare(self.path, busy_timeout, lambda conn: None)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            for pragma in pragmas:
                conn.execute(pragma)
        except sqlite3.Error as exc:
            raise sqlite.sqlite_error(exc, self.path) from exc
        self._conn = conn
        self._cond = threading.Condition()
        self._queue: list[tuple[_Rows, concurrent.futures.Future[list[int]]]] = []
        self._closed = False
        self.commits = 0
        self._thread = threading.Thread(
            target=self._run, name=f"outbox-producer:{self.path}", daemon=True
        )
        self._thread.start()

    # -- sending -----------------------------------------------------------------------------

    def send(self, payload: Any, *, key: str | None = None) -> int:
        """Commit one message; return its id (an existing key returns its row's id)."""
        check_key(key)
        return self._submit([(encode_payload(payload, self.max_message_size), key)])[0]

    def send_many(
        self, payloads: Iterable[Any], *, keys: Sequence[str | None] | None = None
    ) -> list[int]:
        """Commit several messages in one transaction; their ids, in order."""
        rows = encode_rows(payloads, keys, self.max_message_size)
        return self._submit(rows) if rows else []

    def _submit(self, rows: _Rows) -> list[int]:
        future: concurrent.futures.Future[list[int]] = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise OutboxClosedError(f"the Producer on {self.path} is closed")
            self._queue.append((rows, future))
            self._cond.notify()
        return future.result()

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return  # closed, and everything queued is committed
                taken, self._queue = self._queue, []
            self._commit(taken)

    def _commit(self, taken: list[tuple[_Rows, concurrent.futures.Future[list[int]]]]) -> None:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                ids, _ = insert_rows(conn, [row for rows, _ in taken for row in rows], time.time())
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except Exception as exc:
            error = sqlite.translate(exc, self.path)
            for _, future in taken:
                future.set_exception(error)
            return
        self.commits += 1
        offset = 0
        for rows, future in taken:
            future.set_result(ids[offset : offset + len(rows)])
            offset += len(rows)

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Commit what is queued, stop the writer thread, close the connection. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify()
        self._thread.join()
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
