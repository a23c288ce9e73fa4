"""A throwaway PostgreSQL server on 127.0.0.1 for tests, benchmarks and chaos scripts.

``PostgresServer()`` is a context manager: on enter it runs ``initdb`` into a temp dir, starts
``postgres`` on a free port with its unix socket inside that dir and trust auth for 127.0.0.1,
and waits until it accepts connections; on exit it runs ``pg_ctl stop -m fast`` and removes the
dir, leaving no process behind. ``.url(dbname)`` is a ``postgresql://`` URL, ``.create_database()``
makes a fresh database and returns its URL.

The binaries are found by ``OUTBOX_PG_BINDIR``, then ``pg_config --bindir``, then a glob over
Debian's ``/usr/lib/postgresql/*/bin`` (they are not on PATH there). initdb and pg_ctl refuse to
run as root, so as root every command runs as the ``postgres`` user (``runuser``), in a dir
chowned to it. ``Unavailable`` says why no server can be started (no binaries); callers skip on
it, or fail when ``OUTBOX_REQUIRE_POSTGRES=1`` (CI).

    with PostgresServer() as pg:
        url = pg.create_database()
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["PostgresServer", "Unavailable", "find_bindir", "required"]

STARTUP_DEADLINE = 30.0


class Unavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine (or no way to run them)."""


def required() -> bool:
    """CI sets OUTBOX_REQUIRE_POSTGRES=1: a missing server is then a failure, not a skip."""
    return os.environ.get("OUTBOX_REQUIRE_POSTGRES", "") not in ("", "0")


def find_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres, or Unavailable saying where we looked."""
    candidates: list[str] = []
    if env := os.environ.get("OUTBOX_PG_BINDIR"):
        candidates.append(env)
    if shutil.which("pg_config"):
        try:
            out = subprocess.run(
                ["pg_config", "--bindir"], capture_output=True, text=True, check=True, timeout=10
            )
            candidates.append(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    if initdb := shutil.which("initdb"):
        candidates.append(str(Path(initdb).parent))
    for candidate in candidates:
        path = Path(candidate)
        if all((path / name).exists() for name in ("initdb", "pg_ctl", "postgres")):
            return path
    raise Unavailable(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found via OUTBOX_PG_BINDIR, "
        "pg_config --bindir, /usr/lib/postgresql/*/bin or PATH; install PostgreSQL 15 "
        "(apt-get install postgresql-15) to run the PostgreSQL tests"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresServer:
    """One throwaway cluster; see the module docstring."""

    def __init__(self, bindir: Path | None = None, *, fsync: bool = False) -> None:
        """``fsync``: False (tests) skips flushing to disk; benchmarks that compare with
        SQLite's durable commits pass True, so PostgreSQL flushes each COMMIT too."""
        self._bindir = bindir
        self._fsync = fsync
        self._dir: Path | None = None
        self._names = itertools.count(1)
        self.port = 0
        self.user = "postgres"

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        bindir = self._bindir or find_bindir()
        self._bindir = bindir
        as_root = os.geteuid() == 0
        if as_root and not shutil.which("runuser"):
            raise Unavailable("running as root without runuser: cannot run initdb as postgres")
        self._dir = Path(tempfile.mkdtemp(prefix="outbox-pg-"))
        data = self._dir / "data"
        self.user = "postgres" if as_root else _current_user()
        if as_root:
            shutil.chown(self._dir, "postgres", "postgres")
            os.chmod(self._dir, 0o700)
        self.port = _free_port()
        self._run(
            "initdb",
            "-D",
            str(data),
            "-U",
            self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        # Loopback only, trust (initdb --auth=trust wrote the hba lines); no fsync unless
        # asked: a test cluster is thrown away, surviving a power cut is not what we test.
        durability = "" if self._fsync else "-c fsync=off -c full_page_writes=off "
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self._dir} {durability}"
            "-c max_connections=200 -c shared_buffers=32MB"
        )
        try:
            self._run(
                "pg_ctl",
                "start",
                "-D",
                str(data),
                "-w",
                "-t",
                str(int(STARTUP_DEADLINE)),
                "-l",
                str(self._dir / "server.log"),
                "-o",
                options,
            )
        except subprocess.CalledProcessError as exc:
            log = self._dir / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            self._cleanup()
            raise RuntimeError(f"PostgreSQL did not start: {exc}\n{tail}") from exc
        self._wait_ready()

    def stop(self) -> None:
        if self._dir is None:
            return
        data = self._dir / "data"
        if (data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "stop", "-D", str(data), "-m", "fast", "-w")
            except subprocess.CalledProcessError:
                self._run("pg_ctl", "stop", "-D", str(data), "-m", "immediate", "-w")
        self._cleanup()

    def _cleanup(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- use ---------------------------------------------------------------------------------

    @property
    def postmaster_pid(self) -> int:
        """The server's main process (the first line of its ``postmaster.pid``)."""
        if self._dir is None:
            raise RuntimeError("the server is not running")
        return int((self._dir / "data" / "postmaster.pid").read_text().split()[0])

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """A fresh, empty database; returns its URL."""
        name = name or f"t{os.getpid()}_{next(self._names)}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run one SQL command through psql (no driver needed); returns its unaligned output."""
        assert self._bindir is not None
        out = subprocess.run(
            [
                str(self._bindir / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                dbname,
                "-v",
                "ON_ERROR_STOP=1",
                "-XAtq",
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"psql {sql!r} failed: {out.stderr.strip()}")
        return out.stdout

    def _run(self, tool: str, *args: str) -> None:
        assert self._bindir is not None and self._dir is not None
        cmd = [str(self._bindir / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(
            cmd, check=True, cwd=self._dir, capture_output=True, timeout=STARTUP_DEADLINE + 30
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_DEADLINE
        while True:
            try:
                self.psql("SELECT 1")
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _current_user() -> str:
    import getpass

    return getpass.getuser()
