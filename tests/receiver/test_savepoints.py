"""The per-message handler's SAVEPOINTs cost no thread hop of their own, and still isolate.

A kept SAVEPOINT is released with the next message's first statement (or by the COMMIT), so
a handler writing one row costs one hop to aiosqlite's thread, not three. These tests count
the hops on the real connection (each ``aiosqlite.Connection._execute`` call is one) and
read the real file back to show that each message's writes are still kept or undone alone.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.frames import CloseCode

from outbox.receiver import Incoming, Receiver, Reject, serve

from .test_receiver import acks, batch, closed_with, effects, headers, recv

INSERT = "INSERT INTO effects (client_id, message_id) VALUES (?, ?)"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "inbox.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE effects (client_id TEXT, message_id INTEGER, "
            "UNIQUE (client_id, message_id))"
        )
    return path


def count_hops(receiver: Receiver) -> list[str]:
    """Count every call queued to the inbox connection's thread from now on."""
    inbox = receiver._inbox
    assert inbox is not None
    conn: Any = inbox._db
    hops: list[str] = []
    original: Callable[..., Awaitable[Any]] = conn._execute

    async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(fn, "__name__", repr(fn)) + " " + repr(args)[:60])
        return await original(fn, *args, **kwargs)

    conn._execute = counted
    return hops


async def test_one_statement_per_message_costs_one_hop(db: Path) -> None:
    async def handler(message: Incoming) -> None:
        await message.tx.execute(INSERT, (message.client_id, message.id))

    async with serve(handler, db) as receiver:
        hops = count_hops(receiver)
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch(range(1, 101)))
            assert await acks(ws, 100) == list(range(1, 101))
        assert receiver.stats.transactions == 1
    # BEGIN with the dedup query and the floors of its clients (a bounded inbox), 100
    # statements, the inbox rows with COMMIT (was 3 per message, then 100 + 5);
    # around them, the handshake's high-water query and the close.
    begin = next(i for i, h in enumerate(hops) if h.startswith("_begin_and_find"))
    commit = next(i for i, h in enumerate(hops) if h.startswith("_write_and_commit"))
    assert commit - begin + 1 == 100 + 2, hops
    assert effects(db) == [("c1", i) for i in range(1, 101)]


async def test_a_failure_after_kept_messages_undoes_only_its_own_writes(db: Path) -> None:
    async def handler(message: Incoming) -> None:
        # Two statements at once on the first use: both inside this message's SAVEPOINT.
        await asyncio.gather(
            message.tx.execute(INSERT, (message.client_id, message.id)),
            message.tx.execute_fetchall("SELECT count(*) FROM effects"),
        )
        if message.id == 3:
            raise Reject("no threes")
        if message.id == 5:
            raise RuntimeError("bug on 5")

    async with serve(handler, db) as receiver:
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch(range(1, 7)))
            assert await recv(ws) == {"type": "ack", "messageIds": [1, 2, 4]}
            assert await recv(ws) == {"type": "nack", "messageId": 3, "reason": "no threes"}
            assert await closed_with(ws) == CloseCode.INTERNAL_ERROR
        assert receiver.stats.transactions == 1
    assert effects(db) == [("c1", 1), ("c1", 2), ("c1", 4)]


async def test_a_handler_reads_the_writes_of_the_messages_before_it(db: Path) -> None:
    counts: list[int] = []

    async def handler(message: Incoming) -> None:
        [(count,)] = await message.tx.execute_fetchall("SELECT count(*) FROM effects")
        counts.append(count)
        await message.tx.executemany(INSERT, [(message.client_id, message.id)])

    async with serve(handler, db) as receiver:
        for first in (1, 4):  # two transactions: nothing of the first's SAVEPOINTs lingers
            async with connect(receiver.url, additional_headers=headers("c1")) as ws:
                await ws.send(batch(range(first, first + 3)))
                assert await acks(ws, 3) == list(range(first, first + 3))
        assert receiver.stats.transactions == 2
    assert counts == [0, 1, 2, 3, 4, 5]
    assert len(effects(db)) == 6
