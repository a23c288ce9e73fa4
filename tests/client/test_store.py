"""Store: the group-commit SQLite queue, on real files in a temp dir.

What the store wrote is checked from a separate ``sqlite3`` connection, as a person with the
sqlite3 shell would see it while the application runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from outbox.client.store import Counts, Row, Store
from outbox.errors import (
    DatabaseCorruptError,
    DatabaseMissingError,
    OutboxClosedError,
    SchemaTooNewError,
    StorageFullError,
    StoreError,
)
from outbox.storage import schema
from tests.support import wait_until


class Clock:
    """A clock the test moves by hand (the store stamps created_at/updated_at with it)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(db: Path, clock: Clock) -> AsyncIterator[Store]:
    opened = await Store.open(db, clock=clock)
    yield opened
    await opened.close()


def shell(db: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Run one query on a separate connection, as the sqlite3 shell would."""
    with closing(sqlite3.connect(db)) as conn:
        return list(conn.execute(sql, params))


def table(db: Path) -> list[tuple[object, ...]]:
    return shell(
        db, "SELECT id, payload, status, attempts, last_error, key FROM outbox ORDER BY id"
    )


def statuses(db: Path) -> dict[int, str]:
    return {int(i): str(s) for i, s in shell(db, "SELECT id, status FROM outbox")}  # type: ignore[call-overload]


async def insert_many(store: Store, count: int) -> list[int]:
    return await store.insert([(f'{{"n": {n}}}', None) for n in range(count)])


# -- opening ---------------------------------------------------------------------------------


async def test_open_creates_the_schema_in_wal_mode_visible_to_another_connection(
    store: Store, db: Path
) -> None:
    # While the store is open, another process can inspect the file.
    assert shell(db, "PRAGMA journal_mode") == [("wal",)]
    assert shell(db, "PRAGMA user_version") == [(schema.latest_version(),)]
    names = {n for (n,) in shell(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"outbox", "outbox_meta"} <= names
    await store.insert([('"hi"', None)])
    assert table(db) == [(1, '"hi"', "pending", 0, None, None)]


async def test_client_id_is_stable_across_reopen_and_unique_per_file(
    db: Path, tmp_path: Path
) -> None:
    first = await Store.open(db)
    client_id = first.client_id
    await first.close()
    again = await Store.open(db)
    other = await Store.open(tmp_path / "other.db")
    try:
        assert again.client_id == client_id
        assert shell(db, "SELECT value FROM outbox_meta WHERE name = 'client_id'") == [(client_id,)]
        assert other.client_id != client_id
    finally:
        await again.close()
        await other.close()


async def test_reopen_restores_counts_and_keeps_numbering(db: Path) -> None:
    first = await Store.open(db)
    await insert_many(first, 3)
    first.mark_acked([1])
    first.mark_dead([(2, "nack: no")])
    await first.close()
    again = await Store.open(db)
    try:
        assert again.counts == Counts(pending=1, acked=1, dead=1)
        assert await insert_many(again, 1) == [4]
    finally:
        await again.close()


async def test_bad_synchronous_setting_is_refused(db: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        await Store.open(db, synchronous="SOMETIMES")  # type: ignore[arg-type]


# -- inserting -------------------------------------------------------------------------------


async def test_insert_returns_consecutive_ids_in_order(store: Store, db: Path) -> None:
    assert await store.insert([('"a"', None), ('"b"', None), ('"c"', None)]) == [1, 2, 3]
    assert await store.insert([('"d"', None)]) == [4]
    assert await store.insert([]) == []
    assert [(i, p) for i, p, *_ in table(db)] == [(1, '"a"'), (2, '"b"'), (3, '"c"'), (4, '"d"')]
    assert store.counts == Counts(pending=4)
    assert store.queued_rows == 0


async def test_concurrent_inserts_share_a_few_commits(store: Store, db: Path) -> None:
    before = store.commits
    results = await asyncio.gather(*(store.insert([(str(n), None)]) for n in range(100)))
    assert [ids for ids in results] == [[n] for n in range(1, 101)]
    assert store.commits - before <= 5  # group commit: not one transaction per call
    assert shell(db, "SELECT count(*), min(id), max(id) FROM outbox") == [(100, 1, 100)]
    # Each caller's id points at its own payload.
    assert shell(db, "SELECT count(*) FROM outbox WHERE payload != CAST(id - 1 AS TEXT)") == [(0,)]


async def test_a_large_insert_keeps_ids_consecutive_and_matched_to_payloads(
    store: Store, db: Path
) -> None:
    # More rows than one multi-row INSERT statement takes, with keys repeating across it.
    rows: list[tuple[str, str | None]] = [(str(n), f"k{n % 300}") for n in range(450)]
    assert await store.insert(rows) == list(range(1, 301)) + list(range(1, 151))
    assert shell(db, "SELECT count(*), max(id) FROM outbox") == [(300, 300)]
    assert await store.insert([(str(n), None) for n in range(450)]) == list(range(301, 751))
    assert shell(db, "SELECT count(*) FROM outbox") == [(750,)]
    assert shell(
        db,
        "SELECT count(*) FROM outbox WHERE payload != "
        "CAST(CASE WHEN id <= 300 THEN id - 1 ELSE id - 301 END AS TEXT)",
    ) == [(0,)]
    assert store.counts.pending == 750


async def test_an_existing_idempotency_key_returns_the_existing_id(store: Store, db: Path) -> None:
    assert await store.insert([('"first"', "k1"), ('"x"', None)]) == [1, 2]
    assert await store.insert([('"again"', "k1"), ('"y"', "k2")]) == [1, 3]
    assert [(i, p, k) for i, p, _, _, _, k in table(db)] == [
        (1, '"first"', "k1"),
        (2, '"x"', None),
        (3, '"y"', "k2"),
    ]
    assert store.counts == Counts(pending=3)


async def test_a_key_repeated_within_one_call_gets_one_row(store: Store, db: Path) -> None:
    ids = await store.insert([('"a"', "k"), ('"b"', None), ('"c"', "k"), ('"d"', "j")])
    assert ids == [1, 2, 1, 3]
    assert shell(db, "SELECT id, payload FROM outbox ORDER BY id") == [
        (1, '"a"'),
        (2, '"b"'),
        (3, '"d"'),
    ]
    assert store.counts.pending == 3


async def test_the_same_key_from_concurrent_calls_gets_one_row(store: Store, db: Path) -> None:
    first, second = await asyncio.gather(
        store.insert([('"a"', "same")]), store.insert([('"b"', "same")])
    )
    assert first == second == [1]
    assert shell(db, "SELECT count(*) FROM outbox") == [(1,)]
    assert store.counts.pending == 1


async def test_an_insert_cancelled_before_the_commit_loop_runs_writes_nothing(
    store: Store, db: Path
) -> None:
    task = asyncio.create_task(store.insert([('"never"', "key")]))
    await asyncio.sleep(0)  # one turn: the insert is queued, the commit loop has not run yet
    assert store.queued_rows == 1
    task.cancel()
    await store.flush()
    assert task.cancelled()
    assert table(db) == []
    assert store.queued_rows == 0
    assert store.counts == Counts()
    # Neither the id nor the key was used up.
    assert await store.insert([('"now"', "key")]) == [1]


async def test_a_closed_store_refuses_writes(db: Path) -> None:
    store = await Store.open(db)
    await store.close()
    assert store.closed
    with pytest.raises(OutboxClosedError):
        await store.insert([('"late"', None)])
    with pytest.raises(OutboxClosedError):
        store.mark_acked([1])


# -- acks, timeouts, dead rows ---------------------------------------------------------------


async def test_acks_dead_rows_and_timeouts_are_committed_by_flush(
    store: Store, db: Path, clock: Clock
) -> None:
    await insert_many(store, 4)
    clock.now = 2000.0
    store.mark_acked([1])
    store.mark_dead([(2, "too many timeouts")])
    store.record_timeouts([(3, 2)], "no ack within 5s")
    await store.flush()
    assert [(i, s, a, e) for i, _, s, a, e, _ in table(db)] == [
        (1, "acked", 0, None),
        (2, "dead", 0, "too many timeouts"),
        (3, "pending", 2, "no ack within 5s"),
        (4, "pending", 0, None),
    ]
    assert shell(db, "SELECT id FROM outbox WHERE updated_at = 2000.0 ORDER BY id") == [
        (1,),
        (2,),
        (3,),
    ]
    assert store.counts == Counts(pending=2, acked=1, dead=1)


async def test_only_pending_rows_change_status(store: Store, db: Path) -> None:
    await insert_many(store, 3)
    store.mark_acked([1, 1, 99])  # a duplicate and an unknown id
    store.mark_dead([(2, "nack")])
    await store.flush()
    store.mark_acked([2])  # dead stays dead
    store.mark_dead([(1, "late nack")])  # acked stays acked
    store.record_timeouts([(1, 5), (2, 5)], "late")  # attempts of finished rows stay put
    await store.flush()
    assert [(i, s, a, e) for i, _, s, a, e, _ in table(db)] == [
        (1, "acked", 0, None),
        (2, "dead", 0, "nack"),
        (3, "pending", 0, None),
    ]
    assert store.counts == Counts(pending=1, acked=1, dead=1)


async def test_a_repeated_ack_under_a_frozen_clock_is_not_counted_twice(store: Store) -> None:
    # The clock fixture never moves: every transaction gets the same wall-clock time.
    await insert_many(store, 3)
    store.mark_acked([1])
    await store.flush()
    store.mark_acked([1, 2])  # 1 again, from a later transaction at the "same" time
    await store.flush()
    assert store.counts == Counts(pending=1, acked=2)


async def test_fetch_pending_pages_in_id_order_and_skips_acked_and_dead(store: Store) -> None:
    await store.insert([(f'"m{n}"', None) for n in range(1, 11)])
    store.mark_acked([3, 6])
    store.mark_dead([(8, "nack")])
    store.record_timeouts([(4, 1)], "timeout")
    await store.flush()
    pages: list[list[Row]] = []
    after = 0
    while page := await store.fetch_pending(after, 3):
        pages.append(page)
        after = page[-1].id
    assert [[r.id for r in page] for page in pages] == [[1, 2, 4], [5, 7, 9], [10]]
    assert pages[0][2] == Row(4, '"m4"', 1)
    assert await store.fetch_pending(10, 3) == []
    assert [r.id for r in await store.fetch_ids([9, 3, 1, 8])] == [1, 9]


async def test_requeue_dead_puts_rows_back_with_attempts_reset(store: Store, db: Path) -> None:
    await insert_many(store, 4)
    store.record_timeouts([(2, 3), (3, 3)], "timeout")
    store.mark_dead([(2, "gave up"), (3, "gave up")])
    store.mark_acked([4])
    await store.flush()
    wakeups: list[int] = []
    unsubscribe = store.subscribe(lambda rows: wakeups.append(store.requeue_generation))
    generation = store.requeue_generation

    assert await store.requeue_dead([2, 1, 4]) == 1  # 1 is pending, 4 acked: not dead
    assert statuses(db) == {1: "pending", 2: "pending", 3: "dead", 4: "acked"}
    assert shell(db, "SELECT attempts FROM outbox WHERE id = 2") == [(0,)]
    assert store.counts == Counts(pending=2, acked=1, dead=1)
    assert store.requeue_generation == generation + 1
    assert wakeups == [generation + 1]

    unsubscribe()
    assert await store.requeue_dead() == 1
    assert await store.requeue_dead() == 0
    assert store.counts == Counts(pending=3, acked=1, dead=0)
    assert [r.id for r in await store.fetch_pending(0, 10)] == [1, 2, 3]
    assert wakeups == [generation + 1]


# -- retention -------------------------------------------------------------------------------


async def test_purge_deletes_only_acked_rows_by_age_and_by_count(
    store: Store, db: Path, clock: Clock
) -> None:
    await insert_many(store, 7)  # stamped 1000
    for when, ids in [(2000.0, [1, 2]), (3000.0, [3]), (4000.0, [4, 5])]:
        clock.now = when
        store.mark_acked(ids)
        await store.flush()
    store.mark_dead([(7, "nack")])
    await store.flush()

    assert await store.purge_acked(older_than=2500.0, keep=None) == 2
    assert statuses(db) == {3: "acked", 4: "acked", 5: "acked", 6: "pending", 7: "dead"}
    assert await store.purge_acked(older_than=None, keep=1) == 2
    assert statuses(db) == {5: "acked", 6: "pending", 7: "dead"}
    assert await store.purge_acked(older_than=10_000.0, keep=0) == 1
    assert statuses(db) == {6: "pending", 7: "dead"}
    assert store.counts == Counts(pending=1, acked=0, dead=1)


async def test_ids_are_never_reused_after_purging_everything(db: Path) -> None:
    store = await Store.open(db)
    try:
        await insert_many(store, 3)
        store.mark_acked([1, 2, 3])
        await store.flush()
        assert await store.purge_acked(older_than=None, keep=0) == 3
        assert shell(db, "SELECT count(*) FROM outbox") == [(0,)]
        assert await insert_many(store, 1) == [4]
    finally:
        await store.close()
    reopened = await Store.open(db)
    try:
        assert await insert_many(reopened, 1) == [5]
        assert await reopened.status(2) == ("acked", None)
    finally:
        await reopened.close()


async def test_status_of_purged_pending_dead_and_unknown_ids(store: Store) -> None:
    await insert_many(store, 3)
    store.mark_acked([1])
    store.mark_dead([(2, "nack: too big")])
    await store.flush()
    await store.purge_acked(older_than=None, keep=0)
    assert await store.status(1) == ("acked", None)  # purged: only acked rows are deleted
    assert await store.status(2) == ("dead", "nack: too big")
    assert await store.status(3) == ("pending", None)
    for unknown in (0, 4, 1000):
        with pytest.raises(ValueError, match=f"no message with id {unknown}"):
            await store.status(unknown)


# -- waiting for an outcome ------------------------------------------------------------------


async def test_wait_status_resolves_on_ack_and_on_dead(store: Store) -> None:
    await insert_many(store, 2)
    acked = asyncio.create_task(store.wait_status(1))
    dead = asyncio.create_task(store.wait_status(2))
    done, _ = await asyncio.wait({acked, dead}, timeout=0.05)
    assert not done, "wait_status returned while the rows were still pending"
    store.mark_acked([1])
    assert await asyncio.wait_for(acked, 5) == ("acked", None)
    assert not dead.done()
    store.mark_dead([(2, "nack: schema")])
    assert await asyncio.wait_for(dead, 5) == ("dead", "nack: schema")
    # Already settled: returns at once; unknown: raises.
    assert await asyncio.wait_for(store.wait_status(1), 5) == ("acked", None)
    with pytest.raises(ValueError):
        await store.wait_status(3)


async def test_waiters_registered_together_share_one_read_per_chunk(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,202 waiters cost three queries (500 ids each), not a thread hop each, and every
    one gets its own answer: settled rows at once, pending ones later, unknown ids an error."""
    await insert_many(store, 1200)
    store.mark_acked(list(range(1, 601)))
    store.mark_dead([(n, "nack: no") for n in range(601, 701)])
    await store.flush()
    reads: list[int] = []
    real = store._reader.execute_fetchall

    async def counted(sql: str, parameters: Any = ()) -> Any:
        reads.append(len(parameters))
        return await real(sql, parameters)

    monkeypatch.setattr(store._reader, "execute_fetchall", counted)
    futures = {n: store.status_future(n) for n in [*range(1, 1201), 5000, 0]}
    await wait_until(lambda: store._status_reads is None)  # every chunk answered
    assert reads == [500, 500, 202]
    assert all(futures[n].result() == ("acked", None) for n in range(1, 601))
    assert all(futures[n].result() == ("dead", "nack: no") for n in range(601, 701))
    for unknown in (5000, 0):
        with pytest.raises(ValueError, match=f"no message with id {unknown}"):
            futures[unknown].result()
    pending = [futures[n] for n in range(701, 1201)]
    assert not any(future.done() for future in pending)
    store.mark_acked(list(range(701, 1201)))
    assert [await future for future in pending] == [("acked", None)] * 500
    for n, future in futures.items():
        store.forget_waiter(n, future)
    assert store._waiters == {}


async def test_close_wakes_waiters_with_outbox_closed(db: Path) -> None:
    store = await Store.open(db)
    await insert_many(store, 1)
    waiter = asyncio.create_task(store.wait_status(1))
    done, _ = await asyncio.wait({waiter}, timeout=0.05)
    assert not done
    await store.close()
    with pytest.raises(OutboxClosedError):
        await asyncio.wait_for(waiter, 5)


# -- errors ----------------------------------------------------------------------------------


@pytest.fixture
def not_a_database(db: Path) -> Path:
    db.write_bytes(b"these are not the bytes you are looking for\n" * 200)
    return db


async def test_a_file_that_is_not_a_database(not_a_database: Path) -> None:
    db = not_a_database
    with pytest.raises(DatabaseCorruptError, match="not a usable SQLite database") as caught:
        await Store.open(db)
    assert str(db) in str(caught.value)
    assert "backup" in str(caught.value)
    assert isinstance(caught.value, StoreError)


async def test_a_database_from_a_newer_outbox(db: Path) -> None:
    with closing(sqlite3.connect(db)) as conn:
        conn.execute(f"PRAGMA user_version = {schema.latest_version() + 1}")
    with pytest.raises(SchemaTooNewError, match="upgrade"):
        await Store.open(db)
    # Also for a file the current version created and a newer one then migrated.
    newer = db.with_name("newer.db")
    await (await Store.open(newer)).close()
    with closing(sqlite3.connect(newer)) as conn:
        conn.execute("PRAGMA user_version = 999")
    with pytest.raises(SchemaTooNewError, match="999"):
        await Store.open(newer)


async def test_a_directory_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "outbox.db"
    with pytest.raises(StoreError, match="directory exists"):
        await Store.open(missing)
    assert not missing.parent.exists()


async def on_writer(store: Store, sql: str) -> Any:
    """Run one statement on the store's writer connection, on its own thread."""
    return await store._run_on_writer(lambda conn: conn.execute(sql).fetchone())


async def fill_up(store: Store) -> None:
    """Let the writer use no more pages than the file has now (a full disk, for SQLite)."""
    row = await on_writer(store, "PRAGMA page_count")
    assert row is not None
    await on_writer(store, f"PRAGMA max_page_count = {row[0]}")


async def test_a_full_disk_fails_the_insert_whole_and_recovers(store: Store, db: Path) -> None:
    await insert_many(store, 3)
    await fill_up(store)
    big = '"' + "x" * 200_000 + '"'
    with pytest.raises(StorageFullError, match="nothing from this call was written"):
        # Small rows first: they fit, but the transaction must not keep them.
        await store.insert([('"small"', "k1"), ('"small2"', None), (big, None)])
    assert shell(db, "SELECT count(*), max(id) FROM outbox") == [(3, 3)]
    assert store.counts == Counts(pending=3)
    assert store.queued_rows == 0

    await on_writer(store, "PRAGMA max_page_count = 1073741823")
    ids = await asyncio.wait_for(store.insert([('"small"', "k1"), (big, None)]), 5)
    assert ids == [4, 5]
    assert shell(db, "SELECT count(*), max(id) FROM outbox") == [(5, 5)]
    assert store.counts == Counts(pending=5)


async def test_acks_queued_during_a_full_disk_are_kept_and_committed_later(
    store: Store, db: Path
) -> None:
    await insert_many(store, 2)
    await fill_up(store)
    big = '"' + "x" * 200_000 + '"'
    failing = asyncio.create_task(store.insert([(big, None)]))
    store.mark_acked([1])  # rides in the same doomed transaction
    with pytest.raises(StorageFullError):
        await failing
    await on_writer(store, "PRAGMA max_page_count = 1073741823")
    await asyncio.wait_for(store.flush(), 5)
    assert statuses(db) == {1: "acked", 2: "pending"}
    assert store.counts == Counts(pending=1, acked=1)


async def test_wait_commit_wakes_on_a_failed_attempt(store: Store) -> None:
    # Outbox.drain() waits on wait_commit() while queued_rows > 0; a failed insert must
    # wake it, or drain() hangs with nothing left to commit.
    await fill_up(store)
    waiter = asyncio.create_task(store.wait_commit())
    await asyncio.sleep(0)  # the waiter is now waiting on this round's event
    with pytest.raises(StorageFullError):
        await store.insert([('"' + "x" * 200_000 + '"', None)])
    assert store.queued_rows == 0
    await asyncio.wait_for(waiter, 0.5)


# -------------------------------------------------------------------------------------------
# Regression (adversarial review): Store.counts drift, an id acked twice in one commit,
# 500 ids apart
# -------------------------------------------------------------------------------------------


async def test_an_id_acked_twice_in_one_commit_is_counted_once(tmp_path: Path) -> None:
    # Reachable from a session: a commit fails (file locked past busy_timeout), its acks are
    # kept for retry; the connection drops; the next session's flush fails too, so it
    # rescans the still-pending rows, resends them and reads their acks again. When the
    # lock goes, one transaction carries every id twice.
    store = await Store.open(tmp_path / "s.db")
    try:
        ids = await store.insert([(json.dumps(i), None) for i in range(600)])
        store.mark_acked(ids)  # acks read on the first connection, not yet committed
        store.mark_acked(ids)  # the same ids acked again after the resend
        await store.flush()
        assert (store.counts.pending, store.counts.acked) == (0, 600)
    finally:
        await store.close()


HOUR = 3600.0


@pytest.fixture
def mono() -> Clock:
    return Clock(50.0)


async def open_with(db: Path, wall: Clock, mono: Clock) -> Store:
    return await Store.open(db, clock=wall, monotonic=mono)


async def test_a_wall_clock_step_forward_does_not_purge_rows_acked_a_second_ago(
    db: Path, clock: Clock, mono: Clock
) -> None:
    store = await open_with(db, clock, mono)
    try:
        await insert_many(store, 3)
        store.mark_acked([1, 2, 3])
        await store.flush()
        mono.now += 1.0
        clock.now += 1.0 + 2 * HOUR  # the wall clock jumps two hours ahead
        assert await store.purge_expired(HOUR, None) == 0
        assert statuses(db) == {1: "acked", 2: "acked", 3: "acked"}
        clock.now -= 2 * HOUR  # ...and is set right again: stamps follow it, not the future
        await insert_many(store, 1)
        assert shell(db, "SELECT created_at FROM outbox WHERE id = 4") == [(clock.now,)]
        mono.now += HOUR  # now they really are an hour old
        assert await store.purge_expired(HOUR, None) == 3
        assert statuses(db) == {4: "pending"}
    finally:
        await store.close()


async def test_a_wall_clock_step_back_does_not_stop_the_purge(
    db: Path, clock: Clock, mono: Clock
) -> None:
    store = await open_with(db, clock, mono)
    try:
        await insert_many(store, 3)
        store.mark_acked([1, 2])
        await store.flush()
        clock.now -= 86_400.0  # a day back
        mono.now += HOUR + 1.0
        assert await store.purge_expired(HOUR, None) == 2
        assert statuses(db) == {3: "pending"}
    finally:
        await store.close()


async def test_rows_acked_before_this_process_age_by_both_clocks(
    db: Path, clock: Clock, mono: Clock
) -> None:
    first = await open_with(db, clock, mono)
    await insert_many(first, 2)
    first.mark_acked([1, 2])
    await first.flush()
    await first.close()
    # Reopened with the wall clock a day *behind* the stamps: never purged by updated_at...
    clock.now -= 86_400.0
    store = await open_with(db, clock, mono)
    try:
        assert await store.purge_expired(HOUR, None) == 0
        mono.now += HOUR - 1.0
        assert await store.purge_expired(HOUR, None) == 0
        mono.now += 1.0  # ...but they are older than this process, which ran for an hour
        assert await store.purge_expired(HOUR, None) == 2
    finally:
        await store.close()


async def test_rows_acked_before_this_process_go_by_updated_at_when_the_clocks_agree(
    db: Path, clock: Clock, mono: Clock
) -> None:
    first = await open_with(db, clock, mono)
    await insert_many(first, 2)
    first.mark_acked([1, 2])
    await first.flush()
    await first.close()
    clock.now += 2 * HOUR
    store = await open_with(db, clock, mono)
    try:
        assert await store.purge_expired(HOUR, None) == 2
    finally:
        await store.close()


async def test_a_requeued_row_acked_again_keeps_its_new_age(
    db: Path, clock: Clock, mono: Clock
) -> None:
    store = await open_with(db, clock, mono)
    try:
        await insert_many(store, 3)
        store.mark_dead([(1, "nack")])
        store.mark_acked([2, 3])
        await store.flush()
        mono.now += HOUR / 2
        assert await store.requeue_dead() == 1
        store.mark_acked([1])
        await store.flush()
        mono.now += HOUR / 2 + 1.0  # rows 2 and 3 are an hour old, row 1 half an hour
        await store.purge_expired(HOUR, None)
        assert 1 in statuses(db)
        mono.now += HOUR / 2
        await store.purge_expired(HOUR, None)
        assert statuses(db) == {}
    finally:
        await store.close()


def remove_database(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


async def test_a_deleted_file_fails_the_next_commit_and_every_later_one(
    store: Store, db: Path
) -> None:
    assert await insert_many(store, 2) == [1, 2]
    remove_database(db)
    with pytest.raises(DatabaseMissingError, match=r"was deleted while the Outbox had it open"):
        await insert_many(store, 1)
    with pytest.raises(DatabaseMissingError, match="not durable"):
        await insert_many(store, 1)
    assert store.broken


async def test_a_replaced_file_fails_the_next_commit(
    store: Store, db: Path, tmp_path: Path
) -> None:
    await insert_many(store, 2)
    other = tmp_path / "other.db"
    with closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE unrelated (x)")
    os.replace(other, db)
    with pytest.raises(DatabaseMissingError, match="was replaced by another file"):
        await insert_many(store, 1)
    assert shell(db, "SELECT name FROM sqlite_master") == [("unrelated",)]


async def test_a_reader_holding_a_snapshot_grows_the_wal_warns_then_it_shrinks(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="outbox")
    store = await Store.open(
        db, wal_warn_bytes=1 << 20, wal_truncate_bytes=256 << 10, wal_check_interval=0.0
    )
    payload = '"' + "x" * 1000 + '"'
    try:
        with closing(sqlite3.connect(db, isolation_level=None)) as reader:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM outbox").fetchone()  # holds a snapshot
            while os.stat(f"{db}-wal").st_size < 3 << 20:
                await store.insert([(payload, None)] * 200)
            warnings = [r.getMessage() for r in caplog.records if "-wal file" in r.getMessage()]
            assert len(warnings) == 2, warnings  # at 1 MiB and at 2 MiB, not every commit
            assert "holds a read transaction open (a sqlite3 shell after BEGIN" in warnings[0]
            reader.execute("COMMIT")
        await store.insert([(payload, None)])
        assert os.stat(f"{db}-wal").st_size < 64 << 10
        assert "is back to" in caplog.text
    finally:
        await store.close()


async def test_insert_one_calls_queued_together_share_one_commit_in_call_order(
    store: Store, db: Path
) -> None:
    commits = store.commits
    futures = [store.insert_one(f'"m{i}"', None) for i in range(300)]
    assert store.queued_rows == 300
    assert [await future for future in futures] == list(range(1, 301))
    assert store.commits == commits + 1  # one write, one transaction for all of them
    assert store.queued_rows == 0 and store.counts.pending == 300
    assert shell(db, "SELECT payload FROM outbox WHERE id = 300") == [('"m299"',)]


async def test_insert_one_with_keys_and_deadlines_in_one_group(store: Store, db: Path) -> None:
    first = store.insert_one('"a"', "k")
    again = store.insert_one('"b"', "k")  # the same key within the group: one row
    timed = store.insert_one('"c"', None, 5000.0)
    plain = store.insert_one('"d"', None)
    assert [await first, await again, await timed, await plain] == [1, 1, 2, 3]
    assert shell(db, "SELECT id, payload, key, expires_at FROM outbox ORDER BY id") == [
        (1, '"a"', "k", None),
        (2, '"c"', None, 5000.0),
        (3, '"d"', None, None),
    ]
    assert await store.insert_one('"e"', "k") == 1  # a key already committed


async def test_a_cancelled_insert_one_writes_nothing_and_spares_its_group(
    store: Store, db: Path
) -> None:
    async def one(text: str, key: str) -> int:
        return await store.insert_one(text, key)

    tasks = [asyncio.create_task(one(f'"m{i}"', f"k{i}")) for i in range(6)]
    await asyncio.sleep(0)  # all queued in one group; the commit loop has not run yet
    assert store.queued_rows == 6
    for task in tasks[::2]:
        task.cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert [isinstance(result, asyncio.CancelledError) for result in done] == [True, False] * 3
    assert done[1::2] == [1, 2, 3]
    assert shell(db, "SELECT key FROM outbox ORDER BY id") == [("k1",), ("k3",), ("k5",)]
    assert store.queued_rows == 0 and store.counts.pending == 3


async def test_insert_one_on_a_closed_store_refuses(db: Path) -> None:
    store = await Store.open(db)
    pending = store.insert_one('"queued"', None)
    await store.close()  # what was queued commits first
    assert await pending == 1
    with pytest.raises(OutboxClosedError):
        store.insert_one('"late"', None)
