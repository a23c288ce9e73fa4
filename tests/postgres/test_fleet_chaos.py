"""A receiver fleet under chaos: exactly-once effect and per-client order survive SIGKILLs.

Three receiver processes (``tests/procs/fleet_receiver.py``) share one inbox behind a
round-robin proxy (``outbox.testing.round_robin``), like several instances behind a load
balancer with no sticky sessions. Several ``Outbox`` clients, each with its own file (so its
own client id), send through the proxy. Meanwhile a seeded random schedule SIGKILLs one
receiver (sometimes two) and restarts it on a new port, now and then cuts every client's
connection at the proxy while the receivers live on, and partitions one receiver: its
connections stay open but silent until their clients gave up (heartbeat) and reconnected
elsewhere, then the instance gets the frames it missed on its stale half-open connections.
So an instance may still be working on a client's frames when the client's reconnect lands
on another one: the case that fencing exists for. Every event comes after the clients made
progress since the last one (a condition polled with a deadline), so the schedule bites
during traffic however slow the machine is.

At the end, read from the database with its own client (psql, sqlite3), not from the
objects under test:

- every row of every client's outbox is ``acked``;
- every acked (client id, message id) is in the inbox exactly once, with the payload sent;
  the inbox holds nothing the clients never sent;
- every message has exactly one row in the handler's ``fleet_effects`` table (no unique
  constraint there: a message handled twice, by any instance, would show twice);
- each client's effect rows, in the order they were written, follow its id order.

The seed is printed on failure (and taken from ``OUTBOX_FLEET_SEED`` to replay one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sqlite3
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from outbox import Outbox
from outbox.testing.round_robin import RoundRobinProxy

from ..chaos_support import Proc, read_outbox, report
from ..postgres_server import PostgresServer
from ..support import fast_options

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

RECEIVERS = 3
CLIENTS = 4
MESSAGES = 400
"""Per client."""
KILLS = 8
CUTS = 2
"""Times every client connection is cut at the proxy, receivers alive."""
PARTITIONS = 3
"""Times one receiver is silenced without closing anything, until its clients moved on."""
CHUNK = 10
"""Messages per send_many() call."""
DEADLINE = 60.0
"""Seconds for any one thing that is certain to happen (a restart, progress, the drain)."""


# ---------------------------------------------------------------------------------------------
# The database, read from outside
# ---------------------------------------------------------------------------------------------


class Database:
    """The shared inbox: its URL for the receivers and a plain reader for the end state."""

    def __init__(self, url: str, query: Callable[[str, str], list[tuple[str, ...]]]) -> None:
        self.url = url
        self._query = query

    def rows(self, columns: str, source: str) -> list[tuple[str, ...]]:
        """``SELECT columns FROM source``, every value as text."""
        return self._query(columns, source)


def sqlite_database(path: Path) -> Database:
    def query(columns: str, source: str) -> list[tuple[str, ...]]:
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
            cursor = conn.execute(f"SELECT {columns} FROM {source}")
            return [tuple(str(v) for v in row) for row in cursor]

    return Database(str(path), query)


def postgres_database(server: PostgresServer, url: str) -> Database:
    dbname = urllib.parse.urlsplit(url).path.lstrip("/")

    def query(columns: str, source: str) -> list[tuple[str, ...]]:
        # One text column per row (psql prints one line each: JSON text has no raw newline),
        # the fields joined by the unit separator, which no id or JSON text contains.
        out = server.psql(f"SELECT concat_ws(chr(31), {columns}) FROM {source}", dbname)
        return [tuple(line.split("\x1f")) for line in out.splitlines() if line]

    return Database(url, query)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    if request.param == "sqlite":
        return sqlite_database(tmp_path / "inbox.db")
    server: PostgresServer = request.getfixturevalue("postgres")
    return postgres_database(server, request.getfixturevalue("pg_url"))


# ---------------------------------------------------------------------------------------------
# The fleet
# ---------------------------------------------------------------------------------------------


@dataclass
class Slot:
    """One place in the fleet, and the processes that held it in turn."""

    index: int
    proc: Proc | None = None
    incarnations: int = 0
    stats: list[dict[str, int]] = field(default_factory=list)
    """The last stats line of each incarnation (a SIGKILLed one counts up to its last)."""

    def last_stats(self) -> dict[str, int]:
        assert self.proc is not None
        for line in reversed(self.proc.lines):
            if line.startswith("stats "):
                parsed: dict[str, int] = json.loads(line[6:])
                return parsed
        return {}


class Fleet:
    """RECEIVERS receiver processes on one inbox, behind the round-robin proxy; a slot's
    process is replaced, never added, so the proxy's slot i is always receiver i."""

    def __init__(self, db: Database, logs: Path) -> None:
        self.db = db
        self.logs = logs
        self.slots = [Slot(i) for i in range(RECEIVERS)]
        self.proxy: RoundRobinProxy | None = None

    async def start(self, slot: Slot) -> tuple[str, int]:
        slot.incarnations += 1
        name = f"r{slot.index}.{slot.incarnations}"
        slot.proc = await Proc.start(
            name,
            "fleet_receiver.py",
            self.db.url,
            "--name",
            name,
            "--stats-every",
            "0.05",
            log=self.logs / f"receiver{slot.index}.log",
        )
        url = await slot.proc.first_line(timeout=DEADLINE)
        port = urllib.parse.urlsplit(url).port
        assert port is not None, f"{name} printed {url!r}, not its URL"
        return ("127.0.0.1", port)

    async def kill(self, slot: Slot) -> None:
        """SIGKILL, as an OOM killer or a lost host would: no cleanup runs."""
        assert self.proxy is not None and slot.proc is not None
        self.proxy.remove(slot.index)
        await slot.proc.kill()
        self.proxy.kill_upstream(slot.index)
        slot.stats.append(slot.last_stats())

    async def restart(self, slot: Slot) -> None:
        assert self.proxy is not None
        self.proxy.replace(slot.index, *await self.start(slot))

    async def stop_all(self) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                await slot.proc.terminate(timeout=DEADLINE)
                slot.stats.append(slot.last_stats())

    def totals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for slot in self.slots:
            for stats in slot.stats:
                total.update(stats)
        return total


@contextlib.asynccontextmanager
async def fleet_up(db: Database, logs: Path, seed: int) -> AsyncIterator[Fleet]:
    fleet = Fleet(db, logs)
    try:
        addresses = [await fleet.start(slot) for slot in fleet.slots]
        async with RoundRobinProxy(addresses, seed=seed) as proxy:
            fleet.proxy = proxy
            yield fleet
    finally:
        for slot in fleet.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(Exception):
                    await slot.proc.kill()


# ---------------------------------------------------------------------------------------------
# The scenario
# ---------------------------------------------------------------------------------------------


def payload(client: int, seq: int) -> dict[str, Any]:
    return {"client": client, "seq": seq, "note": "x" * 40}


async def produce(box: Outbox, client: int, rng: random.Random) -> None:
    """MESSAGES messages in chunks, with a short seeded pause between chunks so the sending
    spans the whole chaos schedule (pacing only: correctness never depends on it)."""
    for first in range(0, MESSAGES, CHUNK):
        await box.send_many([payload(client, seq) for seq in range(first, first + CHUNK)])
        await asyncio.sleep(rng.uniform(0, 0.03))


async def progress(boxes: list[Outbox], at_least: int) -> None:
    """Wait until the clients together have ``at_least`` rows acked."""
    deadline = time.monotonic() + DEADLINE
    while sum(box.stats().acked for box in boxes) < at_least:
        if time.monotonic() > deadline:
            states = [(box.stats().acked, box.stats().last_error) for box in boxes]
            raise AssertionError(f"no progress to {at_least} acks in {DEADLINE}s: {states}")
        await asyncio.sleep(0.005)


async def until(what: str, predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {DEADLINE}s")
        await asyncio.sleep(0.005)


async def partition(fleet: Fleet, boxes: list[Outbox], slot: Slot) -> int:
    """Silence ``slot`` until each of its clients gave its connection up and connected
    elsewhere (or closed its side: one that was already leaving); then let the
    stale connections speak again at once, so the instance reads the frames it missed after
    their sender moved on (within the client's close_timeout, before it aborts the socket),
    and put the slot back in the rotation. Returns how many clients were held."""
    proxy = fleet.proxy
    assert proxy is not None
    address = proxy.upstreams[slot.index]
    assert address is not None
    proxy.remove(slot.index)

    def connects() -> int:
        return sum(box.stats().counters.connects for box in boxes)

    before = connects()
    held = proxy.clients_on(slot.index)
    proxy.partition(slot.index)
    # Each held client either reconnects elsewhere or closes its side before noticing.
    await until(
        f"the {held} clients held on {slot.index} moving on",
        lambda: connects() - before + held - proxy.clients_on(slot.index) >= held,
    )
    proxy.partition(slot.index, on=False)
    proxy.replace(slot.index, *address)
    return held


async def chaos(fleet: Fleet, boxes: list[Outbox], rng: random.Random) -> dict[str, int]:
    """KILLS kills, CUTS cuts and PARTITIONS partitions in a seeded order, each after some
    seeded progress."""
    assert fleet.proxy is not None
    total = CLIENTS * MESSAGES
    events = ["kill"] * KILLS + ["cut"] * CUTS + ["partition"] * PARTITIONS
    rng.shuffle(events)
    step = total // (len(events) + 2)
    done = {"kills": 0, "cuts": 0, "connections_cut": 0, "partitions": 0, "connections_held": 0}
    for number, event in enumerate(events, start=1):
        await progress(boxes, number * step + rng.randrange(step // 2))
        if event == "cut":
            done["connections_cut"] += fleet.proxy.cut_all()
            done["cuts"] += 1
            continue
        if event == "partition":
            proxy = fleet.proxy
            # The instance with the most clients on it, so the partition strands someone.
            slot = max(fleet.slots, key=lambda s: (proxy.clients_on(s.index), rng.random()))
            done["connections_held"] += await partition(fleet, boxes, slot)
            done["partitions"] += 1
            continue
        slot = rng.choice(fleet.slots)
        await fleet.kill(slot)
        done["kills"] += 1
        if rng.random() < 0.5:
            # Sometimes a second instance dies while the first is still down.
            other = rng.choice([s for s in fleet.slots if s is not slot])
            await fleet.kill(other)
            done["kills"] += 1
            await fleet.restart(other)
        await fleet.restart(slot)
    return done


def check(db: Database, clients: dict[str, list[tuple[int, str]]], context: str) -> dict[str, int]:
    """The end state (see the module docstring), from the database's own reader."""
    inbox: dict[str, list[tuple[int, str]]] = {}
    for client_id, message_id, body in db.rows(
        "client_id, message_id, payload", "inbox WHERE reject_reason IS NULL"
    ):
        inbox.setdefault(client_id, []).append((int(message_id), body))
    rejected = db.rows("client_id, message_id", "inbox WHERE reject_reason IS NOT NULL")
    assert not rejected, f"inbox rows recorded as rejected: {rejected[:5]} ({context})"
    strangers = sorted(set(inbox) - set(clients))
    assert not strangers, f"inbox rows of client ids nobody used: {strangers} ({context})"

    # A bounded inbox (SQLite or PostgreSQL) deletes the rows below each client's floor:
    # those ids were recorded and acked, and the effect rows below still show each handled once.
    forgotten: dict[str, range] = {}
    for client_id, base, floor in db.rows("client_id, base, floor", "inbox_floor"):
        forgotten[client_id] = range(int(base), int(floor))

    effects: dict[str, list[int]] = {}
    for client_id, message_id in db.rows("client_id, message_id", "fleet_effects ORDER BY seq"):
        effects.setdefault(client_id, []).append(int(message_id))

    for client_id, sent in clients.items():
        ids = [message_id for message_id, _ in sent]
        got = inbox.get(client_id, [])
        twice = [i for i, n in Counter(i for i, _ in got).items() if n > 1]
        assert not twice, f"{client_id}: inbox rows twice for {twice[:10]} ({context})"
        held = dict(got)
        below = forgotten.get(client_id, range(0))
        assert not [i for i in held if i in below], f"{client_id}: rows below its floor"
        lost = [i for i in ids if i not in held and i not in below]
        assert not lost, f"LOST: {client_id} acked ids not in the inbox: {lost[:10]} ({context})"
        extra = sorted(set(held) - set(ids))
        assert not extra, f"{client_id}: inbox ids it never sent: {extra[:10]} ({context})"
        differ = [i for i, body in sent if i in held and json.loads(held[i]) != json.loads(body)]
        assert not differ, f"{client_id}: inbox payload differs for {differ[:10]} ({context})"

        handled = effects.get(client_id, [])
        doubled = [i for i, n in Counter(handled).items() if n > 1]
        assert not doubled, f"HANDLED TWICE: {client_id} ids {doubled[:10]} ({context})"
        assert sorted(handled) == ids, (
            f"{client_id}: effect rows for {len(handled)} ids, {len(ids)} acked; missing "
            f"{sorted(set(ids) - set(handled))[:10]} ({context})"
        )
        inversions = [j for j in range(1, len(handled)) if handled[j] < handled[j - 1]]
        if inversions:
            at = inversions[0]
            raise AssertionError(
                f"{client_id}: handled out of id order: {handled[at - 1]} then {handled[at]}"
                f" ({context})"
            )
    return {
        "inbox_rows": sum(len(rows) for rows in inbox.values()),
        "effect_rows": sum(len(rows) for rows in effects.values()),
    }


async def test_fleet_chaos(database: Database, tmp_path: Path) -> None:
    seed = int(os.environ.get("OUTBOX_FLEET_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    context = f"seed {seed}, OUTBOX_FLEET_SEED={seed} replays it; logs in {tmp_path}"
    began = time.monotonic()
    # A silent connection is given up after about a second (0.3 s of silence, then two
    # missed pongs of 0.4 s), so a partitioned client moves on well within the schedule.
    options = fast_options(
        max_attempts=None,
        ack_timeout=5.0,
        heartbeat_interval=0.3,
        heartbeat_timeout=0.4,
        max_missed_heartbeats=2,
    )
    async with fleet_up(database, tmp_path, seed) as fleet:
        assert fleet.proxy is not None
        url = fleet.proxy.url()
        async with contextlib.AsyncExitStack() as stack:
            boxes = [
                await stack.enter_async_context(Outbox(tmp_path / f"client{i}.db", url, **options))
                for i in range(CLIENTS)
            ]
            try:
                async with asyncio.TaskGroup() as group:
                    for i, box in enumerate(boxes):
                        group.create_task(produce(box, i, random.Random(f"{seed}:{i}")))
                    schedule = group.create_task(chaos(fleet, boxes, rng))
                for box in boxes:
                    await box.drain(timeout=DEADLINE)
            except BaseException as exc:
                exc.add_note(context)
                raise
            client_counters = Counter[str]()
            for box in boxes:
                client_counters.update(
                    {"reconnects": box.stats().reconnects, "resends": box.stats().counters.resends}
                )
        await fleet.stop_all()
        proxy_stats = fleet.proxy.stats.as_dict()
        connections_to = dict(fleet.proxy.connections_to)
    seconds = time.monotonic() - began

    clients: dict[str, list[tuple[int, str]]] = {}
    for i in range(CLIENTS):
        client_id, rows = read_outbox(tmp_path / f"client{i}.db")
        not_acked = [(row.id, row.status) for row in rows if row.status != "acked"]
        assert not not_acked, f"client{i}: rows not acked: {not_acked[:10]} ({context})"
        assert len(rows) == MESSAGES, f"client{i}: {len(rows)} rows for {MESSAGES} sends"
        clients[client_id] = [(row.id, row.payload) for row in rows]
    end = check(database, clients, context)

    done = schedule.result()
    totals = fleet.totals()
    report(
        f"[fleet chaos, {'postgresql' if database.url.startswith('postgres') else 'sqlite'}] "
        f"seed={seed} messages={CLIENTS * MESSAGES} clients={CLIENTS} receivers={RECEIVERS} "
        f"kills={done['kills']} cuts={done['cuts']} connections_cut={done['connections_cut']} "
        f"partitions={done['partitions']} connections_held={done['connections_held']} "
        f"upstream_connections={connections_to} proxy_upstream_cuts={proxy_stats['cut_upstream']} "
        f"client_reconnects={client_counters['reconnects']} "
        f"client_resends={client_counters['resends']} "
        f"receiver_duplicates_answered>={totals['duplicates']} "
        f"receiver_conflicts={totals['conflicts']} "
        f"receiver_superseded>={totals['superseded']} "
        f"receiver_storage_errors>={totals['storage_errors']} "
        f"inbox_rows={end['inbox_rows']} effect_rows={end['effect_rows']} "
        f"seconds={seconds:.1f}"
    )
