"""A bounded inbox: real Outbox clients and a real receiver on 127.0.0.1, real SQLite files.

Each test asks whether forgetting rows ever turned a resend into a second effect (a handler
called twice for one message) or a new message into a silent ack (handled zero times).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from outbox import Outbox, operate
from outbox.protocol import wire
from outbox.protocol.floor import Floor, MarkStep, StepDone
from outbox.receiver import Incoming, Receiver, ReceiverStats, Reject, serve
from outbox.receiver.inbox import Inbox
from outbox.receiver.pruner import MAX_DEFER, Pruner
from outbox.receiver.writer import Writer
from outbox.storage import schema

from ..raw_client import low_water_headers as headers
from ..raw_client import recv
from ..support import MS, ScriptedServer, fast_options, wait_until
from .pruning_scenes import played

FAST = fast_options(low_water_interval=10 * MS)


class Handled:
    """A handler that counts each call by (client id, message id)."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, int]] = Counter()
        self.payloads: list[Any] = []

    async def __call__(self, message: Incoming) -> None:
        self.calls[(message.client_id, message.id)] += 1
        self.payloads.append(message.data)

    def twice(self) -> list[tuple[str, int]]:
        return [key for key, count in self.calls.items() if count > 1]


def read(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def inbox_rows(db: Path, client_id: str | None = None) -> int:
    if client_id is None:
        return int(read(db, "SELECT count(*) FROM inbox")[0][0])
    return int(read(db, "SELECT count(*) FROM inbox WHERE client_id = ?", (client_id,))[0][0])


def floor_of(db: Path, client_id: str) -> tuple[int, int, int, int | None] | None:
    found = read(
        db,
        "SELECT base, floor, high_water, mark FROM inbox_floor WHERE client_id = ?",
        (client_id,),
    )
    return found[0] if found else None


@pytest.fixture
def handled() -> Handled:
    return Handled()


@pytest.fixture
async def receiver(tmp_path: Path, handled: Handled) -> AsyncIterator[Receiver]:
    async with serve(handled, tmp_path / "inbox.db") as rx:
        yield rx


async def test_100k_messages_keep_the_inbox_within_a_few_rounds(tmp_path: Path) -> None:
    """100,000 messages in rounds of 10,000: the receiver forgets each round once the
    client's mark passes it, so the inbox never holds much more than a round or two; at the
    end, none of the client's rows is left, and the floor covers them all."""
    db = tmp_path / "inbox.db"
    total, round_size = 100_000, 10_000
    peak = 0
    async with (
        serve(None, db, prune=True) as rx,
        Outbox(tmp_path / "outbox.db", rx.url, **FAST) as box,
    ):
        for start in range(0, total, round_size):
            await box.send_many([{"n": n} for n in range(start, start + round_size)])
            await box.drain(timeout=60)
            peak = max(peak, inbox_rows(db))
            # Pruned once the mark passes the round: at most the round still in flight.
            await wait_until(lambda: inbox_rows(db) <= round_size, timeout=30)
        await wait_until(lambda: inbox_rows(db) == 0 and rx.stats.pruned == total, timeout=30)
        assert rx.stats.messages == total
        client_id = box.client_id
    record = floor_of(db, client_id)
    assert record is not None and record[:3] == (1, total + 1, total)
    print(f"peak inbox rows: {peak}")
    assert peak <= 2 * round_size, peak


async def test_a_replayed_old_frame_is_a_duplicate_and_not_handled(
    tmp_path: Path, receiver: Receiver, handled: Handled
) -> None:
    db = tmp_path / "inbox.db"
    async with Outbox(tmp_path / "outbox.db", receiver.url, **FAST) as box:
        await box.send_many([{"n": n} for n in range(50)])
        await box.drain(timeout=10)
        client_id = box.client_id
        await wait_until(lambda: inbox_rows(db, client_id) == 0)
    assert len(handled.calls) == 50
    # A raw client replays message 7 under the same client id, as a stale connection might.
    async with connect(receiver.url, additional_headers=headers(client_id)) as ws:
        await ws.send(wire.encode_message(7, json.dumps({"n": 6})))
        assert await recv(ws) == {"type": "ack", "messageId": 7}
    assert handled.calls[(client_id, 7)] == 1 and not handled.twice()
    assert receiver.stats.duplicates == 1
    # From a client that renumbers conflicts, an id below its own mark is not a resend (a
    # restored backup, a spoofer): refused as a conflict, never acked unhandled.
    features = f"{wire.FEATURE_ID_CONFLICT}, {wire.FEATURE_LOW_WATER}"
    async with connect(receiver.url, additional_headers=headers(client_id, features)) as ws:
        await ws.send(wire.encode_message(8, json.dumps({"other": "content"})))
        nack = await recv(ws)
    assert nack["type"] == "nack" and nack["messageId"] == 8 and nack["conflict"] is True
    assert "below this client's floor" in nack["reason"]
    assert handled.calls[(client_id, 8)] == 1 and {"other": "content"} not in handled.payloads


async def test_a_hostile_mark_prunes_only_its_own_rows_and_is_clipped(
    tmp_path: Path, receiver: Receiver, handled: Handled
) -> None:
    db = tmp_path / "inbox.db"
    victim_db = tmp_path / "victim.db"
    async with Outbox(victim_db, receiver.url, **fast_options(low_water_interval=3600)) as box:
        await box.send_many([{"n": n} for n in range(20)])
        await box.drain(timeout=10)
        victim = box.client_id
    assert inbox_rows(db, victim) == 20  # its handshake mark was 1: nothing to forget yet
    hostile = "hostile"
    # Its own 3 messages, then a mark far beyond them, in the header and in a frame.
    async with connect(
        receiver.url,
        additional_headers=headers(hostile, "batch-ack, low-water", mark=10**15),
    ) as ws:
        await ws.send(wire.encode_batch([(i, json.dumps({"h": i})) for i in (1, 2, 3)]))
        assert await recv(ws) == {"type": "ack", "messageIds": [1, 2, 3]}
        await ws.send(wire.encode_low_water(2**63 - 1))
        # Clipped to what it holds: the floor stops past its last row, whatever the mark.
        await wait_until(lambda: floor_of(db, hostile) == (1, 4, 3, 2**63 - 1))
        assert inbox_rows(db, hostile) == 0
        # So its next id is handled as new, not swallowed as old.
        await ws.send(wire.encode_message(4, json.dumps({"h": 4})))
        assert await recv(ws) == {"type": "ack", "messageIds": [4]}
    assert handled.calls[(hostile, 4)] == 1
    assert inbox_rows(db, victim) == 20 and floor_of(db, victim) in (None, (0, 0, 0, 1))
    # The high-water mark our client reads survives the pruning.
    async with connect(
        receiver.url, additional_headers=headers(hostile, wire.FEATURE_ID_CONFLICT)
    ) as ws:
        assert ws.response is not None
        assert ws.response.headers[wire.HIGH_WATER_HEADER] == "4"


async def test_under_load_each_round_prunes_in_its_own_commit(
    tmp_path: Path, receiver: Receiver, handled: Handled
) -> None:
    """The writer never idle (the pruner's clock frozen): no pruning step of its own runs,
    yet each round of 100 messages also forgets the rows below the mark announced before
    it, in its own COMMIT, so the inbox holds one round. Once the clock moves on (idle),
    a step of its own finishes the last mark."""
    db = tmp_path / "inbox.db"
    pruner = receiver._pruner
    assert pruner is not None
    frozen = pruner._monotonic()
    pruner._monotonic = lambda: frozen
    steps = 0
    real_step = pruner.step

    async def counted_step() -> int:
        nonlocal steps
        steps += 1
        return await real_step()

    pruner.step = counted_step  # type: ignore[method-assign]
    async with connect(
        receiver.url, additional_headers=headers("busy", "batch-ack, low-water")
    ) as ws:
        for start in range(1, 1001, 100):
            ids = list(range(start, start + 100))
            await ws.send(wire.encode_batch([(i, json.dumps({"n": i})) for i in ids]))
            assert await recv(ws) == {"type": "ack", "messageIds": ids}
            assert inbox_rows(db, "busy") == 100  # this round's; the one before is forgotten
            await ws.send(wire.encode_low_water(start + 100))
        assert steps == 0
        assert floor_of(db, "busy") == (1, 901, 900, 901)
        pruner._monotonic = lambda: frozen + 1.0  # the writer has been idle since
        receiver._writer.wake()
        await wait_until(lambda: inbox_rows(db, "busy") == 0)
    assert steps >= 1
    assert floor_of(db, "busy") == (1, 1001, 1000, 1001)
    assert len(handled.calls) == 1000 and not handled.twice()


async def test_a_step_of_its_own_waits_for_idle_but_never_beyond_max_defer(
    tmp_path: Path,
) -> None:
    """On SQLite, where rounds fold the marks' steps, a step of its own towards a mark runs
    only once no round ran for ``pause``, or ``MAX_DEFER`` after it was due."""
    clock = [100.0]
    pruner = Pruner(window=None, pause=0.02, monotonic=lambda: clock[0])
    inbox = await Inbox.open(tmp_path / "inbox.db")
    try:
        Writer(inbox, None, ReceiverStats(), pruner=pruner)
        assert pruner.folding  # the writer saw a backend whose rounds fold steps
        assert pruner.due_in() is None  # nothing to do
        pruner.announce("c", 10)
        pruner.round_ended()
        assert pruner.due_in() == pytest.approx(0.02)
        clock[0] += 0.02
        assert pruner.due_in() == 0  # idle for pause: go
        clock[0] = 100.0 + MAX_DEFER / 2  # a round every few ms since
        pruner.round_ended()
        assert pruner.due_in() == pytest.approx(0.02)  # still waiting for idle
        clock[0] = 100.0 + MAX_DEFER
        pruner.round_ended()
        assert pruner.due_in() == 0  # overdue by MAX_DEFER: go anyway
        pruner.settle(MarkStep("c", 10, 2000, 0.0), StepDone(Floor(), Floor(), 0, 0))
        assert pruner.due_in() is None  # the mark is done
        pruner.announce("c", 20)  # due since now, not since the last mark
        assert pruner.due_in() == pytest.approx(0.02)
    finally:
        await inbox.close()


@pytest.mark.parametrize("old", [True, False], ids=["rows-to-delete", "rows-to-keep"])
async def test_the_time_windows_sweep_never_waits_for_idle_nor_for_the_marks(
    tmp_path: Path, old: bool
) -> None:
    """A writer busy every millisecond with rounds that fold a marked client's steps (each
    pushing that client's next step back): the time window's pass still goes on, at its
    own pace: a chunk every ``pause`` while it deletes most of what it reads (so it keeps
    up with a steady seed load), every ``5 * pause`` while it keeps most of it."""
    async with played(tmp_path, chunk=10) as scene:
        pruner = scene.pruner
        await scene.seed("seed", range(25), scene.wall if old else scene.wall + 3600)
        await pruner.resume(scene.inbox)
        scene.advance(2.0)  # a pass is due
        steps_at: list[float] = []
        for round_number in range(1, 251):  # 250 ms of rounds, one each millisecond
            pruner.announce("busy", round_number)
            step = pruner.fold(messages=100)
            assert step is not None and step.client_id == "busy"
            pruner.settle(step, StepDone(Floor(), Floor(), 0, 0))
            pruner.round_ended()
            if pruner.due_in() == 0:
                steps_at.append(pruner._monotonic())
                await pruner.step()
            scene.advance(0.001)
        assert pruner.sweeps == 1 and inbox_rows(scene.db, "seed") == (0 if old else 25)
        # The pass's chunks (no mark's step of its own), this far apart: three to delete
        # 25 rows; two to keep them (after a range it keeps, it passes over the rest of
        # that client's rows).
        gaps = [round(b - a, 3) for a, b in itertools.pairwise(steps_at)]
        assert gaps == ([0.02, 0.02] if old else [0.1])


async def test_the_time_windows_sweep_goes_on_while_a_marked_client_keeps_the_writer_busy(
    tmp_path: Path, handled: Handled
) -> None:
    """A client's 500 rows without a mark, past the window, take ten chunks of the sweep;
    meanwhile a marked client keeps the writer busy with rounds that fold its own steps.
    The sweep must not wait for an idle writer (it would never come) nor behind the marks'
    steps."""
    db = tmp_path / "inbox.db"
    async with serve(handled, db, duplicate_window=50 * MS) as rx:
        rx._pruner.chunk = 50
        rx._pruner.pause = 5 * MS
        async with connect(rx.url, additional_headers=headers("seed", "batch-ack")) as seed:
            ids = list(range(1, 501))
            await seed.send(wire.encode_batch([(i, "{}") for i in ids]))
            assert await recv(seed) == {"type": "ack", "messageIds": ids}
        # Named to sort after the seed's: the sweep goes in key order.
        busy = headers("zz-busy", "batch-ack, low-water", mark=1)
        async with connect(rx.url, additional_headers=busy) as ws:
            rounds, deadline = 0, asyncio.get_running_loop().time() + 5.0
            while inbox_rows(db, "seed") and asyncio.get_running_loop().time() < deadline:
                ids = list(range(rounds * 20 + 1, rounds * 20 + 21))
                await ws.send(wire.encode_batch([(i, "{}") for i in ids]))
                assert await recv(ws) == {"type": "ack", "messageIds": ids}
                await ws.send(wire.encode_low_water(ids[-1] + 1))
                rounds += 1
        assert inbox_rows(db, "seed") == 0, f"the sweep starved over {rounds} busy rounds"
        assert inbox_rows(db, "zz-busy") <= 40  # and the busy client's rows went meanwhile
    assert not handled.twice()


async def test_a_seed_client_without_a_mark_gets_the_time_window(
    tmp_path: Path, handled: Handled
) -> None:
    """Rows of a client that never announced a mark go after duplicate_window; those of a
    client that did stay until its mark passes them, whatever their age."""
    db = tmp_path / "inbox.db"
    async with serve(handled, db, duplicate_window=50 * MS) as rx:
        seed_url = f"{rx.url}?client_id=seed-page-1"
        async with connect(seed_url) as seed:
            for n in (1, 2, 3):
                await seed.send(wire.encode_message(n, json.dumps({"seed": n})))
                assert await recv(seed) == {"type": "ack", "messageId": n}
        marked = headers("marked", wire.FEATURE_LOW_WATER, mark=1)  # nothing acked yet
        async with connect(rx.url, additional_headers=marked) as ours:
            await ours.send(wire.encode_message(1, json.dumps({"ours": 1})))
            assert await recv(ours) == {"type": "ack", "messageId": 1}
        await wait_until(lambda: inbox_rows(db, "seed-page-1") == 0)
        # ... a whole sweep later, the marked client's row is still there.
        sweeps = rx._pruner.sweeps
        await wait_until(lambda: rx._pruner.sweeps >= sweeps + 2)
        assert inbox_rows(db, "marked") == 1
        assert rx.stats.pruned == 3  # counted as deleted, not as chosen
        assert floor_of(db, "seed-page-1") == (0, 0, 3, None)  # its high-water mark is kept
        # The documented trade-off: a resend after the window is handled again.
        async with connect(seed_url) as seed:
            await seed.send(wire.encode_message(2, json.dumps({"seed": 2})))
            assert await recv(seed) == {"type": "ack", "messageId": 2}
    assert handled.calls[("seed-page-1", 2)] == 2


async def test_a_restarted_receiver_keeps_the_floor(tmp_path: Path, handled: Handled) -> None:
    db = tmp_path / "inbox.db"
    async with serve(handled, db) as rx, Outbox(tmp_path / "outbox.db", rx.url, **FAST) as box:
        await box.send_many([{"n": n} for n in range(30)])
        await box.drain(timeout=10)
        client_id = box.client_id
        await wait_until(lambda: inbox_rows(db, client_id) == 0)
    async with serve(handled, db) as rx:
        async with connect(rx.url, additional_headers=headers(client_id)) as ws:
            await ws.send(wire.encode_batch([(i, json.dumps({"n": i - 1})) for i in (3, 30)]))
            acked = await recv(ws)
            assert acked == {"type": "ack", "messageId": 3}
            assert await recv(ws) == {"type": "ack", "messageId": 30}
        assert rx.stats.duplicates == 2 and rx.stats.messages == 0
        async with connect(
            rx.url, additional_headers=headers(client_id, wire.FEATURE_ID_CONFLICT)
        ) as ws:
            assert ws.response is not None
            assert ws.response.headers[wire.HIGH_WATER_HEADER] == "30"
    assert not handled.twice() and len(handled.calls) == 30
    with contextlib.closing(sqlite3.connect(db)) as conn:  # what `outbox stats` prints
        stats = operate.inbox_stats(conn, str(db), client_limit=5)
    assert (stats.rows, stats.floors, stats.forgotten) == (0, 1, 30)


def restore(backup: Path, db: Path) -> None:
    """Put a backup back in place of a closed outbox file, as an operator would."""
    shutil.copy(backup, db)
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


async def test_a_restored_outbox_after_pruning_loses_no_new_message(
    tmp_path: Path, receiver: Receiver, handled: Handled
) -> None:
    """The receiver forgot ids 1..30 (and their digests); the outbox file is then restored
    from a backup taken at id 10, and 20 new messages are queued offline with ids 11..30.
    They are refused as below the floor and renumbered: each handled once, none lost."""
    db, backup = tmp_path / "outbox.db", tmp_path / "backup.db"
    inbox = tmp_path / "inbox.db"
    async with Outbox(db, receiver.url, **FAST) as box:
        await box.send_many([{"before backup": n} for n in range(10)])
        await box.drain(timeout=10)
    shutil.copy(db, backup)  # closed: the WAL is checkpointed into the main file
    async with Outbox(db, receiver.url, **FAST) as box:
        await box.send_many([{"after backup": n} for n in range(20)])
        await box.drain(timeout=10)
        client_id = box.client_id
        await wait_until(lambda: inbox_rows(inbox, client_id) == 0)
    restore(backup, db)
    new = [{"after restore": n} for n in range(20)]
    async with Outbox(db, "ws://127.0.0.1:9/", **FAST) as offline:
        await offline.send_many(new)  # ids 11..30: forgotten at the receiver
    async with Outbox(db, receiver.url, **FAST) as box:
        await box.drain(timeout=10)
    assert all(handled.payloads.count(p) == 1 for p in new)
    assert len(handled.payloads) == 50 and not handled.twice()
    # Each of the 20 was refused once as below the floor. Under load a resend of an already
    # acked, renumbered id can also arrive after the client's next mark moved the floor past
    # it: refused as below the floor too, and the client, whose row is acked, drops it
    # (renumbered to nothing). So the count is a lower bound; the effect above is exact.
    assert receiver.stats.conflicts >= 20


def announcing() -> bool:
    """Is a session's low-water announcer running?"""
    return any(task.get_name() == "outbox-low-water" for task in asyncio.all_tasks())


async def test_an_inbox_only_receiver_keeps_every_row_unless_told(tmp_path: Path) -> None:
    """Without a handler the inbox rows are the messages themselves (python -m outbox
    serve): no pruning by default, and ``low-water`` is not accepted, so no frames come."""
    db = tmp_path / "inbox.db"
    async with (
        serve(None, db, duplicate_window=1 * MS) as rx,
        Outbox(tmp_path / "outbox.db", rx.url, **FAST) as box,
    ):
        await box.send_many([{"n": n} for n in range(20)])
        await box.drain(timeout=10)
        assert not announcing()
        assert rx._pruner is None and rx.stats.pruned == 0
    assert inbox_rows(db) == 20
    with pytest.raises(TypeError, match="prune must be True, False or None"):
        serve(None, db, prune="yes")  # type: ignore[arg-type]


async def test_a_seed_style_server_never_sees_a_low_water_frame(tmp_path: Path) -> None:
    """Only a receiver that accepted the token gets frames: a seed-style server would choke
    on one (this scripted server's loop needs an "id" and would drop the connection)."""
    async with (
        ScriptedServer(batch=True) as server,
        Outbox(tmp_path / "outbox.db", server.url, **FAST) as box,
    ):
        await box.send_many([{"n": n} for n in range(10)])
        await box.drain(timeout=10)  # connected, its session running
        assert not announcing()
    assert server.connections == 1 and sorted(server.unique_ids()) == list(range(1, 11))


async def test_our_receiver_gets_the_mark_as_it_rises(tmp_path: Path, receiver: Receiver) -> None:
    async with Outbox(tmp_path / "outbox.db", receiver.url, **FAST) as box:
        await box.send_many([{"n": n} for n in range(10)])
        await box.drain(timeout=10)
        assert announcing()
        client_id = box.client_id
        await wait_until(lambda: (floor_of(tmp_path / "inbox.db", client_id) or (0,))[-1] == 11)


async def test_an_inbox_from_schema_version_4_is_migrated(tmp_path: Path, handled: Handled) -> None:
    db = tmp_path / "inbox.db"
    conn = sqlite3.connect(db, isolation_level=None)
    for migration in schema.available()[:4]:
        for statement in schema.statements(migration.sql):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 4")
    conn.executemany(
        "INSERT INTO inbox (client_id, message_id, payload, received_at, payload_sha256) "
        "VALUES ('old', ?, '{}', 0, NULL)",
        [(i,) for i in range(1, 6)],
    )
    conn.close()
    async with serve(handled, db) as rx:
        assert int(read(db, "PRAGMA user_version")[0][0]) == 5
        async with connect(
            rx.url, additional_headers=headers("old", wire.FEATURE_LOW_WATER, mark=4)
        ) as ws:
            await wait_until(lambda: inbox_rows(db, "old") == 2)
            await ws.send(wire.encode_message(2, "{}"))  # forgotten, still a duplicate
            assert await recv(ws) == {"type": "ack", "messageId": 2}
    assert floor_of(db, "old") == (1, 4, 3, 4) and not handled.calls


async def test_a_dead_row_holds_the_floor_and_its_resend_is_nacked_again(tmp_path: Path) -> None:
    """Message 3 is rejected (dead at the client): the client's mark stays at 3, the floor
    below it, so requeue_dead() gets the same nack again from the kept row; once the dead
    is acked the rest could go too (it never is here: it stays rejected)."""
    db = tmp_path / "inbox.db"
    calls: Counter[int] = Counter()

    async def handler(message: Incoming) -> None:
        calls[message.id] += 1
        if message.data == {"n": 2}:
            raise Reject("no such order")

    async with (
        serve(handler, db) as rx,
        Outbox(tmp_path / "outbox.db", rx.url, **FAST) as box,
    ):
        await box.send_many([{"n": n} for n in range(10)])
        await box.drain(timeout=10)
        client_id = box.client_id
        await wait_until(lambda: (floor_of(db, client_id) or (0, 0))[1] == 3)
        assert inbox_rows(db, client_id) == 8  # 1 and 2 forgotten; 3 (rejected) and above kept
        assert await box.requeue_dead() == 1
        await box.drain(timeout=10)
        assert box.stats().dead == 1 and calls[3] == 1  # nacked again from its row
    assert max(calls.values()) == 1 and len(calls) == 10


async def test_a_batch_handler_never_sees_a_forgotten_message_again(tmp_path: Path) -> None:
    """serve(batch=True) sorts a round's messages before the one call: a straggler below
    the floor is answered there, like on the per-message path, and left out of the batch."""
    db = tmp_path / "inbox.db"
    calls: Counter[tuple[str, int]] = Counter()

    async def handler(batch: Any) -> None:
        for message in batch:
            calls[(message.client_id, message.id)] += 1

    async with serve(handler, db, batch=True) as rx:
        async with Outbox(tmp_path / "outbox.db", rx.url, **FAST) as box:
            await box.send_many([{"n": n} for n in range(40)])
            await box.drain(timeout=10)
            client_id = box.client_id
            await wait_until(lambda: inbox_rows(db, client_id) == 0)
        async with connect(rx.url, additional_headers=headers(client_id, "batch-ack")) as ws:
            replay = [(i, json.dumps({"n": i - 1})) for i in (5, 6, 41)]
            await ws.send(wire.encode_batch(replay))
            acked = await recv(ws)
        assert sorted(acked["messageIds"]) == [5, 6, 41]
    assert calls[(client_id, 5)] == 1 and calls[(client_id, 6)] == 1
    assert calls[(client_id, 41)] == 1 and max(calls.values()) == 1


async def test_a_restarted_receiver_finishes_the_pruning_it_stopped_in(
    tmp_path: Path, handled: Handled
) -> None:
    """A receiver stopped before its floor reached a client's mark takes the work up at
    start, without waiting for the client to come back."""
    db = tmp_path / "inbox.db"
    async with serve(handled, db):
        pass  # the file, migrated
    conn = sqlite3.connect(db, isolation_level=None)
    conn.executemany(
        "INSERT INTO inbox (client_id, message_id, payload, received_at, payload_sha256) "
        "VALUES ('gone', ?, '{}', 0, 'x')",
        [(i,) for i in range(1, 11)],
    )
    conn.execute("DELETE FROM inbox WHERE client_id = 'gone' AND message_id < 4")
    conn.execute(
        "INSERT INTO inbox_floor (client_id, base, floor, high_water, mark, updated_at) "
        "VALUES ('gone', 1, 4, 3, 8, 0)"
    )
    conn.close()
    async with serve(handled, db) as rx:
        await wait_until(lambda: floor_of(db, "gone") == (1, 8, 7, 8))
        await wait_until(lambda: rx.stats.pruned == 4)  # 4 to 7; 1 to 3 were gone already
    assert inbox_rows(db, "gone") == 3  # 8, 9, 10: at and above the mark


def test_serve_duplicate_window_takes_seconds_or_forever() -> None:
    import argparse

    from outbox.cli import _window

    assert _window("3600") == 3600.0 and _window("Forever") is None
    with pytest.raises(argparse.ArgumentTypeError, match="seconds or 'forever'"):
        _window("a week")
