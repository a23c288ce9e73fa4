"""Pruning that fails: a client's rows that cannot be deleted hold up neither the time
window, nor the other clients, nor (more than once) the rounds that carried the step.

Real SQLite files and real triggers that make deletes fail, as a bad page or a full disk
would; the pruner's clock injected where the test plays the writer's loop itself.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from outbox.protocol import wire
from outbox.receiver import ReceiverStats, serve
from outbox.receiver.inbox import Inbox, payload_digest
from outbox.receiver.pruner import Pruner
from outbox.receiver.writer import Writer

from ..raw_client import low_water_headers as headers
from ..raw_client import recv
from .test_retention import Handled, inbox_rows


@pytest.fixture
def handled() -> Handled:
    return Handled()


def undeletable(db: Path, client_id: str, how: str = "ABORT") -> None:
    """Deleting this client's inbox rows fails (a bad page, a full disk, ...)."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TRIGGER no_forgetting BEFORE DELETE ON inbox "
            f"WHEN old.client_id = '{client_id}' "
            f"BEGIN SELECT RAISE({how}, 'database disk image is malformed'); END"
        )


async def seeded(inbox: Inbox, client_id: str, ids: range, received_at: float) -> None:
    await inbox.begin()
    await inbox.record([(client_id, n, "{}", received_at, None, payload_digest("{}")) for n in ids])
    await inbox.commit()


async def test_a_mark_that_keeps_failing_starves_the_time_window_when_idle(
    tmp_path: Path,
) -> None:
    """A marked client whose rows cannot be deleted; an unmarked client's rows are past the
    window. The writer is idle: each pass of its loop runs the due step (``Writer._prune``).
    The marked client's step fails and is retried every ``retry_after``; the sweep, which
    would delete the other client's rows fine, must still get its turn."""
    clock, wall = [100.0], [1_000.0]
    pruner = Pruner(
        window=1.0,
        chunk=10,
        pause=0.02,
        retry_after=0.05,
        monotonic=lambda: clock[0],
        wall=lambda: wall[0],
    )
    db = tmp_path / "inbox.db"
    inbox = await Inbox.open(db)
    try:
        writer = Writer(inbox, None, ReceiverStats(), pruner=pruner)
        await seeded(inbox, "seed", range(1, 6), wall[0])
        await pruner.resume(inbox)
        clock[0] += 2.0
        wall[0] += 2.0  # the seed's rows are past the window: a pass is due
        await seeded(inbox, "stuck", range(1, 4), wall[0] + 3600)  # young all test long
        undeletable(db, "stuck")
        pruner.announce("stuck", 4)
        steps = 0
        for _ in range(50):  # half a second of an idle writer, polled every 10 ms
            if pruner.due_in() == 0:
                steps += 1
                await writer._prune()  # a failure backs off, as in the writer's loop
            clock[0] += 0.01
            wall[0] += 0.01
        assert steps >= 5  # the stuck mark was retried (and failed) all along
        assert inbox_rows(db, "stuck") == 3
        assert inbox_rows(db, "seed") == 0, f"no sweep in {steps} steps; {pruner.sweeps} passes"
    finally:
        await inbox.close()


async def test_a_folded_step_that_keeps_failing_starves_the_time_window_under_load(
    tmp_path: Path,
) -> None:
    """As above, under load: a round every millisecond, each carrying the stuck client's
    step in its COMMIT (``Writer._commit_folding``, the real SAVEPOINT), which fails and is
    undone alone; after each round the writer runs a step of its own if one is due."""
    clock, wall = [100.0], [1_000.0]
    pruner = Pruner(
        window=1.0,
        chunk=10,
        pause=0.02,
        retry_after=0.05,
        monotonic=lambda: clock[0],
        wall=lambda: wall[0],
    )
    db = tmp_path / "inbox.db"
    inbox = await Inbox.open(db)
    try:
        writer = Writer(inbox, None, ReceiverStats(), pruner=pruner)
        await seeded(inbox, "seed", range(1, 6), wall[0])
        await pruner.resume(inbox)
        clock[0] += 2.0
        wall[0] += 2.0
        await seeded(inbox, "stuck", range(1, 4), wall[0] + 3600)
        undeletable(db, "stuck")
        pruner.announce("stuck", 4)
        for n in range(1, 301):  # 300 ms, one round each millisecond
            await inbox.begin()
            await inbox.record([("busy", n, "{}", wall[0] + 3600, None, payload_digest("{}"))])
            await writer._commit_folding(1)
            pruner.round_ended()
            await writer._prune()
            clock[0] += 0.001
            wall[0] += 0.001
        assert inbox_rows(db, "busy") == 300 and inbox_rows(db, "stuck") == 3
        assert inbox_rows(db, "seed") == 0, f"{pruner.sweeps} passes of the window"
    finally:
        await inbox.close()


async def test_a_step_that_rolls_rounds_back_costs_one_round_even_with_other_marks(
    tmp_path: Path, handled: Handled
) -> None:
    """Deleting one client's rows makes SQLite roll the whole transaction back. Another
    client keeps sending and announcing marks (its own rows delete fine). At most one of
    its rounds may fail with 1013: folding must stay off for the failing client's step,
    not resume as soon as some other client's step of its own succeeds."""
    db = tmp_path / "inbox.db"
    async with serve(handled, db) as rx:
        pruner = rx._pruner
        assert pruner is not None
        pruner.retry_after = 5 * 0.001
        undeletable(db, "marked", how="ROLLBACK")
        marked = headers("marked", "batch-ack, low-water")
        async with connect(rx.url, additional_headers=marked) as ws:
            await ws.send(wire.encode_batch([(i, "{}") for i in (1, 2, 3)]))
            assert await recv(ws) == {"type": "ack", "messageIds": [1, 2, 3]}
            await ws.send(wire.encode_low_water(4))
        other = headers("other", "batch-ack, low-water")
        failed, start = 0, 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.5
        ws = await connect(rx.url, additional_headers=other)
        try:
            while failed < 2 and loop.time() < deadline:
                ids = list(range(start, start + 20))
                try:
                    await ws.send(wire.encode_batch([(i, "{}") for i in ids]))
                    answer = await recv(ws)
                except ConnectionClosed as closed:
                    assert closed.rcvd is not None and closed.rcvd.code == 1013
                    failed += 1
                    ws = await connect(rx.url, additional_headers=other)
                    continue
                assert answer == {"type": "ack", "messageIds": ids}
                await ws.send(wire.encode_low_water(ids[-1] + 1))
                start += 20
        finally:
            await ws.close()
        assert inbox_rows(db, "marked") == 3
        assert failed <= 1, f"{failed} rounds of 'other' failed with 1013"


async def test_a_window_range_that_cannot_be_deleted_holds_up_the_clients_after_it(
    tmp_path: Path,
) -> None:
    """Two unmarked clients, both past the window; deleting the first one's rows fails.
    The second one's rows, in a later range of the sweep, must still go."""
    clock, wall = [100.0], [1_000.0]
    pruner = Pruner(
        window=1.0,
        chunk=2,
        pause=0.02,
        retry_after=0.05,
        monotonic=lambda: clock[0],
        wall=lambda: wall[0],
    )
    db = tmp_path / "inbox.db"
    inbox = await Inbox.open(db)
    try:
        writer = Writer(inbox, None, ReceiverStats(), pruner=pruner)
        await seeded(inbox, "aa-stuck", range(1, 3), wall[0])
        await seeded(inbox, "zz-seed", range(1, 6), wall[0])
        await pruner.resume(inbox)
        undeletable(db, "aa-stuck")
        clock[0] += 2.0
        wall[0] += 2.0
        for _ in range(100):  # a second of an idle writer, polled every 10 ms
            if pruner.due_in() == 0:
                await writer._prune()
            clock[0] += 0.01
            wall[0] += 0.01
        assert inbox_rows(db, "aa-stuck") == 2
        assert inbox_rows(db, "zz-seed") == 0
    finally:
        await inbox.close()
