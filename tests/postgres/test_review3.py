"""Review 3 on PostgreSQL: the deferred SAVEPOINT RELEASE, fencing and drain.

Each test here failed before the fix committed with it.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.frames import CloseCode

from outbox.receiver import Batch, Incoming, serve

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


async def lock_waiters(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        found = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE 'INSERT INTO outbox_fence%'"
        )
    finally:
        await conn.close()
    return int(found)


async def test_close_is_not_held_by_a_handshake_waiting_on_a_stuck_rounds_fence(
    pg_url: str,
) -> None:
    """A batch handler is stuck with c1's fence row locked (FOR SHARE), and c1 reconnects:
    its handshake's claim waits for that lock (up to 10 s). close() must still end within
    drain_timeout + 2 x close_timeout (README, "Deploying receivers"): the stuck round is
    cancelled, which releases the row, before waiting for the handshakes in progress."""
    entered = asyncio.Event()

    async def stuck(messages: Batch) -> None:
        await messages.tx.executemany(INSERT, [(m.client_id, m.id) for m in messages])
        entered.set()
        await asyncio.Event().wait()

    receiver = serve(
        stuck, pg_url, batch=True, setup=create_effects, close_timeout=0.3, drain_timeout=0.3
    )
    await receiver.start()
    async with connect(receiver.url, additional_headers=headers("c1")) as ws:
        await ws.send(batch([1, 2]))
        await asyncio.wait_for(entered.wait(), 5)

        async def reconnect() -> BaseException | None:
            try:
                async with connect(receiver.url, additional_headers=headers("c1")):
                    return None
            except BaseException as exc:
                return exc

        second = asyncio.create_task(reconnect())
        deadline = time.monotonic() + 5
        while await lock_waiters(pg_url) == 0:
            assert time.monotonic() < deadline, "the claim never waited for the fence row"
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await receiver.close()
        elapsed = time.monotonic() - started
        refused = await second
    assert elapsed < 0.3 + 2 * 0.3 + 1.0, elapsed
    assert isinstance(refused, InvalidStatus) and refused.response.status_code == 503
    assert await inbox_rows(pg_url) == [] and await effects(pg_url) == []
