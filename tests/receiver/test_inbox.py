"""Inbox and Transaction without sockets: a real SQLite file in tmp_path, no receiver."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from outbox.protocol.floor import Floor, MarkStep, StepDone
from outbox.receiver.inbox import (
    Inbox,
    InboxRow,
    Key,
    Recorded,
    TransactionEndedError,
    encode_payload,
    payload_digest,
)


def row(client_id: str, message_id: int, reason: str | None = None) -> InboxRow:
    payload = encode_payload({"n": message_id})
    return (client_id, message_id, payload, 1.0, reason, payload_digest(payload))


def reasons(found: dict[Key, Recorded]) -> dict[Key, str | None]:
    """What ``seen`` found, without the digests: each key's reject reason."""
    return {key: reason for key, (reason, _) in found.items()}


def effects(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [name for (name,) in conn.execute("SELECT name FROM effects ORDER BY name")]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "inbox.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE effects (name TEXT PRIMARY KEY)")
    return path


@pytest.fixture
async def inbox(path: Path) -> AsyncIterator[Inbox]:
    inbox = await Inbox.open(path, synchronous="NORMAL", busy_timeout=1.0)
    try:
        yield inbox
    finally:
        await inbox.close()


async def test_recorded_rows_are_seen_after_commit_even_from_a_new_connection(
    inbox: Inbox, path: Path
) -> None:
    assert not inbox.in_transaction
    await inbox.begin()
    assert inbox.in_transaction
    assert reasons(await inbox.seen([("a", 1), ("a", 2)])) == {}
    await inbox.record([row("a", 1), row("a", 2)])
    await inbox.commit()
    assert not inbox.in_transaction

    again = await Inbox.open(path)
    try:
        assert reasons(await again.seen([("a", 1), ("a", 2), ("a", 3), ("b", 1)])) == {
            ("a", 1): None,
            ("a", 2): None,
        }
    finally:
        await again.close()


async def test_seen_returns_each_keys_reject_reason(inbox: Inbox) -> None:
    await inbox.begin()
    await inbox.record([row("a", 1), row("a", 2, "bad order"), row("b", 2, "no stock")])
    await inbox.commit()
    assert reasons(await inbox.seen([("a", 2), ("b", 2), ("a", 1)])) == {
        ("a", 2): "bad order",
        ("b", 2): "no stock",
        ("a", 1): None,
    }


async def test_seen_splits_many_keys_over_several_queries(inbox: Inbox) -> None:
    await inbox.begin()
    await inbox.record([row("a", i) for i in range(10)])
    await inbox.commit()
    inbox._keys_per_query = 3  # force chunks of 3, 3, 3, 2 over SQLite's variable limit
    keys = [("a", i) for i in range(0, 20, 2)]
    assert reasons(await inbox.seen(keys)) == {("a", i): None for i in range(0, 10, 2)}


async def test_rollback_undoes_the_recorded_rows(inbox: Inbox) -> None:
    await inbox.begin()
    assert reasons(await inbox.seen([("a", 1)])) == {}
    await inbox.record([row("a", 1)])  # written with the COMMIT's hop, so never here
    await inbox.rollback()
    assert not inbox.in_transaction
    await inbox.begin()
    assert reasons(await inbox.seen([("a", 1)])) == {}
    await inbox.commit()
    await inbox.rollback()  # nothing open: a no-op, not an error


def count_hops(inbox: Inbox, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions run on the connection's thread from now on, one a hop."""
    hops: list[str] = []
    real = inbox._db._execute

    def counted(fn: Any, *args: Any) -> Any:
        hops.append(getattr(fn, "__name__", repr(fn)))
        return real(fn, *args)

    monkeypatch.setattr(inbox._db, "_execute", counted)
    return hops


async def test_a_round_costs_two_thread_hops_whatever_its_size(
    inbox: Inbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops = count_hops(inbox, monkeypatch)
    await inbox.begin()
    assert inbox.in_transaction  # the BEGIN waits for seen's hop, but the round is open
    keys = [("a", i) for i in range(300)]
    assert await inbox.seen(keys) == {}
    await inbox.record([row("a", i) for i in range(300)])
    await inbox.commit()
    assert hops == ["_begin_and_find", "_write_and_commit"]
    assert not inbox.in_transaction
    assert set(reasons(await inbox.seen(keys))) == set(keys)  # all 300 committed


async def test_a_pruning_step_rides_with_the_rounds_commit_in_the_same_hop(
    inbox: Inbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows 1-300 committed; the next round records 301-310 and carries a step towards
    mark 251 (limit 500): still two hops, and one COMMIT holds the new rows, the deletion
    of 1-250 and the floor record."""
    await inbox.begin()
    await inbox.seen([("a", 1)])
    await inbox.record([row("a", i) for i in range(1, 301)])
    await inbox.commit()
    hops = count_hops(inbox, monkeypatch)
    await inbox.begin()
    new = [("a", i) for i in range(301, 311)]
    assert await inbox.seen(new) == {}
    await inbox.record([row(*key) for key in new])
    step = MarkStep("a", 251, 500, now=1234.5)
    done = await inbox.commit_with_step(step)
    assert hops == ["_begin_and_find", "_write_and_commit"]
    assert done == StepDone(Floor(), Floor(1, 251, 250, 251), rows=250, deleted=250)
    assert done.finished(step)
    assert await inbox.floors(["a"]) == {"a": Floor(1, 251, 250, 251)}
    left = reasons(await inbox.seen([("a", i) for i in range(1, 311)]))
    assert sorted(i for _, i in left) == list(range(251, 311))


async def test_a_failing_step_is_undone_alone_and_the_round_still_commits(
    inbox: Inbox, path: Path
) -> None:
    """The step's DELETE fails (a trigger, as a full disk would): its record and deletions
    are undone, the error comes back as the outcome, and the round's rows commit."""
    await inbox.begin()
    await inbox.seen([("a", 1)])
    await inbox.record([row("a", i) for i in range(1, 11)])
    await inbox.commit()
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TRIGGER no_forgetting BEFORE DELETE ON inbox "
            "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
    await inbox.begin()
    await inbox.seen([("a", 11)])
    await inbox.record([row("a", 11)])
    done = await inbox.commit_with_step(MarkStep("a", 11, 100, now=1.0))
    assert isinstance(done, sqlite3.Error) and "disk is full" in str(done)
    assert not inbox.in_transaction
    assert await inbox.floors(["a"]) == {}  # the record was undone with the deletion
    assert len(await inbox.seen([("a", i) for i in range(1, 12)])) == 11  # 11 committed
    await inbox.rollback()


async def test_a_round_whose_transaction_ended_under_it_writes_nothing(
    inbox: Inbox,
) -> None:
    await inbox.begin()
    await inbox.seen([("a", 1)])
    await inbox._db.execute("ROLLBACK")  # as SQLite does after some errors
    await inbox.record([row("a", 1)])
    with pytest.raises(TransactionEndedError):
        await inbox.commit()
    assert reasons(await inbox.seen([("a", 1)])) == {}  # not autocommitted on its own


async def test_a_savepoint_kept_commits_and_one_rolled_back_undoes_only_its_writes(
    inbox: Inbox, path: Path
) -> None:
    await inbox.begin()
    kept = inbox.transaction()
    await kept.execute("INSERT INTO effects VALUES ('kept')")
    await kept._finish(keep=True)

    undone = inbox.transaction()
    await undone.execute("INSERT INTO effects VALUES ('undone 1')")
    await undone.executemany("INSERT INTO effects VALUES (?)", [("undone 2",), ("undone 3",)])
    assert len(list(await undone.execute_fetchall("SELECT name FROM effects"))) == 4
    await undone._finish(keep=False)

    assert inbox.in_transaction  # the group's transaction goes on
    await inbox.record([row("a", 1)])
    await inbox.commit()
    assert effects(path) == ["kept"]
    assert reasons(await inbox.seen([("a", 1)])) == {("a", 1): None}


async def test_savepoints_are_undone_by_the_groups_rollback(inbox: Inbox, path: Path) -> None:
    await inbox.begin()
    tx = inbox.transaction()
    await tx.execute("INSERT INTO effects VALUES ('kept, then rolled back')")
    await tx._finish(keep=True)
    await inbox.rollback()
    assert effects(path) == []


async def test_a_transaction_used_after_its_handler_finished_raises(inbox: Inbox) -> None:
    await inbox.begin()
    used = inbox.transaction()
    await used.execute("INSERT INTO effects VALUES ('x')")
    await used._finish(keep=True)
    with pytest.raises(RuntimeError, match=r"use message\.tx only while the handler runs"):
        await used.execute("INSERT INTO effects VALUES ('late')")

    unused = inbox.transaction()
    await unused._finish(keep=False)  # no SQL ran: nothing to undo, no SAVEPOINT opened
    with pytest.raises(RuntimeError, match="transaction is over"):
        await unused.execute_fetchall("SELECT 1")
    with pytest.raises(RuntimeError, match="transaction is over"):
        await unused.executemany("INSERT INTO effects VALUES (?)", [("late",)])
    await inbox.commit()


async def test_rows_from_before_the_digest_column_are_checked_by_their_payload(
    inbox: Inbox, path: Path
) -> None:
    # A row as migration 0002 wrote it: no payload_sha256.
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO inbox (client_id, message_id, payload, received_at) VALUES (?, ?, ?, ?)",
            ("old", 1, encode_payload({"n": 1}), 1.0),
        )
    found = await inbox.seen([("old", 1)])
    assert found == {("old", 1): (None, payload_digest(encode_payload({"n": 1})))}
    assert found[("old", 1)][1] != payload_digest(encode_payload({"n": 2}))


async def test_high_water_is_the_highest_recorded_id_of_one_client(inbox: Inbox) -> None:
    assert await inbox.high_water("a") == 0
    await inbox.begin()
    await inbox.record([row("a", 3), row("a", 7), row("b", 9)])
    await inbox.commit()
    assert await inbox.high_water("a") == 7


async def test_floors_come_with_the_dedup_query_and_are_read_afresh_next_round(
    inbox: Inbox, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def set_floor(client_id: str, floor: int) -> None:
        with sqlite3.connect(path) as conn:  # another receiver process on the same file
            conn.execute(
                "INSERT OR REPLACE INTO inbox_floor VALUES (?, 1, ?, ?, NULL, 0)",
                (client_id, floor, floor),
            )

    set_floor("a", 10)
    hops = count_hops(inbox, monkeypatch)
    await inbox.begin()
    await inbox.seen([("a", 11), ("c", 1)])
    assert await inbox.floors(["a", "c"]) == {"a": Floor(1, 10, 10, None)}
    assert hops == ["_begin_and_find"]  # answered from the dedup query's hop
    assert await inbox.floors(["b"]) == {}  # not one of the round's clients: read now
    assert len(hops) == 2
    await inbox.commit()
    set_floor("a", 20)
    await inbox.begin()
    await inbox.seen([("a", 21)])
    assert await inbox.floors(["a"]) == {"a": Floor(1, 20, 20, None)}
    await inbox.commit()
