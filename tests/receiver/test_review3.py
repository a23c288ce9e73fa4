"""Review 3: how batch handlers, the deferred SAVEPOINT RELEASE, fencing and drain interact.

Each test here failed before the fix committed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.frames import CloseCode

from outbox.receiver import Batch, Incoming, serve

from .test_batch import INSERT, BatchRecorder, gather_round
from .test_receiver import acks, batch, closed_with, effects, headers, inbox_rows


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "inbox.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE effects (client_id TEXT, message_id INTEGER, "
            "UNIQUE (client_id, message_id))"
        )
    return path


async def test_a_later_message_behind_a_cut_repeat_is_not_handled_in_the_retry(
    db: Path,
) -> None:
    """Two connections of one client: a's first delivery of 2 fails in the retry, so b's
    copy of 2 waits for the next round, and so must b's 4 behind it: handling 4 now would
    commit its effect with no inbox row (b answers neither), and the next round would
    handle it again."""
    recorder = BatchRecorder()
    recorder.fail_once = {("c1", 2)}
    async with serve(recorder, db, batch=True) as receiver:
        async with (
            connect(receiver.url, additional_headers=headers("c1")) as a,
            connect(receiver.url, additional_headers=headers("c1")) as b,
        ):
            await gather_round(receiver, recorder, [(a, batch([1, 2])), (b, batch([2, 4]))])
            assert await acks(a, 1) == [1]
            assert await closed_with(a) == CloseCode.INTERNAL_ERROR
            assert await acks(b, 2) == [2, 4]
        assert receiver.stats.handler_errors == 1
    assert [i for c, i in effects(db) if c == "c1"] == [1, 2, 4]
    assert [i for c, i, _, _ in inbox_rows(db) if c == "c1"] == [1, 2, 4]
    assert recorder.handled("c1").count(4) <= 2  # the batch, then at most once alone


@pytest.mark.parametrize("batch_mode", [False, True])
async def test_a_handler_that_raises_cancelled_error_fails_its_message_not_the_writer(
    db: Path, batch_mode: bool
) -> None:
    """A handler that awaited something cancelled (a task, a future a library cancelled)
    sees CancelledError come out of it. The writer is not being cancelled: that is the
    handler's failure (1011), not the end of every connection's group commits."""
    calls: list[int] = []

    async def one(message: Incoming) -> None:
        calls.append(message.id)
        if message.client_id == "bad" and calls.count(message.id) == 1:
            cancelled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            cancelled.cancel()
            await cancelled  # raises CancelledError
        await message.tx.execute(INSERT, (message.client_id, message.id))

    async def many(messages: Batch) -> None:
        for message in messages:
            await one(message)

    handler: Any = many if batch_mode else one
    async with serve(handler, db, batch=batch_mode) as receiver:
        async with connect(receiver.url, additional_headers=headers("bad")) as bad:
            await bad.send(batch([1]))
            assert await closed_with(bad) == CloseCode.INTERNAL_ERROR
        async with connect(receiver.url, additional_headers=headers("good")) as good:
            await good.send(batch([1, 2]))
            assert await acks(good, 2) == [1, 2]
        async with connect(receiver.url, additional_headers=headers("bad")) as bad:
            await bad.send(batch([1]))  # the resend
            assert await acks(bad, 1) == [1]
        assert receiver.stats.handler_errors == 1
    assert effects(db) == [("bad", 1), ("good", 1), ("good", 2)]


async def test_message_tx_first_used_after_the_handler_returned_is_refused(db: Path) -> None:
    """A handler keeps the message (to finish it later) without having touched message.tx.
    Its first use afterwards must be refused like any handle used after its handler: it
    would otherwise open a SAVEPOINT on the receiver's connection outside any round (a
    transaction nobody commits: the next round's BEGIN fails with 1013 for an innocent
    client, and the write is rolled back although its message was acked long ago)."""
    kept: list[Incoming] = []

    async def handler(message: Incoming) -> None:
        kept.append(message)

    async with serve(handler, db) as receiver:
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([1]))
            assert await acks(ws, 1) == [1]
        with pytest.raises(RuntimeError, match="transaction is over"):
            await kept[0].tx.execute(INSERT, ("late", 1))
        async with connect(receiver.url, additional_headers=headers("c2")) as ws:
            await ws.send(batch([1]))
            assert await acks(ws, 1) == [1]
        assert receiver.stats.storage_errors == 0
    assert effects(db) == []


@pytest.mark.parametrize("batch_mode", [False, True])
async def test_a_write_after_sqlite_rolled_back_the_transaction_is_refused(
    db: Path, batch_mode: bool
) -> None:
    """The application's trigger refuses a row with RAISE(ROLLBACK): SQLite rolls back the
    whole transaction. A handler that catches the error and writes on (an error log row)
    must not have that write autocommitted outside any transaction: the group fails with
    1013 as documented, and the resend must not find the first attempt's write."""
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE orders (n INTEGER)")
        conn.execute(
            "CREATE TRIGGER no_negative BEFORE INSERT ON orders WHEN NEW.n < 0 "
            "BEGIN SELECT RAISE(ROLLBACK, 'negative order'); END"
        )
    attempts: list[int] = []

    async def one(message: Incoming) -> None:
        n = -1 if not attempts else 1  # the first attempt breaks the rule
        attempts.append(n)
        with contextlib.suppress(sqlite3.IntegrityError):
            await message.tx.execute("INSERT INTO orders (n) VALUES (?)", (n,))
        await message.tx.execute(INSERT, (message.client_id, message.id))

    async def many(messages: Batch) -> None:
        for message in messages:
            await one(message)

    handler: Any = many if batch_mode else one
    async with serve(handler, db, batch=batch_mode) as receiver:
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([1]))
            assert await closed_with(ws) in (CloseCode.TRY_AGAIN_LATER, CloseCode.INTERNAL_ERROR)
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([1]))
            assert await acks(ws, 1) == [1]
    assert effects(db) == [("c1", 1)]  # once: the first attempt's write did not stay
