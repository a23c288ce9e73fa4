"""The supervisor: its state machine, and what it retries, on real sockets at 127.0.0.1.

Every transition is recorded by a subclass whose ``state`` setter appends to ``history``,
so no transition is missed however fast they come. Intervals are milliseconds; tests wait on
conditions with a deadline, never on sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Response

import outbox.client.outbox as outbox_module
from outbox import Outbox, OutboxBrokenError, StorageFullError, StoreError
from outbox.client import supervisor as supervisor_module
from outbox.client.options import Options
from outbox.client.session import Session, SessionEnded
from outbox.client.stats import Counters
from outbox.client.store import Store
from outbox.client.supervisor import State, Supervisor, process_exception
from outbox.protocol.backoff import Backoff
from outbox.protocol.heartbeat import HeartbeatTimeout
from outbox.protocol.window import SendWindow

from ..support import ScriptedServer, wait_until

C, UP, WAIT, GAVE_UP, CLOSED = (
    State.CONNECTING,
    State.CONNECTED,
    State.BACKING_OFF,
    State.GAVE_UP,
    State.CLOSED,
)


class RecordingSupervisor(Supervisor):
    """A Supervisor that remembers every state it went through, in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.history: list[State] = [self.state]

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, value: State) -> None:
        if value is not self._state:
            self.history.append(value)
        Supervisor.state.fset(self, value)  # type: ignore[attr-defined]


@pytest.fixture
async def store(db: Path) -> AsyncIterator[Store]:
    opened = await Store.open(db)
    yield opened
    await opened.close()


def make_supervisor(
    url: str, store: Store, *, max_reconnect_attempts: int | None = None, **seams: Any
) -> RecordingSupervisor:
    options = Options(
        reconnect_interval=0.005,
        reconnect_max_interval=0.02,
        max_reconnect_attempts=max_reconnect_attempts,
        open_timeout=2,
    )
    window = SendWindow(
        max_inflight=options.max_inflight,
        ack_timeout=options.ack_timeout,
        max_attempts=options.max_attempts,
    )
    backoff = Backoff(
        options.reconnect_interval,
        options.reconnect_max_interval,
        jitter=0,
        max_attempts=max_reconnect_attempts,
    )
    return RecordingSupervisor(
        url, store, options, Counters(), window, backoff=backoff, clock=time.monotonic, **seams
    )


async def run_until(supervisor: Supervisor, done: Any, timeout: float = 5.0) -> asyncio.Task[None]:
    task = asyncio.create_task(supervisor.run())
    await wait_until(lambda: done() or task.done(), timeout)
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.wait({task})


def closed_port() -> str:
    """A URL where nothing listens: the port was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"ws://127.0.0.1:{port}/"


# -- state transitions -----------------------------------------------------------------------


async def test_connects_then_backs_off_and_reconnects_after_a_drop(
    server: ScriptedServer, store: Store
) -> None:
    supervisor = make_supervisor(server.url, store)
    task = await run_until(supervisor, lambda: supervisor.state is UP)
    try:
        assert supervisor.history == [C, UP]
        assert supervisor.ws is not None
        server.drop_connections()
        await wait_until(lambda: supervisor.history.count(UP) == 2)
        assert supervisor.history == [C, UP, WAIT, C, UP]
        assert supervisor.counters.connects == 2 and supervisor.counters.reconnects == 1
        assert "connection closed by the server" in (supervisor.last_error or "")
    finally:
        await stop(task)


async def test_gives_up_after_max_reconnect_attempts(store: Store) -> None:
    supervisor = make_supervisor(closed_port(), store, max_reconnect_attempts=2)
    task = await run_until(supervisor, lambda: False)
    assert task.done() and task.exception() is None  # run() returns once it gives up
    assert supervisor.history == [C, WAIT, C, WAIT, C, GAVE_UP]
    assert "cannot reach the server" in (supervisor.last_error or "")


async def test_zero_reconnect_attempts_gives_up_after_the_first_failure(store: Store) -> None:
    supervisor = make_supervisor(closed_port(), store, max_reconnect_attempts=0)
    task = await run_until(supervisor, lambda: False)
    assert task.done()
    assert supervisor.history == [C, GAVE_UP]


async def test_a_refused_handshake_backs_off_and_says_why(
    server: ScriptedServer, store: Store
) -> None:
    server.refuse_status = 403
    supervisor = make_supervisor(server.url, store)
    task = await run_until(supervisor, lambda: supervisor.history.count(WAIT) >= 2)
    try:
        assert supervisor.history[:4] == [C, WAIT, C, WAIT]
        assert UP not in supervisor.history
        assert "HTTP 403" in (supervisor.last_error or "")
        server.refuse_status = None
        await wait_until(lambda: supervisor.state is UP)
    finally:
        await stop(task)


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> list[RecordingSupervisor]:
    """Every supervisor an Outbox creates here is a RecordingSupervisor."""
    made: list[RecordingSupervisor] = []

    def factory(*args: Any, **kwargs: Any) -> RecordingSupervisor:
        made.append(RecordingSupervisor(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(outbox_module, "Supervisor", factory)
    return made


async def test_closed_when_the_outbox_closes(
    db: Path, server: ScriptedServer, recording: list[RecordingSupervisor]
) -> None:
    async with Outbox(db, server.url, reconnect_interval=0.005) as box:
        await wait_until(lambda: box.state is UP)
    [supervisor] = recording
    assert supervisor.history == [C, UP, CLOSED]
    assert box.state is CLOSED


async def test_closed_when_the_outbox_closes_while_backing_off(
    db: Path, recording: list[RecordingSupervisor]
) -> None:
    async with Outbox(db, closed_port(), reconnect_interval=5) as box:
        await wait_until(lambda: box.state is WAIT)
    [supervisor] = recording
    assert supervisor.history == [C, WAIT, CLOSED]


async def test_closed_after_giving_up(db: Path, recording: list[RecordingSupervisor]) -> None:
    async with Outbox(db, closed_port(), reconnect_interval=0.005, max_reconnect_attempts=1):
        await wait_until(lambda: recording[0].state is GAVE_UP)
    assert recording[0].history == [C, WAIT, C, GAVE_UP, CLOSED]


# -- what is retryable (process_exception) ---------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "refused"),
        OSError("network unreachable"),
        TimeoutError(),
        ConnectionClosed(None, None),
        SessionEnded(1013, "try again later"),
        InvalidStatus(Response(503, "Service Unavailable", Headers())),
        HeartbeatTimeout("no pong"),
        StoreError("database is locked"),
        StorageFullError("disk full"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_failures_of_the_network_server_or_disk_are_retryable(exc: Exception) -> None:
    assert process_exception(exc) is None


@pytest.mark.parametrize(
    "exc", [AttributeError("x"), KeyError("k"), TypeError("t"), ValueError("v"), RuntimeError()]
)
def test_anything_else_is_a_bug(exc: Exception) -> None:
    assert process_exception(exc) is exc


def session_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken_send_loop(self: Session) -> None:
        raise AttributeError("'Session' object has no attribute 'injected'")

    monkeypatch.setattr(Session, "_send_loop", broken_send_loop)


def bug_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "unexpected" in r.getMessage()]


async def test_a_bug_in_a_session_is_logged_with_its_traceback_not_as_a_network_failure(
    server: ScriptedServer,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    session_bug(monkeypatch)
    caplog.set_level(logging.DEBUG, logger="outbox")
    supervisor = make_supervisor(server.url, store)
    # It keeps retrying after the backoff delay: the process stays up and keeps trying.
    task = await run_until(supervisor, lambda: len(bug_records(caplog)) >= 3)
    try:
        assert not task.done()
        first, *later = bug_records(caplog)
        assert first.levelno == logging.ERROR and "bug" in first.getMessage()
        assert first.exc_info is not None and isinstance(first.exc_info[1], AttributeError)
        assert "Traceback (most recent call last)" in caplog.text
        assert "has no attribute 'injected'" in caplog.text
        # Rate-limited: the traceback once per BUG_LOG_INTERVAL, one line in between.
        assert all(r.exc_info is None and "see above" in r.getMessage() for r in later)
        assert "failed or dropped" not in caplog.text
        assert "connection failed" not in caplog.text
        assert "unexpected AttributeError" in (supervisor.last_error or "")
        assert supervisor.history[:4] == [C, UP, WAIT, C]
    finally:
        await stop(task)


async def test_a_bug_gets_its_traceback_again_after_the_interval(
    server: ScriptedServer,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    session_bug(monkeypatch)
    monkeypatch.setattr(supervisor_module, "BUG_LOG_INTERVAL", 0.0)
    caplog.set_level(logging.ERROR, logger="outbox")
    supervisor = make_supervisor(server.url, store)
    task = await run_until(supervisor, lambda: len(bug_records(caplog)) >= 2)
    await stop(task)
    assert all(r.exc_info is not None for r in bug_records(caplog))


async def test_process_exception_is_a_seam(
    server: ScriptedServer,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An application may declare an error retryable: then it reads as a network failure."""
    session_bug(monkeypatch)
    caplog.set_level(logging.WARNING, logger="outbox")
    supervisor = make_supervisor(server.url, store, process_exception=lambda exc: None)
    task = await run_until(supervisor, lambda: "failed or dropped" in caplog.text)
    await stop(task)
    assert not bug_records(caplog) and "Traceback" not in caplog.text


async def test_a_broken_store_stops_the_supervisor(
    server: ScriptedServer, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_run(self: Session) -> None:
        raise OutboxBrokenError("the store's commit loop crashed")

    monkeypatch.setattr(Session, "run", broken_run)
    supervisor = make_supervisor(server.url, store)
    task = await run_until(supervisor, lambda: False)
    assert isinstance(task.exception(), OutboxBrokenError)
    assert supervisor.history == [C, UP]
