"""Batch handlers on PostgreSQL: one call per group commit, the same rules as on SQLite.

``batch.tx`` is the PostgreSQL transaction (``$1`` placeholders); a batch that raises is
rolled back and retried one message at a time; a superseded connection's share never reaches
the handler.
"""

from __future__ import annotations

from typing import Any

from websockets.asyncio.client import connect
from websockets.frames import CloseCode

from outbox.receiver import Batch, serve
from outbox.receiver.backend import SUPERSEDED

from ..raw_client import acks, batch, closed_with, headers
from .test_receiver import create_effects, effects, inbox_rows

INSERT = "INSERT INTO effects (client_id, message_id) VALUES ($1, $2)"


class BatchRecorder:
    """Writes one effects row per message with one executemany; raises on chosen ids."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, int]]] = []
        self.failing: set[int] = set()

    async def __call__(self, messages: Batch) -> None:
        keys = [(m.client_id, m.id) for m in messages]
        self.calls.append(keys)
        await messages.tx.executemany(INSERT, keys)
        for m in messages:
            if m.id in self.failing:
                raise RuntimeError(f"handler bug on {m.id}")
            if m.data.get("reject"):
                messages.reject(m, "not wanted")


async def test_a_batch_handler_writes_every_message_once_through_batch_tx(pg_url: str) -> None:
    recorder = BatchRecorder()
    async with serve(recorder, pg_url, batch=True, setup=create_effects) as receiver:
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch(range(1, 51)))
            assert await acks(ws, 50) == list(range(1, 51))
            await ws.send(batch(range(1, 51)))  # a resend: answered from the inbox
            assert await acks(ws, 50) == list(range(1, 51))
        assert receiver.stats.messages == 50 and receiver.stats.duplicates == 50
    assert sum(len(call) for call in recorder.calls) == 50
    assert await effects(pg_url) == [("c1", i) for i in range(1, 51)]


async def test_a_raising_batch_fails_only_the_culprit_and_the_innocent_are_handled_once(
    pg_url: str,
) -> None:
    recorder = BatchRecorder()
    recorder.failing = {3}
    async with serve(recorder, pg_url, batch=True, setup=create_effects) as receiver:
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([1, 2, 3, 4]))
            assert await acks(ws, 2) == [1, 2]
            assert await closed_with(ws) == CloseCode.INTERNAL_ERROR
        recorder.failing.clear()  # the handler is fixed
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([3, 4]))
            assert await acks(ws, 2) == [3, 4]
    # The first call's writes (1..4) were rolled back; 1 and 2 were then written once each.
    assert await effects(pg_url) == [("c1", i) for i in (1, 2, 3, 4)]
    assert [key for key in await inbox_rows(pg_url)] == [("c1", i, None) for i in (1, 2, 3, 4)]


async def test_a_superseded_connection_never_reaches_the_batch_handler(pg_url: str) -> None:
    recorder_a, recorder_b = BatchRecorder(), BatchRecorder()
    async with (
        serve(recorder_a, pg_url, batch=True, setup=create_effects) as a,
        serve(recorder_b, pg_url, batch=True, setup=create_effects) as b,
    ):
        stale = await connect(a.url, additional_headers=headers("c1"))
        try:
            await stale.send(batch([1, 2]))
            assert await acks(stale, 2) == [1, 2]
            async with connect(b.url, additional_headers=headers("c1")) as fresh:
                await stale.send(batch([3, 4]))
                assert await closed_with(stale) == SUPERSEDED
                await fresh.send(batch([3, 4, 5]))
                assert await acks(fresh, 3) == [3, 4, 5]
        finally:
            await stale.close()
    handled: list[Any] = [key for call in recorder_a.calls + recorder_b.calls for key in call]
    assert handled == [("c1", i) for i in (1, 2, 3, 4, 5)]
    assert await effects(pg_url) == [("c1", i) for i in (1, 2, 3, 4, 5)]
