"""Review 4: the coalesced status reads of ``Store.status_future`` (wait_acked).

Found by an adversarial review, written as strict xfails first, then fixed: a status read
settled every waiter of its ids when its result came back, including waiters that
registered after the read was taken, so they got a status older than themselves; and a read
that crossed a renumbering found the old id gone and answered "acked". The tests hold the
reader's result (or the writer's) with an event to make the interleaving deterministic: on
a loaded machine the thread hops alone produce it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from outbox.client import commit
from outbox.client.store import Store
from tests.support import wait_until


@pytest.fixture
async def store(db: Path) -> AsyncIterator[Store]:
    opened = await Store.open(db)
    yield opened
    await opened.close()


class HeldReads:
    """Patch the store's reader: each read runs its query, says so, then waits for
    ``release`` before its rows reach the caller (a result still on its way to the loop)."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = store._reader.execute_fetchall
        self.queried = asyncio.Event()
        self.release = asyncio.Event()
        monkeypatch.setattr(store._reader, "execute_fetchall", self.held)

    async def held(self, sql: str, parameters: Any = ()) -> Any:
        rows = await self.real(sql, parameters)
        self.queried.set()
        await self.release.wait()
        return rows


async def test_a_waiter_registered_after_a_requeue_is_not_settled_by_an_older_read(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    [message_id] = await store.insert([('"x"', None)])
    store.mark_dead([(message_id, "nack: no")])
    await store.flush()
    reads = HeldReads(store, monkeypatch)
    first = store.status_future(message_id)
    await asyncio.wait_for(reads.queried.wait(), 5)  # the read saw the row dead
    assert await store.requeue_dead([message_id]) == 1  # committed: pending again
    second = store.status_future(message_id)  # wait_acked() called after the requeue
    reads.release.set()
    await wait_until(lambda: store._status_reads is None)
    assert first.result() == ("dead", "nack: no")  # registered before: fine either way
    assert not second.done(), f"the row is pending, yet the waiter got {second.result()}"
    store.mark_acked([message_id])
    assert await asyncio.wait_for(second, 5) == ("acked", None)


async def test_a_read_from_before_the_row_existed_does_not_ack_a_later_waiter(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = HeldReads(store, monkeypatch)
    early = store.status_future(1)  # no row 1 yet
    await asyncio.wait_for(reads.queried.wait(), 5)  # the read found nothing
    [message_id] = await store.insert([('"x"', None)])  # row 1, pending, committed
    assert message_id == 1
    later = store.status_future(message_id)  # send() then wait_acked(): the usual way
    reads.release.set()
    await wait_until(lambda: store._status_reads is None)
    assert not later.done(), f"row 1 is pending and never acked, yet got {later.result()}"
    with pytest.raises((ValueError, asyncio.InvalidStateError)):
        early.result()  # unknown when asked (or still waiting); never "acked"


async def test_a_status_read_during_a_renumber_does_not_ack_the_message(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    [message_id] = await store.insert([('"x"', None)])
    real_read = store._reader.execute_fetchall
    real_write = store._run_on_writer
    committed = asyncio.Event()
    moved = asyncio.Event()

    async def read_after_commit(sql: str, parameters: Any = ()) -> Any:
        await committed.wait()
        return await real_read(sql, parameters)

    async def renumber_then_hold(function: Any, *args: Any) -> Any:
        result = await real_write(function, *args)
        if function is commit.renumber:
            committed.set()
            await moved.wait()
        return result

    monkeypatch.setattr(store._reader, "execute_fetchall", read_after_commit)
    monkeypatch.setattr(store, "_run_on_writer", renumber_then_hold)
    waiter = store.status_future(message_id)  # wait_acked() in progress
    renumbering = asyncio.create_task(store.renumber(message_id, "id conflict"))
    await wait_until(lambda: committed.is_set() and store._status_reads is None)
    moved.set()
    new_id = await asyncio.wait_for(renumbering, 5)
    assert new_id is not None and new_id != message_id
    assert not waiter.done(), f"message {new_id} is pending, yet wait_acked got {waiter.result()}"
    store.forget_waiter(message_id, waiter)
