"""How close the outbox gets to the raw socket, and how far ahead of the obvious durable design.

    python benchmarks/throughput.py            # the full run (under 2 minutes on 2 cores)
    python benchmarks/throughput.py --quick    # the CI smoke run: well under a minute
    python benchmarks/throughput.py --repeat 3 --json bench-results.json
    python benchmarks/throughput.py --only outbox-batch backlog --outbox-option max_inflight=4000

Each scenario runs in fresh processes on 127.0.0.1: a server (``_servers.py``) and a sender
(``_clients.py``), each with its own peak RSS, in a fresh temp directory.

1. ceiling, fire-and-forget: plain ``websockets``; the server only counts frames.
2. ceiling, windowed acks: plain ``websockets``; the server acks every message, the client
   keeps up to 1000 un-acked. Again with permessage-deflate (websockets' default).
3. naive durable: the seed article's design on SQLite: INSERT + commit, send, wait for the
   ack, UPDATE + commit, one message at a time, to a server that commits each message
   before acking it.
4. outbox: ``Outbox`` with its defaults, N messages from many producer tasks calling
   ``send()``, to ``outbox.receiver.serve`` (durable inbox, deduplication): in the seed's
   wire format (one message per frame, one ack per message), with batch frames (the
   defaults), with deflate, and paced at half the batch-frame rate (the send-to-ack
   latency short of saturation).
5. enqueue only: ``send()`` and ``send_many()`` with 1, 10 and 100 producers and no
   receiver, next to plain sqlite3 committing one row at a time (same table, same pragmas).
6. transactional enqueue: 1 and 4 producer processes, each committing its own sqlite3
   transactions through ``outbox.enqueue`` (1 or 100 messages per transaction) into one
   shared, migrated file (WAL, synchronous=FULL); afterwards the file must hold exactly the
   rows enqueue returned.
7. relay pickup: ``python -m outbox relay`` between that file and the receiver, and a producer
   process committing one message per transaction at 50/s; latency from its COMMIT returning
   to the receiver's handler call.
8. backlog: enqueue a large backlog with the receiver down, start it, time the drain and
   sample the sender's RSS meanwhile.

After each outbox scenario the receiver's inbox and the client's outbox files are read:
``lost`` counts ids that ``send()`` returned and the inbox does not hold; ``dups`` counts
handler calls beyond one per message id. The exit status is 1 if either is not 0 anywhere,
2 if a scenario failed to run, 130 if interrupted. Speeds are for people to read; nothing
here gates on them.

On a shared machine the figures move with whatever else runs: the CPU time other processes
used is measured and a row that lost more than 10% of a core to them is marked ``*``;
``--repeat K`` keeps, per scenario, the attempt least disturbed. ``--outbox-option`` runs
every outbox row with a non-default option (the report then says so), for tuning.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

try:
    import psutil  # noqa: F401  (the backlog sender samples its RSS with it)
    from tqdm import tqdm
except ImportError as missing:
    raise SystemExit(
        f"benchmarks/throughput.py needs tqdm and psutil ({missing}); "
        "install them with: python -m pip install tqdm psutil"
    ) from None

from _common import latency_summary
from _peers import missing as missing_peer
from _procs import ROOT, Child, ChildError, OtherLoad, free_port, kill_all
from _report import (
    NOTES,
    Row,
    code_version,
    disturbed,
    format_table,
    format_verdicts,
    fsync_probe,
    machine,
    verdicts,
    write_json,
)

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
"""uvloop (in the fast extra) is installed: the uvloop rows run."""

PEERS = {
    "nats": "peer: NATS JetStream publish",
    "mqtt": "peer: MQTT QoS 1 (mosquitto)",
}
"""What a user would pick instead (``--peers``): see ``_peers.py`` for what their acks mean."""

EXIT_LOST = 1
EXIT_FAILED = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Settings:
    messages: int
    naive_messages: int
    enqueue_messages: int
    send_many_messages: int
    backlog_messages: int
    tx_messages: int
    """Messages per ``enqueue: ... 1/tx`` row (all its producer processes together)."""
    tx_batch_messages: int
    """Messages per ``enqueue: ... 100/tx`` row."""
    pickup_messages: int
    pickup_rate: float
    paced_seconds: float
    producers: int
    size: int
    quick: bool
    peers: bool = False
    """Also run the peers (NATS JetStream, MQTT QoS 1) where they are installed."""
    outbox_options: tuple[str, ...] = ()
    """``NAME=VALUE`` passed to every Outbox: for tuning experiments, never the defaults."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        def pick(value: int | None, full: int, quick: int) -> int:
            return value if value is not None else (quick if args.quick else full)

        return cls(
            messages=pick(args.messages, 200_000, 20_000),
            naive_messages=pick(args.naive_messages, 10_000, 1_000),
            enqueue_messages=pick(args.enqueue_messages, 20_000, 2_000),
            send_many_messages=pick(args.send_many_messages, 200_000, 20_000),
            backlog_messages=pick(args.backlog, 1_000_000, 50_000),
            tx_messages=pick(args.tx_messages, 20_000, 1_000),
            tx_batch_messages=pick(args.tx_batch_messages, 200_000, 10_000),
            pickup_messages=pick(args.pickup_messages, 200, 50),
            pickup_rate=50.0,
            paced_seconds=args.paced_seconds or (2.0 if args.quick else 10.0),
            producers=args.producers,
            size=args.size,
            quick=args.quick,
            peers=args.peers or any(key.startswith("peer-") for key in args.only or ()),
            outbox_options=tuple(args.outbox_option),
        )


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    client: tuple[str, ...]
    """``_clients.py`` arguments (``-n``, ``--size``, ``--db`` and ``--url`` are added)."""
    messages: int
    server: tuple[str, ...] | None = None
    """``_servers.py`` arguments, or None when nothing listens."""
    procs: int = 1
    """Producer processes (the ``tx-enqueue`` rows)."""

    @property
    def delivery(self) -> bool:
        """Lost and duplicates are checked against the receiver's inbox."""
        return self.server is not None and self.server[0] == "receiver"


def plan(s: Settings) -> list[Scenario]:
    """Every scenario, in running order (the paced one takes its rate from outbox-batch)."""
    n, many, enq = s.messages, s.send_many_messages, s.enqueue_messages
    producers = ("--producers", str(s.producers))
    acks = ("ceiling-acks", "--window", "1000")
    S = Scenario
    scenarios = [
        S("ceiling-ff", "ceiling: fire-and-forget", ("ceiling-ff",), n, ("count",)),
        S("ceiling-acks", "ceiling: windowed acks (1000)", acks, n, ("ack",)),
        S("ceiling-acks-deflate", "ceiling: windowed acks, deflate",
          (*acks, "--compression"), n, ("ack", "--compression")),
        S("naive", "naive durable: stop-and-wait", ("naive",), s.naive_messages, ("naive",)),
        S("outbox-frame", "outbox: 1 msg/frame (seed wire)",
          ("outbox", *producers, "--per-frame"), n, ("receiver",)),
        S("outbox-batch", "outbox: batch frames (defaults)", ("outbox", *producers), n,
          ("receiver",)),
        S("outbox-deflate", "outbox: batch frames, deflate",
          ("outbox", *producers, "--compression"), n, ("receiver", "--compression")),
    ]  # fmt: skip
    if HAVE_UVLOOP:  # the fast extra: the same rows on uvloop's event loop, both processes
        scenarios += [
            S("ceiling-acks-uvloop", "ceiling: windowed acks, uvloop", (*acks, "--uvloop"), n,
              ("ack", "--uvloop")),
            S("outbox-frame-uvloop", "outbox: 1 msg/frame, uvloop",
              ("outbox", *producers, "--per-frame", "--uvloop"), n, ("receiver", "--uvloop")),
            S("outbox-batch-uvloop", "outbox: batch frames, uvloop",
              ("outbox", *producers, "--uvloop"), n, ("receiver", "--uvloop")),
        ]  # fmt: skip
    scenarios += [
        S("outbox-paced", "outbox: paced at 50% of max",
          ("outbox", *producers, "--sample", "10"), 0, ("receiver",)),
        S("enqueue-sqlite", "enqueue: sqlite3, 1 commit/msg", ("enqueue", "--api", "sqlite"),
          enq),
    ]  # fmt: skip
    for api, label, total in (("send", "send()", enq), ("send_many", "send_many(100)", many)):
        for p in (1, 10, 100):
            key = f"enqueue-{api.replace('_', '-')}-{p}"
            argv = ("enqueue", "--api", api, "--producers", str(p), "--batch", "100")
            scenarios.append(S(key, f"enqueue: {label} x{p}", argv, total))
    for procs in (1, 4):
        for batch, total in ((1, s.tx_messages), (100, s.tx_batch_messages)):
            title = f"enqueue: {procs} {'proc' if procs == 1 else 'procs'}, {batch}/tx"
            argv = ("tx-enqueue", "--batch", str(batch))
            scenarios.append(S(f"tx-enqueue-{procs}p-{batch}", title, argv, total, procs=procs))
    pickup = ("tx-pickup", "--rate", f"{s.pickup_rate:g}")
    scenarios.append(S("tx-pickup", f"relay pickup: enqueue {s.pickup_rate:g}/s", pickup,
                       s.pickup_messages, ("receiver", "--record-times")))  # fmt: skip
    if s.peers:  # those not installed are dropped by main(), which says why
        for kind, title in PEERS.items():
            scenarios.append(S(f"peer-{kind}", title, ("peer", kind, *producers), n))
    backlog = ("backlog", "--producers", "4", "--batch", "1000")
    scenarios.append(S("backlog", "backlog", backlog, s.backlog_messages, ("receiver",)))
    return scenarios


# ---------------------------------------------------------------------------------------------
# Running one scenario
# ---------------------------------------------------------------------------------------------


class Progress:
    """The inner progress bar: messages of the scenario running now (stderr, TTY only)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def start(self, title: str, total: int) -> None:
        self.close()
        if self.enabled:
            self.bar = tqdm(
                total=total,
                desc=f"  {title}",
                unit="msg",
                unit_scale=True,
                leave=False,
                position=1,
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def to(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(max(0, done - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


async def run_scenario(
    scenario: Scenario, settings: Settings, work: Path, progress: Progress
) -> list[Row]:
    """Run one scenario in ``work``; return its table rows (two for the backlog)."""
    client_argv = [*scenario.client, "-n", str(scenario.messages), "--size", str(settings.size)]
    client_argv += ["--db", str(work / "outbox.db")]
    if scenario.client[0] in ("outbox", "enqueue", "backlog"):
        client_argv += [arg for text in settings.outbox_options for arg in ("--option", text)]
    server_argv = None
    if scenario.server is not None:
        server_argv = [*scenario.server, "--db", str(work / "inbox.db")]
    progress.start(scenario.title, scenario.messages)
    if scenario.key == "backlog":
        assert server_argv is not None
        return await _run_backlog(scenario, work, client_argv, server_argv, progress)
    if scenario.client[0] == "tx-enqueue":
        return await _run_tx_enqueue(scenario, settings, work, progress)
    if scenario.client[0] == "peer":
        return await _run_peer(scenario, settings, work)
    if scenario.client[0] == "tx-pickup":
        assert server_argv is not None
        return await _run_tx_pickup(scenario, work, client_argv, server_argv, progress)

    async with contextlib.AsyncExitStack() as stack:
        server = None
        if server_argv is not None:
            server = await stack.enter_async_context(
                Child.run("server", "_servers.py", server_argv, work / "server.log")
            )
            client_argv += ["--url", (await server.event("ready"))["url"]]
        else:
            client_argv += ["--url", f"ws://127.0.0.1:{free_port()}/"]  # nobody listens
        client = await stack.enter_async_context(
            Child.run("client", "_clients.py", client_argv, work / "client.log")
        )
        result = await _follow(client, progress)
        server_stats = None if server is None else await server.finish()
    row = _row(scenario.key, scenario.title, result, server_stats)
    if scenario.delivery:
        _check_delivery(row, work, result, server_stats)
    elif "ids" in result:
        row.lost = _missing_from_outbox(work / "outbox.db", result["ids"])
    return [row]


async def _follow(client: Child, progress: Progress) -> dict[str, Any]:
    """Show the client's progress until its result line."""
    async for message in client.events():
        if message["event"] == "progress":
            progress.to(message["done"])
        elif message["event"] == "result":
            return message
    await client.process.wait()
    raise ChildError(
        f"the client exited with status {client.process.returncode} and no result{client.tail()}"
    )


async def _run_backlog(
    scenario: Scenario,
    work: Path,
    client_argv: list[str],
    server_argv: list[str],
    progress: Progress,
) -> list[Row]:
    """The client enqueues with nothing listening on its port; then the receiver starts
    there, and the client times the drain from the moment it is told "go"."""
    port = free_port()
    client_argv += ["--url", f"ws://127.0.0.1:{port}/"]
    async with Child.run("client", "_clients.py", client_argv, work / "client.log") as client:
        progress.start(f"{scenario.title}: enqueue, receiver down", scenario.messages)
        async for message in client.events():
            if message["event"] == "progress":
                progress.to(message["done"])
            elif message["event"] == "enqueued":
                break
        else:
            raise ChildError(f"the backlog client ended before enqueueing{client.tail()}")
        progress.start(f"{scenario.title}: drain", scenario.messages)
        server_argv += ["--port", str(port)]
        async with Child.run("server", "_servers.py", server_argv, work / "server.log") as server:
            await server.event("ready")
            client.send("go")
            result = await _follow(client, progress)
            server_stats = await server.finish()
    enqueue = Row(
        "backlog-enqueue",
        "backlog: enqueue, receiver down",
        messages=result["messages"],
        seconds=result["enqueue_seconds"],
        rate=result["messages"] / result["enqueue_seconds"],
        client_rss_mb=result["enqueue_rss_mb"],
        client_cpu_us=result["enqueue_cpu_s"] / max(1, result["messages"]) * 1e6,
    )
    drain = _row("backlog-drain", "backlog: drain", result, server_stats)
    drain.client_rss_mb = result["drain_rss_mb"]
    drain.extra["client_rss_lifetime_mb"] = result["rss_mb"]
    _check_delivery(drain, work, result, server_stats)
    return [enqueue, drain]


async def _run_tx_enqueue(
    scenario: Scenario, settings: Settings, work: Path, progress: Progress
) -> list[Row]:
    """P producer processes, each committing its share through ``outbox.enqueue`` into one
    file; timed from the first one's start (all wait for "go") to the last one's end."""
    db = work / "outbox.db"
    shares = [scenario.messages // scenario.procs] * scenario.procs
    shares[0] += scenario.messages - sum(shares)
    async with contextlib.AsyncExitStack() as stack:
        children = []
        for index, share in enumerate(shares):
            argv = [*scenario.client, "-n", str(share), "--size", str(settings.size)]
            argv += ["--db", str(db)]
            log = work / f"producer-{index}.log"
            child = await stack.enter_async_context(
                Child.run(f"producer {index}", "_clients.py", argv, log)
            )
            await child.event("ready")  # migrated; one at a time, so no race on the schema
            children.append(child)
        for child in children:
            child.send("go")
        done = [0] * len(children)

        async def follow(index: int, child: Child) -> dict[str, Any]:
            async for message in child.events():
                if message["event"] == "progress":
                    done[index] = message["done"]
                    progress.to(sum(done))
                elif message["event"] == "result":
                    return message
            raise ChildError(f"the {child.name} ended with no result{child.tail()}")

        results = await asyncio.gather(*(follow(i, c) for i, c in enumerate(children)))
    seconds = max(r["ended"] for r in results) - min(r["started"] for r in results)
    messages = sum(r["messages"] for r in results)
    runs = [run for r in results for run in r["ids"]]
    p50s = [r["latency"]["p50_ms"] for r in results if r["latency"]["p50_ms"] is not None]
    p99s = [r["latency"]["p99_ms"] for r in results if r["latency"]["p99_ms"] is not None]
    row = Row(
        scenario.key,
        scenario.title,
        messages=messages,
        seconds=seconds,
        rate=messages / seconds if seconds > 0 else None,
        p50_ms=max(p50s) if p50s else None,  # the slowest producer's
        p99_ms=max(p99s) if p99s else None,
        latency_samples=sum(r["latency"]["samples"] for r in results),
        client_rss_mb=max(r["rss_mb"] for r in results),
    )
    row.client_cpu_us = sum(r["cpu_s"] for r in results) / max(1, messages) * 1e6
    row.extra["producers"] = [
        {k: r[k] for k in ("messages", "seconds", "latency")} for r in results
    ]
    row.lost = _missing_from_outbox(db, runs)
    with contextlib.closing(sqlite3.connect(db)) as outbox:
        held = outbox.execute("SELECT count(*) FROM outbox").fetchone()[0]
    returned = sum(last - first + 1 for first, last in runs)
    row.extra.update(returned_ids=returned, outbox_rows=held)
    if held != returned or len({tuple(run) for run in runs}) != len(runs):
        row.error = f"the file holds {held} rows; enqueue returned {returned} ids"
    return [row]


async def _run_peer(scenario: Scenario, settings: Settings, work: Path) -> list[Row]:
    """One process runs the broker and the producers (``_peers.py``)."""
    argv = [*scenario.client[1:], "-n", str(scenario.messages), "--size", str(settings.size)]
    argv += ["--dir", str(work)]
    async with Child.run("peer", "_peers.py", argv, work / "peer.log") as child:
        result = await child.event("result")
    row = _row(scenario.key, scenario.title, result, result["server"])
    row.server_rss_mb = result["server"]["rss_mb"]
    row.lost = result["lost"]
    return [row]


async def _run_tx_pickup(
    scenario: Scenario,
    work: Path,
    client_argv: list[str],
    server_argv: list[str],
    progress: Progress,
) -> list[Row]:
    """A receiver, a producer process committing through ``enqueue`` one message at a time,
    and ``python -m outbox relay`` on the producer's file between them. Latency: from the
    producer's COMMIT returning to the receiver's handler being called with that message
    (``time.time()`` in both processes)."""
    db = work / "outbox.db"
    async with Child.run("server", "_servers.py", server_argv, work / "server.log") as server:
        url = (await server.event("ready"))["url"]
        async with Child.run("producer", "_clients.py", client_argv, work / "client.log") as client:
            await client.event("ready")  # the file is migrated: the relay can open it
            relay_argv = ["outbox", "relay", "--db", str(db), "--url", url]
            async with Child.run("relay", "-m", relay_argv, work / "relay.log") as relay:
                result = await _follow(client, progress)
                relay.process.send_signal(signal.SIGTERM)  # its clean stop: exit status 0
                await asyncio.wait_for(relay.process.wait(), 30.0)
                if relay.process.returncode != 0:
                    raise ChildError(
                        f"the relay exited with status {relay.process.returncode}{relay.tail()}"
                    )
        server_stats = await server.finish()
    handled = dict(server_stats.pop("handled_at"))
    handled = {int(message_id): at for message_id, at in handled.items()}
    latencies = [handled[int(i)] - at for i, at in result["committed"] if int(i) in handled]
    result["latency"] = latency_summary(latencies)
    row = _row(scenario.key, scenario.title, result, server_stats)
    _check_delivery(row, work, result, server_stats)
    return [row]


def _row(key: str, title: str, result: dict[str, Any], server: dict[str, Any] | None) -> Row:
    latency = result["latency"]
    row = Row(
        key,
        title,
        messages=result["messages"],
        seconds=result["seconds"],
        rate=result["rate"],
        p50_ms=latency["p50_ms"],
        p99_ms=latency["p99_ms"],
        latency_samples=latency["samples"],
        client_rss_mb=result["rss_mb"],
        server_rss_mb=None if server is None else server["rss_mb"],
    )
    row.extra = {k: result[k] for k in ("enqueue_seconds", "counters", "dead") if k in result}
    messages = max(1, result["messages"])
    row.client_cpu_us = result["cpu_s"] / messages * 1e6
    if server is not None:
        row.extra["server"] = {k: v for k, v in server.items() if k != "event"}
        row.server_cpu_us = server["cpu_s"] / messages * 1e6
    return row


def _check_delivery(
    row: Row, work: Path, result: dict[str, Any], server: dict[str, Any] | None
) -> None:
    """lost: ids send() returned that the inbox does not hold as handled (read from the
    files, after both processes ended); dups: handler calls beyond one per message id.

    The bounded inbox deletes a client's rows below the low-water mark it announced: ids in
    the client's ``[base, floor)`` (``inbox_floor``) were recorded and acked, then deleted, so
    they count as delivered; the handler's own count (``dups``) still shows each handled once.
    """
    runs: list[list[int]] = result["ids"]
    returned = sum(last - first + 1 for first, last in runs)
    client_id = result["client_id"]
    with contextlib.closing(sqlite3.connect(work / "inbox.db")) as inbox:
        floor = inbox.execute(
            "SELECT base, floor FROM inbox_floor WHERE client_id = ?", (client_id,)
        ).fetchone()
        base, top = floor if floor is not None else (0, 0)
        delivered = 0
        for first, last in runs:
            delivered += inbox.execute(
                "SELECT count(*) FROM inbox WHERE client_id = ? AND message_id BETWEEN ? AND ? "
                "AND reject_reason IS NULL",
                (client_id, first, last),
            ).fetchone()[0]
            # ids of this run in [base, top): pruned after being acked
            delivered += max(0, min(last + 1, top) - max(first, base))
    with contextlib.closing(sqlite3.connect(work / "outbox.db")) as outbox:
        statuses = dict(outbox.execute("SELECT status, count(*) FROM outbox GROUP BY status"))
    row.lost = returned - delivered
    row.dups = None if server is None else server["duplicates_handled"]
    row.extra.update(returned_ids=returned, outbox_rows=statuses)
    not_acked = statuses.get("pending", 0) + statuses.get("dead", 0)
    if not_acked:
        row.error = f"{not_acked} rows still pending or dead in the outbox after drain()"


def _missing_from_outbox(path: Path, runs: list[list[int]]) -> int:
    """Enqueue rows: ids send() returned that the outbox table does not hold."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        held: int = sum(
            db.execute("SELECT count(*) FROM outbox WHERE id BETWEEN ? AND ?", run).fetchone()[0]
            for run in runs
        )
    return sum(last - first + 1 for first, last in runs) - held


def _paced(scenario: Scenario, rows: Sequence[Row], settings: Settings) -> Scenario | None:
    """The paced run, at half the rate outbox-batch reached in this same run."""
    batch = next((r for r in rows if r.key == "outbox-batch" and not r.failed), None)
    if batch is None or not batch.rate:
        return None
    rate = batch.rate / 2
    return replace(
        scenario,
        title=f"outbox: paced at {rate:,.0f}/s (50%)",
        client=(*scenario.client, "--rate", f"{rate:.1f}"),
        messages=max(1, int(rate * settings.paced_seconds)),
    )


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


async def run_all(
    scenarios: Sequence[Scenario],
    settings: Settings,
    base: Path,
    timeout: float,
    other: OtherLoad,
    repeat: int,
) -> list[Row]:
    rows: list[Row] = []
    interactive = sys.stderr.isatty()
    progress = Progress(interactive)
    outer = tqdm(
        total=len(scenarios),
        desc="scenarios",
        position=0,
        file=sys.stderr,
        disable=not interactive,
        dynamic_ncols=True,
    )
    try:
        for index, planned in enumerate(scenarios):
            scenario = _paced(planned, rows, settings) if planned.key == "outbox-paced" else planned
            if scenario is None:
                rows.append(Row(planned.key, planned.title, error="needs outbox-batch's rate"))
                continue
            outer.set_postfix_str(scenario.title)
            attempts = []
            for attempt in range(repeat):
                work = base / f"{index:02d}-{scenario.key}-{attempt}"
                attempts.append(await _attempt(scenario, settings, work, progress, timeout, other))
            rows.extend(_keep(attempts))
            outer.update(1)
    finally:
        outer.close()
    return rows


async def _attempt(
    scenario: Scenario,
    settings: Settings,
    work: Path,
    progress: Progress,
    timeout: float,
    other: OtherLoad,
) -> list[Row]:
    """Run the scenario once; its rows carry how much CPU other processes took meanwhile."""
    await asyncio.to_thread(work.mkdir)
    started, other_before = time.monotonic(), other.seconds
    try:
        async with asyncio.timeout(timeout):
            rows = await run_scenario(scenario, settings, work, progress)
    except Exception as exc:  # one scenario failing must not hide the others
        rows = [Row(scenario.key, scenario.title, error=f"{type(exc).__name__}: {exc}")]
    finally:
        progress.close()
        await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)
    elapsed = time.monotonic() - started
    for row in rows:
        row.other_load = (other.seconds - other_before) / elapsed
        done = f"{row.rate:,.0f} msg/s" if row.rate else "FAILED"
        load = f", other processes {row.other_load:.2f} cores" if row.other_load > 0.01 else ""
        tqdm.write(f"{row.title:<34} {done} ({elapsed:.1f}s{load})", file=sys.stderr)
        if row.error:
            tqdm.write(f"    {row.error}", file=sys.stderr)
    return rows


def _keep(attempts: list[list[Row]]) -> list[Row]:
    """The attempt to show: one that failed, lost or duplicated if any (never hidden),
    else the least disturbed by other processes. Every attempt's figures go in the JSON."""

    def bad(rows: list[Row]) -> bool:
        return any(row.failed or row.lost or row.dups for row in rows)

    def disturbance(rows: list[Row]) -> float:
        return max(row.other_load for row in rows)

    kept = min(attempts, key=lambda rows: (not bad(rows), disturbance(rows)))
    if len(attempts) > 1:
        for position, row in enumerate(kept):
            row.extra["attempts"] = [
                {"rate": rows[position].rate, "other_load": rows[position].other_load,
                 "p99_ms": rows[position].p99_ms, "error": rows[position].error}
                for rows in attempts
                if len(rows) > position
            ]  # fmt: skip
    return kept


def build_parser(keys: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios: " + ", ".join(keys),
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="small counts, under a minute: the CI smoke run")
    add("--json", metavar="PATH", help="also write every figure to this file")
    add("--only", nargs="+", metavar="SCENARIO", help="run only these scenarios")
    add("-n", "--messages", type=int, help="messages per streaming row (200,000; quick 20,000)")
    add("--naive-messages", type=int, help="messages for naive durable (10,000; quick 1,000)")
    add("--enqueue-messages", type=int, help="messages per send() row (20,000; quick 2,000)")
    add("--send-many-messages", type=int, help="per send_many() row (200,000; quick 20,000)")
    add("--backlog", type=int, help="rows in the backlog (1,000,000; quick 50,000)")
    add("--tx-messages", type=int, help="per enqueue 1/tx row (20,000; quick 1,000)")
    add("--tx-batch-messages", type=int, help="per enqueue 100/tx row (200,000; quick 10,000)")
    add("--pickup-messages", type=int, help="commits in relay pickup (200; quick 50)")
    add("--paced-seconds", type=float, help="length of the paced run (10; quick 2)")
    add("--producers", type=int, default=100, help="producer tasks (default: %(default)s)")
    add("--size", type=int, default=100, help="payload bytes, about (default: %(default)s)")
    add(
        "--peers",
        action="store_true",
        help="also NATS JetStream and MQTT QoS 1 (mosquitto), where installed (the peers extra)",
    )
    add("--tmp", help="where the databases go (its disk sets the cost of every fsync)")
    add(
        "--outbox-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="pass an Outbox option to every outbox row, e.g. max_inflight=5000 (for tuning; "
        "the report then says the rows are not the defaults)",
    )
    add("--timeout", type=float, help="seconds allowed per scenario (900; quick 120)")
    add(
        "--repeat",
        type=int,
        default=1,
        metavar="K",
        help="run each scenario K times and show the attempt least disturbed by other "
        "processes (any attempt that failed, lost or duplicated is shown instead)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    keys = [s.key for s in plan(Settings.from_args(build_parser([]).parse_args(["--peers"])))]
    args = build_parser(keys).parse_args(argv)
    settings = Settings.from_args(args)
    scenarios = plan(settings)
    if args.only:
        unknown = sorted(set(args.only) - set(keys))
        if unknown:
            raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}; see --help")
        wanted = set(args.only) | ({"outbox-batch"} if "outbox-paced" in args.only else set())
        scenarios = [s for s in scenarios if s.key in wanted]
    peer_keys = [s.key for s in scenarios if s.key.startswith("peer-")]
    skipped = {key: missing_peer(key.removeprefix("peer-")) for key in peer_keys}
    scenarios = [s for s in scenarios if skipped.get(s.key) is None]

    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="outbox-bench-", dir=args.tmp))
    try:
        disk = fsync_probe(str(base), 0.5 if settings.quick else 2.0)
        timeout = args.timeout or (120.0 if settings.quick else 900.0)
        with OtherLoad() as other:
            run = _run_until_signal(scenarios, settings, base, timeout, other, args.repeat)
            rows = asyncio.run(run)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every child process was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        kill_all()  # last resort: nothing outlives the benchmark
        shutil.rmtree(base, ignore_errors=True)

    status = 0
    if any(row.failed for row in rows):
        status = EXIT_FAILED
    if any(row.lost or row.dups for row in rows):
        status = EXIT_LOST
    info = {**machine(), "outbox": code_version(ROOT)}
    measured = verdicts(rows)
    print(
        f"outbox throughput ({'--quick' if settings.quick else 'full run'}): "
        f"python {info['python']}, websockets {info['websockets']}, sqlite {info['sqlite']}, "
        f"json decoder {info['json_decoder']}, {info['cpus']} cpus; payload ~{settings.size} B, "
        f"{settings.producers} producers; fdatasync p50 {disk['p50_ms']:.2f} ms, "
        f"p99 {disk['p99_ms']:.2f} ms"
    )
    elapsed = time.monotonic() - started
    print(f"outbox measured: {info['outbox']}")
    print(
        f"Other processes on this machine used {other.seconds:.1f} CPU-seconds during the run "
        f"({other.seconds / elapsed:.2f} of a core on average)"
        + ("; rows marked * lost more than 10% of a core to them" if disturbed(rows) else "")
    )
    for key, reason in skipped.items():
        if reason is not None:
            print(f"{PEERS[key.removeprefix('peer-')]}: skipped, {reason}")
    if not HAVE_UVLOOP:
        print("uvloop is not installed: its rows were skipped (python -m pip install '.[fast]')")
    if settings.outbox_options:
        print(f"NOT THE DEFAULTS: every Outbox ran with {', '.join(settings.outbox_options)}")
    print()
    print(format_table(rows))
    print()
    print(format_verdicts(measured))
    print()
    print(NOTES)
    print(f"Took {elapsed:.0f} s; exit status {status}.")
    if args.json:
        write_json(
            args.json,
            {**info, "fsync": disk, "other_cpu_seconds": other.seconds},
            settings,
            rows,
            measured,
            status,
        )
    return status


async def _run_until_signal(
    scenarios: Sequence[Scenario],
    settings: Settings,
    base: Path,
    timeout: float,
    other: OtherLoad,
    repeat: int,
) -> list[Row]:
    task = asyncio.current_task()
    assert task is not None
    with contextlib.suppress(NotImplementedError):  # SIGTERM (a CI timeout) stops children too
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run_all(scenarios, settings, base, timeout, other, repeat)


if __name__ == "__main__":
    sys.exit(main())
