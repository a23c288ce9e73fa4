"""Crashes: the producer process and the receiver process killed with SIGKILL, then restarted
on the same SQLite files.

The producer is ``tests/procs/producer.py``: it opens an Outbox, sends ``msg-0 .. msg-N`` with
idempotency keys one ``send()`` at a time (``synchronous=FULL``, the default) and prints
``sent KEY ID`` after each. A restarted producer sends every key again from 0: the keys must
give it the ids its earlier lives got, and write nothing twice. The receiver is
``tests/procs/receiver.py`` (``outbox.serve`` with an effects table written through
``message.tx``), or an in-process ``serve`` when only the producer dies.

The specific windows are reached from outside the library, with the fault proxy:

- inside ``send()``: many small sends; a kill after a random number of ``sent`` lines lands
  inside one more often than not (the test counts how often a row committed whose ``send()``
  never returned);
- between the commit and the socket write: the proxy refuses connections, so every row is
  committed and none can be written;
- between a frame and its ack: the proxy delays the downstream direction once connected, so
  frames reach the receiver and commit there while their acks are held in the proxy;
- while acks are written back: a small ``max_inflight`` makes acks and their group commits
  stream; the kill comes when the outbox file shows both acked and pending rows;
- the receiver between its inbox commit and its ack: downstream delayed as above, then the
  receiver is killed; the held acks die with the connection.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from outbox import Outbox, Receiver, State
from outbox.testing.fault_proxy import FaultProxy

from ..chaos_support import (
    ROOT,
    Proc,
    check_end_state,
    inbox_count,
    merge_ids,
    outbox_statuses,
    parse_sent,
    read_outbox,
    reaped,
    report,
)
from ..support import MS, wait_until

pytestmark = pytest.mark.timeout(60)

SEED = int(os.environ.get("OUTBOX_FAULT_SEED", "20261127"))

PRODUCER_OPTIONS: dict[str, Any] = {
    "reconnect_interval": 10 * MS,
    "reconnect_max_interval": 50 * MS,
    "ack_timeout": 1000 * MS,
    "max_attempts": None,
    "heartbeat_interval": 500 * MS,
    "heartbeat_timeout": 500 * MS,
    "open_timeout": 1000 * MS,
    "close_timeout": 100 * MS,
    "acked_retention": None,
}


async def start_producer(
    tmp_path: Path,
    outbox_db: Path,
    url: str,
    count: int,
    *,
    life: int,
    options: dict[str, Any] | None = None,
    extra: tuple[str, ...] = (),
) -> Proc:
    proc = await Proc.start(
        f"producer#{life}",
        "producer.py",
        str(outbox_db),
        url,
        "--count",
        str(count),
        "--options",
        json.dumps({**PRODUCER_OPTIONS, **(options or {})}),
        *extra,
        log=tmp_path / "producer.log",
    )
    await proc.first_line()
    return proc


def sent_lines(lines: list[str]) -> int:
    return sum(line.startswith("sent ") for line in lines)


def committed_keys(outbox_db: Path) -> set[str]:
    if not outbox_db.exists():
        return set()
    return {row.key for row in read_outbox(outbox_db)[1] if row.key is not None}


async def finish_producer(proc: Proc, timeout: float = 30.0) -> dict[str, int]:
    """Let the last life run to the end; return its counters."""
    code = await proc.wait(timeout)
    assert code == 0, f"producer exited {code}: {proc.stderr_tail()}"
    assert proc.lines[-1].startswith("drained "), proc.lines[-3:]
    counters: dict[str, int] = json.loads(proc.lines[-1].split(" ", 1)[1])
    return counters


# ---------------------------------------------------------------------------------------------
# The producer dies
# ---------------------------------------------------------------------------------------------


async def test_producer_killed_at_random_points_and_restarted(
    tmp_path: Path, receiver: Receiver, outbox_db: Path, inbox_db: Path
) -> None:
    seed = SEED + 101
    rng = random.Random(seed)
    count, kills = 200, 6
    seen: dict[str, set[int]] = {}
    inside_send = 0
    procs: list[Proc] = []
    async with reaped(procs), FaultProxy("127.0.0.1", receiver.port, seed=seed) as proxy:
        for life in range(kills):
            proc = await start_producer(tmp_path, outbox_db, proxy.url(), count, life=life)
            procs.append(proc)
            # Progress is counted in new keys: a restarted producer reprints the old ones.
            before = len(committed_keys(outbox_db))
            target = min(count - 1, before + rng.randint(1, count // kills))
            await proc.wait_for(
                lambda lines, target=target: sent_lines(lines) >= target,
                timeout=20,
                what=f"{target} sent lines",
            )
            await proc.kill()
            merge_ids(seen, proc.lines)
            printed = set(parse_sent(proc.lines))
            if committed_keys(outbox_db) - printed:
                inside_send += 1  # a row committed whose send() never returned its id
        last = await start_producer(tmp_path, outbox_db, proxy.url(), count, life=kills)
        procs.append(last)
        counters = await finish_producer(last)
        merge_ids(seen, last.lines)
    end = check_end_state(
        outbox_db,
        inbox_db,
        context=f"seed {seed}",
        expect_keys=[f"msg-{i}" for i in range(count)],
        ids_seen=seen,
    )
    assert end.messages == count == end.delivered
    end.extra.update(
        kills=kills,
        kills_inside_send=inside_send,
        duplicates_at_receiver=receiver.stats.duplicates,
        last_life_resends=counters["resends"],
        connections=receiver.stats.connections,
    )
    report(end.line("producer SIGKILLed at random points") + f" seed={seed}")


async def test_producer_killed_between_commit_and_socket_write(
    tmp_path: Path, receiver: Receiver, outbox_db: Path, inbox_db: Path
) -> None:
    """No connection can open: every committed row is waiting for its socket write."""
    seed = SEED + 102
    rng = random.Random(seed)
    count = 120
    procs: list[Proc] = []
    seen: dict[str, set[int]] = {}
    async with reaped(procs), FaultProxy("127.0.0.1", receiver.port, seed=seed) as proxy:
        proxy.refuse(True)
        first = await start_producer(tmp_path, outbox_db, proxy.url(), count, life=0)
        procs.append(first)
        target = rng.randint(count // 4, count // 2)
        await first.wait_for(lambda lines: sent_lines(lines) >= target, 20, "sent lines")
        await first.kill()
        merge_ids(seen, first.lines)
        committed = outbox_statuses(outbox_db)
        assert inbox_count(inbox_db) == 0 and committed.get("pending", 0) >= target
        proxy.refuse(False)
        second = await start_producer(tmp_path, outbox_db, proxy.url(), count, life=1)
        procs.append(second)
        await finish_producer(second)
        merge_ids(seen, second.lines)
    end = check_end_state(
        outbox_db,
        inbox_db,
        context=f"seed {seed}",
        expect_keys=[f"msg-{i}" for i in range(count)],
        ids_seen=seen,
    )
    end.extra.update(
        committed_never_written_at_kill=committed.get("pending", 0),
        refused=proxy.stats.refused,
        duplicates_at_receiver=receiver.stats.duplicates,
    )
    report(end.line("producer SIGKILLed between commit and socket write") + f" seed={seed}")


async def test_producer_killed_between_frame_and_ack(
    tmp_path: Path, receiver: Receiver, outbox_db: Path, inbox_db: Path
) -> None:
    """Frames reach the receiver and commit in its inbox; their acks are held in the proxy
    when the producer dies. The restarted producer resends them; the receiver answers each
    copy from its inbox and the handler runs once."""
    seed = SEED + 103
    rng = random.Random(seed)
    count = 120
    procs: list[Proc] = []
    async with reaped(procs), FaultProxy("127.0.0.1", receiver.port, seed=seed) as proxy:
        first = await start_producer(tmp_path, outbox_db, proxy.url(), count, life=0)
        procs.append(first)
        await wait_until(lambda: receiver.stats.connections >= 1, timeout=10)
        await wait_until(lambda: proxy.stats.forwarded["downstream"] > 0, timeout=10)
        proxy.set_delay(60.0, "downstream")  # acks from now on are held
        target = rng.randint(count // 4, count // 2)
        await wait_until(lambda: inbox_count(inbox_db) >= target, timeout=20)
        await first.kill()
        handled_unacked = inbox_count(inbox_db) - outbox_statuses(outbox_db).get("acked", 0)
        assert handled_unacked > 0, f"nothing in the window (seed {seed})"
        proxy.set_delay(0.0)
        duplicates_before = receiver.stats.duplicates
        second = await start_producer(tmp_path, outbox_db, proxy.url(), count, life=1)
        procs.append(second)
        counters = await finish_producer(second)
    end = check_end_state(
        outbox_db, inbox_db, context=f"seed {seed}", expect_keys=[f"msg-{i}" for i in range(count)]
    )
    answered_again = receiver.stats.duplicates - duplicates_before
    assert answered_again >= handled_unacked, f"seed {seed}"
    end.extra.update(
        handled_but_unacked_at_kill=handled_unacked,
        client_counted_resends_last_life=counters["resends"],
        duplicates_at_receiver=answered_again,
    )
    report(end.line("producer SIGKILLed between frame and ack") + f" seed={seed}")


async def test_producer_killed_while_acks_are_written_back(
    tmp_path: Path, receiver: Receiver, outbox_db: Path, inbox_db: Path
) -> None:
    """Acks stream in and are group-committed while the producer is killed, at seeded points
    in the stream, three times over."""
    seed = SEED + 104
    rng = random.Random(seed)
    count, kills = 600, 3
    options = {"max_inflight": 4}
    procs: list[Proc] = []
    mid_stream = 0
    async with reaped(procs), FaultProxy("127.0.0.1", receiver.port, seed=seed) as proxy:
        for life in range(kills):
            # Enqueue everything first (one transaction per 50), then only acks flow.
            proc = await start_producer(
                tmp_path,
                outbox_db,
                proxy.url(),
                count,
                life=life,
                options=options,
                extra=("--chunk", "50"),
            )
            procs.append(proc)
            acked = outbox_statuses(outbox_db).get("acked", 0)
            # Leave at least 150 rows to ack (about 40 round trips at max_inflight 4), so the
            # kill lands while acks are still streaming in.
            target = min(count - 150, acked + rng.randint(20, (count - acked) // 2))
            await wait_until(
                lambda target=target: outbox_statuses(outbox_db).get("acked", 0) >= target,
                timeout=20,
            )
            await proc.kill()
            now = outbox_statuses(outbox_db)
            if now.get("acked", 0) and now.get("pending", 0):
                mid_stream += 1
        last = await start_producer(
            tmp_path, outbox_db, proxy.url(), count, life=kills, options=options
        )
        procs.append(last)
        counters = await finish_producer(last)
    end = check_end_state(
        outbox_db, inbox_db, context=f"seed {seed}", expect_keys=[f"msg-{i}" for i in range(count)]
    )
    assert mid_stream == kills, f"a kill did not land mid-stream (seed {seed})"
    end.extra.update(
        kills=kills,
        duplicates_at_receiver=receiver.stats.duplicates,
        last_life_resends=counters["resends"],
    )
    report(end.line("producer SIGKILLed while acks are written back") + f" seed={seed}")


# ---------------------------------------------------------------------------------------------
# The receiver dies
# ---------------------------------------------------------------------------------------------


async def start_receiver(tmp_path: Path, inbox_db: Path, port: int, life: int) -> Proc:
    proc = await Proc.start(
        f"receiver#{life}",
        "receiver.py",
        str(inbox_db),
        "--port",
        str(port),
        log=tmp_path / "receiver.log",
    )
    url = await proc.first_line()
    assert url.startswith("ws://127.0.0.1:"), url
    return proc


def port_of(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


async def test_receiver_killed_at_random_and_restarted_on_the_same_port(
    tmp_path: Path, outbox_db: Path, inbox_db: Path
) -> None:
    seed = SEED + 105
    rng = random.Random(seed)
    count, kills = 400, 5
    procs: list[Proc] = []
    options = {**PRODUCER_OPTIONS, "synchronous": "NORMAL", "max_inflight": 8}
    async with reaped(procs):
        rx = await start_receiver(tmp_path, inbox_db, 0, life=0)
        procs.append(rx)
        port = port_of(rx.lines[0])
        async with Outbox(outbox_db, rx.lines[0], **options) as box:
            ids = await box.send_many(
                [{"i": i} for i in range(count)], keys=[f"msg-{i}" for i in range(count)]
            )
            for life in range(1, kills + 1):
                target = min(count - 10, inbox_count(inbox_db) + rng.randint(10, count // kills))
                await wait_until(lambda target=target: inbox_count(inbox_db) >= target, 20)
                await rx.kill()
                rx = await start_receiver(tmp_path, inbox_db, port, life=life)
                procs.append(rx)
            await box.drain(timeout=20)
            counters = box.stats().counters
        await rx.terminate()
    end = check_end_state(outbox_db, inbox_db, context=f"seed {seed}")
    assert end.messages == count == end.delivered and len(set(ids)) == count
    end.extra.update(kills=kills, resends_sent=counters.resends, reconnects=counters.reconnects)
    report(end.line("receiver SIGKILLed at random, same port") + f" seed={seed}")


async def test_receiver_killed_between_inbox_commit_and_ack(
    tmp_path: Path, outbox_db: Path, inbox_db: Path
) -> None:
    """The receiver commits messages and writes their acks, which the proxy holds; then it
    dies. The acks die with the connection; the restarted receiver (on a new port, the proxy
    moved to it) answers the resends from the inbox."""
    seed = SEED + 106
    rng = random.Random(seed)
    per_round, rounds = 60, 3
    count = per_round * (rounds + 1)
    procs: list[Proc] = []
    # A short heartbeat: the FIN of a killed receiver waits in the proxy behind the held acks,
    # so only the heartbeat tells the client that connection is gone.
    options = {
        **PRODUCER_OPTIONS,
        "synchronous": "NORMAL",
        "heartbeat_interval": 100 * MS,
        "heartbeat_timeout": 100 * MS,
    }
    in_window: list[int] = []
    async with reaped(procs):
        rx = await start_receiver(tmp_path, inbox_db, 0, life=0)
        procs.append(rx)
        async with (
            FaultProxy("127.0.0.1", port_of(rx.lines[0]), seed=seed) as proxy,
            Outbox(outbox_db, proxy.url(), **options) as box,
        ):
            for life in range(1, rounds + 1):
                # Connected to this life of the receiver first (a delayed handshake response
                # would never open); the connection to the killed one may take a heartbeat
                # to notice, since its FIN is queued behind the held acks.
                await wait_until(
                    lambda life=life: (
                        box.state is State.CONNECTED and box.stats().counters.connects >= life
                    ),
                    timeout=10,
                )
                proxy.set_delay(60.0, "downstream")
                start = (life - 1) * per_round
                await box.send_many(
                    [{"i": i} for i in range(start, start + per_round)],
                    keys=[f"msg-{i}" for i in range(start, start + per_round)],
                )
                target = inbox_count(inbox_db) + rng.randint(1, per_round)
                await wait_until(lambda target=target: inbox_count(inbox_db) >= target, 20)
                await rx.kill()
                in_window.append(inbox_count(inbox_db) - box.stats().acked)
                proxy.set_delay(0.0)
                rx = await start_receiver(tmp_path, inbox_db, 0, life=life)
                procs.append(rx)
                proxy.set_upstream("127.0.0.1", port_of(rx.lines[0]))
            start = rounds * per_round
            await box.send_many(
                [{"i": i} for i in range(start, count)],
                keys=[f"msg-{i}" for i in range(start, count)],
            )
            await box.drain(timeout=20)
            counters = box.stats().counters
        await rx.terminate()
    end = check_end_state(outbox_db, inbox_db, context=f"seed {seed}")
    assert end.messages == count == end.delivered
    assert all(n > 0 for n in in_window), f"{in_window} (seed {seed})"
    end.extra.update(
        committed_unacked_at_each_kill=in_window,
        resends_sent=counters.resends,
        reconnects=counters.reconnects,
    )
    report(end.line("receiver SIGKILLed between inbox commit and ack") + f" seed={seed}")


# ---------------------------------------------------------------------------------------------
# The soak, as a smoke test
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_chaos_soak_smoke(tmp_path: Path) -> None:
    """``benchmarks/chaos.py`` on a short run: both processes killed, the network faulty;
    it exits 0 only if nothing was lost and nothing was handled twice."""
    proc = await Proc.start(
        "chaos",
        str(ROOT / "benchmarks" / "chaos.py"),
        "--seconds",
        "4",
        "--seed",
        str(SEED),
        "--dir",
        str(tmp_path),
        log=tmp_path / "chaos.log",
    )
    code = await proc.wait(timeout=50)
    output = "\n".join(proc.lines)
    assert code == 0, f"{output}\n{proc.stderr_tail()}"
    assert "lost" in output
    report("[benchmarks/chaos.py --seconds 4] " + " | ".join(proc.lines[-12:]))
