"""Network faults between a real Outbox and a real receiver, injected by the fault proxy.

Client (real ``Outbox`` on a SQLite file) -> ``FaultProxy`` -> receiver (``outbox.serve`` on
another SQLite file, with a handler whose effect is exactly-once). The proxy cuts connections
at seeded byte offsets, cuts frames in the middle, delays, stalls without closing, refuses,
or runs a seeded chaos plan. Each scenario ends when the faults stop and the queue drains,
then ``check_end_state`` reads both files: every message the producer got an id for is in the
inbox exactly once, handled once and in id order; every outbox row is acked.

Faults are triggered by progress (bytes through the proxy, rows committed), never by
sleeping; every wait has a deadline. The seed is ``OUTBOX_FAULT_SEED`` (default below) plus
a per-test offset, and it is in every assertion message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from outbox import Outbox, Receiver, State
from outbox.testing.fault_proxy import Fault, FaultPlan, FaultProxy

from ..chaos_support import check_end_state, report
from ..support import MS, fast_options, wait_until

pytestmark = pytest.mark.timeout(30)

SEED = int(os.environ.get("OUTBOX_FAULT_SEED", "20261127"))

FAST = fast_options(
    ack_timeout=1000 * MS,
    max_attempts=None,  # no scenario here means to dead-letter anything
    heartbeat_interval=500 * MS,
    heartbeat_timeout=500 * MS,
    open_timeout=2000 * MS,
    max_inflight=16,
    synchronous="NORMAL",  # survives a process crash; the crash tests use FULL
)


class Producer:
    """Enqueues keyed messages in seeded chunks while the faults happen."""

    def __init__(self, box: Outbox, count: int, rng: random.Random, pad: int = 60) -> None:
        self.box = box
        self.count = count
        self.rng = rng
        self.pad = pad
        self.ids: dict[str, int] = {}
        self.task = asyncio.create_task(self._run(), name="test-producer")

    async def _run(self) -> None:
        i = 0
        while i < self.count:
            numbers = range(i, min(i + self.rng.randint(1, 8), self.count))
            keys = [f"msg-{j}" for j in numbers]
            payloads = [{"i": j, "pad": "x" * self.pad} for j in numbers]
            ids = await self.box.send_many(payloads, keys=keys)
            self.ids.update(zip(keys, ids, strict=True))
            i = numbers[-1] + 1

    def done(self) -> bool:
        """Everything enqueued and acked: no fault can change the outcome any more."""
        return self.task.done() and self.box.stats().pending == 0

    async def finish(self, timeout: float = 15.0) -> None:
        await asyncio.wait_for(self.task, timeout)
        await self.box.drain(timeout=timeout)


def keys(count: int) -> list[str]:
    return [f"msg-{i}" for i in range(count)]


def finish_report(
    scenario: str,
    outbox_db: Path,
    inbox_db: Path,
    box: Outbox,
    rx: Receiver,
    proxy: FaultProxy,
    *,
    context: str,
    count: int,
    **extra: Any,
) -> None:
    counters = box.stats().counters
    end = check_end_state(outbox_db, inbox_db, context=context, expect_keys=keys(count))
    assert end.messages == count == end.delivered, context
    end.extra.update(
        resends_sent=counters.resends,
        duplicates_at_receiver=rx.stats.duplicates,
        reconnects=counters.reconnects,
        proxy_connections=proxy.stats.accepted,
        cuts=proxy.stats.cuts,
        **extra,
    )
    report(end.line(scenario) + f" ({context})")


async def wait_progress(predicate: Callable[[], bool], producer: Producer) -> bool:
    """Wait for ``predicate`` unless the scenario ends first; True if it held."""
    await wait_until(lambda: predicate() or producer.done(), timeout=10)
    return predicate()


# ---------------------------------------------------------------------------------------------
# Cuts
# ---------------------------------------------------------------------------------------------


async def test_every_connection_cut_at_random_moments(
    receiver: Receiver, outbox_db: Path, inbox_db: Path
) -> None:
    seed = SEED + 1
    rng = random.Random(seed)
    count, wanted_cuts = 400, 20
    async with (
        FaultProxy("127.0.0.1", receiver.port, seed=seed) as proxy,
        Outbox(outbox_db, proxy.url(), **FAST) as box,
    ):
        producer = Producer(box, count, rng)
        cuts = 0
        for _ in range(wanted_cuts):
            target = proxy.stats.forwarded["upstream"] + rng.randint(300, 2500)
            if not await wait_progress(
                lambda target=target: proxy.stats.forwarded["upstream"] >= target, producer
            ):
                break
            cuts += proxy.cut_all()
        await producer.finish()
        assert cuts >= wanted_cuts // 2, f"only {cuts} cuts landed (seed {seed})"
        # Every cut link is gone for good and the last one carried the drain. (Not the
        # client's reconnects: a cut during a handshake is a failed connect, not a reconnect.)
        assert proxy.stats.accepted >= cuts + 1, f"seed {seed}"
        finish_report(
            "cut_all at random moments",
            outbox_db,
            inbox_db,
            box,
            receiver,
            proxy,
            context=f"seed {seed}",
            count=count,
        )


@pytest.mark.parametrize("direction", ["upstream", "downstream"])
async def test_frames_cut_in_the_middle(
    receiver: Receiver, outbox_db: Path, inbox_db: Path, direction: str
) -> None:
    """``cut_after`` hands the peer a prefix of the stream and then a reset: a frame (a batch
    of messages upstream, an ack downstream, or the handshake itself) cut short."""
    seed = SEED + (2 if direction == "upstream" else 3)
    rng = random.Random(seed)
    count, wanted_cuts = 300, 15
    # Large payloads upstream, so a random byte offset almost always lands inside a frame.
    pad = 900 if direction == "upstream" else 60
    span = (200, 6000) if direction == "upstream" else (20, 400)
    async with (
        FaultProxy("127.0.0.1", receiver.port, seed=seed) as proxy,
        Outbox(outbox_db, proxy.url(), **FAST) as box,
    ):
        producer = Producer(box, count, rng, pad=pad)
        for made in range(wanted_cuts):
            proxy.cut_after(rng.randint(*span), direction)  # type: ignore[arg-type]
            if not await wait_progress(
                lambda made=made: proxy.stats.faults[Fault.CUT_AFTER] > made, producer
            ):
                proxy.cut_after(10**12, direction)  # type: ignore[arg-type]  # disarm
                break
        await producer.finish()
        assert proxy.stats.faults[Fault.CUT_AFTER] >= wanted_cuts // 2, f"seed {seed}"
        finish_report(
            f"frames cut mid-stream ({direction})",
            outbox_db,
            inbox_db,
            box,
            receiver,
            proxy,
            context=f"seed {seed}",
            count=count,
        )


# ---------------------------------------------------------------------------------------------
# Delay, stall, refuse
# ---------------------------------------------------------------------------------------------


async def test_a_path_slower_than_the_ack_timeout_is_waited_for_not_resent(
    receiver: Receiver, outbox_db: Path, inbox_db: Path
) -> None:
    """Round trip 60 ms, ack_timeout 30 ms, a steady trickle of messages: every deadline
    passes before its ack can come back, but acks for earlier messages keep arriving, so the
    server is visibly working through the queue ahead (docs/protocol.md, "Dead letters").
    Nothing is counted against the messages, nothing is resent, nothing dies, and each
    message is handled once. (Until issue 9 this resent every late message.)"""
    seed = SEED + 4
    count = 120
    options = {**FAST, "ack_timeout": 30 * MS, "max_attempts": 1}
    async with (
        FaultProxy("127.0.0.1", receiver.port, seed=seed) as proxy,
        Outbox(outbox_db, proxy.url(), **options) as box,
    ):
        proxy.set_delay(30 * MS)
        for i in range(count):
            await box.send({"i": i}, key=f"msg-{i}")
            await asyncio.sleep(0.004)  # traffic shaping: a message every 4 ms
        await box.drain(timeout=15)
        counters = box.stats().counters
        assert box.stats().dead == 0, f"a slow path dead-lettered messages (seed {seed})"
        assert counters.resends == 0, f"late acks were resent (seed {seed})"
        assert receiver.stats.duplicates == 0
        assert box.stats().reconnects == 0  # a slow path is not a broken one
        finish_report(
            "delay 30 ms each way, ack_timeout 30 ms, steady trickle, max_attempts 1",
            outbox_db,
            inbox_db,
            box,
            receiver,
            proxy,
            context=f"seed {seed}",
            count=count,
        )


async def test_a_slow_path_with_nothing_heard_is_not_a_failed_attempt(
    receiver: Receiver, outbox_db: Path, inbox_db: Path
) -> None:
    """One burst over a 60 ms round trip with ack_timeout 40 ms: the deadlines pass before
    anything has come back, so nothing is counted against the messages and nothing dies."""
    seed = SEED + 9
    options = {**FAST, "ack_timeout": 40 * MS, "max_attempts": 1}
    async with (
        FaultProxy("127.0.0.1", receiver.port, seed=seed) as proxy,
        Outbox(outbox_db, proxy.url(), **options) as box,
    ):
        proxy.set_delay(30 * MS)
        ids = await box.send_many([{"i": i} for i in range(50)], keys=keys(50))
        await box.drain(timeout=15)
        assert box.stats().dead == 0, f"a slow path dead-lettered messages (seed {seed})"
        for message_id in ids:
            await box.wait_acked(message_id, timeout=1)
    check_end_state(outbox_db, inbox_db, context=f"slow burst, seed {seed}")


BLACKHOLE = {
    **FAST,
    "heartbeat_interval": 50 * MS,
    "heartbeat_timeout": 50 * MS,
    "max_missed_heartbeats": 2,
    "ack_timeout": 2000 * MS,  # longer than the heartbeat needs to notice: nothing times out
    "open_timeout": 200 * MS,
    "close_timeout": 100 * MS,
}


async def test_a_blackhole_is_noticed_by_the_heartbeat_and_nothing_is_lost(
    receiver: Receiver, outbox_db: Path, inbox_db: Path
) -> None:
    """The path stalls without closing: no RST, no FIN. Only the heartbeat can tell; the
    reconnects that follow hang in the handshake until open_timeout, and the messages sent
    into the hole (and those enqueued meanwhile) go out once the path heals."""
    seed = SEED + 5
    rng = random.Random(seed)
    count = 200
    async with (
        FaultProxy("127.0.0.1", receiver.port, seed=seed) as proxy,
        Outbox(outbox_db, proxy.url(), **BLACKHOLE) as box,
    ):
        producer = Producer(box, count, rng)
        await wait_until(lambda: len(producer.ids) >= count // 4, timeout=10)
        proxy.blackhole(True)
        accepted = proxy.stats.accepted
        await wait_until(lambda: box.stats().counters.heartbeat_misses >= 2, timeout=5)
        await wait_until(lambda: box.state is not State.CONNECTED, timeout=5)
        # Two more connections accepted and stuck in the handshake: open_timeout works.
        await wait_until(lambda: proxy.stats.accepted >= accepted + 2, timeout=5)
        held = box.stats().pending
        proxy.blackhole(False)
        await producer.finish()
        assert held > 0, f"nothing was pending during the blackhole (seed {seed})"
        finish_report(
            "blackhole (heartbeat detection, handshakes time out)",
            outbox_db,
            inbox_db,
            box,
            receiver,
            proxy,
            context=f"seed {seed}",
            count=count,
            pending_during_blackhole=held,
            heartbeat_misses=box.stats().counters.heartbeat_misses,
        )


async def test_a_connection_the_heartbeat_declared_dead_is_dropped_at_once(
    receiver: Receiver, outbox_db: Path
) -> None:
    options = {**BLACKHOLE, "close_timeout": 1500 * MS}
    async with (
        FaultProxy("127.0.0.1", receiver.port, seed=SEED) as proxy,
        Outbox(outbox_db, proxy.url(), **options) as box,
    ):
        await box.wait_acked(await box.send("before"), timeout=5)
        proxy.blackhole(True)
        accepted = proxy.stats.accepted
        # Session.run adds its misses to the counters when the session has ended.
        await wait_until(lambda: box.stats().counters.heartbeat_misses >= 2, timeout=5)
        ended = time.monotonic()
        await wait_until(lambda: proxy.stats.accepted > accepted, timeout=5)
        waited = time.monotonic() - ended
        report(f"[heartbeat declared the connection dead] next attempt after {waited:.3f}s")
        proxy.blackhole(False)
    assert waited < 750 * MS, (
        f"reconnected {waited:.2f}s after the session ended (close_timeout {1500 * MS})"
    )


async def test_refused_reconnects_back_off_and_then_deliver(
    receiver: Receiver, outbox_db: Path, inbox_db: Path
) -> None:
    seed = SEED + 6
    count = 200
    options = {**FAST, "reconnect_interval": 10 * MS, "reconnect_max_interval": 80 * MS}
    async with (
        FaultProxy("127.0.0.1", receiver.port, seed=seed) as proxy,
        Outbox(outbox_db, proxy.url(), **options) as box,
    ):
        producer = Producer(box, count, random.Random(seed))
        await wait_until(lambda: len(producer.ids) >= count // 4, timeout=10)
        proxy.refuse(True)
        proxy.cut_all()
        await wait_until(lambda: proxy.stats.refused >= 6, timeout=5)
        proxy.refuse(False)
        await producer.finish()
        refused = proxy.stats.refused
        assert box.state is State.CONNECTED
        finish_report(
            "refuse new connections for a while",
            outbox_db,
            inbox_db,
            box,
            receiver,
            proxy,
            context=f"seed {seed}",
            count=count,
            refused=refused,
        )


@pytest.mark.slow
async def test_seeded_chaos_of_every_kind(
    receiver: Receiver, outbox_db: Path, inbox_db: Path
) -> None:
    """Cuts, truncated chunks, stalls and refusals drawn per chunk by the proxy's own seeded
    plan, bounded by max_faults so the soak ends on a quiet network."""
    seed = SEED + 7
    count = 600
    plan = FaultPlan(
        cut_rate=0.1,
        truncate_rate=0.1,
        stall_rate=0.1,
        stall_seconds=50 * MS,
        refuse_rate=0.15,
        grace_chunks=1,
        max_faults=60,
    )
    async with (
        FaultProxy("127.0.0.1", receiver.port, seed=seed, plan=plan) as proxy,
        Outbox(outbox_db, proxy.url(), **FAST) as box,
    ):
        producer = Producer(box, count, random.Random(seed))
        await producer.finish(timeout=20)
        faults = {str(kind): n for kind, n in proxy.stats.faults.items() if n}
        assert proxy.stats.chaos_faults >= 10, f"too few faults: {faults} (seed {seed})"
        finish_report(
            "seeded chaos plan (cut, truncate, stall, refuse)",
            outbox_db,
            inbox_db,
            box,
            receiver,
            proxy,
            context=f"seed {seed}",
            count=count,
            faults=faults,
        )


# ---------------------------------------------------------------------------------------------
# A partition with the default proportions
# ---------------------------------------------------------------------------------------------

# The defaults (ack_timeout 5 s, max_attempts 3, heartbeat_interval 30 s, heartbeat_timeout
# 5 s, 3 missed), scaled down a hundredfold.
DEFAULT_PROPORTIONS = {
    **FAST,
    "ack_timeout": 50 * MS,
    "max_attempts": 3,
    "heartbeat_interval": 300 * MS,
    "heartbeat_timeout": 50 * MS,
    "max_missed_heartbeats": 3,
    "open_timeout": 100 * MS,
    "close_timeout": 20 * MS,
}


async def test_a_silent_partition_does_not_dead_letter_messages_in_flight(
    receiver: Receiver, outbox_db: Path, inbox_db: Path
) -> None:
    seed = SEED + 8
    async with (
        FaultProxy("127.0.0.1", receiver.port, seed=seed) as proxy,
        Outbox(outbox_db, proxy.url(), **DEFAULT_PROPORTIONS) as box,
    ):
        await box.wait_acked(await box.send({"before": True}, key="before"), timeout=5)
        proxy.blackhole(True)
        ids = await box.send_many([{"i": i} for i in range(5)], keys=keys(5))
        await wait_until(lambda: box.state is not State.CONNECTED, timeout=5)
        proxy.blackhole(False)
        with contextlib.suppress(Exception):
            await asyncio.gather(*(box.wait_acked(i, timeout=5) for i in ids))
        dead = box.stats().dead
    report(f"[silent partition, default proportions] dead={dead} of 5 in flight, seed {seed}")
    check_end_state(outbox_db, inbox_db, context=f"seed {seed}")
