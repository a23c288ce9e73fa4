"""One sender per database file: a lease that the kernel releases when the process dies.

Every ``Outbox`` (and so every ``outbox relay``) takes an exclusive ``flock`` on a sidecar
file next to the database, ``<db>-outbox-lease``, before it connects. The one that holds it
is the *active* sender; any other is a *standby*: its ``send()`` still commits, but it sends
nothing, and it tries the lock again every ``RETRY_INTERVAL`` seconds. When the active
process exits, closes, or is killed (even with SIGKILL: the kernel drops the lock with the
file descriptor), a standby takes over within about that interval and resends whatever was
un-acked, as after any reconnect.

The lock is advisory and local: it works between processes on one host with a local file
system. ``flock`` is not reliable on network file systems (NFS, SMB, some FUSE mounts): two
hosts may both believe they hold it, and then both send (the receiver still deduplicates,
but ordering and the one-sender promise are gone). Keep outbox files on local disks; network
file systems are not supported (SQLite's own locking is not safe there either).

The holder writes its pid into the lease file, for ``outbox stats``; who holds the lock is
read with a shared try-lock, released at once (``holder``), which never disturbs the holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import AsyncIterator
from typing import Literal

logger = logging.getLogger("outbox")

LEASE_SUFFIX = "-outbox-lease"
RETRY_INTERVAL = 0.5
"""Seconds between a standby's attempts to take the lease."""

Role = Literal["active", "standby"]


def lease_path(db_path: str) -> str:
    return db_path + LEASE_SUFFIX


def _leasable(db_path: str) -> bool:
    """In-memory and URI databases have no file next to which a lease could live."""
    return bool(db_path) and db_path != ":memory:" and not db_path.startswith("file:")


class Lease:
    """The sender lease on one database file (see the module docstring)."""

    def __init__(self, db_path: str, *, retry_interval: float = RETRY_INTERVAL) -> None:
        self.db_path = db_path
        self.path = lease_path(db_path)
        self.retry_interval = retry_interval
        self.role: Role = "standby"
        self._fd: int | None = None
        self._on_lease_file = True

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it, without waiting; True if this process has it."""
        if self._fd is not None:
            return True
        if not _leasable(self.db_path):
            self.role = "active"
            return True
        fd, on_lease_file = self._open_target()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._on_lease_file = fd, on_lease_file
        if on_lease_file:  # never write into the database file itself
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.role = "active"
        return True

    def _open_target(self) -> tuple[int, bool]:
        """The file to lock: the lease file, or, where it cannot be created (a directory we
        may not write to), the database file itself, opened read-only. flock does not touch
        SQLite's own (fcntl) locks on Linux. Never active without a lock: if neither can be
        opened, the OSError goes up and the caller stays a standby."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), True
        except OSError:
            pass
        try:
            return os.open(self.path, os.O_RDONLY), False  # there, but not ours to write
        except OSError:
            return os.open(self.db_path, os.O_RDONLY), False

    async def acquire(self) -> None:
        """Wait (as a standby) until this process holds the lease."""
        try:
            if self.try_acquire():
                return
        except OSError as exc:
            # Neither the lease file nor the database can be opened: stay a standby (never a
            # second sender on the file) and keep trying; the store will say more.
            logger.warning(
                "outbox: cannot take the sender lease %s (%s); not sending until it can",
                self.path,
                exc,
            )
        pid = read_pid(self.db_path)
        logger.info(
            "outbox %s: standby, another process%s is sending from this file; "
            "send() commits, this process takes over when that one stops",
            self.db_path,
            f" (pid {pid})" if pid else "",
        )
        while True:
            await asyncio.sleep(self.retry_interval)  # the kernel gives no wake-up for a flock
            with contextlib.suppress(OSError):
                if self.try_acquire():
                    break
        logger.info("outbox %s: took over the sender lease; now the active sender", self.db_path)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        self.role = "standby"
        if fd is not None:
            if self._on_lease_file:  # never truncate the database file
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor drops the flock

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Hold the lease for the body; wait as a standby first, release however it ends."""
        try:
            await self.acquire()
            yield
        finally:
            self.release()


def read_pid(db_path: str) -> int | None:
    """The pid the holder wrote into the lease file, if any (for display only)."""
    try:
        with open(lease_path(db_path), encoding="ascii") as file:
            text = file.read(32).strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def holder(db_path: str) -> tuple[bool, int | None]:
    """Whether some process holds the lease now, and the pid it wrote; non-destructive.

    A shared try-lock, released at once: it conflicts with the holder's exclusive lock (so
    it tells), and a standby that tries in that instant only retries a little later.
    """
    for target in (lease_path(db_path), db_path):  # the lease file, or the fallback
        try:
            fd = os.open(target, os.O_RDONLY)
        except OSError:
            continue  # never taken this way on this file
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, read_pid(db_path)
        finally:
            os.close(fd)  # also drops the shared lock if it was taken
    return False, None
