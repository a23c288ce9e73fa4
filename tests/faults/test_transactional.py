"""The transactional outbox with real processes, real files and our receiver: applications
enqueue in their own transactions (``outbox.enqueue``, ``Producer``), ``outbox relay``
processes send, one at a time per file (the lease), and the inbox holds every committed
message exactly once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import outbox
from outbox import Receiver

from ..chaos_support import Proc, check_end_state, inbox_count, reaped, report
from ..support import wait_until

pytestmark = pytest.mark.slow

RELAY_FLAGS = [
    "--reconnect-interval", "0.01", "--reconnect-max-interval", "0.05",
    "--acked-retention", "none", "--progress-interval", "1", "--max-inflight", "200",
]  # fmt: skip


async def start_relay(name: str, db: Path, url: str, tmp_path: Path) -> Proc:
    return await Proc.start(
        name, "relay.py", "--db", str(db), "--url", url, *RELAY_FLAGS, log=tmp_path / f"{name}.log"
    )


async def start_app(name: str, db: Path, tmp_path: Path, *args: str) -> Proc:
    return await Proc.start(name, "app.py", str(db), *args, log=tmp_path / f"{name}.log")


def committed(lines: list[str]) -> dict[str, int]:
    return {p[1]: int(p[2]) for p in (line.split() for line in lines) if p[0] == "committed"}


async def test_commit_delivers_rollback_never_and_keys_dedupe_across_processes(
    tmp_path: Path, outbox_db: Path, inbox_db: Path, receiver: Receiver
) -> None:
    outbox.migrate(outbox_db)
    procs: list[Proc] = []
    async with reaped(procs):
        relay = await start_relay("relay", outbox_db, receiver.url, tmp_path)
        procs.append(relay)
        await relay.wait_for(lambda lines: "role active" in lines, 10, "role active")
        first = await start_app("app-commit", outbox_db, tmp_path, "--count", "20")
        rolled = await start_app(
            "app-rollback", outbox_db, tmp_path, "--count", "5", "--rollback", "--prefix", "rb"
        )
        procs += [first, rolled]
        for proc in (first, rolled):
            assert await proc.wait(30) == 0
        # A second process repeats keys order-10..19 (through the Producer) and adds 20..29.
        again = await start_app(
            "app-again", outbox_db, tmp_path, "--count", "20", "--start", "10", "--mode",
            "producer",
        )  # fmt: skip
        procs.append(again)
        assert await again.wait(30) == 0
        await wait_until(lambda: inbox_count(inbox_db) >= 30, timeout=20)
        assert await relay.terminate() == 0
    ids_first, ids_again = committed(first.lines), committed(again.lines)
    for key in (f"order-{i}" for i in range(10, 20)):
        assert ids_again[key] == ids_first[key]
    end = check_end_state(
        outbox_db,
        inbox_db,
        context="commit/rollback",
        expect_keys=[f"order-{i}" for i in range(30)],
    )
    assert end.delivered == 30
    report(end.line("transactional-commit-rollback"))


async def test_a_crash_after_the_commit_delivers_on_the_next_start(
    tmp_path: Path, outbox_db: Path, inbox_db: Path, receiver: Receiver
) -> None:
    outbox.migrate(outbox_db)
    procs: list[Proc] = []
    async with reaped(procs):
        app = await start_app("app", outbox_db, tmp_path, "--count", "10", "--hold")
        procs.append(app)
        await app.wait_for(lambda lines: "done" in lines, 30, "done")
        await app.kill()  # SIGKILL after its commits, before anything sent them
        assert inbox_count(inbox_db) == 0
        relay = await start_relay("relay", outbox_db, receiver.url, tmp_path)
        procs.append(relay)
        await wait_until(lambda: inbox_count(inbox_db) >= 10, timeout=20)
        assert await relay.terminate() == 0
    end = check_end_state(
        outbox_db, inbox_db, context="crash", expect_keys=[f"order-{i}" for i in range(10)]
    )
    report(end.line("transactional-crash-after-commit"))


async def test_four_producers_two_relays_the_active_one_killed(
    tmp_path: Path, outbox_db: Path, inbox_db: Path, receiver: Receiver
) -> None:
    outbox.migrate(outbox_db)
    per_producer, producers = 400, 4
    procs: list[Proc] = []
    async with reaped(procs):
        first = await start_relay("relay-1", outbox_db, receiver.url, tmp_path)
        procs.append(first)
        await first.wait_for(lambda lines: "role active" in lines, 10, "role active")
        second = await start_relay("relay-2", outbox_db, receiver.url, tmp_path)
        procs.append(second)
        await second.wait_for(lambda lines: "role standby" in lines, 10, "role standby")
        apps = []
        for n in range(producers):  # two through enqueue, two through the Producer
            mode = "enqueue" if n % 2 else "producer"
            flags = ["--count", str(per_producer), "--prefix", f"p{n}", "--mode", mode]
            apps.append(await start_app(f"app-{n}", outbox_db, tmp_path, *flags))
        procs += apps
        await wait_until(lambda: inbox_count(inbox_db) >= 200, timeout=30)
        await first.kill()  # mid-stream: the producers are still writing
        killed_at = time.monotonic()
        await second.wait_for(lambda lines: "role active" in lines, 10, "taking over")
        takeover = time.monotonic() - killed_at
        for app in apps:
            assert await app.wait(60) == 0
        total = per_producer * producers
        await wait_until(lambda: inbox_count(inbox_db) >= total, timeout=60)
        assert await second.terminate() == 0
    keys = [f"p{n}-{i}" for n in range(producers) for i in range(per_producer)]
    end = check_end_state(outbox_db, inbox_db, context="two relays", expect_keys=keys)
    assert end.delivered == total and end.duplicates_handled == 0
    # Resent on the wire by the standby: what the dead one had in flight or had acked without
    # committing the ack yet (about a window), never every row again.
    assert receiver.stats.duplicates < total // 2
    end.extra.update(takeover_s=f"{takeover:.2f}", wire_duplicates=receiver.stats.duplicates)
    report(end.line("transactional-two-relays"))
