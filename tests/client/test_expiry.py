"""Per-message expiry: ``send(ttl=)``; a row not acked by its deadline becomes expired.

The clocks are injected: the monotonic clock decides, a wall-clock step changes nothing
within a process. Real SQLite files; the rows stay pending because nothing listens at the
URL (or a real receiver acks them).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from outbox import MessageDeadError, MessageExpiredError, Outbox, serve
from outbox.client import expiry

from ..support import MS, ScriptedServer, fast_options, wait_until
from ..test_cli import run_cli

NOWHERE = "ws://127.0.0.1:9/"  # the discard port: nothing accepts, rows stay pending


class Clocks:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_800_000_000.0

    def kwargs(self) -> dict[str, object]:
        return {"clock": lambda: self.mono, "wall_clock": lambda: self.wall}


@pytest.fixture(autouse=True)
def quick_recheck(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep looks again every 5 ms, so a step of the fake clock is seen soon."""
    monkeypatch.setattr(expiry, "EXPIRY_RECHECK", 5 * MS)


def _row(path: Path, message_id: int) -> tuple[str, int, str | None, float | None]:
    with sqlite3.connect(path) as conn:
        found = conn.execute(
            "SELECT status, expired, last_error, expires_at FROM outbox WHERE id = ?",
            (message_id,),
        ).fetchone()
    return found[0], found[1], found[2], found[3]


async def test_a_row_not_acked_by_its_ttl_expires_and_is_kept(tmp_path: Path) -> None:
    clocks = Clocks()
    db = tmp_path / "o.db"
    async with Outbox(db, NOWHERE, **clocks.kwargs(), **fast_options()) as box:
        short = await box.send({"n": 1}, ttl=60)
        forever = await box.send({"n": 2})
        many = await box.send_many([{"n": 3}, {"n": 4}], ttl=120)
        assert _row(db, short)[3] == clocks.wall + 60  # wall-clock seconds, for people
        clocks.mono += 61
        await wait_until(lambda: box.stats().expired == 1)
        with pytest.raises(MessageExpiredError, match="expired before it was acked") as info:
            await box.wait_acked(short, timeout=1)
        assert isinstance(info.value, MessageDeadError) and info.value.message_id == short
        stats = box.stats()
        assert (stats.pending, stats.dead, stats.expired) == (3, 0, 1)
        clocks.mono += 60
        await wait_until(lambda: box.stats().expired == 3)
        # requeue_dead() leaves expired rows alone: their deadline has passed.
        assert await box.requeue_dead() == 0
    status, expired, error, _ = _row(db, short)
    assert (status, expired) == ("dead", 1) and error is not None and "ttl" in error
    assert _row(db, forever)[:2] == ("pending", 0)
    assert all(_row(db, n)[:2] == ("dead", 1) for n in many)


async def test_the_monotonic_clock_decides_not_the_wall_clock(tmp_path: Path) -> None:
    clocks = Clocks()
    db = tmp_path / "o.db"
    async with Outbox(db, NOWHERE, **clocks.kwargs(), **fast_options()) as box:
        long = await box.send({"n": 1}, ttl=60)
        clocks.wall += 86_400  # the wall clock jumps a day ahead: nothing expires for it
        probe = await box.send({"n": 2}, ttl=1)
        clocks.mono += 2  # only the probe's deadline has passed
        await wait_until(lambda: box.stats().expired == 1)
        assert _row(db, probe)[0:2] == ("dead", 1)
        assert _row(db, long)[0:2] == ("pending", 0)
        clocks.wall -= 2 * 86_400  # and a day behind: the monotonic deadline still holds
        clocks.mono += 60
        await wait_until(lambda: box.stats().expired == 2)


async def test_a_deadline_is_kept_in_the_file_for_the_next_process(tmp_path: Path) -> None:
    clocks = Clocks()
    db = tmp_path / "o.db"
    async with Outbox(db, NOWHERE, **clocks.kwargs(), **fast_options()) as box:
        message_id = await box.send({"n": 1}, ttl=60)
    later = Clocks()
    later.wall = clocks.wall + 61  # the next process opens after the deadline
    async with Outbox(db, NOWHERE, **later.kwargs(), **fast_options()) as box:
        await wait_until(lambda: box.stats().expired == 1)
        with pytest.raises(MessageExpiredError):
            await box.wait_acked(message_id, timeout=1)


async def test_a_row_acked_in_time_does_not_expire(tmp_path: Path) -> None:
    clocks = Clocks()
    async with (
        serve(None, tmp_path / "inbox.db") as receiver,
        Outbox(tmp_path / "o.db", receiver.url, **clocks.kwargs(), **fast_options()) as box,
    ):
        message_id = await box.send({"n": 1}, ttl=60)
        await box.wait_acked(message_id, timeout=10)
        clocks.mono += 120
        probe = await box.send({"n": 2}, ttl=1)
        await box.wait_acked(probe, timeout=10)
        assert box.stats().expired == 0


@pytest.mark.parametrize("ttl", [0, -1, float("inf"), float("nan"), "5", True])
async def test_a_bad_ttl_is_refused_before_anything_is_written(tmp_path: Path, ttl: object) -> None:
    async with Outbox(tmp_path / "o.db", NOWHERE, **fast_options()) as box:
        with pytest.raises((TypeError, ValueError), match="ttl"):
            await box.send({"n": 1}, ttl=ttl)  # type: ignore[arg-type]
        with pytest.raises((TypeError, ValueError), match="ttl"):
            await box.send_many([{"n": 1}], ttl=ttl)  # type: ignore[arg-type]
        assert box.stats().pending == 0


async def test_operator_commands_show_and_requeue_expired_rows(tmp_path: Path) -> None:
    clocks = Clocks()
    db = tmp_path / "o.db"
    async with Outbox(db, NOWHERE, **clocks.kwargs(), **fast_options()) as box:
        expired_id = await box.send({"n": 1}, ttl=1)
        await box.send({"n": 2})
        clocks.mono += 2
        await wait_until(lambda: box.stats().expired == 1)
    stats = json.loads(run_cli("stats", "--db", str(db), "--json").stdout)
    assert (stats["pending"], stats["dead"], stats["expired"]) == (1, 0, 1)
    table = run_cli("stats", "--db", str(db)).stdout
    assert "expired    1" in table
    listed = json.loads(run_cli("list", "--db", str(db), "--status", "expired", "--json").stdout)
    assert [(r["id"], r["status"]) for r in listed] == [(expired_id, "expired")]
    assert json.loads(run_cli("list", "--db", str(db), "--status", "dead", "--json").stdout) == []
    assert json.loads(run_cli("requeue", "--db", str(db), "--dead", "--json").stdout) == {
        "requeued": [],
        "skipped": {},
    }
    done = run_cli("requeue", "--db", str(db), "--expired", "--json")
    assert json.loads(done.stdout)["requeued"] == [expired_id], done.stderr
    assert _row(db, expired_id) == ("pending", 0, _row(db, expired_id)[2], None)


async def test_a_row_in_flight_at_its_deadline_expires_and_leaves_the_window(
    tmp_path: Path,
) -> None:
    """The server holds the ack: the row expires in flight and leaves the window (no resend
    of it), and the queue goes on (expired means not confirmed in time)."""
    clocks = Clocks()
    db = tmp_path / "o.db"
    async with ScriptedServer(ack=False) as server:
        options = fast_options(ack_timeout=10.0)
        async with Outbox(db, server.url, **clocks.kwargs(), **options) as box:
            message_id = await box.send({"n": 1}, ttl=5)
            await wait_until(lambda: server.ids() == [message_id])
            assert box.stats().in_flight == 1
            clocks.mono += 6
            # The count moves at COMMIT, the window a moment later (the sweep's next step).
            await wait_until(lambda: box.stats().expired == 1 and box.stats().in_flight == 0)
            assert box.stats().pending == 0
            after = await box.send({"n": 2})
            await wait_until(lambda: server.ids() == [message_id, after])
    assert _row(db, message_id)[:2] == ("dead", 1)
