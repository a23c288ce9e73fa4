"""The sending side of the throughput benchmark, one scenario per process.

    python benchmarks/_clients.py KIND [options]

KIND is one of ``ceiling-ff``, ``ceiling-acks``, ``naive``, ``outbox``, ``enqueue``,
``backlog``, ``tx-enqueue`` and ``tx-pickup`` (see ``throughput.py`` for what each measures).
The process prints ``{"event": "progress", "done": n}`` lines while it runs and one
``{"event": "result", ...}`` line at the end; it stops at once if its stdin closes (the
parent is gone).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from _common import (
    PING_INTERVAL,
    cpu_seconds,
    emit,
    latency_summary,
    payload,
    peak_rss_mb,
    run_loop,
    watch_stdin,
)
from websockets.asyncio.client import connect

from outbox import Outbox

now = time.perf_counter


class Timer:
    """Wall-clock seconds and CPU seconds (every thread of this process) from start to stop."""

    def __init__(self) -> None:
        self._wall, self._cpu = now(), cpu_seconds()
        self.seconds = self.cpu = 0.0

    def lap(self) -> float:
        return now() - self._wall

    def stop(self) -> float:
        self.seconds, self.cpu = now() - self._wall, cpu_seconds() - self._cpu
        return self.seconds


class IdRuns:
    """The ids send() returned, as inclusive runs: ids arrive nearly in order, so a
    million of them cost a few runs, not a million Python ints in the measured process."""

    def __init__(self) -> None:
        self.runs: list[list[int]] = []
        self.count = 0

    def add(self, ids: Sequence[int]) -> None:
        runs = self.runs
        for message_id in ids:
            if runs and message_id == runs[-1][1] + 1:
                runs[-1][1] = message_id
            else:
                runs.append([message_id, message_id])
        self.count += len(ids)

    def merged(self) -> list[list[int]]:
        out: list[list[int]] = []
        for first, last in sorted(self.runs):
            if out and first <= out[-1][1] + 1:
                out[-1][1] = max(out[-1][1], last)
            else:
                out.append([first, last])
        return out


async def report_progress(done: Callable[[], int], **fields: Any) -> None:
    """Emit ``done()`` every PING_INTERVAL seconds until cancelled."""
    while True:
        emit("progress", done=done(), **fields)
        await asyncio.sleep(PING_INTERVAL)


@contextlib.asynccontextmanager
async def progress(done: Callable[[], int], **fields: Any) -> Any:
    task = asyncio.create_task(report_progress(done, **fields))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        emit("progress", done=done(), **fields)


def finish(messages: int, timer: Timer, **fields: Any) -> None:
    seconds = timer.seconds
    emit(
        "result",
        messages=messages,
        seconds=seconds,
        rate=messages / seconds if seconds > 0 else None,
        rss_mb=peak_rss_mb(),
        cpu_s=timer.cpu,
        **fields,
    )


# ---------------------------------------------------------------------------------------------
# Ceilings: plain websockets, no durability
# ---------------------------------------------------------------------------------------------


async def ceiling_ff(args: argparse.Namespace) -> None:
    """Stream N messages; the server counts them and says "done" after the last."""
    compression = "deflate" if args.compression else None
    sent = 0
    url = f"{args.url}?n={args.n}"
    async with connect(url, compression=compression) as ws, progress(lambda: sent):
        timer = Timer()
        for seq in range(1, args.n + 1):
            await ws.send(json.dumps({"id": seq, "data": payload(seq, args.size)}))
            sent += 1
        await ws.recv()  # {"type": "done"}: the server has counted all N
        timer.stop()
    finish(args.n, timer, latency=latency_summary([]))


async def ceiling_acks(args: argparse.Namespace) -> None:
    """Stream N messages with at most ``window`` un-acked; the server acks each one."""
    compression = "deflate" if args.compression else None
    n, window = args.n, args.window
    sent_at = [0.0] * (n + 1)
    latencies: list[float] = []
    acked = 0
    room = asyncio.Event()
    async with connect(args.url, compression=compression) as ws:

        async def read_acks() -> None:
            nonlocal acked
            async for frame in ws:
                ack = json.loads(frame)
                latencies.append(now() - sent_at[ack["messageId"]])
                acked += 1
                room.set()
                if acked == n:
                    return

        async with progress(lambda: acked), asyncio.TaskGroup() as group:
            timer = Timer()
            group.create_task(read_acks())
            for seq in range(1, n + 1):
                while seq - acked > window:
                    room.clear()
                    await room.wait()
                sent_at[seq] = now()
                await ws.send(json.dumps({"id": seq, "data": payload(seq, args.size)}))
        timer.stop()
    finish(n, timer, latency=latency_summary(latencies))


# ---------------------------------------------------------------------------------------------
# Naive durable: the seed's design on SQLite, one message at a time
# ---------------------------------------------------------------------------------------------


async def naive(args: argparse.Namespace) -> None:
    """INSERT + commit, send, wait for the ack, UPDATE + commit; then the next message."""
    db = sqlite3.connect(args.db)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, "
        "payload TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'pending')"
    )
    latencies: list[float] = []
    done = 0
    async with connect(args.url, compression=None) as ws, progress(lambda: done):
        timer = Timer()
        for seq in range(1, args.n + 1):
            data = payload(seq, args.size)
            with db:
                cursor = db.execute("INSERT INTO outbox (payload) VALUES (?)", (json.dumps(data),))
            message_id = cursor.lastrowid
            queued = now()
            await ws.send(json.dumps({"id": message_id, "data": data}))
            while True:
                ack = json.loads(await ws.recv())
                if ack.get("type") == "ack" and ack.get("messageId") == message_id:
                    break
            with db:
                db.execute("UPDATE outbox SET status = 'acked' WHERE id = ?", (message_id,))
            latencies.append(now() - queued)
            done += 1
        timer.stop()
    db.close()
    finish(args.n, timer, latency=latency_summary(latencies))


# ---------------------------------------------------------------------------------------------
# The outbox
# ---------------------------------------------------------------------------------------------


def option(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` with VALUE read as JSON when it can be (5000, true, null), else a str."""
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def outbox_options(args: argparse.Namespace, **scenario: Any) -> dict[str, Any]:
    """Outbox keyword arguments: the scenario's own, then any ``--option`` given (none at
    all for the default rows)."""
    options: dict[str, Any] = {**scenario, **dict(args.option)}
    if args.per_frame:
        # The seed's wire format: no batch frames, and no batch-ack in the request, so the
        # receiver answers one {"type": "ack", "messageId"} per message.
        options["batch"] = False
        options["additional_headers"] = {"Outbox-Features": ""}
    if args.compression:
        options["compression"] = True
    return options


async def outbox_stream(args: argparse.Namespace) -> None:
    """N messages from P producer tasks calling send(); time until the last is acked.

    With ``--rate``, producers are paced so that message k is sent at ``start + k / rate``.
    Every ``--sample``-th message gets a ``wait_acked`` task, timed from send() returning.
    """
    n, producers, rate = args.n, args.producers, args.rate
    ids = IdRuns()
    latencies: list[float] = []
    sequence = 0

    async with Outbox(args.db, args.url, **outbox_options(args)) as box:
        await wait_connected(box)

        async def measure(message_id: int, returned: float) -> None:
            await box.wait_acked(message_id)
            latencies.append(now() - returned)

        async def produce(first: int, group: asyncio.TaskGroup, start: float) -> None:
            nonlocal sequence
            for seq in range(first, n, producers):
                if rate:
                    delay = start + seq / rate - now()
                    if delay > 0:
                        await asyncio.sleep(delay)
                message_id = await box.send(payload(seq, args.size))
                ids.add((message_id,))
                sequence += 1
                if sequence % args.sample == 0:
                    group.create_task(measure(message_id, now()))

        async with progress(lambda: box.stats().acked):
            timer = Timer()
            start = now()
            async with asyncio.TaskGroup() as group:
                for first in range(producers):
                    group.create_task(produce(first, group, start))
            enqueued = timer.lap()
            await box.drain()
            timer.stop()
        stats = box.stats()
        client_id = box.client_id
    finish(
        ids.count,
        timer,
        enqueue_seconds=enqueued,
        latency=latency_summary(latencies),
        ids=ids.merged(),
        client_id=client_id,
        counters=counters_of(stats.counters),
        dead=stats.dead,
    )


async def wait_connected(box: Outbox, timeout: float = 10.0) -> None:
    """Start the clock only once the handshake is done, as the ceilings do."""
    deadline = now() + timeout
    while not box.stats().connected:
        if now() > deadline:
            raise TimeoutError(f"the Outbox did not connect to {box.url} in {timeout}s")
        await asyncio.sleep(0.005)


def counters_of(counters: Any) -> dict[str, int]:
    return dict(dataclasses.asdict(counters))


# ---------------------------------------------------------------------------------------------
# Enqueue only: no receiver
# ---------------------------------------------------------------------------------------------


async def enqueue(args: argparse.Namespace) -> None:
    """How fast rows commit: send() or send_many() from P producers, or plain sqlite3.

    The Outbox points at a port nobody listens on and gives up after one refused connect,
    so nothing but the commits runs. ``sqlite`` is the baseline: the same table, the same
    pragmas, one INSERT and one commit per message, from one synchronous loop.
    """
    n, producers, batch = args.n, args.producers, args.batch
    ids = IdRuns()
    options = outbox_options(args, max_reconnect_attempts=0)
    async with Outbox(args.db, args.url, **options) as box:
        client_id = box.client_id
        if args.api == "sqlite":
            await box.close()  # the schema exists; now write to it the plain way
            synchronous = str(options.get("synchronous", "FULL"))
            timer = sqlite_enqueue(args.db, n, args.size, ids, synchronous)
        else:

            async def produce(first: int) -> None:
                if args.api == "send":
                    for seq in range(first, n, producers):
                        ids.add((await box.send(payload(seq, args.size)),))
                    return
                for chunk in range(first * batch, n, producers * batch):
                    messages = [
                        payload(seq, args.size) for seq in range(chunk, min(n, chunk + batch))
                    ]
                    ids.add(await box.send_many(messages))

            async with progress(lambda: ids.count):
                timer = Timer()
                async with asyncio.TaskGroup() as group:
                    for first in range(producers):
                        group.create_task(produce(first))
                timer.stop()
    finish(ids.count, timer, ids=ids.merged(), client_id=client_id, latency=latency_summary([]))


def sqlite_enqueue(path: str, n: int, size: int, ids: IdRuns, synchronous: str) -> Timer:
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA synchronous = {synchronous}")  # as the Outbox's; the file is in WAL
    timer = Timer()
    for seq in range(n):
        stamp = time.time()
        with db:
            cursor = db.execute(
                "INSERT INTO outbox (payload, created_at, updated_at) VALUES (?, ?, ?)",
                (json.dumps(payload(seq, size)), stamp, stamp),
            )
        assert cursor.lastrowid is not None
        ids.add((cursor.lastrowid,))
        if seq % 1000 == 0:
            emit("progress", done=ids.count)
    timer.stop()
    db.close()
    return timer


# ---------------------------------------------------------------------------------------------
# Transactional: outbox.enqueue in the producer's own sqlite3 transactions
# ---------------------------------------------------------------------------------------------


def tx_connect(path: str) -> tuple[sqlite3.Connection, str]:
    """A plain application connection on the shared file, migrated, ``synchronous=FULL``
    (the file is in WAL: migrate switches it); returns it and the file's client id."""
    import outbox

    db = sqlite3.connect(path, timeout=60.0, check_same_thread=False)
    outbox.migrate(db)  # idempotent and safe from several processes at once
    db.execute("PRAGMA synchronous = FULL")
    row = db.execute("SELECT value FROM outbox_meta WHERE name = 'client_id'").fetchone()
    return db, str(row[0])


async def tx_enqueue(args: argparse.Namespace, go: asyncio.Event) -> None:
    """One producer process: N messages through ``outbox.enqueue``, ``--batch`` per
    transaction (``with db:``, one COMMIT each). Says "ready" once migrated and waits for
    "go", so that all the producers of a row start together; the parent times them from the
    first start to the last end (monotonic clocks, the same across processes on one host).
    Latency: one transaction, from its first enqueue to its COMMIT returning."""
    import outbox

    n, batch = args.n, args.batch
    db, client_id = tx_connect(args.db)
    emit("ready")
    await go.wait()
    ids = IdRuns()
    latencies: list[float] = []

    def produce() -> None:
        for chunk in range(0, n, batch):
            began = now()
            with db:
                ids.add(
                    [
                        outbox.enqueue(db, payload(s, args.size))
                        for s in range(chunk, min(n, chunk + batch))
                    ]
                )
            latencies.append(now() - began)

    async with progress(lambda: ids.count):
        started = time.monotonic()
        timer = Timer()
        await asyncio.to_thread(produce)
        timer.stop()
        ended = time.monotonic()
    db.close()
    finish(
        ids.count,
        timer,
        started=started,
        ended=ended,
        ids=ids.merged(),
        client_id=client_id,
        latency=latency_summary(latencies),
    )


async def tx_pickup(args: argparse.Namespace, go: asyncio.Event) -> None:
    """The producer next to a relay: migrates the file and says "ready" (the parent then
    starts the relay), commits one warm-up message and waits for its ack (the relay is
    active and connected), then commits N messages one per transaction at ``--rate``, waits
    for all of them to be acked and reports each one's COMMIT time (``time.time()``, which
    the receiver's handler also uses)."""
    import outbox

    n, rate = args.n, args.rate or 50.0
    db, client_id = tx_connect(args.db)
    emit("ready")
    ids = IdRuns()
    committed: list[list[float]] = []

    def pending() -> int:
        return int(db.execute("SELECT count(*) FROM outbox WHERE status != 'acked'").fetchone()[0])

    async def until_acked(timeout: float) -> None:
        deadline = now() + timeout
        while pending():
            if now() > deadline:
                raise TimeoutError(f"{pending()} rows not acked after {timeout}s")
            await asyncio.sleep(0.01)

    with db:
        ids.add([outbox.enqueue(db, {"type": "warm-up"})])
    await until_acked(30.0)
    async with progress(lambda: ids.count - 1):
        timer = Timer()
        start = now()
        for seq in range(n):
            delay = start + seq / rate - now()
            if delay > 0:
                await asyncio.sleep(delay)
            with db:
                message_id = outbox.enqueue(db, payload(seq, args.size))
            committed.append([message_id, time.time()])
            ids.add([message_id])
        await until_acked(30.0)
        timer.stop()
    db.close()
    finish(n, timer, ids=ids.merged(), client_id=client_id, committed=committed,
           latency=latency_summary([]))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Backlog: enqueue while the receiver is down, then drain
# ---------------------------------------------------------------------------------------------


class RssSampler:
    """Peak RSS of this process over a stretch of time, sampled by a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


async def backlog(args: argparse.Namespace, go: asyncio.Event) -> None:
    """Enqueue N rows with nobody listening; on "go" (the receiver is up), time the drain."""
    n, batch, producers = args.n, args.batch, args.producers
    ids = IdRuns()
    # Reconnect quickly, so the drain starts within ~0.1 s of the receiver coming up
    # instead of after a backoff grown during the enqueue.
    options = outbox_options(args, reconnect_interval=0.05, reconnect_max_interval=0.1)
    async with Outbox(args.db, args.url, **options) as box:

        async def produce(first: int) -> None:
            for chunk in range(first * batch, n, producers * batch):
                messages = [payload(seq, args.size) for seq in range(chunk, min(n, chunk + batch))]
                ids.add(await box.send_many(messages))

        async with progress(lambda: ids.count, phase="enqueue"):
            timer = Timer()
            async with asyncio.TaskGroup() as group:
                for first in range(producers):
                    group.create_task(produce(first))
            timer.stop()
            enqueue_seconds, enqueue_cpu = timer.seconds, timer.cpu
        rss_before_drain = peak_rss_mb()
        emit("enqueued", messages=ids.count, seconds=enqueue_seconds)
        await go.wait()
        with RssSampler() as sampler:
            async with progress(lambda: box.stats().acked, phase="drain"):
                timer = Timer()
                await box.drain()
                timer.stop()
        stats = box.stats()
        client_id = box.client_id
    finish(
        ids.count,
        timer,
        enqueue_seconds=enqueue_seconds,
        enqueue_cpu_s=enqueue_cpu,
        enqueue_rss_mb=rss_before_drain,
        drain_rss_mb=sampler.peak / 2**20,
        latency=latency_summary([]),
        ids=ids.merged(),
        client_id=client_id,
        counters=counters_of(stats.counters),
        dead=stats.dead,
    )


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "kind",
        choices=(
            "ceiling-ff", "ceiling-acks", "naive", "outbox", "enqueue", "backlog",
            "tx-enqueue", "tx-pickup",
        ),
    )  # fmt: skip
    parser.add_argument("--url", default="ws://127.0.0.1:9/")
    parser.add_argument("--db")
    parser.add_argument("-n", type=int, required=True, help="messages")
    parser.add_argument("--size", type=int, default=100, help="payload bytes, about")
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--producers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=100, help="messages per send_many()")
    parser.add_argument("--api", choices=("send", "send_many", "sqlite"), default="send")
    parser.add_argument("--rate", type=float, default=0.0, help="pace: messages/s (0: flat out)")
    parser.add_argument("--sample", type=int, default=100, help="time every k-th message")
    parser.add_argument("--per-frame", action="store_true", help="the seed's wire format")
    parser.add_argument("--compression", action="store_true", help="permessage-deflate")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    parser.add_argument(
        "--option", type=option, action="append", default=[], help="Outbox NAME=VALUE"
    )
    return parser


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    go = asyncio.Event()

    def on_line(line: str) -> None:
        if line == "go":
            go.set()
        elif line == "":  # the parent is gone, or wants us gone
            main_task.cancel()

    watch_stdin(loop, on_line)
    scenarios: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, None]]] = {
        "ceiling-ff": ceiling_ff,
        "ceiling-acks": ceiling_acks,
        "naive": naive,
        "outbox": outbox_stream,
        "enqueue": enqueue,
    }
    if args.kind == "backlog":
        await backlog(args, go)
    elif args.kind == "tx-enqueue":
        await tx_enqueue(args, go)
    elif args.kind == "tx-pickup":
        await tx_pickup(args, go)
    else:
        await scenarios[args.kind](args)


def main() -> None:
    args = build_parser().parse_args()
    with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
        run_loop(run(args), args.uvloop)


if __name__ == "__main__":
    main()
