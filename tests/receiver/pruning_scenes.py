"""What the pruning tests share: an inbox whose deletes fail, a pruner whose clocks the test
moves, and a raw client that resends a round the receiver failed (1013)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from outbox.protocol import wire
from outbox.receiver import ReceiverStats
from outbox.receiver.inbox import Inbox, payload_digest
from outbox.receiver.pruner import Pruner
from outbox.receiver.writer import Writer

from ..raw_client import recv


def undeletable(
    db: Path,
    client_id: str | None = None,
    *,
    how: str = "ABORT",
    message: str = "database or disk is full",
) -> None:
    """Deleting inbox rows (of ``client_id``, or any) fails, as on a full disk or a bad page:
    ``ABORT`` fails the statement, ``ROLLBACK`` the whole transaction."""
    when = "" if client_id is None else f"WHEN old.client_id = '{client_id}' "
    conn = sqlite3.connect(db)
    try:
        conn.execute(
            f"CREATE TRIGGER no_forgetting BEFORE DELETE ON inbox {when}"
            f"BEGIN SELECT RAISE({how}, '{message}'); END"
        )
    finally:
        conn.close()


def deletable(db: Path) -> None:
    """Undo :func:`undeletable`. Blocking: call it off the event loop (``asyncio.to_thread``)
    when a receiver runs on it, whose step may hold the write lock across a hop."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        conn.execute("DROP TRIGGER no_forgetting")
    finally:
        conn.close()


class Played:
    """A pruner on a real inbox file, its clocks in the test's hands, and the writer whose
    loop the test plays (``writer._prune()``, ``writer._commit_folding()``)."""

    def __init__(self, db: Path, inbox: Inbox, pruner: Pruner, clocks: list[float]) -> None:
        self.db = db
        self.inbox = inbox
        self.pruner = pruner
        self.writer = Writer(inbox, None, ReceiverStats(), pruner=pruner)
        self._clocks = clocks

    @property
    def wall(self) -> float:
        return self._clocks[1]

    def advance(self, seconds: float) -> None:
        """Both clocks move on together."""
        self._clocks[0] += seconds
        self._clocks[1] += seconds

    async def _record(self, client_id: str, ids: range, received_at: float) -> None:
        digest = payload_digest("{}")
        await self.inbox.begin()
        await self.inbox.record([(client_id, n, "{}", received_at, None, digest) for n in ids])

    async def seed(self, client_id: str, ids: range, received_at: float) -> None:
        """Rows in the inbox, as if handled at ``received_at`` (wall clock)."""
        await self._record(client_id, ids, received_at)
        await self.inbox.commit()

    async def idle(self, seconds: float) -> int:
        """An idle writer for ``seconds`` of the pruner's clocks, polled every 10 ms: each
        pass of its loop runs the step that is due (a failure is backed off, as in the
        loop). Returns the steps run."""
        steps = 0
        for _ in range(round(seconds / 0.01)):
            if self.pruner.due_in() == 0:
                steps += 1
                await self.writer._prune()
            self.advance(0.01)
        return steps

    async def round(self, client_id: str, ids: range, received_at: float) -> None:
        """A group commit of these rows, carrying a pruning step as the writer's would."""
        await self._record(client_id, ids, received_at)
        await self.writer._commit_folding(len(ids))
        self.pruner.round_ended()


@asynccontextmanager
async def played(tmp_path: Path, **options: Any) -> AsyncIterator[Played]:
    """A :class:`Played` with ``Pruner(window=1.0, pause=0.02, **options)``."""
    clocks = [100.0, 1_000.0]  # monotonic, wall
    options = {"window": 1.0, "pause": 0.02, **options}
    pruner = Pruner(monotonic=lambda: clocks[0], wall=lambda: clocks[1], **options)
    db = tmp_path / "inbox.db"
    inbox = await Inbox.open(db)
    try:
        yield Played(db, inbox, pruner, clocks)
    finally:
        await inbox.close()


class Resending:
    """A raw client of batch frames that resends a batch after the receiver closed the
    connection with 1013 (the round failed), on a new connection; counts those."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url = url
        self.headers = headers
        self.failed = 0
        self._ws: ClientConnection | None = None

    async def __aenter__(self) -> Resending:
        self._ws = await connect(self.url, additional_headers=self.headers)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._ws is not None:
            await self._ws.close()

    async def send(self, ids: Sequence[int]) -> None:
        """Send these ids in one batch frame until they are acked."""
        assert self._ws is not None
        while True:
            try:
                await self._ws.send(wire.encode_batch([(i, "{}") for i in ids]))
                answer = await recv(self._ws)
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1013, closed
                self.failed += 1
                self._ws = await connect(self.url, additional_headers=self.headers)
                continue
            assert answer == {"type": "ack", "messageIds": list(ids)}
            return

    async def mark(self, mark: int) -> None:
        assert self._ws is not None
        await self._ws.send(wire.encode_low_water(mark))
