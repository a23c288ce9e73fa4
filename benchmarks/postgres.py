"""The receiver on PostgreSQL next to SQLite: one run, the same load, total throughput.

    python benchmarks/postgres.py            # the full run (a few minutes on 2 cores)
    python benchmarks/postgres.py --quick    # the smoke run: about a minute
    python benchmarks/postgres.py --clients 8 -n 200000 --json pg-results.json
    python benchmarks/postgres.py --repeat 3    # on a shared machine: least disturbed of 3

Rows, each in fresh processes and a fresh database:

1. sqlite x1: one ``outbox.receiver.serve`` process (``_servers.py receiver``, inbox only: its
   handler counts calls) on a SQLite file, ``synchronous=FULL`` in WAL mode.
2. postgresql x1: the same receiver on a fresh database of a throwaway PostgreSQL server
   (``tests/postgres_server.py``) started by this script with PostgreSQL's durable defaults:
   ``fsync``, ``synchronous_commit`` and ``full_page_writes`` on (checked and printed).
3. postgresql x3: three such receivers sharing one fresh database, the clients spread over
   them in turn by the round-robin proxy.

The load is the same in every row: ``--clients`` client processes (``_clients.py backlog``),
each its own outbox file and so its own client id, enqueue their share of ``-n`` messages
while nobody listens (not timed); then the row's receivers start, and on "go" a round-robin
proxy (``outbox.testing.round_robin``, in this process) starts listening on the port the
clients dial, handing each connection to the next receiver; the clients drain their
backlogs with the Outbox defaults (batch frames, batch acks). The time is from "go" to the
last client's ``drain()`` returning. Every row goes through the proxy, so each pays the
same extra hop (a few large batch frames per second: cheap next to the receivers' work).

Checked per row, afterwards, from the files and the database with its own client (sqlite3,
psql): ``lost`` counts ids that ``send_many()`` returned and the inbox does not hold as
handled; ``dups`` counts handler calls beyond one per message, over all the row's
receivers; every outbox row must be acked. Exit status 1 if lost or dups is not 0 anywhere,
2 if a row failed to run, 130 if interrupted. Nothing here gates on speed: the targets
(issue 11) are printed as met or NOT MET.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import psutil  # noqa: F401  (OtherLoad and the backlog sender's RSS sampler use it)
except ImportError as missing:
    raise SystemExit(
        f"benchmarks/postgres.py needs psutil ({missing}); install it with: "
        "python -m pip install psutil"
    ) from None

from _procs import ROOT, Child, ChildError, OtherLoad, free_port, kill_all
from _report import (
    Row,
    Verdict,
    code_version,
    disturbed,
    format_table,
    format_verdicts,
    fsync_probe,
    machine,
    write_json,
)

sys.path.insert(0, str(ROOT))
from outbox.testing.round_robin import RoundRobinProxy
from tests.postgres_server import PostgresServer, Unavailable

EXIT_LOST = 1
EXIT_FAILED = 2
EXIT_INTERRUPTED = 130

now = time.monotonic


@dataclass(frozen=True)
class Settings:
    messages: int
    clients: int
    size: int
    quick: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        messages = args.messages or (40_000 if args.quick else 200_000)
        clients = args.clients or (4 if args.quick else 8)
        if messages < clients:
            raise SystemExit(f"-n {messages} is fewer messages than --clients {clients}")
        return cls(messages=messages, clients=clients, size=args.size, quick=args.quick)

    def share(self, client: int) -> int:
        """Client ``client``'s part of the messages (the first ones take the remainder)."""
        base, extra = divmod(self.messages, self.clients)
        return base + (1 if client < extra else 0)


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    backend: str
    """"sqlite" or "postgresql"."""
    receivers: int


SCENARIOS = (
    Scenario("sqlite-x1", "sqlite x1 (inbox only)", "sqlite", 1),
    Scenario("postgresql-x1", "postgresql x1", "postgresql", 1),
    Scenario("postgresql-x3", "postgresql x3, total", "postgresql", 3),
)


# ---------------------------------------------------------------------------------------------
# Reading the inbox from outside
# ---------------------------------------------------------------------------------------------


class Inbox:
    """One row's inbox, read with the database's own client after the receivers stopped."""

    def __init__(self, scalar: Callable[[str], int]) -> None:
        self._scalar = scalar

    @classmethod
    def sqlite(cls, path: Path) -> Inbox:
        def scalar(sql: str) -> int:
            with contextlib.closing(sqlite3.connect(path)) as conn:
                return int(conn.execute(sql).fetchone()[0])

        return cls(scalar)

    @classmethod
    def postgresql(cls, server: PostgresServer, dbname: str) -> Inbox:
        def scalar(sql: str) -> int:
            return int(server.psql(sql, dbname))

        return cls(scalar)

    def _count(self, where: str) -> int:
        return self._scalar(f"SELECT count(*) FROM inbox WHERE {where}")

    def handled(self, client_id: str, first: int, last: int) -> int:
        """Ids of ``client_id`` in ``first..last`` handled (not rejected): its rows, and those
        deleted below its floor (a bounded inbox prunes while a handler runs)."""
        quoted = client_id.replace("'", "''")
        rows = self._count(
            f"client_id = '{quoted}' AND message_id BETWEEN {int(first)} AND {int(last)} "
            "AND reject_reason IS NULL"
        )
        record = f"FROM inbox_floor WHERE client_id = '{quoted}'"
        base = self._scalar(f"SELECT coalesce((SELECT base {record}), 0)")
        floor = self._scalar(f"SELECT coalesce((SELECT floor {record}), 0)")
        return rows + max(0, min(floor, last + 1) - max(base, first))

    def total(self) -> int:
        """Rows kept, and rows deleted below the clients' floors."""
        return self._count("TRUE") + self._scalar(
            "SELECT coalesce(sum(floor - base), 0) FROM inbox_floor"
        )


# ---------------------------------------------------------------------------------------------
# One row
# ---------------------------------------------------------------------------------------------


async def run_row(
    scenario: Scenario, settings: Settings, work: Path, pg: PostgresServer | None
) -> Row:
    if scenario.backend == "postgresql":
        if pg is None:
            raise RuntimeError("no PostgreSQL server (see the first lines of the output)")
        dbname = "bench_" + work.name.replace("-", "_")  # one database per attempt
        db = pg.create_database(dbname)
        inbox = Inbox.postgresql(pg, dbname)
    else:
        db = str(work / "inbox.db")
        inbox = Inbox.sqlite(work / "inbox.db")
    # The clients dial the proxy's port, where nothing listens until "go" (their backoff is
    # at most 0.1 s): so no receiver gets a head start while the others are still starting.
    gate = free_port()
    ports = [free_port() for _ in range(scenario.receivers)]

    async with contextlib.AsyncExitStack() as stack:
        clients: list[Child] = []
        for i in range(settings.clients):
            argv = [
                "backlog",
                "-n",
                str(settings.share(i)),
                "--size",
                str(settings.size),
                "--db",
                str(work / f"client{i}.db"),
                "--url",
                f"ws://127.0.0.1:{gate}/",
            ]
            clients.append(
                await stack.enter_async_context(
                    Child.run(f"client {i}", "_clients.py", argv, work / f"client{i}.log")
                )
            )
        await asyncio.gather(*(_enqueued(client) for client in clients))
        note(f"{scenario.title}: {settings.messages:,} messages enqueued; draining")

        servers: list[Child] = []
        for j, port in enumerate(ports):
            argv = ["receiver", "--db", db, "--port", str(port)]
            server = await stack.enter_async_context(
                Child.run(f"receiver {j}", "_servers.py", argv, work / f"receiver{j}.log")
            )
            await server.event("ready")
            servers.append(server)
        began = now()
        upstreams = [("127.0.0.1", port) for port in ports]
        async with RoundRobinProxy(upstreams, port=gate) as proxy:
            for client in clients:
                client.send("go")
            results = await asyncio.gather(*(client.event("result") for client in clients))
            seconds = now() - began
            spread = [proxy.connections_to[j] for j in range(len(ports))]
        stats = [await server.finish() for server in servers]

    row = Row(
        scenario.key,
        scenario.title,
        messages=sum(result["messages"] for result in results),
        seconds=seconds,
        client_rss_mb=max(result["drain_rss_mb"] for result in results),
        server_rss_mb=max(s["rss_mb"] for s in stats),
    )
    assert row.messages is not None
    row.rate = row.messages / seconds
    _check_delivery(row, work, results, stats, inbox)
    row.extra.update(
        receivers=scenario.receivers,
        clients=settings.clients,
        connections_per_receiver=spread,
        client_drain_seconds=[result["seconds"] for result in results],
        server=[{k: v for k, v in s.items() if k != "event"} for s in stats],
        server_cpu_us_per_msg=sum(s["cpu_s"] for s in stats) / max(1, row.messages) * 1e6,
    )
    return row


async def _enqueued(client: Child) -> None:
    async for message in client.events():
        if message["event"] == "enqueued":
            return
    raise ChildError(f"the {client.name} ended before enqueueing{client.tail()}")


def _check_delivery(
    row: Row,
    work: Path,
    results: Sequence[dict[str, Any]],
    stats: Sequence[dict[str, Any]],
    inbox: Inbox,
) -> None:
    """lost: returned ids the inbox does not hold as handled; dups: handler calls beyond one
    per message over every receiver of the row (a message handled by two of them counts)."""
    returned = delivered = 0
    not_acked = 0
    for i, result in enumerate(results):
        for first, last in result["ids"]:
            returned += last - first + 1
            delivered += inbox.handled(result["client_id"], first, last)
        with contextlib.closing(sqlite3.connect(work / f"client{i}.db")) as outbox:
            statuses = dict(outbox.execute("SELECT status, count(*) FROM outbox GROUP BY status"))
        not_acked += statuses.get("pending", 0) + statuses.get("dead", 0)
    total = inbox.total()
    calls = sum(s["handler_calls"] for s in stats)
    row.lost = returned - delivered
    row.dups = max(calls - delivered, sum(s["duplicates_handled"] for s in stats))
    row.extra.update(returned_ids=returned, inbox_rows=total, handler_calls=calls)
    row.extra["client_cpu_us_per_msg"] = (
        sum(result["cpu_s"] for result in results) / max(1, returned) * 1e6
    )
    problems = []
    if not_acked:
        problems.append(f"{not_acked} outbox rows still pending or dead after drain()")
    if total != delivered:
        problems.append(f"the inbox holds {total} rows, {delivered} of them ids sent")
    if problems:
        row.error = "; ".join(problems)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class ServerCpu:
    """CPU seconds of the PostgreSQL server: the postmaster, its live children (backends,
    the WAL writer...) and those it has reaped. The server daemonized, so it is not a child
    of ours; OtherLoad is told it is ours (``pids``)."""

    def __init__(self, server: PostgresServer) -> None:
        import psutil

        # Its pid file, not a backend's parent: psql's backend may be gone before we look.
        self._postmaster = psutil.Process(server.postmaster_pid)

    def pids(self) -> set[int]:
        try:
            children = self._postmaster.children(recursive=True)
        except Exception:  # the server stopped
            return set()
        return {self._postmaster.pid} | {p.pid for p in children}

    def seconds(self) -> float:
        times = self._postmaster.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in self._postmaster.children(recursive=True):
            with contextlib.suppress(Exception):  # a backend ending meanwhile
                used = child.cpu_times()
                total += used.user + used.system
        return float(total)


def start_postgres() -> tuple[PostgresServer | None, str]:
    """The throwaway server with fsync on, and a line saying how it is set (or why not)."""
    server = PostgresServer(fsync=True)
    try:
        server.start()
    except (Unavailable, RuntimeError) as exc:
        return None, f"PostgreSQL: not available, its rows fail: {exc}"
    names = ("server_version", "fsync", "synchronous_commit", "full_page_writes", "wal_sync_method")
    shown = {name: server.psql(f"SHOW {name}").strip() for name in names}
    if shown["fsync"] != "on" or shown["synchronous_commit"] != "on":
        server.stop()
        raise SystemExit(f"the benchmark's PostgreSQL is not durable: {shown}")
    return server, "PostgreSQL " + ", ".join(f"{k} {v}" for k, v in shown.items())


async def run_all(
    scenarios: Sequence[Scenario],
    settings: Settings,
    base: Path,
    pg: PostgresServer | None,
    pg_cpu: ServerCpu | None,
    timeout: float,
    other: OtherLoad,
    repeat: int,
) -> list[Row]:
    attempts: dict[str, list[Row]] = {s.key: [] for s in scenarios}
    # Round after round of every row, so a burst of load elsewhere hits all rows alike.
    for attempt in range(repeat):
        for index, scenario in enumerate(scenarios):
            work = base / f"{attempt}-{index:02d}-{scenario.key}"
            attempts[scenario.key].append(
                await run_attempt(scenario, settings, work, pg, pg_cpu, timeout, other, attempt)
            )
    return [_keep(attempts[s.key]) for s in scenarios]


async def run_attempt(
    scenario: Scenario,
    settings: Settings,
    work: Path,
    pg: PostgresServer | None,
    pg_cpu: ServerCpu | None,
    timeout: float,
    other: OtherLoad,
    attempt: int,
) -> Row:
    """One row once; it carries how much CPU other processes took meanwhile."""
    await asyncio.to_thread(work.mkdir)
    started, other_before = now(), other.seconds
    pg_before = None if pg_cpu is None else pg_cpu.seconds()
    try:
        async with asyncio.timeout(timeout):
            row = await run_row(scenario, settings, work, pg)
    except Exception as exc:  # one row failing must not hide the others
        row = Row(scenario.key, scenario.title, error=f"{type(exc).__name__}: {exc}")
    finally:
        await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)
    row.other_load = (other.seconds - other_before) / (now() - started)
    if scenario.backend == "postgresql" and pg_cpu is not None and row.messages:
        assert pg_before is not None
        used = pg_cpu.seconds() - pg_before
        row.extra["postgres_cpu_us_per_msg"] = used / row.messages * 1e6
    done = f"{row.rate:,.0f} msg/s" if row.rate else "FAILED"
    load = f", other processes {row.other_load:.2f} cores"
    note(
        f"{scenario.title} (attempt {attempt + 1}): {done}{load}"
        + (f" ({row.error})" if row.error else "")
    )
    return row


def _keep(attempts: list[Row]) -> Row:
    """The attempt to show: one that failed, lost or duplicated if any (never hidden), else
    the least disturbed by other processes. Every attempt's figures go in the JSON."""
    kept = min(attempts, key=lambda r: (not (r.failed or r.lost or r.dups), r.other_load))
    if len(attempts) > 1:
        kept.extra["attempts"] = [
            {"rate": r.rate, "other_load": r.other_load, "error": r.error} for r in attempts
        ]
    return kept


_RATIOS = (
    ("postgresql x1 / sqlite x1", "postgresql-x1", "sqlite-x1", 0.3),
    ("postgresql x3 total / postgresql x1", "postgresql-x3", "postgresql-x1", 1.0),
)


def verdicts(rows: Sequence[Row]) -> list[Verdict]:
    by_key = {row.key: row for row in rows if not row.failed}
    out = []
    for label, top, bottom, floor in _RATIOS:
        a, b = by_key.get(top), by_key.get(bottom)
        value = None if a is None or b is None or not a.rate or not b.rate else a.rate / b.rate
        out.append(
            Verdict(label, value, "x", f">= {floor:g}x", None if value is None else value >= floor)
        )
    return out


def format_cpu(rows: Sequence[Row]) -> str:
    """Where the CPU went, per message: the clients, the receivers, the PostgreSQL server."""
    names = ("client_cpu_us_per_msg", "server_cpu_us_per_msg", "postgres_cpu_us_per_msg")
    lines = [f"{'CPU per message (us)':<34}   clients  receivers  postgresql"]
    for row in rows:
        if row.failed:
            continue
        shown = ["-" if row.extra.get(n) is None else f"{row.extra[n]:.1f}" for n in names]
        lines.append(f"{row.title:<34} {shown[0]:>9}  {shown[1]:>9}  {shown[2]:>10}")
    return "\n".join(lines)


NOTES = """\
Time: from "go" (the receivers listening, every backlog enqueued, the proxy opening) to
the last client's drain() returning, so it includes the clients' reconnect (backoff at most
0.1 s); msg/s is all the row's messages over that time. RSS: the largest peak
among the row's clients (sampled during the drain) and among its receivers. lost: ids
send_many() returned that the inbox does not hold as handled; dups: handler calls beyond
one per message, over all the row's receivers. Receivers store every message in the inbox
and call a handler that only counts (no handler writes): the inbox path itself."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios: " + ", ".join(s.key for s in SCENARIOS),
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="small counts: the smoke run")
    add("-n", "--messages", type=int, help="messages per row, all clients (200,000; quick 40,000)")
    add("--clients", type=int, help="client processes, each its own client id (8; quick 4)")
    add("--size", type=int, default=100, help="payload bytes, about (default: %(default)s)")
    add("--only", nargs="+", metavar="SCENARIO", help="run only these rows")
    add("--json", metavar="PATH", help="also write every figure to this file")
    add("--tmp", help="where the SQLite files go (its disk sets the cost of every fsync)")
    add("--timeout", type=float, help="seconds allowed per row (600; quick 120)")
    add(
        "--repeat",
        type=int,
        default=1,
        metavar="K",
        help="run the rows K times, round after round, and show each row's attempt least "
        "disturbed by other processes (any attempt that failed, lost or duplicated is shown "
        "instead)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_args(args)
    scenarios = list(SCENARIOS)
    if args.only:
        unknown = sorted(set(args.only) - {s.key for s in SCENARIOS})
        if unknown:
            raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}; see --help")
        scenarios = [s for s in scenarios if s.key in args.only]

    started = now()
    base = Path(tempfile.mkdtemp(prefix="outbox-pgbench-", dir=args.tmp))
    pg: PostgresServer | None = None
    pg_line = "PostgreSQL: not used"
    try:
        if any(s.backend == "postgresql" for s in scenarios):
            pg, pg_line = start_postgres()
        disk = fsync_probe(str(base), 0.5 if settings.quick else 2.0)
        timeout = args.timeout or (120.0 if settings.quick else 600.0)
        pg_cpu = None if pg is None else ServerCpu(pg)
        with OtherLoad(also_ours=None if pg_cpu is None else pg_cpu.pids) as other:
            run = _run_until_signal(
                scenarios, settings, base, pg, pg_cpu, timeout, other, args.repeat
            )
            rows = asyncio.run(run)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every child process was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        kill_all()  # last resort: nothing outlives the benchmark
        if pg is not None:
            pg.stop()
        shutil.rmtree(base, ignore_errors=True)

    status = 0
    if any(row.failed for row in rows):
        status = EXIT_FAILED
    if any(row.lost or row.dups for row in rows):
        status = EXIT_LOST
    info = {**machine(), "outbox": code_version(ROOT)}
    measured = verdicts(rows)
    elapsed = now() - started
    print(
        f"outbox receiver on PostgreSQL ({'--quick' if settings.quick else 'full run'}): "
        f"python {info['python']}, websockets {info['websockets']}, sqlite {info['sqlite']}, "
        f"{info['cpus']} cpus; {settings.messages:,} messages per row from "
        f"{settings.clients} clients, payload ~{settings.size} B; SQLite fdatasync p50 "
        f"{disk['p50_ms']:.2f} ms, p99 {disk['p99_ms']:.2f} ms"
    )
    print(pg_line)
    print(f"outbox measured: {info['outbox']}")
    print(
        f"Other processes on this machine used {other.seconds:.1f} CPU-seconds during the run "
        f"({other.seconds / elapsed:.2f} of a core on average)"
        + ("; rows marked * lost more than 10% of a core to them" if disturbed(rows) else "")
    )
    print()
    print(format_table(rows))
    print()
    print(format_cpu(rows))
    print()
    print(format_verdicts(measured))
    print()
    print(NOTES)
    print(f"Took {elapsed:.0f} s; exit status {status}.")
    if args.json:
        write_json(
            args.json,
            {**info, "fsync": disk, "postgresql": pg_line},
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
    pg: PostgresServer | None,
    pg_cpu: ServerCpu | None,
    timeout: float,
    other: OtherLoad,
    repeat: int,
) -> list[Row]:
    task = asyncio.current_task()
    assert task is not None
    with contextlib.suppress(NotImplementedError):  # SIGTERM (a CI timeout) stops children too
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run_all(scenarios, settings, base, pg, pg_cpu, timeout, other, repeat)


if __name__ == "__main__":
    sys.exit(main())
