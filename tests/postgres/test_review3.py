"""Review 3 on PostgreSQL: the deferred SAVEPOINT RELEASE, fencing and drain.

Each test here failed before the fix committed with it.
"""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import connect
from websockets.frames import CloseCode

from outbox.receiver import Incoming, serve

from .test_receiver import acks, batch, closed_with, create_effects, effects, headers, inbox_rows

INSERT = "INSERT INTO effects (client_id, message_id) VALUES ($1, $2)"


async def test_a_statement_cancelled_by_the_handler_fails_its_message_not_the_next(
    pg_url: str,
) -> None:
    """Message 1's handler writes, then gives up on a slow query (asyncio.timeout) and
    returns: PostgreSQL has aborted the transaction under its SAVEPOINT. That must fail
    message 1 (as for a statement that raised), not be kept: else the next message's
    SAVEPOINT fails, its ROLLBACK TO undoes message 1's write, and 1 is acked without it."""

    slow_done: list[bool] = []

    async def handler(message: Incoming) -> None:
        await message.tx.execute(INSERT, (message.client_id, message.id))
        if message.id == 1 and not slow_done:
            slow_done.append(True)
            try:
                async with asyncio.timeout(0.05):
                    await message.tx.execute("SELECT pg_sleep(5)")
            except TimeoutError:
                pass  # the handler decides the slow lookup was optional

    async with serve(handler, pg_url, setup=create_effects) as receiver:
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([1, 2]))
            assert await closed_with(ws) == CloseCode.INTERNAL_ERROR  # 1 failed, nothing acked
        assert receiver.stats.messages == 0 and receiver.stats.handler_errors == 1
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([1, 2]))  # the resend; this time the lookup is quick
            assert await acks(ws, 2) == [1, 2]
    assert [i for _, i, _ in await inbox_rows(pg_url)] == [1, 2]
    assert await effects(pg_url) == [("c1", 1), ("c1", 2)]
