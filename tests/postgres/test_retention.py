"""A bounded inbox on PostgreSQL: the SQLite retention tests' counterparts, and the fleet's.

Real receivers on 127.0.0.1, real clients (our Outbox, or raw websockets for frames a stale
connection would send), a fresh database per test on the session's throwaway server. Each
test asks whether forgetting rows ever turned a resend into a second effect, on one receiver
or across two sharing the database.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from websockets.asyncio.client import connect

from outbox import Outbox
from outbox.protocol import wire
from outbox.protocol.floor import Floor
from outbox.receiver import Incoming, serve
from outbox.receiver.postgres import PostgresInbox
from outbox.receiver.pruner import Pruner

from ..raw_client import batch, recv
from ..raw_client import low_water_headers as headers
from ..support import MS, fast_options

FAST = fast_options(low_water_interval=10 * MS)


class Handled:
    """A handler that counts each call by (client id, message id), shared by receivers."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, int]] = Counter()

    async def __call__(self, message: Incoming) -> None:
        self.calls[(message.client_id, message.id)] += 1

    def twice(self) -> list[tuple[str, int]]:
        return [key for key, count in self.calls.items() if count > 1]


async def fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows
    finally:
        await conn.close()


async def inbox_rows(url: str, client_id: str | None = None) -> int:
    if client_id is None:
        return int((await fetch(url, "SELECT count(*) FROM inbox"))[0][0])
    rows = await fetch(url, "SELECT count(*) FROM inbox WHERE client_id = $1", client_id)
    return int(rows[0][0])


async def floor_of(url: str, client_id: str) -> tuple[int, int, int, int | None] | None:
    rows = await fetch(
        url,
        "SELECT base, floor, high_water, mark FROM inbox_floor WHERE client_id = $1",
        client_id,
    )
    return tuple(rows[0]) if rows else None  # type: ignore[return-value]


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll an async condition (a query) every few milliseconds, up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


async def test_postgresql_accepts_low_water_and_prune(pg_url: str) -> None:
    handled = Handled()
    async with serve(handled, pg_url) as rx:
        assert rx._pruner is not None
        features = wire.format_features(wire.CLIENT_FEATURES)
        async with connect(rx.url, additional_headers=headers("c1", features, mark=1)) as ws:
            assert ws.response is not None
            accepted = wire.parse_features(ws.response.headers[wire.FEATURES_HEADER])
            assert wire.FEATURE_LOW_WATER in accepted
    async with serve(None, pg_url, prune=True) as rx:
        assert rx._pruner is not None
    version = await fetch(pg_url, "SELECT max(version) FROM outbox_schema")
    assert version[0][0] == 3


async def test_100k_messages_keep_the_inbox_within_a_few_rounds(
    pg_url: str, tmp_path: Path
) -> None:
    """100,000 messages in rounds of 10,000, as on SQLite: the inbox never holds much more
    than a round or two; at the end none of the client's rows is left and the floor covers
    them all."""
    total, round_size = 100_000, 10_000
    peak = 0
    async with (
        serve(None, pg_url, prune=True) as rx,
        Outbox(tmp_path / "outbox.db", rx.url, **FAST) as box,
    ):
        for start in range(0, total, round_size):
            await box.send_many([{"n": n} for n in range(start, start + round_size)])
            await box.drain(timeout=60)
            peak = max(peak, await inbox_rows(pg_url))

            async def within_a_round() -> bool:
                return await inbox_rows(pg_url) <= round_size

            await until(within_a_round, timeout=30)

        async def all_pruned() -> bool:
            return await inbox_rows(pg_url) == 0 and rx.stats.pruned == total

        await until(all_pruned, timeout=30)
        assert rx.stats.messages == total
        client_id = box.client_id
    record = await floor_of(pg_url, client_id)
    assert record is not None and record[:3] == (1, total + 1, total)
    print(f"peak inbox rows: {peak}")
    assert peak <= 2 * round_size, peak


async def test_a_replayed_old_frame_is_a_duplicate_and_not_handled(
    pg_url: str, tmp_path: Path
) -> None:
    handled = Handled()
    async with serve(handled, pg_url) as rx:
        async with Outbox(tmp_path / "outbox.db", rx.url, **FAST) as box:
            await box.send_many([{"n": n} for n in range(50)])
            await box.drain(timeout=10)
            client_id = box.client_id

            async def forgotten() -> bool:
                return await inbox_rows(pg_url, client_id) == 0

            await until(forgotten)
        assert len(handled.calls) == 50
        async with connect(rx.url, additional_headers=headers(client_id)) as ws:
            await ws.send(wire.encode_message(7, json.dumps({"n": 6})))
            assert await recv(ws) == {"type": "ack", "messageId": 7}
        assert handled.calls[(client_id, 7)] == 1 and not handled.twice()
        assert rx.stats.duplicates == 1
        # From a client that renumbers conflicts: refused, never acked unhandled.
        features = f"{wire.FEATURE_ID_CONFLICT}, {wire.FEATURE_LOW_WATER}"
        async with connect(rx.url, additional_headers=headers(client_id, features)) as ws:
            await ws.send(wire.encode_message(8, json.dumps({"other": "content"})))
            nack = await recv(ws)
        assert nack["type"] == "nack" and nack["messageId"] == 8 and nack["conflict"] is True
        assert "below this client's floor" in nack["reason"]
        assert handled.calls[(client_id, 8)] == 1


async def test_a_straggler_reaching_a_receiver_with_a_stale_floor_is_a_duplicate(
    pg_url: str,
) -> None:
    """The fleet's hazard: receiver B handled c1's first messages when c1 had no floor, then
    receiver A raises c1's floor and deletes the rows below it. A replayed old frame of c1
    then reaches B: B must answer it as a duplicate from the real floor, not handle it again
    as a receiver that still went by the floor it saw earlier (none) would, finding no row."""
    handled = Handled()
    low_water = wire.FEATURE_LOW_WATER
    async with serve(handled, pg_url) as a, serve(handled, pg_url) as b:
        assert a._pruner is not None and b._pruner is not None
        async with connect(b.url, additional_headers=headers("c1", low_water, mark=1)) as ws:
            await ws.send(batch(range(1, 11)))
            assert await recv(ws) == {"type": "ack", "messageId": 1}
            for n in range(2, 11):
                assert await recv(ws) == {"type": "ack", "messageId": n}
        before = await floor_of(pg_url, "c1")
        assert before is not None and before[1] == 0  # what B saw: no floor yet
        # c1 reconnects to A, sends more, and its mark says 1..20 are acked for good.
        async with connect(a.url, additional_headers=headers("c1", low_water, mark=1)) as ws:
            await ws.send(batch(range(11, 21)))
            for n in range(11, 21):
                assert await recv(ws) == {"type": "ack", "messageId": n}
            await ws.send(wire.encode_low_water(21))

            async def pruned() -> bool:
                counted = a.stats.pruned == 20  # read first: counted after the COMMIT
                return counted and await inbox_rows(pg_url, "c1") == 0

            await until(pruned)
        assert await floor_of(pg_url, "c1") == (1, 21, 20, 21)
        assert b.stats.pruned == 0
        # A stale connection's replay of old frames reaches B: duplicates, not handled.
        async with connect(b.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([3, 15, 20]))
            for n in (3, 15, 20):
                assert await recv(ws) == {"type": "ack", "messageId": n}
            # And a new id is still new (the floor stops at what was recorded).
            await ws.send(batch([21]))
            assert await recv(ws) == {"type": "ack", "messageId": 21}
        assert b.stats.duplicates == 3 and b.stats.messages == 11
    assert not handled.twice() and len(handled.calls) == 21


async def test_a_group_commit_waits_for_a_chunk_and_sees_the_raised_floor(pg_url: str) -> None:
    """The interleaving behind the fleet test, made deterministic at the store level: a
    pruner's chunk holds c1's fence row FOR UPDATE with its floor raised and rows deleted,
    uncommitted; another receiver's group commit carrying c1 waits at its fence, then its
    dedup query sees the raised floor (never the rows gone and the old floor)."""
    pruning = await PostgresInbox.open(pg_url)
    writing = await PostgresInbox.open(pg_url)
    try:
        assert pruning.claim is not None
        await pruning.claim("c1")
        await pruning.begin()
        await pruning.record([("c1", i, "{}", 0.0, None, "d") for i in range(1, 6)])
        await pruning.commit()
        await pruning.begin()
        await pruning.lock("c1")
        assert await pruning.run("c1", 0, 4, 100) == [(1, False), (2, False), (3, False)]
        assert await pruning.forget("c1", Floor(1, 4, 3, 4), 0.0) == 3
        await writing.begin()
        fence = asyncio.create_task(writing.fence(["c1"]))
        pid = writing._conn.get_server_pid()

        async def waiting_for_the_lock() -> bool:
            rows = await fetch(
                pg_url, "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid
            )
            return bool(rows) and rows[0][0] == "Lock"

        await until(waiting_for_the_lock)  # the group commit waits for the chunk
        assert not fence.done()
        await pruning.commit()
        assert await fence == {"c1": 1}
        seen = await writing.seen([("c1", 2), ("c1", 5)])
        assert seen == {("c1", 5): (None, "d")}  # 2 is gone...
        assert await writing.floors(["c1"]) == {"c1": Floor(1, 4, 3, 4)}  # ...and covered
        await writing.commit()
    finally:
        await pruning.close()
        await writing.close()


async def test_a_hostile_mark_prunes_only_its_own_rows_and_is_clipped(
    pg_url: str, tmp_path: Path
) -> None:
    handled = Handled()
    async with serve(handled, pg_url) as rx:
        options = fast_options(low_water_interval=3600)
        async with Outbox(tmp_path / "victim.db", rx.url, **options) as box:
            await box.send_many([{"n": n} for n in range(20)])
            await box.drain(timeout=10)
            victim = box.client_id
        assert await inbox_rows(pg_url, victim) == 20
        hostile = "hostile"
        async with connect(
            rx.url, additional_headers=headers(hostile, "batch-ack, low-water", mark=10**15)
        ) as ws:
            await ws.send(batch([1, 2, 3]))
            assert await recv(ws) == {"type": "ack", "messageIds": [1, 2, 3]}
            await ws.send(wire.encode_low_water(2**63 - 1))

            async def pruned() -> bool:
                return await inbox_rows(pg_url, hostile) == 0

            await until(pruned)
            await ws.send(batch([4]))  # clipped: its next id is new, not swallowed as old
            assert await recv(ws) == {"type": "ack", "messageIds": [4]}
        assert handled.calls[(hostile, 4)] == 1
        assert await floor_of(pg_url, hostile) == (1, 4, 3, 2**63 - 1)
        assert await inbox_rows(pg_url, victim) == 20
        assert await floor_of(pg_url, victim) in (None, (0, 0, 0, 1))
        async with connect(
            rx.url, additional_headers=headers(hostile, wire.FEATURE_ID_CONFLICT)
        ) as ws:
            assert ws.response is not None
            assert ws.response.headers[wire.HIGH_WATER_HEADER] == "4"


async def test_a_seed_client_without_a_mark_gets_the_time_window(pg_url: str) -> None:
    handled = Handled()
    async with serve(handled, pg_url, duplicate_window=50 * MS) as rx:
        assert rx._pruner is not None
        seed_url = f"{rx.url}?client_id=seed-page-1"
        async with connect(seed_url) as seed:
            for n in (1, 2, 3):
                await seed.send(wire.encode_message(n, json.dumps({"seed": n})))
                assert await recv(seed) == {"type": "ack", "messageId": n}
        marked = headers("marked", wire.FEATURE_LOW_WATER, mark=1)
        async with connect(rx.url, additional_headers=marked) as ours:
            await ours.send(wire.encode_message(1, json.dumps({"ours": 1})))
            assert await recv(ours) == {"type": "ack", "messageId": 1}

        async def seed_forgotten() -> bool:
            return await inbox_rows(pg_url, "seed-page-1") == 0

        await until(seed_forgotten)
        sweeps = rx._pruner.sweeps

        async def two_more_sweeps() -> bool:
            assert rx._pruner is not None
            return rx._pruner.sweeps >= sweeps + 2

        await until(two_more_sweeps)
        assert await inbox_rows(pg_url, "marked") == 1
        assert await floor_of(pg_url, "seed-page-1") == (0, 0, 3, None)
        async with connect(seed_url) as seed:  # the documented trade-off: handled again
            await seed.send(wire.encode_message(2, json.dumps({"seed": 2})))
            assert await recv(seed) == {"type": "ack", "messageId": 2}
    assert handled.calls[("seed-page-1", 2)] == 2


async def test_a_restarted_receiver_keeps_the_floor(pg_url: str, tmp_path: Path) -> None:
    handled = Handled()
    async with serve(handled, pg_url) as rx, Outbox(tmp_path / "outbox.db", rx.url, **FAST) as box:
        await box.send_many([{"n": n} for n in range(30)])
        await box.drain(timeout=10)
        client_id = box.client_id

        async def forgotten() -> bool:
            return await inbox_rows(pg_url, client_id) == 0

        await until(forgotten)
    async with serve(handled, pg_url) as rx:
        async with connect(rx.url, additional_headers=headers(client_id)) as ws:
            await ws.send(wire.encode_batch([(i, json.dumps({"n": i - 1})) for i in (3, 30)]))
            assert await recv(ws) == {"type": "ack", "messageId": 3}
            assert await recv(ws) == {"type": "ack", "messageId": 30}
        assert rx.stats.duplicates == 2 and rx.stats.messages == 0
        async with connect(
            rx.url, additional_headers=headers(client_id, wire.FEATURE_ID_CONFLICT)
        ) as ws:
            assert ws.response is not None
            assert ws.response.headers[wire.HIGH_WATER_HEADER] == "30"
    assert not handled.twice() and len(handled.calls) == 30


async def test_a_second_receivers_lower_mark_never_lowers_the_floor(pg_url: str) -> None:
    """Receiver A's pruner raised c1's floor to 11; receiver B's pruner then works on an older,
    lower mark (6) it heard from c1 earlier. B starts from the record A left (read after
    taking c1's lock, never remembered), so the floor stays at 11: lowering it over deleted
    rows would let the stragglers 6..10 through to the handler again."""
    a = await PostgresInbox.open(pg_url)
    b = await PostgresInbox.open(pg_url)
    try:
        assert a.claim is not None
        await a.claim("c1")
        await a.begin()
        await a.record([("c1", i, "{}", 0.0, None, "d") for i in range(1, 21)])
        await a.commit()
        pruners = [Pruner(window=None), Pruner(window=None)]
        pruners[0].inbox, pruners[1].inbox = a, b
        pruners[0].announce("c1", 11)
        assert await pruners[0].step() == 10
        pruners[1].announce("c1", 6)
        assert await pruners[1].step() == 0
        assert await floor_of(pg_url, "c1") == (1, 11, 10, 11)
        # The record's upsert refuses to go down even when told to.
        await b.begin()
        await b.forget("c1", Floor(1, 6, 5, 6), 0.0)
        await b.commit()
        assert await floor_of(pg_url, "c1") == (1, 11, 10, 11)
        assert await inbox_rows(pg_url, "c1") == 10
    finally:
        await a.close()
        await b.close()


async def test_receivers_starting_together_resume_an_unfinished_mark_once(pg_url: str) -> None:
    """A previous run noted c1's mark 21 but got its floor only to 11 before it stopped. Two
    receivers then start on the database: both take the mark up (``unfinished``), take turns
    on c1's lock, and the floor ends at 21 with exactly the rows below it deleted."""
    async with serve(Handled(), pg_url):  # the schema, then nobody
        pass
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("INSERT INTO outbox_fence (client_id, epoch) VALUES ('c1', 3)")
        await conn.executemany(
            "INSERT INTO inbox (client_id, message_id, payload, received_at, payload_sha256) "
            "VALUES ('c1', $1, '{}', 0, 'd')",
            [(i,) for i in range(11, 31)],
        )
        await conn.execute(
            "INSERT INTO inbox_floor (client_id, base, floor, high_water, mark, updated_at) "
            "VALUES ('c1', 1, 11, 10, 21, 0)"
        )
    finally:
        await conn.close()
    async with serve(Handled(), pg_url) as a, serve(Handled(), pg_url) as b:

        async def resumed() -> bool:
            done = a.stats.pruned + b.stats.pruned == 10  # read first: counted after COMMIT
            return done and await inbox_rows(pg_url, "c1") == 10

        await until(resumed)
        assert await floor_of(pg_url, "c1") == (1, 21, 20, 21)
