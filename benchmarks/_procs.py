"""Child processes of the benchmark: start, talk to, and always stop them.

A child prints JSON lines on stdout and reads commands on stdin; closing its stdin asks it to
stop (and is what happens by itself if this process dies, so no child outlives it). Children
run in their own session, so a Ctrl-C reaches only the parent, which stops them in order:
end of file, then SIGTERM, then SIGKILL. ``LIVE`` holds whatever is still running, for a
last-resort kill on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

LIVE: set[asyncio.subprocess.Process] = set()


class ChildError(Exception):
    """A child ended or spoke out of turn; the message ends with the tail of its stderr."""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Measure this working tree's outbox, whatever version is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on (for now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kill_all() -> None:
    for process in list(LIVE):
        with contextlib.suppress(ProcessLookupError):
            process.kill()


class Child:
    """One server or client process (``_servers.py`` or ``_clients.py``)."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log

    @classmethod
    @contextlib.asynccontextmanager
    async def run(
        cls, name: str, script: str, argv: Sequence[str], log: Path
    ) -> AsyncIterator[Child]:
        """Start ``script argv`` with its stderr in ``log``; stop it when the block ends.
        ``script`` "-m" runs a module instead: ``python -m argv`` (``outbox relay ...``)."""
        command = ["-m"] if script == "-m" else [str(HERE / script)]
        with log.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                *command,
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env=child_env(),
                start_new_session=True,
                limit=1 << 24,  # the result line carries the id runs
            )
        LIVE.add(process)
        child = cls(name, process, log)
        try:
            yield child
        finally:
            await child.stop()

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Every JSON line until the child closes its stdout."""
        stdout = self.process.stdout
        assert stdout is not None
        while line := await stdout.readline():
            with contextlib.suppress(ValueError):  # a stray print is not a protocol line
                yield json.loads(line)

    async def event(self, *wanted: str) -> dict[str, Any]:
        """The next line whose event is one of ``wanted``."""
        async for message in self.events():
            if message["event"] in wanted:
                return message
        raise ChildError(f"the {self.name} ended before saying {'/'.join(wanted)}{self.tail()}")

    def send(self, line: str) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(line.encode() + b"\n")

    async def finish(self, timeout: float = 60.0) -> dict[str, Any]:
        """Ask it to stop; return the ``stats`` line it prints on the way out."""
        stdin = self.process.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()
        stats = None
        async with asyncio.timeout(timeout):
            async for message in self.events():
                if message["event"] == "stats":
                    stats = message
            await self.process.wait()
        if stats is None:
            raise ChildError(f"the {self.name} stopped without its stats{self.tail()}")
        return stats

    async def stop(self) -> None:
        """Make sure it is gone: end of file, then SIGTERM, then SIGKILL, 5 s apart."""
        process = self.process
        try:
            stdin = process.stdin
            if process.returncode is None and stdin is not None and not stdin.is_closing():
                stdin.close()
            for signum in (None, signal.SIGTERM, signal.SIGKILL):
                if process.returncode is not None:
                    break
                if signum is not None:
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(signum)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), 5.0)
        finally:
            if process.returncode is not None:
                LIVE.discard(process)

    def tail(self, lines: int = 15) -> str:
        """The end of its stderr, to append to an error message."""
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        if not text:
            return ""
        return f"\n--- end of the {self.name}'s stderr ({self.log}):\n" + "\n".join(text[-lines:])


class OtherLoad:
    """CPU seconds used by processes other than this one and its children, while it runs.

    On a shared machine (another test run, a build) the figures of a row mean little if
    something else took a core meanwhile; this says so. A thread samples every process's
    CPU time; one first seen after the start counts from zero. ``also_ours`` names more
    processes of the benchmark's own that are not its children (a database server it
    started, which daemonized): they are part of what is measured, not a disturbance.
    """

    def __init__(
        self, interval: float = 0.25, also_ours: Callable[[], set[int]] | None = None
    ) -> None:
        import psutil

        self._psutil = psutil
        self._interval = interval
        self._also_ours = also_ours
        self._me = psutil.Process()
        self._started = time.time()
        self._last: dict[int, float] = {}
        self._first = True
        self.seconds = 0.0
        """CPU seconds used by other processes so far."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="other-load", daemon=True)

    def _sample(self) -> None:
        psutil = self._psutil
        ours = {self._me.pid} | {p.pid for p in self._me.children(recursive=True)}
        if self._also_ours is not None:
            ours |= self._also_ours()
        seen: dict[int, float] = {}
        for process in psutil.process_iter(["cpu_times", "create_time", "ppid"]):
            times = process.info["cpu_times"]
            # Kernel threads (children of kthreadd, pid 2) do our own fsyncs' work.
            if process.pid in ours or times is None or 2 in (process.pid, process.info["ppid"]):
                continue
            seen[process.pid] = used = times.user + times.system
            if process.pid in self._last:
                self.seconds += max(0.0, used - self._last[process.pid])
            elif not self._first and (process.info["create_time"] or 0) >= self._started:
                self.seconds += used  # born during the run
        self._last = seen
        self._first = False

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(Exception):  # a process vanishing mid-scan
                self._sample()

    def __enter__(self) -> OtherLoad:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
