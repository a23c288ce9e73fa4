"""Pruning that fails, and the line of clients it works through: a client's rows that cannot
be deleted hold up neither the acks, nor the time window, nor the other clients, nor (more
than once) the rounds that carried the step; a busy client holds up no other.

Real SQLite files and real triggers that make deletes fail, as a bad page or a full disk
would; real receivers and clients on 127.0.0.1, or, where the test plays the writer's loop
itself, the pruner's clocks in the test's hands (``pruning_scenes.played``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from outbox import Outbox
from outbox.protocol.floor import MarkStep, StepDone
from outbox.receiver import Receiver

from ..raw_client import low_water_headers as headers
from ..support import MS, wait_until
from .pruning_scenes import Played, Resending, deletable, played, undeletable
from .test_retention import FAST, Handled, inbox_rows
from .test_retention import handled as handled  # the fixtures, shared
from .test_retention import receiver as receiver


def retry_after(receiver: Receiver, seconds: float) -> None:
    """Retry failed pruning steps this soon (5 s by default), so the test sees several."""
    assert receiver._pruner is not None
    receiver._pruner.retry_after = seconds


MARKED = "batch-ack, low-water"


async def three_then_mark(receiver: Receiver, client_id: str) -> None:
    """A marked client's messages 1-3, acked, then its mark past them: a step is due."""
    async with Resending(receiver.url, headers(client_id, MARKED)) as client:
        await client.send([1, 2, 3])
        await client.mark(4)


YOUNG = 3600.0
"""Seconds ahead of the wall clock for rows that the time window must keep all test long."""


async def unfold(scene: Played, client_id: str, message_id: int) -> None:
    """A round (of an unmarked client's one message) carries ``client_id``'s step, whose
    delete makes SQLite roll the whole round back: the client is no longer folded."""
    try:
        await scene.round("busy", range(message_id, message_id + 1), scene.wall + YOUNG)
    except sqlite3.Error:
        await scene.inbox.rollback()
    else:
        raise AssertionError("the round carrying the step did not fail")
    assert client_id in scene.pruner._unfoldable


async def test_a_failing_prune_step_never_stops_the_acks(
    tmp_path: Path, receiver: Receiver, handled: Handled, caplog: pytest.LogCaptureFixture
) -> None:
    """Every deletion from the inbox fails, in the rounds' folded steps and in steps of
    their own alike: each is undone and logged, messages go on being handled and acked,
    and pruning resumes once deleting works again."""
    retry_after(receiver, 20 * MS)
    db = tmp_path / "inbox.db"
    undeletable(db)
    async with Outbox(tmp_path / "outbox.db", receiver.url, **FAST) as box:
        for start in range(0, 300, 100):
            await box.send_many([{"n": n} for n in range(start, start + 100)])
            await box.drain(timeout=10)  # acked while steps fail
        client_id = box.client_id
        await wait_until(lambda: caplog.text.count("pruning the inbox failed") >= 2)
        assert inbox_rows(db, client_id) == 300
        await asyncio.to_thread(deletable, db)
        await box.send({"n": 300})  # a round of its own, then idle: either may prune
        await box.drain(timeout=10)
        await wait_until(lambda: inbox_rows(db, client_id) <= 1)
    assert len(handled.calls) == 301 and not handled.twice()
    assert receiver.stats.storage_errors == 0  # no group commit failed


async def test_a_step_that_rolls_the_whole_round_back_fails_that_round_only(
    tmp_path: Path, receiver: Receiver, handled: Handled, caplog: pytest.LogCaptureFixture
) -> None:
    """Deleting makes SQLite roll the whole transaction back (as a full disk or an I/O error
    may): at most the one round that carried the step fails, with 1013, and its client
    resends. No round carries that client's steps again until one of its own succeeds, so
    a step that keeps failing costs only its own retries (logged), never another client's."""
    retry_after(receiver, 1 * MS)  # retried as fast as rounds come
    db = tmp_path / "inbox.db"
    undeletable(db, how="ROLLBACK")
    await three_then_mark(receiver, "marked")
    async with Resending(receiver.url, headers("other", "batch-ack")) as other:
        for start in range(1, 1001, 50):
            await other.send(range(start, start + 50))
    assert other.failed <= 1 and receiver.stats.storage_errors == other.failed
    await wait_until(lambda: caplog.text.count("pruning the inbox failed") >= 3)
    assert inbox_rows(db, "marked") == 3  # nothing forgotten while deleting fails
    await asyncio.to_thread(deletable, db)
    await wait_until(lambda: inbox_rows(db, "marked") == 0)
    assert {i for (client, i) in handled.calls if client == "other"} == set(range(1, 1001))


async def test_a_step_that_rolls_rounds_back_costs_one_round_even_with_other_marks(
    tmp_path: Path, receiver: Receiver
) -> None:
    """As above, while another client keeps sending and announcing marks (its own rows
    delete fine): folding must stay off for the failing client's steps, not resume as soon
    as some other client's step of its own succeeds."""
    retry_after(receiver, 5 * MS)
    db = tmp_path / "inbox.db"
    undeletable(db, "marked", how="ROLLBACK")
    await three_then_mark(receiver, "marked")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.5
    async with Resending(receiver.url, headers("other", MARKED)) as other:
        start = 1
        while other.failed < 2 and loop.time() < deadline:
            await other.send(range(start, start + 20))
            await other.mark(start + 20)
            start += 20
    assert inbox_rows(db, "marked") == 3
    assert other.failed <= 1, f"{other.failed} rounds of 'other' failed with 1013"


async def test_a_client_whose_rows_cannot_be_deleted_holds_up_no_other_client(
    tmp_path: Path, receiver: Receiver, handled: Handled, caplog: pytest.LogCaptureFixture
) -> None:
    """Deleting the first marked client's rows always fails: after each failed step that
    client goes to the back of the line, so the next client's rows still go."""
    retry_after(receiver, 20 * MS)
    pruner = receiver._pruner
    assert pruner is not None
    db = tmp_path / "inbox.db"
    undeletable(db, "stuck", message="database disk image is malformed")
    await three_then_mark(receiver, "stuck")
    await wait_until(lambda: "stuck" in pruner._marks)  # it heads the line
    await three_then_mark(receiver, "next")
    await wait_until(lambda: inbox_rows(db, "next") == 0)
    assert inbox_rows(db, "stuck") == 3 and "pruning the inbox failed" in caplog.text
    assert receiver.stats.storage_errors == 0 and len(handled.calls) == 6


async def test_a_mark_that_keeps_failing_never_starves_the_time_window_when_idle(
    tmp_path: Path,
) -> None:
    """A marked client whose rows cannot be deleted; an unmarked client's rows are past the
    window. The writer is idle: each pass of its loop runs the due step. The marked
    client's step fails and is retried every ``retry_after``; the sweep, which deletes the
    other client's rows fine, still gets its turn."""
    async with played(tmp_path, chunk=10, retry_after=0.05) as scene:
        await scene.seed("seed", range(1, 6), scene.wall)
        await scene.pruner.resume(scene.inbox)
        scene.advance(2.0)  # the seed's rows are past the window: a pass is due
        await scene.seed("stuck", range(1, 4), scene.wall + 3600)  # young all test long
        undeletable(scene.db, "stuck")
        scene.pruner.announce("stuck", 4)
        steps = await scene.idle(0.5)
        assert steps >= 5  # the stuck mark was retried (and failed) all along
        assert inbox_rows(scene.db, "stuck") == 3
        assert inbox_rows(scene.db, "seed") == 0, f"no sweep in {steps} steps"


async def test_a_folded_step_that_keeps_failing_never_starves_the_time_window_under_load(
    tmp_path: Path,
) -> None:
    """As above, under load: a round every millisecond, each carrying the stuck client's
    step in its COMMIT (the real SAVEPOINT), which fails and is undone alone; after each
    round the writer runs a step of its own if one is due."""
    async with played(tmp_path, chunk=10, retry_after=0.05) as scene:
        await scene.seed("seed", range(1, 6), scene.wall)
        await scene.pruner.resume(scene.inbox)
        scene.advance(2.0)
        await scene.seed("stuck", range(1, 4), scene.wall + 3600)
        undeletable(scene.db, "stuck")
        scene.pruner.announce("stuck", 4)
        for n in range(1, 301):  # 300 ms, one round each millisecond
            await scene.round("busy", range(n, n + 1), scene.wall + 3600)
            await scene.writer._prune()
            scene.advance(0.001)
        assert inbox_rows(scene.db, "busy") == 300 and inbox_rows(scene.db, "stuck") == 3
        assert inbox_rows(scene.db, "seed") == 0, f"{scene.pruner.sweeps} passes"


async def test_a_window_range_that_cannot_be_deleted_holds_up_no_client_after_it(
    tmp_path: Path,
) -> None:
    """Two unmarked clients, both past the window; deleting the first one's rows fails.
    The second one's rows, in a later range of the sweep, still go."""
    async with played(tmp_path, chunk=2, retry_after=0.05) as scene:
        await scene.seed("aa-stuck", range(1, 3), scene.wall)
        await scene.seed("zz-seed", range(1, 6), scene.wall)
        await scene.pruner.resume(scene.inbox)
        undeletable(scene.db, "aa-stuck")
        scene.advance(2.0)
        await scene.idle(1.0)
        assert inbox_rows(scene.db, "aa-stuck") == 2
        assert inbox_rows(scene.db, "zz-seed") == 0


async def test_an_unfoldable_client_that_keeps_failing_never_starves_a_foldable_one_when_idle(
    tmp_path: Path,
) -> None:
    """'stuck' took a round down (its delete rolls SQLite's transaction back), so it is
    unfolded, and every step of its own fails. 'next' announces a mark over rows that delete
    fine, and the writer goes idle (no round will fold 'next''s step): a step of its own for
    'next' is due (at most MAX_DEFER late) and must come, stuck or not."""
    async with played(tmp_path, chunk=10, retry_after=0.05) as scene:
        await scene.seed("stuck", range(1, 4), scene.wall + YOUNG)
        await scene.seed("next", range(1, 4), scene.wall + YOUNG)
        await scene.pruner.resume(scene.inbox)
        undeletable(scene.db, "stuck", how="ROLLBACK")
        scene.pruner.announce("stuck", 4)
        await unfold(scene, "stuck", 1)
        scene.pruner.announce("next", 4)
        steps = await scene.idle(2.0)  # twice MAX_DEFER, 40 retries of 'stuck'
        assert steps >= 10
        assert inbox_rows(scene.db, "stuck") == 3
        assert inbox_rows(scene.db, "next") == 0, f"{steps} steps, none for 'next'"


async def test_a_stuck_client_does_not_throttle_a_busy_clients_folded_steps(
    tmp_path: Path,
) -> None:
    """'stuck''s rows cannot be deleted (its folded step fails alone, in its SAVEPOINT).
    'busy' sends 10 messages a millisecond and announces its mark after each round: its
    rounds fold up to 100 rows each, ten times what they insert, so its rows stay a few
    rounds' worth. Retries of 'stuck' every 50 ms must not leave 'busy' one step each."""
    async with played(tmp_path, chunk=2000, retry_after=0.05) as scene:
        await scene.seed("stuck", range(1, 4), scene.wall + YOUNG)
        await scene.pruner.resume(scene.inbox)
        undeletable(scene.db, "stuck")
        scene.pruner.announce("stuck", 4)
        for n in range(300):  # 300 ms, one round of 10 messages each millisecond
            first = 1 + 10 * n
            await scene.round("busy", range(first, first + 10), scene.wall + YOUNG)
            scene.pruner.announce("busy", first + 10)
            await scene.writer._prune()
            scene.advance(0.001)
        assert inbox_rows(scene.db, "stuck") == 3
        busy = inbox_rows(scene.db, "busy")
        assert busy <= 200, f"'busy' keeps {busy} of 3000 rows"


async def test_a_pass_never_chases_a_busy_clients_new_rows(tmp_path: Path) -> None:
    """A seed-style client ('a-busy', no mark) adds 10 rows a millisecond, all inside the
    window; 'z-seed''s old rows sort after them. A pass reading 2 rows per chunk would
    never catch up with 'a-busy''s new rows if it read them all: it passes over the rest of
    a client whose rows the window keeps, and reaches 'z-seed'."""
    async with played(tmp_path, chunk=2) as scene:
        await scene.seed("z-seed", range(1, 6), scene.wall)
        await scene.pruner.resume(scene.inbox)
        scene.advance(2.0)  # 'z-seed''s rows are past the window
        for n in range(500):  # 500 ms of rounds
            await scene.round("a-busy", range(1 + 10 * n, 11 + 10 * n), scene.wall)
            await scene.writer._prune()
            scene.advance(0.001)
        assert inbox_rows(scene.db, "z-seed") == 0
        assert inbox_rows(scene.db, "a-busy") == 5000  # inside the window: all kept
        assert scene.pruner.sweeps >= 1


def marks_raised_mid_round(scene: Played, client_id: str) -> list[int]:
    """Each round's COMMIT announces ``client_id``'s next mark (the ids it was acked up to,
    set by the test in the returned list) while it is in flight, as the connection's reader
    would while the writer waits on the hop."""
    pending: list[int] = []
    commit, commit_with_step = scene.inbox.commit, scene.inbox.commit_with_step

    def announce() -> None:
        while pending:
            scene.pruner.announce(client_id, pending.pop())

    async def plain() -> None:
        announce()
        await commit()

    async def folded(step: MarkStep) -> StepDone | sqlite3.Error:
        announce()
        return await commit_with_step(step)

    scene.inbox.commit = plain  # type: ignore[method-assign]
    scene.inbox.commit_with_step = folded  # type: ignore[method-assign]
    return pending


async def busy_rounds(scene: Played, pending: list[int], rounds: int) -> None:
    """'busy' sends 10 messages a millisecond, from id 11 on (1-10 were acked before its
    mark of 1 came in); the mark acking what came before a round arrives during that
    round's COMMIT. After each round the writer runs a step of its own if one is due."""
    for n in range(rounds):
        first = 11 + 10 * n
        pending.append(first)
        await scene.round("busy", range(first, first + 10), scene.wall + YOUNG)
        await scene.writer._prune()
        scene.advance(0.001)


async def test_an_unfolded_client_gets_its_steps_while_busy_behind_a_raised_mark(
    tmp_path: Path,
) -> None:
    """README: no round carries an unfolded client's steps, 'those run between rounds, busy
    or not'. 'unfolded' took a round down once (and deletes fine since); 'busy' heads the
    line. 300 ms of rounds: 'unfolded''s rows must go (its hold was 50 ms)."""
    async with played(tmp_path, chunk=2000, retry_after=0.05) as scene:
        await scene.seed("unfolded", range(1, 4), scene.wall + YOUNG)
        await scene.seed("busy", range(1, 11), scene.wall + YOUNG)
        await scene.pruner.resume(scene.inbox)
        undeletable(scene.db, "unfolded", how="ROLLBACK")
        scene.pruner.announce("unfolded", 4)
        scene.pruner.announce("busy", 1)
        await unfold(scene, "unfolded", 10_000)  # the round carried 'unfolded''s step
        await asyncio.to_thread(deletable, scene.db)
        assert list(scene.pruner._marks) == ["busy", "unfolded"]
        pending = marks_raised_mid_round(scene, "busy")
        await busy_rounds(scene, pending, 300)
        assert inbox_rows(scene.db, "busy") <= 200  # its folded steps keep pace
        assert inbox_rows(scene.db, "unfolded") == 0, f"line: {list(scene.pruner._marks)}"


async def test_a_busy_clients_raised_marks_do_not_starve_another_foldable_client(
    tmp_path: Path,
) -> None:
    """As above, with a foldable 'quiet' client behind 'busy' (clients take turns, says
    ``settle``): 300 ms of rounds, each able to carry 100 rows, must reach its 3 rows."""
    async with played(tmp_path, chunk=2000, retry_after=0.05) as scene:
        await scene.seed("quiet", range(1, 4), scene.wall + YOUNG)
        await scene.seed("busy", range(1, 11), scene.wall + YOUNG)
        await scene.pruner.resume(scene.inbox)
        scene.pruner.announce("busy", 1)
        scene.pruner.announce("quiet", 4)
        pending = marks_raised_mid_round(scene, "busy")
        await busy_rounds(scene, pending, 300)
        assert inbox_rows(scene.db, "busy") <= 200
        assert inbox_rows(scene.db, "quiet") == 0, f"line: {list(scene.pruner._marks)}"
