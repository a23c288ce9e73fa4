"""A chaos soak: a producer and a receiver, real processes on 127.0.0.1, a faulty network
between them, and both processes killed with SIGKILL at random, for a bounded time.

    python benchmarks/chaos.py                       # the CI smoke run: 5 s, seed 1
    python benchmarks/chaos.py --seconds 60 --seed 7 --rate 2

Parts:

- the **receiver**: this file run as ``_receiver``, i.e. ``outbox.serve`` on an inbox file
  with a handler that writes one row per handled message to an ``effects`` table through
  ``message.tx`` (no unique constraint there: a message handled twice would show twice);
- the **producer**: this file run as ``_producer``, an ``Outbox`` that enqueues keyed
  messages (``msg-0``, ``msg-1``, ...) at ``--msg-rate`` per second. Each life starts again
  from ``msg-0``: the idempotency keys make that a no-op for what earlier lives committed;
- the **network**: ``outbox.testing.fault_proxy.FaultProxy`` in this process, with a seeded
  ``FaultPlan`` (cuts, truncated chunks, stalls, refused connections) plus blackhole
  episodes, all scaled by ``--rate``.

Kills come at seeded random moments (mean interval ``1.5 / rate`` seconds), each one a
SIGKILL of the producer or the receiver, which is restarted on the same file at once (the
receiver on a new port; the proxy follows it). When ``--seconds`` are up, the faults stop,
the producer is asked (SIGTERM) to stop enqueueing and drain, the receiver is stopped, and
both SQLite files are read:

- sent: outbox rows (every message the producer got an id for);
- delivered: inbox rows of that client; lost: sent and not delivered;
- duplicates handled: effects rows beyond one per id; out of order: handled after a
  higher id of the same client;
- enqueued twice: rows beyond one per key (keys are contiguous, so rows must equal the
  highest key + 1);
- duplicates on the wire: resends the receiver answered from its inbox, summed over its
  lives (a life killed loses its last ~0.1 s of counts, so this is a lower bound);
- reconnects: TCP connections through the proxy, minus one.

Exit status 0 only if lost, duplicates handled, out of order, enqueued twice, dead and
still-pending are all 0 and the producer drained; 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import random
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

SCRIPT = str(Path(__file__).resolve())
ROOT = Path(SCRIPT).parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from outbox import Outbox  # noqa: E402
from outbox.receiver import Incoming, serve  # noqa: E402
from outbox.testing.fault_proxy import FaultPlan, FaultProxy  # noqa: E402

EFFECTS_TABLE = (
    "CREATE TABLE IF NOT EXISTS effects ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " client_id TEXT NOT NULL,"
    " message_id INTEGER NOT NULL)"
)

PRODUCER_OPTIONS: dict[str, Any] = {
    "reconnect_interval": 0.02,
    "reconnect_max_interval": 0.2,
    "ack_timeout": 1.0,
    "heartbeat_interval": 0.2,
    "heartbeat_timeout": 0.2,
    "max_missed_heartbeats": 2,
    "open_timeout": 1.0,
    "close_timeout": 0.2,
    "acked_retention": None,  # keys must outlive every restart of the producer
}


# ---------------------------------------------------------------------------------------------
# The two child roles
# ---------------------------------------------------------------------------------------------


async def record_effect(message: Incoming) -> None:
    await message.tx.execute(
        "INSERT INTO effects (client_id, message_id) VALUES (?, ?)",
        (message.client_id, message.id),
    )


async def run_receiver(db: str) -> int:
    """Serve until SIGTERM; print the URL, then ``stats {...}`` every 0.1 s and at the end."""
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn, conn:
        conn.execute(EFFECTS_TABLE)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with serve(record_effect, db, port=0) as receiver:
        print(receiver.url, flush=True)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
            print("stats", json.dumps(dataclasses.asdict(receiver.stats)), flush=True)
    return 0


async def run_producer(db: str, url: str, msg_rate: float, options: dict[str, Any]) -> int:
    """Enqueue msg-0, msg-1, ... at ``msg_rate`` per second until SIGTERM, then drain."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tick = 0.01
    per_tick = max(1, round(msg_rate * tick))
    async with Outbox(db, url, **options) as box:
        print("open", box.client_id, flush=True)

        def report(kind: str) -> None:
            print(kind, json.dumps(dataclasses.asdict(box.stats().counters)), flush=True)

        async def reporter() -> None:
            while True:
                await asyncio.sleep(0.1)
                report("stats")

        task = asyncio.create_task(reporter())
        # Catch up with what earlier lives enqueued (idempotent), in big transactions.
        committed = box.stats().pending + box.stats().acked + box.stats().dead
        i = 0
        while i < committed and not stop.is_set():
            n = min(500, committed - i)
            await box.send_many(
                [{"i": j} for j in range(i, i + n)], keys=[f"msg-{j}" for j in range(i, i + n)]
            )
            i += n
        next_at = time.monotonic()
        while not stop.is_set():
            await box.send_many(
                [{"i": j} for j in range(i, i + per_tick)],
                keys=[f"msg-{j}" for j in range(i, i + per_tick)],
            )
            i += per_tick
            next_at += tick
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
        print("stopping at", i, flush=True)
        await box.drain(timeout=120)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        report("drained")
    return 0


# ---------------------------------------------------------------------------------------------
# The orchestrator
# ---------------------------------------------------------------------------------------------


def _append(path: Path) -> BinaryIO:
    return path.open("ab")


class Child:
    """One life of a child process; its stdout lines are collected as they come."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name = name
        self.args = args
        self.log = log
        self.lines: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 15.0) -> str:
        """Start and return the first line (the receiver's URL, the producer's client id)."""
        with _append(self.log) as err:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                SCRIPT,
                *self.args,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                stdin=asyncio.subprocess.DEVNULL,
            )
        self._reader = asyncio.create_task(self._read())
        deadline = time.monotonic() + timeout
        while not self.lines:
            if self.process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start; see {self.log}")
            await asyncio.sleep(0.005)
        return self.lines[0]

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.lines.append(line.decode().rstrip("\n"))

    def last(self, prefix: str) -> dict[str, Any]:
        for line in reversed(self.lines):
            if line.startswith(prefix + " "):
                found: dict[str, Any] = json.loads(line.split(" ", 1)[1])
                return found
        return {}

    async def kill(self) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        await self.wait(10)

    async def stop(self, timeout: float) -> int:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def wait(self, timeout: float) -> int:
        assert self.process is not None
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            code = await self.process.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        return code


@dataclasses.dataclass
class Tally:
    producer_kills: int = 0
    receiver_kills: int = 0
    blackholes: int = 0
    wire_duplicates: int = 0
    client_resends: int = 0
    client_reconnects: int = 0


def port_of(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    rate = args.rate
    outbox_db, inbox_db = workdir / "outbox.db", workdir / "inbox.db"
    options = {**PRODUCER_OPTIONS, "max_attempts": args.max_attempts}
    plan = FaultPlan(
        cut_rate=min(0.3, 0.01 * rate),
        truncate_rate=min(0.3, 0.01 * rate),
        stall_rate=min(0.3, 0.01 * rate),
        stall_seconds=0.1,
        refuse_rate=min(1.0, 0.05 * rate),
        grace_chunks=1,
    )
    tally = Tally()
    lives = {"receiver": 0, "producer": 0}

    def new_receiver() -> Child:
        lives["receiver"] += 1
        return Child(
            f"receiver#{lives['receiver']}", ["_receiver", str(inbox_db)], workdir / "rx.log"
        )

    def new_producer(url: str) -> Child:
        lives["producer"] += 1
        return Child(
            f"producer#{lives['producer']}",
            ["_producer", str(outbox_db), url, str(args.msg_rate), json.dumps(options)],
            workdir / "producer.log",
        )

    receiver = new_receiver()
    rx_url = await receiver.start()
    proxy = FaultProxy("127.0.0.1", port_of(rx_url), seed=args.seed, plan=plan)
    await proxy.start()
    producer = new_producer(proxy.url())
    started = time.monotonic()
    drained = False
    final_counters: dict[str, Any] = {}
    try:
        await producer.start()
        end = started + args.seconds
        next_kill = started + rng.expovariate(rate / 1.5)
        next_blackhole = started + rng.expovariate(rate / 3.0)
        while (now := time.monotonic()) < end:
            await asyncio.sleep(max(0.0, min(next_kill, next_blackhole, end) - now))
            now = time.monotonic()
            if now >= end:
                break
            if now >= next_kill:
                next_kill = now + rng.expovariate(rate / 1.5)
                if rng.random() < 0.5:
                    await producer.kill()
                    tally.producer_kills += 1
                    tally.client_resends += producer.last("stats").get("resends", 0)
                    tally.client_reconnects += producer.last("stats").get("reconnects", 0)
                    producer = new_producer(proxy.url())
                    await producer.start()
                else:
                    await receiver.kill()
                    tally.receiver_kills += 1
                    tally.wire_duplicates += receiver.last("stats").get("duplicates", 0)
                    receiver = new_receiver()
                    proxy.set_upstream("127.0.0.1", port_of(await receiver.start()))
            if now >= next_blackhole:
                next_blackhole = now + rng.expovariate(rate / 3.0)
                tally.blackholes += 1
                proxy.blackhole(True)
                await asyncio.sleep(rng.uniform(0.1, 0.6))
                proxy.blackhole(False)
        # The storm is over: a quiet network, both processes up, the producer drains.
        proxy.chaos(None)
        proxy.blackhole(False)
        proxy.refuse(False)
        code = await producer.stop(timeout=args.drain_timeout)
        drained = code == 0 and bool(producer.last("drained"))
        final_counters = producer.last("drained") or producer.last("stats")
        tally.client_resends += final_counters.get("resends", 0)
        tally.client_reconnects += final_counters.get("reconnects", 0)
        await receiver.stop(timeout=10)
        tally.wire_duplicates += receiver.last("stats").get("duplicates", 0)
    finally:
        for child in (producer, receiver):
            if child.process is not None and child.process.returncode is None:
                await child.kill()
        await proxy.close()
    elapsed = time.monotonic() - started
    return {
        "elapsed": elapsed,
        "tally": tally,
        "drained": drained,
        "proxy": proxy.stats,
        **check(outbox_db, inbox_db),
    }


def check(outbox_db: Path, inbox_db: Path) -> dict[str, Any]:
    with contextlib.closing(sqlite3.connect(outbox_db)) as conn:
        (client_id,) = conn.execute(
            "SELECT value FROM outbox_meta WHERE name = 'client_id'"
        ).fetchone()
        rows = conn.execute("SELECT id, status, key FROM outbox").fetchall()
    with contextlib.closing(sqlite3.connect(inbox_db)) as conn:
        inbox = {
            int(message_id)
            for (message_id,) in conn.execute(
                "SELECT message_id FROM inbox WHERE client_id = ?", (client_id,)
            )
        }
        effects = [
            int(message_id)
            for (message_id,) in conn.execute(
                "SELECT message_id FROM effects WHERE client_id = ? ORDER BY seq", (client_id,)
            )
        ]
        # The bounded inbox deleted the rows below the client's floor: recorded, then
        # forgotten (the effects table still shows each handled once).
        floor = conn.execute(
            "SELECT base, floor FROM inbox_floor WHERE client_id = ?", (client_id,)
        ).fetchone()
    if floor is not None:
        inbox |= {message_id for message_id, _, _ in rows if floor[0] <= message_id < floor[1]}
    statuses: dict[str, int] = {}
    for _, status, _ in rows:
        statuses[status] = statuses.get(status, 0) + 1
    highest_key = max((int(key.split("-")[1]) for _, _, key in rows), default=-1)
    return {
        "sent": len(rows),
        "delivered": len(inbox),
        "lost": sum(1 for message_id, _, _ in rows if message_id not in inbox),
        "duplicates_handled": len(effects) - len(set(effects)),
        "out_of_order": sum(1 for a, b in itertools.pairwise(effects) if b < a),
        "enqueued_twice": len(rows) - (highest_key + 1),
        "dead": statuses.get("dead", 0),
        "pending": statuses.get("pending", 0),
        "strangers": len(inbox - {message_id for message_id, _, _ in rows}),
    }


def print_report(args: argparse.Namespace, result: dict[str, Any], workdir: Path) -> bool:
    tally: Tally = result["tally"]
    proxy = result["proxy"]
    faults = {str(kind): n for kind, n in proxy.faults.items() if n}
    ok = result["drained"] and all(
        result[name] == 0
        for name in (
            "lost",
            "duplicates_handled",
            "out_of_order",
            "enqueued_twice",
            "dead",
            "pending",
            "strangers",
        )
    )
    lines = [
        f"chaos soak: {result['elapsed']:.1f} s, seed {args.seed}, rate {args.rate}, "
        f"{args.msg_rate:g} msg/s offered (files in {workdir})",
        ("messages sent (ids given)", f"{result['sent']:,}", ""),
        ("delivered (in the inbox)", f"{result['delivered']:,}", ""),
        ("lost", f"{result['lost']:,}", "must be 0"),
        ("duplicates handled", f"{result['duplicates_handled']:,}", "must be 0"),
        ("handled out of id order", f"{result['out_of_order']:,}", "must be 0"),
        ("enqueued twice (same key)", f"{result['enqueued_twice']:,}", "must be 0"),
        ("dead / still pending", f"{result['dead']} / {result['pending']}", "must be 0 / 0"),
        ("duplicates on the wire", f"{tally.wire_duplicates:,}", "answered from the inbox, >="),
        ("resends by the client", f"{tally.client_resends:,}", "client counters, >="),
        ("reconnects", f"{max(0, proxy.accepted - 1):,}", "TCP connections via the proxy - 1"),
        (
            "kills survived",
            f"{tally.producer_kills + tally.receiver_kills}",
            f"producer {tally.producer_kills}, receiver {tally.receiver_kills}",
        ),
        (
            "network faults",
            f"{sum(faults.values()) + tally.blackholes}",
            ", ".join(f"{k} {v}" for k, v in sorted(faults.items()))
            + f", blackholes {tally.blackholes}",
        ),
        ("producer drained", "yes" if result["drained"] else "NO", ""),
        f"result: {'OK' if ok else 'FAILED'}",
    ]
    for line in lines:
        if isinstance(line, str):
            print(line)
        else:
            name, value, note = line
            print(f"  {name:<28}{value:>10}   {note}".rstrip())
    return ok


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_receiver":
        logging.basicConfig(level=logging.ERROR)
        return asyncio.run(run_receiver(sys.argv[2]))
    if len(sys.argv) > 1 and sys.argv[1] == "_producer":
        logging.basicConfig(level=logging.ERROR)
        _, _, db, url, msg_rate, options = sys.argv
        return asyncio.run(run_producer(db, url, float(msg_rate), json.loads(options)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the storm")
    parser.add_argument("--seed", type=int, default=1, help="seed of every random choice")
    parser.add_argument("--rate", type=float, default=1.0, help="fault rate multiplier")
    parser.add_argument("--msg-rate", type=float, default=1000.0, help="messages per second")
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=None,
        help="the producer's max_attempts (default None: nothing is meant to go dead)",
    )
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--dir", type=Path, help="keep the files here (default: a temp dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # the proxy's debug chatter stays quiet
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="chaos-", dir=args.dir))
        result = asyncio.run(soak(args, workdir))
        return 0 if print_report(args, result, workdir) else 1
    with tempfile.TemporaryDirectory(prefix="outbox-chaos-") as tmp:
        result = asyncio.run(soak(args, Path(tmp)))
        return 0 if print_report(args, result, Path(tmp)) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
