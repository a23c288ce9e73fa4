"""Receiver throughput: the inbox alone, a per-message handler, a batch handler, one run.

    python benchmarks/receiver.py            # the full run (about a minute on 2 cores)
    python benchmarks/receiver.py --quick    # a smoke run: a few seconds per row
    python benchmarks/receiver.py --repeat 3 --json receiver-results.json

The same load goes to ``outbox.receiver.serve`` (SQLite, the defaults: WAL,
``synchronous=FULL``) in a fresh process and a fresh file for each row:

a. inbox only: no handler, what ``python -m outbox serve`` does;
b. per-message handler: one ``INSERT`` into the handler's own table per message through
   ``message.tx`` (a SAVEPOINT, the statement and a RELEASE per message);
c. batch handler (``serve(..., batch=True)``): the same rows, one
   ``batch.tx.executemany`` per transaction.

The load is one process with many raw WebSocket connections (our wire format: batch frames,
``batch-ack``), each a distinct client id sending its ids 1..N in frames of ``--frame``
messages, a few frames in flight, frames encoded before the clock starts: as cheap a sender
as there is, so the receiver is what saturates. ``msg/s`` is from the first frame sent to
the last ack received; ``CPU us/msg`` is the receiver process's CPU time (every thread:
the event loop and aiosqlite's) per message; ``x inbox`` is the row's rate over row a.

After each row the files are read back: ``lost`` counts (client, id) pairs the sender sent
and the inbox (or, for b and c, the handler's table) does not hold; ``dups`` counts rows of
the handler's table beyond one per pair. The exit status is 1 if either is not 0 anywhere,
2 if a row failed to run. With ``--repeat K`` each row runs K times, interleaved (a, b, c,
a, b, c, ...), and the table shows the attempt least disturbed by other processes (every
attempt's rate is listed under its row). On a shared machine, the CPU other processes
used meanwhile is measured (``other``, in cores); a row that lost more than 10% of a core
to them is marked ``*``. ``tx`` counts the receiver's transactions (group commits).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from _common import cpu_seconds, emit, payload, peak_rss_mb, watch_stdin
from _procs import Child, ChildError, OtherLoad, kill_all
from _report import DISTURBED, code_version, machine

HERE = Path(__file__).resolve().parent
EXIT_LOST = 1
EXIT_FAILED = 2

KINDS = {
    "inbox": "a. inbox only (no handler)",
    "message": "b. per-message handler, message.tx",
    "batch": "c. batch handler, batch.tx.executemany",
}

CREATE = (
    "CREATE TABLE IF NOT EXISTS effects (client_id TEXT NOT NULL, message_id INTEGER NOT NULL, "
    "seq INTEGER NOT NULL)"
)
INSERT = "INSERT INTO effects (client_id, message_id, seq) VALUES (?, ?, ?)"


# ---------------------------------------------------------------------------------------------
# The receiver process
# ---------------------------------------------------------------------------------------------


async def serve_receiver(args: argparse.Namespace) -> None:
    from outbox.receiver import Batch, Incoming, Transaction, serve

    calls = 0

    async def setup(tx: Transaction) -> None:
        await tx.execute(CREATE)

    async def per_message(message: Incoming) -> None:
        nonlocal calls
        calls += 1
        await message.tx.execute(INSERT, (message.client_id, message.id, message.data["seq"]))

    async def per_batch(batch: Batch) -> None:
        nonlocal calls
        calls += len(batch)
        await batch.tx.executemany(INSERT, [(m.client_id, m.id, m.data["seq"]) for m in batch])

    handler: Any = {"inbox": None, "message": per_message, "batch": per_batch}[args.serve]
    stop = asyncio.Event()
    watch_stdin(
        asyncio.get_running_loop(), lambda line: stop.set() if line in ("", "stop") else None
    )
    async with serve(
        handler, args.db, batch=args.serve == "batch", setup=setup, port=0
    ) as receiver:
        cpu_at_ready = cpu_seconds()
        emit("ready", url=receiver.url)
        await stop.wait()
    s = receiver.stats
    emit(
        "stats",
        cpu_s=cpu_seconds() - cpu_at_ready,
        rss_mb=peak_rss_mb(),
        handler_calls=calls,
        messages=s.messages,
        transactions=s.transactions,
        resends_answered=s.duplicates,
        errors=s.handler_errors + s.storage_errors + s.protocol_errors,
    )


# ---------------------------------------------------------------------------------------------
# The load process
# ---------------------------------------------------------------------------------------------


async def send_load(args: argparse.Namespace) -> None:
    """``--clients`` connections, each sending ids 1..``--messages`` and reading its acks."""
    from websockets.asyncio.client import connect

    from outbox.protocol import wire

    def frames_of(client: int) -> list[tuple[list[int], str]]:
        out = []
        for first in range(1, args.messages + 1, args.frame):
            ids = list(range(first, min(first + args.frame, args.messages + 1)))
            body = [(i, json.dumps(payload(client * args.messages + i, args.size))) for i in ids]
            out.append((ids, wire.encode_batch(body)))
        return out

    prepared = [frames_of(client) for client in range(args.clients)]
    features = wire.format_features(wire.CLIENT_FEATURES)
    connections = [
        await connect(
            args.url,
            additional_headers={
                wire.CLIENT_ID_HEADER: f"bench-{client}",
                wire.FEATURES_HEADER: features,
            },
            compression=None,
            max_size=None,
        )
        for client in range(args.clients)
    ]
    acked = [0] * args.clients
    bad = 0

    async def run(client: int) -> None:
        nonlocal bad
        ws = connections[client]
        window = asyncio.Semaphore(args.window)
        expected = set(range(1, args.messages + 1))

        async def reader() -> None:
            nonlocal bad
            while expected:
                answer = wire.parse_server_frame(await ws.recv())
                ids = answer.ids if isinstance(answer, wire.Ack) else None
                if ids is None:
                    bad += 1
                    raise RuntimeError(f"bench-{client}: unexpected answer {answer!r}")
                for message_id in ids:
                    expected.discard(message_id)
                    acked[client] += 1
                    if message_id % args.frame == 0 or message_id == args.messages:
                        window.release()

        task = asyncio.create_task(reader())
        for _, frame in prepared[client]:
            await window.acquire()
            if task.done():
                break
            await ws.send(frame)
        await task

    started = time.perf_counter()
    cpu = cpu_seconds()
    await asyncio.gather(*(run(client) for client in range(args.clients)))
    seconds = time.perf_counter() - started
    for ws in connections:
        await ws.close()
    total = sum(acked)
    emit(
        "result",
        messages=total,
        seconds=seconds,
        rate=total / seconds,
        cpu_s=cpu_seconds() - cpu,
        bad=bad,
    )


# ---------------------------------------------------------------------------------------------
# The parent: rows, checks, table
# ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    kind: str
    messages: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    cpu_us: float = 0.0
    transactions: int = 0
    lost: int = 0
    dups: int = 0
    other_load: float = 0.0
    error: str | None = None


def check(db: Path, kind: str, clients: int, messages: int) -> tuple[int, int]:
    """(lost, dups) read back from the receiver's file."""
    expected = clients * messages
    with sqlite3.connect(db) as conn:
        inbox = conn.execute(
            "SELECT count(*) FROM inbox WHERE client_id LIKE 'bench-%' "
            "AND message_id BETWEEN 1 AND ?",
            (messages,),
        ).fetchone()[0]
        lost = expected - int(inbox)
        dups = 0
        if kind != "inbox":
            total = conn.execute("SELECT count(*) FROM effects").fetchone()[0]
            pairs = conn.execute(
                "SELECT count(*) FROM (SELECT DISTINCT client_id, message_id FROM effects)"
            ).fetchone()[0]
            lost = max(lost, expected - int(pairs))
            dups = int(total) - int(pairs)
    return lost, dups


async def run_row(kind: str, args: argparse.Namespace, workdir: Path, attempt: int) -> Result:
    result = Result(kind)
    db = workdir / f"{kind}-{attempt}.db"
    script = Path(__file__).name
    try:
        with OtherLoad() as other:
            async with Child.run(
                "receiver", script, ["--serve", kind, "--db", str(db)], workdir / f"{kind}.rx.log"
            ) as receiver:
                url = (await receiver.event("ready"))["url"]
                load_argv = [
                    "--load",
                    url,
                    "--clients",
                    str(args.clients),
                    "--messages",
                    str(args.messages),
                    "--frame",
                    str(args.frame),
                    "--window",
                    str(args.window),
                    "--size",
                    str(args.size),
                ]
                async with Child.run(
                    "load", script, load_argv, workdir / f"{kind}.load.log"
                ) as load:
                    done = await asyncio.wait_for(load.event("result"), args.timeout)
                stats = await receiver.finish()
        result.messages = int(done["messages"])
        result.seconds = float(done["seconds"])
        result.rate = float(done["rate"])
        result.cpu_us = float(stats["cpu_s"]) / max(1, result.messages) * 1e6
        result.transactions = int(stats["transactions"])
        result.other_load = other.seconds / max(result.seconds, 1e-9)
        result.lost, result.dups = check(db, kind, args.clients, args.messages)
        calls = int(stats["handler_calls"])
        if kind != "inbox" and calls != result.messages:
            result.dups = max(result.dups, calls - result.messages)
        if stats["errors"] or done["bad"]:
            result.error = f"receiver errors {stats['errors']}, bad answers {done['bad']}"
    except (ChildError, TimeoutError, OSError, KeyError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    remove_db(db)
    return result


def remove_db(db: Path) -> None:
    """Each row's file goes once read, so a long run does not fill the temp directory."""
    with contextlib.suppress(OSError):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)


def least_disturbed(attempts: dict[str, list[Result]]) -> int:
    """The attempt (one a, b, c sequence) whose rows lost the least CPU to other processes,
    among those where every row ran: its rows are compared with each other."""
    count = min(len(results) for results in attempts.values())

    def load(i: int) -> tuple[bool, float]:
        rows = [results[i] for results in attempts.values()]
        return (any(r.error is not None for r in rows), max(r.other_load for r in rows))

    return min(range(count), key=load)


def format_rows(rows: Sequence[Result], all_rates: dict[str, list[float]]) -> str:
    base = next((r.rate for r in rows if r.kind == "inbox" and r.error is None), None)
    header = (
        f"{'receiver':<42} {'messages':>9} {'msg/s':>9} {'CPU us/msg':>10} "
        f"{'x inbox':>7} {'tx':>6} {'lost':>4} {'dups':>4} {'other':>5}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        title = KINDS[r.kind] + (" *" if r.other_load > DISTURBED else "")
        if r.error is not None and not r.messages:
            lines.append(f"{title:<42} FAILED: {r.error.splitlines()[0]}")
            continue
        ratio = f"{r.rate / base:.2f}x" if base else "-"
        lines.append(
            f"{title:<42} {r.messages:>9,} {r.rate:>9,.0f} {r.cpu_us:>10.1f} "
            f"{ratio:>7} {r.transactions:>6,} {r.lost:>4} {r.dups:>4} {r.other_load:>5.2f}"
        )
        if r.error:
            lines.append(f"    !! {r.error}")
        if len(all_rates[r.kind]) > 1:
            lines.append(
                "    every attempt, msg/s: " + ", ".join(f"{x:,.0f}" for x in all_rates[r.kind])
            )
    inbox = next((r for r in rows if r.kind == "inbox" and r.error is None), None)
    batch = next((r for r in rows if r.kind == "batch" and r.error is None), None)
    if inbox is not None and batch is not None and inbox.rate:
        value = batch.rate / inbox.rate
        verdict = "met" if value >= 0.5 else "NOT MET"
        lines.append("")
        lines.append(
            f"batch handler / inbox only, msg/s: {value:.2f}x   target >= 0.5x   {verdict}"
        )
        lines.append(
            f"inbox only / batch handler, CPU per message: {inbox.cpu_us / batch.cpu_us:.2f}x"
            "   (less sensitive to other load)"
        )
        rates_a, rates_c = all_rates.get("inbox", []), all_rates.get("batch", [])
        if len(rates_a) > 1 and len(rates_a) == len(rates_c):
            ratios = ", ".join(f"{c / a:.2f}x" for a, c in zip(rates_a, rates_c, strict=True) if a)
            lines.append(f"batch / inbox in each attempt: {ratios}")
    lines.append("")
    return "\n".join(lines)


async def run_attempts(args: argparse.Namespace, workdir: Path) -> dict[str, list[Result]]:
    """Every row ``--repeat`` times, interleaved, so a disturbance hits all rows alike."""
    attempts: dict[str, list[Result]] = {kind: [] for kind in args.only}
    try:
        for attempt in range(args.repeat):
            for kind in args.only:
                result = await run_row(kind, args, workdir, attempt)
                attempts[kind].append(result)
                shown = "FAILED" if result.error else f"{result.rate:,.0f} msg/s"
                print(f"  {KINDS[kind]}: {shown}", file=sys.stderr, flush=True)
    finally:
        kill_all()
    return attempts


def report(args: argparse.Namespace, attempts: dict[str, list[Result]]) -> int:
    """Print the table (and write the JSON); the exit status."""
    best = least_disturbed(attempts)
    rows = [replace(attempts[kind][best]) for kind in args.only]
    for row in rows:  # a loss or a double anywhere counts, not only in the attempt shown
        row.lost = max(r.lost for r in attempts[row.kind])
        row.dups = max(r.dups for r in attempts[row.kind])
    rates = {kind: [r.rate for r in attempts[kind]] for kind in args.only}
    print(
        f"\n{args.clients} connections x {args.messages:,} messages ({args.size} B payloads, "
        f"{args.frame} per frame, {args.window} frames in flight each); "
        f"code {code_version(HERE.parent)}"
    )
    print(format_rows(rows, rates))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "settings": vars(args),
                    "rows": [vars(r) for r in rows],
                    "attempts": {k: [vars(r) for r in v] for k, v in attempts.items()},
                },
                indent=2,
                default=str,
            )
        )
    if any(r.error and not r.messages for rows_ in attempts.values() for r in rows_):
        return EXIT_FAILED
    if any(r.lost or r.dups for r in rows):
        return EXIT_LOST
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small, one attempt")
    parser.add_argument("--clients", type=int, default=16, help="connections (client ids)")
    parser.add_argument("--messages", type=int, default=None, help="messages per connection")
    parser.add_argument("--frame", type=int, default=200, help="messages per batch frame")
    parser.add_argument("--window", type=int, default=4, help="frames in flight per connection")
    parser.add_argument("--size", type=int, default=100, help="payload bytes, about")
    parser.add_argument("--repeat", type=int, default=None, help="attempts per row")
    parser.add_argument("--only", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per row")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    # the child processes
    parser.add_argument("--serve", choices=list(KINDS), help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve:
        asyncio.run(serve_receiver(args))
        return 0
    if args.messages is None:
        args.messages = 1_000 if args.quick else 10_000
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.load:
        args.url = args.load
        asyncio.run(send_load(args))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="outbox-rx-bench-"))
    try:
        attempts = asyncio.run(run_attempts(args, workdir))
    except KeyboardInterrupt:
        kill_all()
        return 130
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.path.insert(0, str(HERE.parent))  # machine() reads this tree's outbox, as the rows did
    return report(args, attempts)


if __name__ == "__main__":
    sys.exit(main())
