"""How close the outbox gets to the raw socket, and how far ahead of the obvious durable design.

    python benchmarks/throughput.py            # the full run (a few minutes on 2 cores)
    python benchmarks/throughput.py --quick    # the CI smoke: under a minute
    python benchmarks/throughput.py --json bench-results.json --only outbox-batch backlog

Every scenario runs in fresh processes on 127.0.0.1, a receiver (``_servers.py``) and a
sender (``_clients.py``), each in its own process with its own peak RSS, in a fresh temp
directory:

1. ceiling, fire-and-forget: plain ``websockets``, the server only counts frames.
2. ceiling, windowed acks: plain ``websockets``, the server acks every message, the client
   keeps up to 1000 un-acked. Again with permessage-deflate (websockets' default).
3. naive durable: the seed article's design on SQLite: INSERT + commit, send, wait for the
   ack, UPDATE + commit, one message at a time, to a server that commits each message
   before acking it. Same durability as the outbox (WAL, ``synchronous=FULL``, both ends).
4. outbox: ``Outbox`` with its defaults, N messages from many producer tasks calling
   ``send()``, to ``outbox.receiver.serve`` (durable inbox, deduplication): once in the
   seed's wire format (one message per frame, one ack per message), once with batch frames
   (the defaults), once with deflate, and once paced at half the batch-frame rate to read
   the send-to-ack latency of a system that is not saturated.
5. enqueue only: ``send()`` and ``send_many()`` with 1, 10 and 100 producers and no
   receiver, against plain sqlite3 committing one row at a time (the same table and pragmas).
6. backlog: enqueue a large backlog with the receiver down, start it, time the drain and
   sample the sender's RSS during it.

After each outbox scenario the receiver's inbox and the client's outbox files are read:
``lost`` counts ids that ``send()`` returned but the inbox does not hold; ``dups`` counts
handler calls beyond one per message id (the receiver's handler counts them). The command
exits with status 1 if any of them is not 0, and 2 if a scenario failed to run. Speeds are
printed for people to read; nothing here gates on them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

try:
    import psutil  # noqa: F401  (the backlog sender samples its RSS with it)
    from tqdm import tqdm
except ImportError as missing:
    raise SystemExit(
        f"benchmarks/throughput.py needs tqdm and psutil ({missing}); "
        "install them with: python -m pip install tqdm psutil"
    ) from None

EXIT_LOST = 1
EXIT_FAILED = 2

# ---------------------------------------------------------------------------------------------
# What to run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    client: tuple[str, ...]
    """Arguments of ``_clients.py``."""
    messages: int
    server: tuple[str, ...] | None = None
    """Arguments of ``_servers.py``, or None for no receiver."""
    delivery: bool = False
    """An outbox scenario: check lost and duplicates against the receiver's inbox."""
    group: str = ""


@dataclass
class Row:
    """One line of the table."""

    key: str
    title: str
    messages: int | None = None
    seconds: float | None = None
    rate: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    latency_samples: int = 0
    client_rss_mb: float | None = None
    server_rss_mb: float | None = None
    lost: int | None = None
    dups: int | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    messages: int
    naive_messages: int
    enqueue_messages: int
    send_many_messages: int
    backlog_messages: int
    paced_seconds: float
    producers: int
    size: int
    quick: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        quick = args.quick

        def pick(value: int | None, full: int, small: int) -> int:
            return value if value is not None else (small if quick else full)

        return cls(
            messages=pick(args.messages, 200_000, 20_000),
            naive_messages=pick(args.naive_messages, 10_000, 1_000),
            enqueue_messages=pick(args.enqueue_messages, 20_000, 2_000),
            send_many_messages=pick(args.send_many_messages, 200_000, 20_000),
            backlog_messages=pick(args.backlog, 1_000_000, 50_000),
            paced_seconds=args.paced_seconds or (2.0 if quick else 10.0),
            producers=args.producers,
            size=args.size,
            quick=quick,
        )


def plan(s: Settings) -> list[Scenario]:
    """Every scenario, in the order they run (the paced one needs the batch rate first)."""
    n, size = s.messages, s.size
    common = ("--size", str(size))
    outbox = ("outbox", "-n", str(n), "--producers", str(s.producers), *common)
    scenarios = [
        Scenario(
            "ceiling-ff",
            "ceiling: fire-and-forget",
            ("ceiling-ff", "-n", str(n), *common),
            n,
            ("count",),
            group="socket",
        ),
        Scenario(
            "ceiling-acks",
            "ceiling: windowed acks (1000)",
            ("ceiling-acks", "-n", str(n), "--window", "1000", *common),
            n,
            ("ack",),
            group="socket",
        ),
        Scenario(
            "ceiling-acks-deflate",
            "ceiling: windowed acks, deflate",
            ("ceiling-acks", "-n", str(n), "--window", "1000", "--compression", *common),
            n,
            ("ack", "--compression"),
            group="socket",
        ),
        Scenario(
            "naive",
            "naive durable: stop-and-wait",
            ("naive", "-n", str(s.naive_messages), *common),
            s.naive_messages,
            ("naive",),
            group="socket",
        ),
        Scenario(
            "outbox-frame",
            "outbox: 1 msg/frame (seed wire)",
            (*outbox, "--per-frame"),
            n,
            ("receiver",),
            delivery=True,
            group="socket",
        ),
        Scenario(
            "outbox-batch",
            "outbox: batch frames (defaults)",
            outbox,
            n,
            ("receiver",),
            delivery=True,
            group="socket",
        ),
        Scenario(
            "outbox-deflate",
            "outbox: batch frames, deflate",
            (*outbox, "--compression"),
            n,
            ("receiver", "--compression"),
            delivery=True,
            group="socket",
        ),
        Scenario(
            "outbox-paced",
            "outbox: paced at 50% of max",
            ("outbox", "--producers", str(s.producers), "--sample", "10", *common),
            0,  # set from the batch rate just before it runs
            ("receiver",),
            delivery=True,
            group="socket",
        ),
        Scenario(
            "enqueue-sqlite",
            "enqueue: sqlite3, 1 commit/msg",
            ("enqueue", "--api", "sqlite", "-n", str(s.enqueue_messages), *common),
            s.enqueue_messages,
            group="enqueue",
        ),
    ]
    for api, total in (("send", s.enqueue_messages), ("send_many", s.send_many_messages)):
        for producers in (1, 10, 100):
            label = "send()" if api == "send" else "send_many(100)"
            args = ("enqueue", "--api", api, "--producers", str(producers), "--batch", "100")
            scenarios.append(
                Scenario(
                    f"enqueue-{api.replace('_', '-')}-{producers}",
                    f"enqueue: {label} x{producers}",
                    (*args, "-n", str(total), *common),
                    total,
                    group="enqueue",
                )
            )
    b = s.backlog_messages
    scenarios.append(
        Scenario(
            "backlog",
            "backlog",
            ("backlog", "-n", str(b), "--producers", "4", "--batch", "1000", *common),
            b,
            ("receiver",),
            delivery=True,
            group="backlog",
        )
    )
    return scenarios


# ---------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------

_LIVE: set[asyncio.subprocess.Process] = set()
"""Every child still running, for the last-resort kill in ``main``."""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Measure this working tree's outbox, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class ChildError(Exception):
    pass


class Child:
    """One server or client process: JSON lines out, commands in, stopped by closing stdin."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log

    @classmethod
    @contextlib.asynccontextmanager
    async def run(
        cls, name: str, script: str, argv: Sequence[str], log: Path
    ) -> AsyncIterator[Child]:
        with log.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(HERE / script),
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env=_child_env(),
                # Ctrl-C reaches only this process, which then stops its children in order.
                start_new_session=True,
                limit=1 << 24,
            )
        _LIVE.add(process)
        child = cls(name, process, log)
        try:
            yield child
        finally:
            await child.stop()

    async def event(self, *wanted: str) -> dict[str, Any]:
        """The next line whose event is one of ``wanted`` (other lines are skipped)."""
        async for message in self.events():
            if message["event"] in wanted:
                return message
        raise ChildError(f"{self.name} ended before saying {'/'.join(wanted)}{self.log_tail()}")

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        stdout = self.process.stdout
        assert stdout is not None
        while True:
            line = await stdout.readline()
            if not line:
                return
            try:
                message = json.loads(line)
            except ValueError:
                continue  # a stray print; the protocol lines are JSON
            yield message

    def send(self, line: str) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(line.encode() + b"\n")

    async def finish(self, timeout: float = 60.0) -> dict[str, Any] | None:
        """Close stdin (stop), read what it still says, return its last ``stats`` line."""
        stdin = self.process.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()
        stats = None
        async with asyncio.timeout(timeout):
            async for message in self.events():
                if message["event"] == "stats":
                    stats = message
            await self.process.wait()
        return stats

    async def stop(self) -> None:
        """Make sure the process is gone: EOF, then SIGTERM, then SIGKILL."""
        process = self.process
        try:
            if process.returncode is None:
                if process.stdin is not None and not process.stdin.is_closing():
                    process.stdin.close()
                for signum in (None, signal.SIGTERM, signal.SIGKILL):
                    if signum is not None:
                        with contextlib.suppress(ProcessLookupError):
                            process.send_signal(signum)
                    try:
                        await asyncio.wait_for(process.wait(), 5.0)
                        break
                    except TimeoutError:
                        continue
        finally:
            if process.returncode is not None:
                _LIVE.discard(process)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        if not text:
            return ""
        return f"\n--- last lines of {self.name}'s stderr ({self.log}):\n" + "\n".join(
            text[-lines:]
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Running one scenario
# ---------------------------------------------------------------------------------------------


class Progress:
    """The inner progress bar: messages of the scenario running now."""

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


async def run_scenario(scenario: Scenario, work: Path, progress: Progress) -> list[Row]:
    """Run one scenario in ``work``; return its table rows (two for the backlog)."""
    client_argv = [*scenario.client]
    server_argv = [*scenario.server] if scenario.server else None
    if scenario.client[0] in ("naive", "outbox", "enqueue", "backlog"):
        client_argv += ["--db", str(work / "outbox.db")]
    if server_argv is not None and server_argv[0] in ("naive", "receiver"):
        server_argv += ["--db", str(work / "inbox.db")]
    progress.start(scenario.title, scenario.messages)
    if scenario.key == "backlog":
        assert server_argv is not None
        return await _run_backlog(scenario, work, client_argv, server_argv, progress)

    async with contextlib.AsyncExitStack() as stack:
        server_stats: dict[str, Any] | None = None
        server = None
        if server_argv is not None:
            server = await stack.enter_async_context(
                Child.run("server", "_servers.py", server_argv, work / "server.log")
            )
            ready = await server.event("ready")
            client_argv += ["--url", ready["url"]]
        else:
            client_argv += ["--url", f"ws://127.0.0.1:{_free_port()}/"]  # nobody listens
        client = await stack.enter_async_context(
            Child.run("client", "_clients.py", client_argv, work / "client.log")
        )
        result = await _follow(client, progress)
        if server is not None:
            server_stats = await server.finish()
    row = _row(scenario.key, scenario.title, result, server_stats)
    if scenario.delivery:
        _check_delivery(row, work, result, server_stats)
    elif scenario.group == "enqueue":
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
        f"the client exited with status {client.process.returncode} without a result"
        + client.log_tail()
    )


async def _run_backlog(
    scenario: Scenario,
    work: Path,
    client_argv: list[str],
    server_argv: list[str],
    progress: Progress,
) -> list[Row]:
    port = _free_port()
    client_argv += ["--url", f"ws://127.0.0.1:{port}/"]
    async with Child.run("client", "_clients.py", client_argv, work / "client.log") as client:
        progress.start(f"{scenario.title}: enqueue, receiver down", scenario.messages)
        async for message in client.events():
            if message["event"] == "progress":
                progress.to(message["done"])
            elif message["event"] == "enqueued":
                break
        else:
            raise ChildError("the backlog client ended before enqueueing" + client.log_tail())
        progress.start(f"{scenario.title}: drain", scenario.messages)
        server_log = work / "server.log"
        async with Child.run(
            "server", "_servers.py", [*server_argv, "--port", str(port)], server_log
        ) as server:
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
    )
    drain = _row("backlog-drain", "backlog: drain", result, server_stats)
    drain.client_rss_mb = result["drain_rss_mb"]
    drain.extra["client_rss_lifetime_mb"] = result["rss_mb"]
    _check_delivery(drain, work, result, server_stats)
    return [enqueue, drain]


def _row(key: str, title: str, result: dict[str, Any], server_stats: dict[str, Any] | None) -> Row:
    latency = result.get("latency") or {}
    row = Row(
        key,
        title,
        messages=result["messages"],
        seconds=result["seconds"],
        rate=result["rate"],
        p50_ms=latency.get("p50_ms"),
        p99_ms=latency.get("p99_ms"),
        latency_samples=latency.get("samples", 0),
        client_rss_mb=result["rss_mb"],
        server_rss_mb=None if server_stats is None else server_stats["rss_mb"],
    )
    for name in ("enqueue_seconds", "counters", "dead"):
        if name in result:
            row.extra[name] = result[name]
    if server_stats is not None:
        row.extra["server"] = {k: v for k, v in server_stats.items() if k != "event"}
    return row


def _check_delivery(
    row: Row, work: Path, result: dict[str, Any], server_stats: dict[str, Any] | None
) -> None:
    """lost: ids send() returned that the inbox does not hold as handled; dups: handler
    calls beyond one per message id. Also what is left un-acked in the outbox file."""
    runs: list[list[int]] = result["ids"]
    returned = sum(last - first + 1 for first, last in runs)
    with contextlib.closing(sqlite3.connect(work / "inbox.db")) as inbox:
        delivered = sum(
            inbox.execute(
                "SELECT count(*) FROM inbox WHERE client_id = ? AND message_id BETWEEN ? AND ? "
                "AND reject_reason IS NULL",
                (result["client_id"], first, last),
            ).fetchone()[0]
            for first, last in runs
        )
    with contextlib.closing(sqlite3.connect(work / "outbox.db")) as outbox:
        statuses = dict(outbox.execute("SELECT status, count(*) FROM outbox GROUP BY status"))
    row.lost = returned - delivered
    row.dups = None if server_stats is None else server_stats["duplicates_handled"]
    row.extra["returned_ids"] = returned
    row.extra["outbox_rows"] = statuses
    not_acked = statuses.get("pending", 0) + statuses.get("dead", 0)
    if not_acked:
        row.error = f"{not_acked} rows not acked in the outbox after drain()"


def _missing_from_outbox(path: Path, runs: list[list[int]]) -> int:
    """Enqueue rows: ids that send() returned but the outbox table does not hold."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        held = sum(
            db.execute(
                "SELECT count(*) FROM outbox WHERE id BETWEEN ? AND ?", (first, last)
            ).fetchone()[0]
            for first, last in runs
        )
    return sum(last - first + 1 for first, last in runs) - held


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _fmt(value: float | int | None, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


COLUMNS = (
    ("scenario", "<", 33),
    ("messages", ">", 9),
    ("seconds", ">", 7),
    ("msg/s", ">", 9),
    ("p50 ms", ">", 7),
    ("p99 ms", ">", 7),
    ("client MB", ">", 9),
    ("server MB", ">", 9),
    ("lost", ">", 4),
    ("dups", ">", 4),
)


def format_table(rows: Sequence[Row]) -> str:
    header = "  ".join(f"{name:{align}{width}}" for name, align, width in COLUMNS)
    lines = [header, "-" * len(header)]
    for row in rows:
        if row.error and row.messages is None:
            lines.append(f"{row.title:<33}  FAILED: {row.error.splitlines()[0]}")
            continue
        cells = (
            row.title,
            _fmt(row.messages, ","),
            _fmt(row.seconds, ".2f"),
            _fmt(row.rate, ",.0f"),
            _fmt(row.p50_ms, ".2f"),
            _fmt(row.p99_ms, ".2f"),
            _fmt(row.client_rss_mb, ".1f"),
            _fmt(row.server_rss_mb, ".1f"),
            _fmt(row.lost, "d"),
            _fmt(row.dups, "d"),
        )
        lines.append(
            "  ".join(
                f"{cell:{align}{width}}"
                for cell, (_, align, width) in zip(cells, COLUMNS, strict=True)
            )
        )
        if row.error:
            lines.append(f"  !! {row.error}")
    return "\n".join(lines)


@dataclass
class Ratio:
    label: str
    value: float | None
    unit: str
    target: str
    met: bool | None


def ratios(rows: Sequence[Row]) -> list[Ratio]:
    by_key = {row.key: row for row in rows if row.error is None}

    def rate(key: str) -> float | None:
        row = by_key.get(key)
        return None if row is None else row.rate

    def over(a: str, b: str) -> float | None:
        x, y = rate(a), rate(b)
        return None if x is None or not y else x / y

    def at_least(value: float | None, floor: float) -> bool | None:
        return None if value is None else value >= floor

    out: list[Ratio] = []
    value = over("outbox-frame", "ceiling-acks")
    out.append(
        Ratio(
            "outbox 1 msg/frame / ceiling windowed acks",
            value,
            "x",
            ">= 0.5x",
            at_least(value, 0.5),
        )
    )
    value = over("outbox-frame", "naive")
    out.append(
        Ratio("outbox 1 msg/frame / naive durable", value, "x", ">= 15x", at_least(value, 15))
    )
    value = over("outbox-batch", "ceiling-acks")
    out.append(
        Ratio(
            "outbox batch frames / ceiling windowed acks", value, "x", ">= 2x", at_least(value, 2)
        )
    )
    value = over("outbox-batch", "naive")
    out.append(Ratio("outbox batch frames / naive durable", value, "x", "", None))
    value = over("enqueue-send-100", "enqueue-sqlite")
    out.append(
        Ratio(
            "send() x100 / sqlite3 1 commit per message", value, "x", ">= 10x", at_least(value, 10)
        )
    )
    value = over("enqueue-send-100", "enqueue-send-1")
    out.append(Ratio("send() x100 / send() x1", value, "x", "", None))
    value = over("enqueue-send-many-100", "enqueue-sqlite")
    out.append(Ratio("send_many(100) x100 / sqlite3 1 commit per msg", value, "x", "", None))
    paced = by_key.get("outbox-paced")
    p99 = None if paced is None else paced.p99_ms
    out.append(
        Ratio(
            "p99 send-to-ack, paced at 50% of max",
            p99,
            " ms",
            "< 10 ms",
            None if p99 is None else p99 < 10,
        )
    )
    value = over("backlog-drain", "outbox-batch")
    out.append(
        Ratio(
            "backlog drain / outbox batch frames",
            value,
            "x",
            ">= 0.9x (same rate)",
            at_least(value, 0.9),
        )
    )
    drain = by_key.get("backlog-drain")
    rss = None if drain is None else drain.client_rss_mb
    pending = None if drain is None else drain.messages
    out.append(
        Ratio(
            f"sender peak RSS draining {_fmt(pending, ',')} rows",
            rss,
            " MB",
            "< 100 MB",
            None if rss is None else rss < 100,
        )
    )
    value = over("ceiling-acks-deflate", "ceiling-acks")
    out.append(Ratio("deflate / no compression, ceiling acks", value, "x", "", None))
    value = over("outbox-deflate", "outbox-batch")
    out.append(Ratio("deflate / no compression, outbox batch", value, "x", "", None))
    return out


def format_ratios(items: Sequence[Ratio]) -> str:
    lines = []
    for item in items:
        shown = "-" if item.value is None else f"{item.value:.2f}{item.unit}"
        verdict = {True: "met", False: "NOT MET", None: ""}[item.met]
        target = f"target {item.target}" if item.target else ""
        lines.append(f"{item.label:<48} {shown:>10}   {target:<27} {verdict}".rstrip())
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import websockets

    from outbox import codec

    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "websockets": websockets.__version__,
        "sqlite": sqlite3.sqlite_version,
        "json_decoder": codec.BACKEND,
    }


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def build_parser(keys: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios: " + ", ".join(keys),
    )
    parser.add_argument("--quick", action="store_true", help="small counts: the CI smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this file")
    parser.add_argument("--only", nargs="+", metavar="SCENARIO", help="run only these")
    parser.add_argument("-n", "--messages", type=int, help="messages per streaming scenario")
    parser.add_argument("--naive-messages", type=int, help="messages for naive durable")
    parser.add_argument("--enqueue-messages", type=int, help="messages per send() enqueue row")
    parser.add_argument("--send-many-messages", type=int, help="messages per send_many() row")
    parser.add_argument("--backlog", type=int, help="rows in the backlog (default 1,000,000)")
    parser.add_argument("--paced-seconds", type=float, help="length of the paced run")
    parser.add_argument("--producers", type=int, default=100, help="producer tasks (default 100)")
    parser.add_argument("--size", type=int, default=100, help="payload bytes (default 100)")
    parser.add_argument("--tmp", help="directory for the databases (its disk sets fsync cost)")
    parser.add_argument("--keep", action="store_true", help="keep the databases and logs")
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds allowed per scenario (default 900)"
    )
    return parser


async def run_all(args: argparse.Namespace, settings: Settings) -> tuple[list[Row], int]:
    scenarios = plan(settings)
    if args.only:
        wanted = set(args.only)
        if "outbox-paced" in wanted:
            wanted.add("outbox-batch")  # its rate sets the pace
        scenarios = [s for s in scenarios if s.key in wanted]
    rows: list[Row] = []
    status = 0
    interactive = sys.stderr.isatty()
    progress = Progress(interactive)
    base = Path(tempfile.mkdtemp(prefix="outbox-bench-", dir=args.tmp))
    outer = tqdm(
        total=len(scenarios),
        desc="scenarios",
        unit="",
        position=0,
        file=sys.stderr,
        disable=not interactive,
        dynamic_ncols=True,
    )
    try:
        for index, scenario in enumerate(scenarios):
            if scenario.key == "outbox-paced":
                scenario = _paced(scenario, rows, settings)
                if scenario is None:
                    continue
            work = base / f"{index:02d}-{scenario.key}"
            work.mkdir()
            outer.set_postfix_str(scenario.title)
            started = time.monotonic()
            try:
                async with asyncio.timeout(args.timeout):
                    new_rows = await run_scenario(scenario, work, progress)
            except (ChildError, OSError, TimeoutError, sqlite3.Error, KeyError) as exc:
                error = str(exc) or type(exc).__name__
                new_rows = [Row(scenario.key, scenario.title, error=error)]
                status = max(status, EXIT_FAILED)
            finally:
                progress.close()
            for row in new_rows:
                if row.error is not None:
                    status = max(status, EXIT_FAILED)
                if (row.lost or row.dups) and status == 0:
                    status = EXIT_LOST
            rows.extend(new_rows)
            elapsed = time.monotonic() - started
            for row in new_rows:
                summary = (
                    "FAILED"
                    if row.error and row.messages is None
                    else (f"{_fmt(row.rate, ',.0f')} msg/s")
                )
                tqdm.write(f"{row.title:<33} {summary}  ({elapsed:.1f}s)", file=sys.stderr)
                if row.error:
                    tqdm.write(row.error, file=sys.stderr)
            outer.update(1)
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        outer.close()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"databases and logs kept in {base}", file=sys.stderr)
    if any((row.lost or row.dups) for row in rows):
        status = max(status, EXIT_LOST)
    return rows, status


def _paced(scenario: Scenario, rows: Sequence[Row], settings: Settings) -> Scenario | None:
    batch = next((r for r in rows if r.key == "outbox-batch" and r.rate), None)
    if batch is None or batch.rate is None:
        tqdm.write("outbox-paced skipped: it needs the outbox-batch rate", file=sys.stderr)
        return None
    rate = batch.rate / 2
    n = max(1, int(rate * settings.paced_seconds))
    return Scenario(
        scenario.key,
        f"outbox: paced {rate:,.0f}/s (50%)",
        (*scenario.client, "--rate", f"{rate:.1f}", "-n", str(n)),
        n,
        scenario.server,
        delivery=True,
        group=scenario.group,
    )


def main(argv: Sequence[str] | None = None) -> int:
    keys = [s.key for s in plan(Settings.from_args(build_parser([]).parse_args([])))]
    args = build_parser(keys).parse_args(argv)
    if args.only:
        unknown = sorted(set(args.only) - set(keys))
        if unknown:
            raise SystemExit(f"unknown scenario(s) {', '.join(unknown)}; choose from {keys}")
    settings = Settings.from_args(args)
    started = time.monotonic()
    try:
        rows, status = asyncio.run(_main(args, settings))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; child processes stopped", file=sys.stderr)
        return 130
    finally:
        for process in list(_LIVE):  # last resort: nothing outlives the benchmark
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    info = machine()
    print(
        f"outbox throughput, {'--quick' if settings.quick else 'full run'}: "
        f"python {info['python']}, websockets {info['websockets']}, sqlite {info['sqlite']}, "
        f"json decoder {info['json_decoder']}, {info['cpus']} cpus, "
        f"payload ~{settings.size} B, {settings.producers} producers"
    )
    print()
    print(format_table(rows))
    print()
    measured = ratios(rows)
    print(format_ratios(measured))
    print()
    print(
        "Latency: from send() returning to wait_acked() returning (outbox rows, every 100th "
        "message, every 10th when paced), or from the frame's send to its ack (ceiling), or "
        "from the INSERT's commit to the UPDATE's commit (naive). RSS: each process's peak; "
        "the backlog drain row shows the sender's peak sampled during the drain."
    )
    print(f"Total time {time.monotonic() - started:.0f}s; exit status {status}.")
    if args.json:
        document = {
            "version": 1,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": info,
            "settings": vars(settings),
            "rows": [vars(row) for row in rows],
            "ratios": [vars(item) for item in measured],
            "exit_status": status,
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return status


async def _main(args: argparse.Namespace, settings: Settings) -> tuple[list[Row], int]:
    task = asyncio.current_task()
    assert task is not None
    with contextlib.suppress(NotImplementedError):  # SIGTERM (a CI timeout): stop children too
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run_all(args, settings)


if __name__ == "__main__":
    sys.exit(main())
