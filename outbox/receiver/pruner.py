"""The bounded inbox at work: delete what the floor and the time window allow, in chunks.

The rules are in ``outbox/protocol/floor.py``; the SQL in ``inbox.py`` and ``postgres.py``
(:class:`FloorStore` is what this module needs of a backend; both inboxes have it). This
module decides *when*.

Where the backend can (:class:`FoldingStore`: SQLite, whose one writer per file makes the
round's write lock the only lock there is), a round's own transaction carries a step
towards a client's mark (:meth:`Pruner.fold`): a few rows more for each message the round
handled, deleted in the same COMMIT and the same fsync, so under load pruning keeps pace
with the inserts and never stands between two rounds. A step of its own (:meth:`step`, one
small transaction of at most ``chunk`` rows) runs between group commits, never inside one:
towards a mark, once the writer is idle (the catching up after a burst; at most MAX_DEFER
late); the time window's sweep, idle or not (no round folds it), one chunk per
``5 * pause`` (per ``pause`` while most of what it reads goes); and every step on PostgreSQL,
where taking a client's fence row inside a round would order locks differently from the
other receivers, spaced by ``pause``. So pruning takes at most a small share of the
writer's time under load.

A step that fails is backed off for its client alone, or for the window alone: a client
whose rows cannot be deleted waits ``retry_after`` and goes to the back of the line (and, if
its folded step took the whole round down, is no longer folded: its steps run between
rounds), and a range of the sweep that fails is passed over until the next pass.

It also answers the writer's question for every new message: is this id below the client's
floor (a straggler of a forgotten message, to ack as a duplicate)? The floors are read in
each group commit's own transaction (under its write lock), for the clients it carries:
several receiver processes may share one file, and any of them may raise a floor. On
PostgreSQL a whole fleet shares the database: there the floors come with the dedup query's
own snapshot, and a mark step first takes the client's lock (``FloorStore.lock``;
``postgres.py``, "The bounded inbox in a fleet", says why both are needed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from ..protocol.floor import (
    Floor,
    MarkStep,
    StepDone,
    advance,
    covers,
    raise_mark,
    sweep_resume,
    window_cutoff,
    window_victims,
)
from .inbox import Key

__all__ = ["MAX_DEFER", "FloorStore", "FoldingStore", "Pruner"]

logger = logging.getLogger("outbox.receiver")

MAX_DEFER = 1.0
"""Most seconds a due step of its own towards a mark waits for the writer to be idle, where
rounds fold such steps: the work gets done even if the rounds stopped carrying it."""

SWEEP_EVERY = 3600.0
"""Most seconds between two passes of the time window: a row goes at most this long after
it is older than the window (a quarter window when that is shorter)."""


class FloorStore(Protocol):
    """The bounded inbox's SQL, as ``inbox.Inbox`` and ``postgres.PostgresInbox`` implement
    it (see their methods for the contract); ``begin``/``commit``/``rollback`` wrap each chunk."""

    async def lock(self, client_id: str) -> None:
        """Keep other receivers off this client's floor and rows until the transaction ends
        (a no-op where this receiver is the only writer)."""
        ...

    async def begin(self) -> None: ...

    async def commit(self) -> None: ...

    async def rollback(self) -> None: ...

    async def floors(self, client_ids: Sequence[str]) -> dict[str, Floor]: ...

    async def unfinished(self) -> list[tuple[str, int]]: ...

    async def run(
        self, client_id: str, start: int, end: int, limit: int
    ) -> list[tuple[int, bool]]: ...

    async def forget(self, client_id: str, floor: Floor, now: float) -> int: ...

    async def window_rows(
        self, after: Key | None, limit: int
    ) -> list[tuple[str, int, float, bool]]: ...

    async def forget_keys(
        self, keys: Sequence[Key], highest: dict[str, int], now: float, cutoff: float
    ) -> int: ...


@runtime_checkable
class FoldingStore(Protocol):
    """A backend whose round can carry a pruning step in its own COMMIT (``inbox.Inbox``)."""

    async def commit_with_step(self, step: MarkStep) -> StepDone | Exception:
        """COMMIT, with ``step`` run just before it; a failed step is undone alone and
        returned (the rest commits)."""
        ...


class Pruner:
    """Pending marks, the floors cache, and the time window's sweep of one receiver."""

    def __init__(
        self,
        *,
        window: float | None,
        chunk: int = 2000,
        fold_rows: int = 2,
        fold_min: int = 100,
        pause: float = 0.02,
        retry_after: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.window = window
        self.chunk = chunk
        self.fold_rows = fold_rows
        """Rows a round's folded step may delete per message the round carries: above one,
        so pruning outruns the inserts and catches up on a backlog while under load."""
        self.fold_min = fold_min
        """Rows a folded step may always delete, however small the round."""
        self.pause = pause
        self.retry_after = retry_after
        """Seconds to wait after a step failed (the file locked, full): one log line each."""
        self._monotonic = monotonic
        self._wall = wall
        self._started_mono = monotonic()
        self._started_wall = wall()
        self._floors: dict[str, Floor] = {}
        """The floors of the clients of the group commit in progress (see ``load``)."""
        self._marks: dict[str, int] = {}
        """Announced marks not yet worked through, by client (the newest, highest one)."""
        self._sweep_after: Key | None = None
        self._sweep_at = self._started_mono + (window or 0.0)
        """When the time window's next chunk is due (monotonic): the next pass, or mid-pass
        the next range. Kept apart from the marks' time, which every round may push back."""
        self._mark_at = 0.0
        """When a step towards a waiting mark is next due (monotonic); every step, folded
        or not, pushes it back by ``pause``."""
        self._own_at = 0.0
        """When a step of its own for a client no round may carry is due: pushed back by
        such steps only, so the rounds folding other clients' steps never starve it."""
        self._held: dict[str, float] = {}
        """Clients whose last step failed, and until when (monotonic) none of theirs runs:
        each client backs off alone, so the time window and the other clients go on."""
        self.folding = False
        """Set by the writer where rounds fold the marks' steps (a :class:`FoldingStore`):
        then a mark's step of its own waits for the writer to be idle, at most MAX_DEFER."""
        self._unfoldable: set[str] = set()
        """Clients whose folded step failed with the whole round (SQLite rolled it all
        back): their steps run on their own, where a failure is theirs alone, until one
        succeeds or their mark is done."""
        self._last_round = float("-inf")
        self.inbox: FloorStore | None = None
        """Set by the receiver once the inbox is open (the writer's own connection)."""
        self.pruned = 0
        """Rows deleted since start (``ReceiverStats.pruned``)."""
        self.sweeps = 0
        """Passes of the time window over the whole inbox since start."""

    async def resume(self, inbox: FloorStore) -> None:
        """Use ``inbox`` and take up the marks a previous run had not worked through (a
        client that never comes back still gets its rows below its last mark deleted)."""
        self.inbox = inbox
        for client_id, mark in await inbox.unfinished():
            self.announce(client_id, mark)

    # -- what the writer asks ------------------------------------------------------------------

    async def load(self, client_ids: Sequence[str]) -> None:
        """Read the floors of these clients, inside the group commit's transaction (one
        query). Read afresh each time, never from an older transaction: another receiver
        process on the same file may have raised a floor since, and a stale one would let
        a forgotten message through to the handler again."""
        inbox = self.inbox
        assert inbox is not None
        wanted = list(dict.fromkeys(client_ids))
        found = await inbox.floors(wanted)
        self._floors = {client_id: found.get(client_id, Floor()) for client_id in wanted}

    def covers(self, client_id: str, message_id: int) -> bool:
        """Below the client's floor: a resend of a message handled and forgotten (after
        ``load``)."""
        floor = self._floors.get(client_id)
        return floor is not None and covers(floor, message_id)

    # -- what connections tell it --------------------------------------------------------------

    def announce(self, client_id: str, mark: int) -> None:
        """A client's low-water mark (handshake or frame); only ever raises its own target."""
        if mark > self._marks.get(client_id, 0):
            waiting = bool(self._marks)
            self._marks[client_id] = mark
            due = self._monotonic()
            # Due since now if no mark was waiting: where rounds fold the work, a step of
            # its own waits for idle at most MAX_DEFER past this time.
            self._mark_at = min(self._mark_at, due) if waiting else due
            self._own_at = min(self._own_at, due) if waiting else due

    def round_ended(self) -> None:
        """The writer finished a group commit: it is busy (a mark's step of its own waits)."""
        self._last_round = self._monotonic()

    # -- the work ------------------------------------------------------------------------------

    def step_failed(self, step: MarkStep) -> None:
        """``step`` failed (undone): no step for its client for ``retry_after`` (one log
        line each), and that client to the back of the line; the time window and the other
        clients go on, so one client whose rows cannot be deleted holds up no other."""
        now = self._monotonic()
        self._to_the_back(step.client_id)
        self._held[step.client_id] = now + self.retry_after
        self._mark_at = self._own_at = now + self.pause

    def fold_failed(self, step: MarkStep) -> None:
        """The round carrying ``step`` failed as a whole (SQLite rolled it all back: the
        step may be why). As :meth:`step_failed`, and no round carries this client's steps
        until one of its own succeeded: a step that keeps failing costs no round again."""
        self._unfoldable.add(step.client_id)
        self.step_failed(step)

    def _to_the_back(self, client_id: str) -> None:
        if client_id in self._marks:
            self._marks[client_id] = self._marks.pop(client_id)

    def _ready(self, client_id: str, now: float) -> bool:
        """Not backing off from a failed step."""
        held = self._held.get(client_id)
        return held is None or now >= held

    def _next_own(self, now: float) -> str | None:
        """The client whose mark a step of its own works on: the first in line that is
        not backing off (the line turns as steps are done or fail)."""
        return next((c for c in self._marks if self._ready(c, now)), None)

    def _mark_due(self) -> float | None:
        if not self._marks:
            return None
        client_id = self._next_own(self._monotonic())
        if client_id is None:  # every one backing off: due when the first may go again
            return min(self._held[c] for c in self._marks)
        if client_id in self._unfoldable or not self.folding:
            # No round carries it: between rounds, at its own pace, idle or not.
            return self._own_at
        # The rounds do this work in their own COMMITs; a step of its own (its own
        # transaction and fsync, which the next round would wait behind) waits until no
        # round ran for ``pause``, or at most MAX_DEFER past its time.
        at = self._mark_at
        return max(at, min(self._last_round + self.pause, at + MAX_DEFER))

    def _sweep_due(self) -> float | None:
        """The time window's chunks never wait for idle: no round folds them, and under
        sustained load they must keep pace with the inserts (see ``_sweep_past``)."""
        return None if self.window is None else self._sweep_at

    def due_at(self) -> float | None:
        """When the next step of its own is due (monotonic; maybe past), None if there is
        nothing to do."""
        due = [at for at in (self._mark_due(), self._sweep_due()) if at is not None]
        return min(due) if due else None

    def due_in(self) -> float | None:
        """Seconds until the next step is due (0: now), None if there is nothing to do."""
        at = self.due_at()
        return None if at is None else max(0.0, at - self._monotonic())

    def fold(self, messages: int) -> MarkStep | None:
        """A step towards a waiting mark for a round of ``messages`` to carry in its own
        transaction (``FoldingStore.commit_with_step``), or None: no mark waits, a failed
        step is being backed off, or the waiting clients' steps must run on their own
        (:meth:`fold_failed`). Hand the outcome to :meth:`settle`."""
        now = self._monotonic()
        client_id = next(
            (c for c in self._marks if c not in self._unfoldable and self._ready(c, now)), None
        )
        if client_id is None:
            return None
        target = self._marks[client_id]
        limit = min(self.chunk, max(self.fold_min, self.fold_rows * messages))
        return MarkStep(client_id, target, limit, self._wall())

    def settle(self, step: MarkStep, done: StepDone) -> None:
        """After the COMMIT of ``step``: count it, then drop its mark if no step is left
        to do for it, or send the client to the back of the line (clients take turns)."""
        self.pruned += done.deleted
        self._mark_at = self._monotonic() + self.pause
        self._held.pop(step.client_id, None)
        if done.finished(step) and self._marks.get(step.client_id) == step.target:
            del self._marks[step.client_id]
            self._unfoldable.discard(step.client_id)
        else:  # work left, or a mark raised meanwhile: after the others
            self._to_the_back(step.client_id)

    async def step(self) -> int:
        """One chunk in its own transaction, whichever is due first (the time window on a
        tie): a client's rows below its mark, or a range of the time window's sweep.
        Returns the rows deleted; a failure is backed off here (the caller logs it), for
        the marks or for the window, never both. Call only with no transaction open."""
        inbox = self.inbox
        assert inbox is not None
        now = self._monotonic()
        mark_at, sweep_at = self._mark_due(), self._sweep_due()
        if sweep_at is not None and sweep_at <= now and (mark_at is None or sweep_at <= mark_at):
            return await self._window_step(inbox, now)
        if mark_at is not None and mark_at <= now:
            return await self._mark_step(inbox)
        return 0

    async def _mark_step(self, inbox: FloorStore) -> int:
        client_id = self._next_own(self._monotonic())
        assert client_id is not None
        step = MarkStep(client_id, self._marks[client_id], self.chunk, self._wall())
        try:
            await inbox.begin()
            await inbox.lock(client_id)  # before the record is read: it must be the newest
            record = (await inbox.floors([client_id])).get(client_id, Floor())
            noted = raise_mark(record, step.target)
            run = await inbox.run(client_id, record.floor, noted.mark or 0, step.limit)
            moved = advance(noted, noted.mark or 0, run)
            deleted = 0
            if moved != record:
                deleted = await inbox.forget(client_id, moved, step.now)
            await inbox.commit()
        except Exception:
            self.step_failed(step)
            raise
        finally:
            await inbox.rollback()
        self._unfoldable.discard(client_id)
        self._own_at = self._monotonic() + self.pause
        self.settle(step, StepDone(record, moved, len(run), deleted))
        return deleted

    async def _window_step(self, inbox: FloorStore, now: float) -> int:
        assert self.window is not None
        cutoff = window_cutoff(
            wall_now=self._wall(),
            wall_at_start=self._started_wall,
            monotonic_now=now,
            monotonic_at_start=self._started_mono,
            window=self.window,
        )
        rows: list[tuple[str, int, float, bool]] = []
        deleted = 0
        try:
            # Read outside a transaction (no write lock while looking); the delete checks
            # the age again, as another receiver process on the file may have changed a
            # row since.
            rows = await inbox.window_rows(self._sweep_after, self.chunk)
            keys, highest = window_victims(rows, cutoff)
            if keys:
                await inbox.begin()
                try:
                    deleted = await inbox.forget_keys(keys, highest, self._wall(), cutoff)
                    await inbox.commit()
                finally:
                    await inbox.rollback()
        except Exception:
            # Past this range all the same (the next pass tries it again): rows that cannot
            # be deleted must not stop the sweep for the clients after them.
            if rows:
                self._sweep_past(rows, now, cutoff, deleted=0)
            self._sweep_at = max(self._sweep_at, self._monotonic() + self.retry_after)
            raise
        self.pruned += deleted
        self._sweep_past(rows, now, cutoff, deleted)
        return deleted

    def _sweep_past(
        self, rows: Sequence[tuple[str, int, float, bool]], now: float, cutoff: float, deleted: int
    ) -> None:
        assert self.window is not None
        if len(rows) < self.chunk:  # the pass is over: the next one in a quarter window
            self._sweep_after = None
            self.sweeps += 1
            self._sweep_at = now + min(self.window / 4, SWEEP_EVERY)
        else:
            self._sweep_after = sweep_resume(rows[-1], cutoff)
            # A pass reads every row: where it mostly finds rows to keep, it goes gently;
            # where it mostly deletes, at the marks' pace, so a seed-style load past
            # chunk / (5 * pause) rows a second does not outgrow it.
            spacing = self.pause if 2 * deleted > len(rows) else self.pause * 5
            self._sweep_at = now + spacing
