"""Storage faults on both SQLite files: locked by another process, full, read-only, corrupt.

What each must show: the operation that cannot be done raises an error that says what to
do (``StoreError`` and its subclasses), writes nothing half-way, and nothing already
committed is lost; once the fault is gone, the queue drains and the end state holds
(``check_end_state``). A full disk is simulated twice: with ``PRAGMA max_page_count`` (runs
everywhere) and with a real 8 MiB tmpfs filled to the last byte (needs root; skipped
otherwise). Read-only uses a read-only bind mount as root (chmod does not stop root), and
chmod otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from outbox import (
    DatabaseCorruptError,
    Outbox,
    Receiver,
    State,
    StorageFullError,
    StoreError,
    serve,
)
from outbox.testing.fault_proxy import FaultProxy

from ..chaos_support import (
    PROCS,
    ROOT,
    check_end_state,
    create_effects_table,
    outbox_statuses,
    read_outbox,
    record_effect,
    report,
)
from ..support import MS, fast_options, wait_until

pytestmark = pytest.mark.timeout(30)

FAST = fast_options(
    ack_timeout=1000 * MS,
    max_attempts=None,
    heartbeat_interval=500 * MS,
    open_timeout=2000 * MS,
    close_timeout=100 * MS,
)

BIG = "x" * 300_000  # more than any free space left in a "full" file


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Locked by another process
# ---------------------------------------------------------------------------------------------


class Locker:
    """``tests/procs/locker.py``: another process holding the file's write lock."""

    def __init__(self, db: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(PROCS / "locker.py"), str(db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )

    async def locked(self) -> None:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.process.stdout.readline), 10)
        assert line.strip() == "locked", line

    async def release(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        line = await asyncio.wait_for(asyncio.to_thread(self.process.stdout.readline), 10)
        assert line.strip() == "released", line
        await asyncio.wait_for(asyncio.to_thread(self.process.wait), 10)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.asynccontextmanager
async def locked_by_another_process(db: Path) -> AsyncIterator[Locker]:
    locker = Locker(db)
    try:
        await locker.locked()
        yield locker
    finally:
        locker.kill()


async def test_outbox_locked_by_another_process(
    receiver: Receiver, outbox_db: Path, inbox_db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past busy_timeout, send() raises a StoreError naming the lock and writes nothing; rows
    committed before still go out (WAL readers are not blocked) and their acks, which cannot
    be committed meanwhile, are kept and committed after the lock is gone."""
    options = {**FAST, "busy_timeout": 100 * MS}
    async with (
        FaultProxy("127.0.0.1", receiver.port) as proxy,
        Outbox(outbox_db, proxy.url(), **options) as box,
    ):
        before = await box.send_many(
            [{"i": i} for i in range(20)], keys=[f"a{i}" for i in range(20)]
        )
        await box.drain(timeout=5)
        # The next rows are sent into a stalled path (no reconnect: the heartbeat interval
        # is longer than the stall) and arrive once the lock is taken.
        proxy.blackhole(True)
        held = await box.send_many([{"h": i} for i in range(30)], keys=[f"h{i}" for i in range(30)])
        async with locked_by_another_process(outbox_db) as locker:
            with pytest.raises(StoreError, match="stayed locked by another connection"):
                await box.send({"during": 1}, key="during")
            # The 30 rows committed before the lock are delivered while it is held ...
            proxy.blackhole(False)
            await wait_until(lambda: receiver.stats.messages >= 50, timeout=10)
            # ... but their acks cannot be committed until it is released.
            assert outbox_statuses(outbox_db).get("pending", 0) == 30
            await locker.release()
        await box.drain(timeout=10)
        again = await box.send({"during": 1}, key="during")  # the failed call wrote nothing
        await box.wait_acked(again, timeout=5)
        assert box.stats().reconnects == 0
    assert "stayed locked" in caplog.text
    end = check_end_state(outbox_db, inbox_db, context="outbox locked")
    assert end.messages == len(before) + len(held) + 1
    report(end.line("outbox file locked by another process past busy_timeout"))


async def test_a_reconnect_needs_no_write_lock(
    receiver: Receiver, outbox_db: Path, inbox_db: Path
) -> None:
    options = {**FAST, "busy_timeout": 100 * MS}
    async with (
        FaultProxy("127.0.0.1", receiver.port) as proxy,
        Outbox(outbox_db, proxy.url(), **options) as box,
    ):
        await box.wait_acked(await box.send("warm up"), timeout=5)
        proxy.refuse(True)
        proxy.cut_all()
        await box.send_many([{"i": i} for i in range(30)])
        async with locked_by_another_process(outbox_db) as locker:
            proxy.refuse(False)
            try:
                await wait_until(lambda: receiver.stats.messages >= 31, timeout=1.5)
            finally:
                await locker.release()
        await box.drain(timeout=10)
    check_end_state(outbox_db, inbox_db, context="reconnect under a lock")


async def test_outbox_locked_briefly_waits_instead_of_failing(
    receiver: Receiver, outbox_db: Path, inbox_db: Path
) -> None:
    async with Outbox(outbox_db, receiver.url, **{**FAST, "busy_timeout": 10.0}) as box:
        await box.wait_acked(await box.send("first"), timeout=5)
        async with locked_by_another_process(outbox_db) as locker:
            sending = asyncio.create_task(box.send("while locked", key="k"))
            started = time.monotonic()
            await wait_until(lambda: time.monotonic() - started > 0.2, timeout=1)
            assert not sending.done()  # waiting on the lock, within busy_timeout
            await locker.release()
            message_id = await asyncio.wait_for(sending, 5)
        await box.wait_acked(message_id, timeout=5)
    check_end_state(outbox_db, inbox_db, context="outbox locked briefly")


async def test_inbox_locked_by_another_process(
    inbox_db: Path, outbox_db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The receiver's transaction fails past its busy_timeout: it closes with 1013, the
    client backs off, reconnects, resends; nothing is handled until the lock is gone, and
    everything is handled once afterwards."""
    async with (
        serve(record_effect, inbox_db, busy_timeout=0.05) as rx,
        Outbox(outbox_db, rx.url, **FAST) as box,
    ):
        await box.wait_acked(await box.send({"before": 1}), timeout=5)
        async with locked_by_another_process(inbox_db) as locker:
            ids = await box.send_many([{"i": i} for i in range(40)])
            await wait_until(lambda: rx.stats.storage_errors >= 3, timeout=10)
            assert box.stats().pending == 40
            await locker.release()
        await box.drain(timeout=10)
        counters = box.stats().counters
    assert "1013" in caplog.text and "try again later" in caplog.text
    end = check_end_state(outbox_db, inbox_db, context="inbox locked")
    assert end.messages == len(ids) + 1
    end.extra.update(storage_errors=rx.stats.storage_errors, reconnects=counters.reconnects)
    report(end.line("inbox file locked by another process"))


# ---------------------------------------------------------------------------------------------
# Full: PRAGMA max_page_count
# ---------------------------------------------------------------------------------------------


async def on_outbox_writer(box: Outbox, sql: str) -> Any:
    """One statement on the Outbox's writer connection. Private, and the only way in:
    ``max_page_count`` is a per-connection setting."""
    store = box._store
    assert store is not None
    return await store._run_on_writer(lambda conn: conn.execute(sql).fetchone())


async def on_inbox(receiver: Receiver, sql: str) -> Any:
    inbox = receiver._inbox
    assert inbox is not None
    cursor = await inbox._db.execute(sql)
    return await cursor.fetchone()


NO_CAP = "PRAGMA max_page_count = 1073741823"


async def test_outbox_full_send_raises_whole_and_the_sender_goes_on(
    receiver: Receiver, outbox_db: Path, inbox_db: Path
) -> None:
    async with (
        FaultProxy("127.0.0.1", receiver.port) as proxy,
        Outbox(outbox_db, proxy.url(), **FAST) as box,
    ):
        await box.wait_acked(await box.send("warm up"), timeout=5)
        proxy.refuse(True)
        proxy.cut_all()
        waiting = await box.send_many(
            [{"i": i} for i in range(20)], keys=[f"w{i}" for i in range(20)]
        )
        rows_before = len(read_outbox(outbox_db)[1])
        (pages,) = await on_outbox_writer(box, "PRAGMA page_count")
        await on_outbox_writer(box, f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StorageFullError, match="nothing from this call was written"):
            await box.send_many(["small", BIG], keys=["small", "big"])
        with pytest.raises(StorageFullError):
            await box.send(BIG, key="big")
        assert len(read_outbox(outbox_db)[1]) == rows_before  # no half row, no key taken
        # The sender is not stalled: the rows committed before the disk filled go out, and
        # their acks (updates in place) commit although nothing new fits.
        proxy.refuse(False)
        await box.drain(timeout=10)
        assert outbox_statuses(outbox_db) == {"acked": rows_before}
        await on_outbox_writer(box, NO_CAP)
        ids = await box.send_many(["small", BIG], keys=["small", "big"])
        await box.drain(timeout=10)
    end = check_end_state(outbox_db, inbox_db, context="outbox max_page_count")
    assert end.messages == rows_before + 2 and len(waiting) == 20 and len(ids) == 2
    report(end.line("outbox full (max_page_count)"))


async def test_inbox_full_closes_1013_until_there_is_room(
    receiver: Receiver, outbox_db: Path, inbox_db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with Outbox(outbox_db, receiver.url, **FAST) as box:
        await box.wait_acked(await box.send("warm up"), timeout=5)
        (pages,) = await on_inbox(receiver, "PRAGMA page_count")
        await on_inbox(receiver, f"PRAGMA max_page_count = {pages}")
        await box.send_many([{"big": BIG}])
        await wait_until(lambda: receiver.stats.storage_errors >= 2, timeout=10)
        assert box.stats().pending == 1
        await on_inbox(receiver, NO_CAP)
        await box.drain(timeout=10)
    assert "database or disk is full" in caplog.text
    end = check_end_state(outbox_db, inbox_db, context="inbox max_page_count")
    end.extra.update(storage_errors=receiver.stats.storage_errors)
    report(end.line("inbox full (max_page_count)"))


# ---------------------------------------------------------------------------------------------
# Full: a real, small filesystem
# ---------------------------------------------------------------------------------------------


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


@contextlib.contextmanager
def small_filesystem(mountpoint: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of ``size`` at ``mountpoint`` (root only; the test is skipped otherwise)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small filesystem needs root")
    mountpoint.mkdir()
    done = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        _run("umount", "-l", str(mountpoint))


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem is full; return it (delete it to free)."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 4096)
    return filler


async def test_outbox_on_a_full_filesystem(
    tmp_path: Path, receiver: Receiver, inbox_db: Path
) -> None:
    """ENOSPC for real: the WAL cannot grow. send() raises StorageFullError and writes
    nothing; acks cannot be committed either (kept in memory, retried); once space is
    freed, everything commits and drains."""
    with small_filesystem(tmp_path / "small") as small:
        outbox_db = small / "outbox.db"
        async with (
            FaultProxy("127.0.0.1", receiver.port) as proxy,
            Outbox(outbox_db, proxy.url(), **FAST) as box,
        ):
            await box.wait_acked(await box.send("warm up"), timeout=5)
            proxy.refuse(True)
            proxy.cut_all()
            waiting = await box.send_many([{"i": i} for i in range(20)])
            filler = fill(small)
            with pytest.raises(StorageFullError, match="database or disk is full"):
                await box.send_many(["small", BIG], keys=["small", "big"])
            proxy.refuse(False)
            # Delivered, but their acks cannot be committed while the disk is full.
            await wait_until(lambda: receiver.stats.messages >= 21, timeout=10)
            full_pending = box.stats().pending
            filler.unlink()
            await box.drain(timeout=10)
            ids = await box.send_many(["small", BIG], keys=["small", "big"])
            await box.drain(timeout=10)
        end = check_end_state(outbox_db, inbox_db, context="outbox on a full tmpfs")
    assert end.messages == 1 + len(waiting) + len(ids)
    end.extra.update(pending_while_full=full_pending)
    report(end.line("outbox on a full 8 MiB tmpfs"))


async def test_inbox_on_a_full_filesystem(tmp_path: Path, outbox_db: Path) -> None:
    with small_filesystem(tmp_path / "small") as small:
        inbox_db = small / "inbox.db"
        create_effects_table(inbox_db)
        async with (
            serve(record_effect, inbox_db) as rx,
            Outbox(outbox_db, rx.url, **FAST) as box,
        ):
            await box.wait_acked(await box.send("warm up"), timeout=5)
            filler = fill(small)
            await box.send_many([{"i": i, "pad": "y" * 2000} for i in range(50)])
            await wait_until(lambda: rx.stats.storage_errors >= 2, timeout=10)
            filler.unlink()
            await box.drain(timeout=10)
            errors = rx.stats.storage_errors
        end = check_end_state(outbox_db, inbox_db, context="inbox on a full tmpfs")
    end.extra.update(storage_errors=errors)
    report(end.line("inbox on a full 8 MiB tmpfs"))


# ---------------------------------------------------------------------------------------------
# Read-only
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def read_only_view(directory: Path) -> Iterator[Path]:
    """The same files, read-only: a read-only bind mount as root, else chmod."""
    if os.geteuid() != 0:
        modes = {path: path.stat().st_mode for path in [directory, *directory.iterdir()]}
        for path in modes:
            path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield directory
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
        return
    view = directory.parent / f"{directory.name}-ro"
    view.mkdir()
    if _run("mount", "--bind", str(directory), str(view)).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        if _run("mount", "-o", "remount,ro,bind", str(view)).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield view
    finally:
        _run("umount", "-l", str(view))


async def test_read_only_outbox_refuses_to_open_and_is_left_as_it_was(
    tmp_path: Path, receiver: Receiver, inbox_db: Path
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    outbox_db = files / "outbox.db"
    # Three rows wait on disk (nobody listens while they are written).
    async with Outbox(outbox_db, "ws://127.0.0.1:9/", **FAST) as box:
        await box.send_many([{"i": i} for i in range(3)])
    before = digest(outbox_db)
    with read_only_view(files) as view:
        with pytest.raises(StoreError, match=r"read-only|cannot open") as info:
            await Outbox(view / "outbox.db", receiver.url, **FAST).open()
        with pytest.raises(StoreError, match=r"read-only|cannot open"):
            async with serve(record_effect, view / "outbox.db"):
                pass
    assert digest(outbox_db) == before
    async with Outbox(outbox_db, receiver.url, **FAST) as box:
        await box.drain(timeout=10)
    end = check_end_state(outbox_db, inbox_db, context="read-only outbox")
    assert end.messages == 3
    report(end.line("read-only outbox file") + f" error={str(info.value)[:100]!r}")


async def test_read_only_inbox_refuses_to_start(tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    inbox_db = files / "inbox.db"
    async with serve(record_effect, inbox_db):
        pass
    with read_only_view(files) as view, pytest.raises(StoreError, match=r"read-only|cannot open"):
        async with serve(record_effect, view / "inbox.db"):
            pass


# ---------------------------------------------------------------------------------------------
# Corrupt
# ---------------------------------------------------------------------------------------------


def scribble(db: Path, seed: int, first_page: int = 2) -> None:
    """Overwrite every page from ``first_page`` on with seeded random bytes."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    rng = random.Random(seed)
    pages = db.stat().st_size // page_size
    with db.open("r+b") as out:
        for page in range(first_page, pages + 1):
            out.seek((page - 1) * page_size)
            out.write(rng.randbytes(page_size))


async def filled_outbox(db: Path, url: str, count: int = 200) -> None:
    async with Outbox(db, url, **FAST) as box:
        await box.send_many([{"i": i, "pad": "z" * 200} for i in range(count)])
        await box.drain(timeout=5)


@pytest.mark.parametrize("damage", ["pages scribbled over", "truncated"])
async def test_corrupt_outbox_refuses_to_open_and_is_left_as_it_was(
    tmp_path: Path, receiver: Receiver, damage: str
) -> None:
    db = tmp_path / "outbox.db"
    await filled_outbox(db, receiver.url)
    if damage == "truncated":
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        data = db.read_bytes()
        db.write_bytes(data[: len(data) // 3])
    else:
        scribble(db, seed=7)
    before = digest(db)
    with pytest.raises(DatabaseCorruptError, match="restore it from a backup") as info:
        await asyncio.wait_for(Outbox(db, receiver.url, **FAST).open(), 10)
    assert digest(db) == before, "a failed open must not touch the evidence"
    report(f"[corrupt outbox: {damage}] open raised: {str(info.value)[:110]}")


async def test_outbox_corrupted_while_running(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process scribbles over the file under a running Outbox: every send() raises
    DatabaseCorruptError (nothing hangs), and close() still returns."""
    db = tmp_path / "outbox.db"
    async with Outbox(db, receiver.url, **FAST) as box:
        await box.send_many([{"i": i, "pad": "z" * 200} for i in range(200)])
        await box.drain(timeout=5)
        scribble(db, seed=11)
        for i in range(3):
            with pytest.raises(DatabaseCorruptError, match="not a usable SQLite database"):
                await asyncio.wait_for(box.send({"after": i}), 5)
    assert "not a usable SQLite database" in caplog.text


async def test_corrupt_inbox_refuses_to_start(tmp_path: Path, outbox_db: Path) -> None:
    """The receiver probes its inbox table at start, so a damaged file stops it there (and
    ``outbox serve`` exits 1 saying so) rather than failing every transaction after it."""
    inbox_db = tmp_path / "inbox.db"
    create_effects_table(inbox_db)
    async with serve(record_effect, inbox_db) as rx:
        await filled_outbox(outbox_db, rx.url)
    scribble(inbox_db, seed=5)
    with pytest.raises(DatabaseCorruptError, match="not a usable SQLite database"):
        async with serve(record_effect, inbox_db):
            pass


async def test_inbox_corrupted_while_running(
    tmp_path: Path, outbox_db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process scribbles over the inbox under a running receiver: each transaction
    fails with a clear log line and a 1013 close; the client keeps its rows pending (not
    dead) and keeps retrying with backoff."""
    inbox_db = tmp_path / "inbox.db"
    create_effects_table(inbox_db)
    rx = serve(record_effect, inbox_db)
    await rx.start()
    try:
        async with Outbox(outbox_db, rx.url, **FAST) as box:
            await box.send_many([{"i": i, "pad": "z" * 200} for i in range(200)])
            await box.drain(timeout=5)
            scribble(inbox_db, seed=3)
            await box.send_many([{"after": i} for i in range(5)])
            await wait_until(lambda: rx.stats.storage_errors >= 3, timeout=10)
            stats = box.stats()
            # The receiver goes first: closing an Outbox while its sessions keep failing can
            # hang (see test_close_returns_while_the_server_keeps_closing_connections).
            await rx.close()
            await wait_until(lambda: box.state is State.BACKING_OFF, timeout=5)
    finally:
        await rx.close()
    assert stats.pending == 5 and stats.dead == 0
    assert "not a usable SQLite database" in caplog.text
