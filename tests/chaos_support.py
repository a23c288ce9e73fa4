"""Shared helpers for the fault-injection tests: the end-state check, an exactly-once-effect
handler, and real subprocesses that a test can SIGKILL.

The end state is read from the SQLite files with plain ``sqlite3`` connections, as an operator
would read them after an incident, never from the objects under test:

- every outbox row is ``acked`` (or ``dead``, only for ids the scenario meant to kill);
- every acked id is in the inbox exactly once, under the outbox's client id, with the same
  payload; the inbox holds nothing the outbox never had;
- the handler's effect log (one row per handler call that committed, no unique constraint, so
  a message handled twice would show twice) holds every id once, in id order;
- with a producer that uses idempotency keys: one row per key, nothing enqueued twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from outbox.receiver import Incoming

ROOT = Path(__file__).resolve().parent.parent
PROCS = Path(__file__).resolve().parent / "procs"

EFFECTS_TABLE = (
    "CREATE TABLE IF NOT EXISTS effects ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " client_id TEXT NOT NULL,"
    " message_id INTEGER NOT NULL)"
)


def create_effects_table(inbox_db: Path) -> None:
    """The handler's own table, in the inbox file (so its writes share the inbox commit)."""
    with contextlib.closing(sqlite3.connect(inbox_db)) as conn, conn:
        conn.execute(EFFECTS_TABLE)


async def record_effect(message: Incoming) -> None:
    """A handler whose effect is exactly-once: one effects row per handled message, written
    through ``message.tx``. Handling a message twice would leave two rows."""
    await message.tx.execute(
        "INSERT INTO effects (client_id, message_id) VALUES (?, ?)",
        (message.client_id, message.id),
    )


# ---------------------------------------------------------------------------------------------
# Reading the files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    status: str
    key: str | None
    payload: str
    attempts: int
    last_error: str | None


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def read_outbox(db: Path) -> tuple[str, list[OutboxRow]]:
    """The client id and every outbox row, in id order."""
    with contextlib.closing(_connect(db)) as conn:
        client_id = conn.execute(
            "SELECT value FROM outbox_meta WHERE name = 'client_id'"
        ).fetchone()[0]
        rows = [
            OutboxRow(*row)
            for row in conn.execute(
                "SELECT id, status, key, payload, attempts, last_error FROM outbox ORDER BY id"
            )
        ]
    return str(client_id), rows


def outbox_statuses(db: Path) -> dict[str, int]:
    with contextlib.closing(_connect(db)) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM outbox GROUP BY status"))


def read_inbox(db: Path, client_id: str) -> dict[int, tuple[str, str | None]]:
    """message id -> (payload, reject reason) for one client."""
    with contextlib.closing(_connect(db)) as conn:
        return {
            int(message_id): (payload, reason)
            for message_id, payload, reason in conn.execute(
                "SELECT message_id, payload, reject_reason FROM inbox WHERE client_id = ?",
                (client_id,),
            )
        }


def read_floor(db: Path, client_id: str) -> tuple[int, int]:
    """``(base, floor)``: the ids a bounded inbox forgot (rows deleted, answered as
    duplicates); ``(0, 0)`` when it forgot nothing."""
    with contextlib.closing(_connect(db)) as conn:
        try:
            row = conn.execute(
                "SELECT base, floor FROM inbox_floor WHERE client_id = ?", (client_id,)
            ).fetchone()
        except sqlite3.OperationalError:  # before migration 0005
            return (0, 0)
    return (int(row[0]), int(row[1])) if row else (0, 0)


def inbox_count(db: Path) -> int:
    """Ids recorded so far: inbox rows plus the ids a bounded inbox forgot (one snapshot)."""
    if not db.exists():
        return 0
    with contextlib.closing(_connect(db)) as conn:
        for sql in (
            "SELECT (SELECT count(*) FROM inbox) + "
            "(SELECT coalesce(sum(floor - base), 0) FROM inbox_floor)",
            "SELECT count(*) FROM inbox",  # before migration 0005
        ):
            try:
                return int(conn.execute(sql).fetchone()[0])
            except sqlite3.OperationalError:
                continue
    return 0  # not migrated yet


def read_effects(db: Path, client_id: str) -> list[int] | None:
    """Message ids in the order the handler's effects committed, or None without the table."""
    with contextlib.closing(_connect(db)) as conn:
        try:
            return [
                int(row[0])
                for row in conn.execute(
                    "SELECT message_id FROM effects WHERE client_id = ? ORDER BY seq", (client_id,)
                )
            ]
        except sqlite3.OperationalError:
            return None


# ---------------------------------------------------------------------------------------------
# The end-state check
# ---------------------------------------------------------------------------------------------


@dataclass
class EndState:
    """What a scenario ended with (all checks passed when ``check_end_state`` returns it)."""

    client_id: str
    messages: int
    acked: int
    dead: int
    delivered: int
    duplicates_handled: int
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self, scenario: str) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.extra.items())
        return (
            f"[{scenario}] messages={self.messages} acked={self.acked} dead={self.dead} "
            f"delivered={self.delivered} duplicates_handled={self.duplicates_handled} {extra}"
        ).rstrip()


def check_end_state(
    outbox_db: Path,
    inbox_db: Path,
    *,
    context: str,
    dead_allowed: Callable[[OutboxRow], bool] | None = None,
    expect_keys: Iterable[str] | None = None,
    ids_seen: dict[str, set[int]] | None = None,
) -> EndState:
    """Assert the promise on the files; ``context`` (the seed, the scenario) goes into every
    assertion message so a failure can be replayed.

    ``expect_keys``: the idempotency keys the producer used; each must own exactly one row.
    ``ids_seen``: key -> every id send() returned for it, across process restarts; each key
    must always have been given the same id (its row's).
    """
    client_id, rows = read_outbox(outbox_db)
    inbox = read_inbox(inbox_db, client_id)
    where = f"({context}; outbox {outbox_db}, inbox {inbox_db})"

    dead = [row for row in rows if row.status == "dead"]
    unexpected_dead = [row for row in dead if dead_allowed is None or not dead_allowed(row)]
    assert not unexpected_dead, f"rows dead that should not be: {unexpected_dead[:5]} {where}"
    pending = [row.id for row in rows if row.status == "pending"]
    assert not pending, f"{len(pending)} rows still pending, first {pending[:10]} {where}"

    acked = [row for row in rows if row.status == "acked"]
    # A bounded inbox deletes rows below the client's floor: those ids were recorded, and
    # the effects table (when there is one) still shows each was handled exactly once.
    base, floor = read_floor(inbox_db, client_id)
    forgotten = {row.id for row in acked if base <= row.id < floor and row.id not in inbox}
    acked = [row for row in acked if row.id not in forgotten]
    lost = [row.id for row in acked if row.id not in inbox]
    assert not lost, f"LOST: {len(lost)} acked rows not in the inbox: {lost[:10]} {where}"
    mismatched = [row.id for row in acked if inbox[row.id][0] != row.payload]
    assert not mismatched, f"inbox payload differs from the outbox for {mismatched[:10]} {where}"
    refused = [row.id for row in acked if inbox[row.id][1] is not None]
    assert not refused, f"acked rows the inbox recorded as rejected: {refused[:10]} {where}"
    known = {row.id for row in rows}
    strangers = sorted(set(inbox) - known)
    assert not strangers, f"inbox ids the outbox never had: {strangers[:10]} {where}"

    effects = read_effects(inbox_db, client_id)
    duplicates = 0
    if effects is not None:
        duplicates = len(effects) - len(set(effects))
        assert duplicates == 0, f"DUPLICATES HANDLED: {duplicates} {where}"
        assert effects == sorted(effects), (
            f"handled out of id order: first inversion at "
            f"{next(i for i in range(1, len(effects)) if effects[i] < effects[i - 1])} {where}"
        )
        assert set(effects) == set(inbox) | forgotten, f"effects and inbox rows differ {where}"

    if expect_keys is not None:
        wanted = sorted(expect_keys)
        keys = [row.key for row in rows]
        assert None not in keys, f"a row without a key in a keyed scenario {where}"
        assert sorted(k for k in keys if k is not None) == wanted, (
            f"keys differ from what the producer sent: {len(keys)} rows for {len(wanted)} keys"
            f" {where}"
        )
    if ids_seen is not None:
        by_key = {row.key: row.id for row in rows}
        twice = {k: v for k, v in ids_seen.items() if v != {by_key.get(k)}}
        assert not twice, f"a key got more than one id across restarts: {list(twice.items())[:5]}"
    return EndState(
        client_id=client_id,
        messages=len(rows),
        acked=len(acked) + len(forgotten),
        dead=len(dead),
        delivered=len(inbox) + len(forgotten),
        duplicates_handled=duplicates,
    )


def report(line: str) -> None:
    """One measured line per scenario: printed (``pytest -s`` shows it) and, when
    ``OUTBOX_FAULT_REPORT`` names a file, appended to it."""
    print(line)
    path = os.environ.get("OUTBOX_FAULT_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


# ---------------------------------------------------------------------------------------------
# Subprocesses
# ---------------------------------------------------------------------------------------------


class Proc:
    """A real child process whose stdout lines the test waits on; stderr goes to a file.

    ``lines`` grows as the child prints; ``wait_for`` polls it with a deadline. ``kill()`` is
    SIGKILL: no cleanup of any kind runs in the child.
    """

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.env = env
        self.lines: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stderr: BinaryIO | None = None

    @classmethod
    async def start(
        cls,
        name: str,
        script: str,
        *args: str,
        log: Path,
        env: dict[str, str] | None = None,
    ) -> Proc:
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        proc = cls(name, [sys.executable, str(PROCS / script), *args], log, full_env)
        await proc._spawn()
        return proc

    async def _spawn(self) -> None:
        self._stderr = _append(self.log)  # closed in wait()
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._stderr,
            stdin=asyncio.subprocess.PIPE,
            env=self.env,
            cwd=ROOT,
        )
        self._reader = asyncio.create_task(self._read(), name=f"proc-reader:{self.name}")

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.lines.append(line.decode().rstrip("\n"))

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def stderr_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def wait_for(
        self, predicate: Callable[[list[str]], bool], timeout: float, what: str = ""
    ) -> None:
        """Poll the lines printed so far until ``predicate(lines)`` holds."""
        deadline = time.monotonic() + timeout
        while not predicate(self.lines):
            if self.process is not None and self.process.returncode is not None:
                await self._drain_reader()
                if predicate(self.lines):
                    return
                raise AssertionError(
                    f"{self.name} exited with {self.process.returncode} before {what or 'it'}"
                    f"; last lines {self.lines[-5:]}\nstderr:\n{self.stderr_tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: {what or 'condition'} not met within {timeout}s; "
                    f"last lines {self.lines[-5:]}\nstderr:\n{self.stderr_tail()}"
                )
            await asyncio.sleep(0.002)

    async def first_line(self, timeout: float = 10.0) -> str:
        await self.wait_for(lambda lines: bool(lines), timeout, "its first line")
        return self.lines[0]

    async def _drain_reader(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._reader), 5)

    async def kill(self) -> None:
        """SIGKILL and reap."""
        assert self.process is not None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
        await self.wait(timeout=10)

    async def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
        assert self.process is not None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def wait(self, timeout: float) -> int:
        assert self.process is not None
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise AssertionError(
                f"{self.name} did not exit within {timeout}s (killed); last lines "
                f"{self.lines[-5:]}\nstderr:\n{self.stderr_tail()}"
            ) from None
        finally:
            await self._drain_reader()
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None
        return code


def _append(path: Path) -> BinaryIO:
    return path.open("ab")


@contextlib.asynccontextmanager
async def reaped(procs: list[Proc]) -> Any:
    """Kill every process still running when the block ends, however it ends."""
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(Exception):
                    await proc.kill()


def parse_sent(lines: Iterable[str]) -> dict[str, int]:
    """``sent KEY ID`` lines of the producer -> key: id (the last one printed wins)."""
    found: dict[str, int] = {}
    for line in lines:
        if line.startswith("sent "):
            _, key, message_id = line.split()
            found[key] = int(message_id)
    return found


def merge_ids(seen: dict[str, set[int]], lines: Iterable[str]) -> None:
    for line in lines:
        if line.startswith("sent "):
            _, key, message_id = line.split()
            seen.setdefault(key, set()).add(int(message_id))
