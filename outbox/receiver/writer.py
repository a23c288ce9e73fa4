"""The group commit: one task handles every connection's messages in shared transactions.

Each round takes the work the readers queued and handles it in one SQLite transaction
(``BEGIN IMMEDIATE``, one dedup query, the handlers, one ``executemany``, ``COMMIT``). While
it commits, readers keep reading, so the busier the receiver, the more messages share each
fsync. Answers are queued on each connection only after the COMMIT.

A round is bounded, so acks keep flowing while a backlog is worked through: it takes at most
``max_messages``, shared equally among the connections that are ready, and it stops calling
handlers once ``max_time`` seconds have gone by (after at least one message, so every round
makes progress). What a round did not reach goes back to the head of its connection's queue;
connections the round did not reach at all go first in the next one, those it served in part
go last, so a flooding client and a quiet one take turns.

Why a single writer rather than a lock per client: SQLite has one writer at a time anyway,
so a second one would only wait on the file lock. Running every transaction in one task also
gives the per-client guarantee for free: two connections with the same client id (a client
that reconnected before the server noticed its old connection died) cannot interleave, and
each client's messages are handled in the order they arrived, which for a conforming client
is id order. The cost is that handlers run one at a time.

One connection's failure stays that connection's: a failing handler closes its own
connection (1011) and its SAVEPOINT is undone; only a failure of the transaction itself
(SQLite locked or full) closes every connection that shared it (1013).

A batch handler (``batch=True``) is called once per round with every new message of it;
if it raises, its SAVEPOINT is undone and the new messages go through it again one at a
time, which finds the failing message and gives its connection the per-message outcome.

On PostgreSQL (``backend.InboxBackend``, ``postgres``) several receivers may share the inbox:
each round first fences the identities it carries, and a connection superseded by a newer
one for its identity (on any receiver) has its items dropped, unhandled and unacked, and is
closed with 4409 (``backend.SUPERSEDED``); its client resends them on its newer connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.frames import CloseCode

from ..errors import StoreError
from ..logs import PEERS, rate_limited
from ..protocol import wire
from ..protocol.wire import Close, Item, Malformed, ack_frames, clip
from .api import Batch as HandlerBatch
from .api import BatchHandler, Handler, Incoming, ReceiverStats, Reject
from .backend import SUPERSEDED, InboxBackend, StatementFailed
from .connection import Peer
from .handshake import describe_peer
from .inbox import InboxRow, Key, Recorded, encode_payload, payload_digest
from .pruner import FoldingStore, Pruner

__all__ = ["Writer"]

logger = logging.getLogger("outbox.receiver")
peer_log = rate_limited(PEERS)

Batch = list[tuple[Peer, list[Item], list[int]]]
"""One round of work: each connection with the items it queued (in arrival order) and the
bytes each stands for."""

Verdict = str | Close | None
"""What the handler made of one new message: None = accepted, a str = rejected with that
reason, a Close = the handler failed (close the connection with this frame)."""


@dataclass(slots=True)
class _Outcome:
    """What one transaction decided for one connection; sent only after COMMIT."""

    acks: list[int] = field(default_factory=list)
    nacks: list[tuple[int, str]] = field(default_factory=list)
    close: Close | None = None
    handled: int = 0
    rejected: int = 0
    duplicates: int = 0
    conflicts: list[tuple[int, str]] = field(default_factory=list)
    handler_failed: bool = False
    unreached: int = 0
    """Items at the end of this connection's share that the round's time ran out before."""
    superseded: bool = False
    """Fenced out: a newer connection holds this identity (nothing else was done)."""

    def answer_again(self, message_id: int, reason: str | None) -> None:
        """A resend of a recorded message: the same answer as the first time."""
        self.duplicates += 1
        if reason is None:
            self.acks.append(message_id)
        else:
            self.nacks.append((message_id, reason))

    def decided(self, message_id: int, reason: str | None) -> None:
        """A first delivery, handled (reason None) or rejected."""
        if reason is None:
            self.acks.append(message_id)
            self.handled += 1
        else:
            self.nacks.append((message_id, reason))
            self.rejected += 1


class Writer:
    """The receiver's only user of the inbox: readers ``submit`` work, one task commits it."""

    def __init__(
        self,
        inbox: InboxBackend,
        handler: Handler | BatchHandler | None,
        stats: ReceiverStats,
        *,
        batch: bool = False,
        max_messages: int = 1000,
        max_time: float = 0.1,
        observers: Sequence[Callable[[float], None]] = (),
        pruner: Pruner | None = None,
    ) -> None:
        self._inbox = inbox
        self._pruner = pruner
        """Deletes what the floors and the time window allow: in rounds' own COMMIT where
        the backend can, else between rounds (pruner.py)."""
        self._folding = inbox if pruner is not None and isinstance(inbox, FoldingStore) else None
        """The inbox, where a round's COMMIT can carry a pruning step (SQLite)."""
        if pruner is not None and self._folding is not None:
            pruner.folding = True
        self._observers = observers
        """Called with each committed transaction's duration in seconds (metrics)."""
        self._handler: Handler | None = None
        self._batch_handler: BatchHandler | None = None
        if batch:
            self._batch_handler = handler  # type: ignore[assignment]
        else:
            self._handler = handler  # type: ignore[assignment]
        self._stats = stats
        self._max_messages = max_messages
        self._max_time = max_time
        self._deadline = float("inf")
        self._ready: list[Peer] = []
        self._work = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._in_round = False
        self._settled = asyncio.Event()
        """Set after each round (see ``drained``)."""

    def start(self, name: str) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=name)

    def submit(self, peer: Peer, items: Sequence[Item], size: int = 0) -> None:
        """Queue a connection's items, read from a frame of ``size`` bytes, for a round."""
        peer.add_pending(items, size)
        if not peer.queued:
            peer.queued = True
            self._ready.append(peer)
            self._work.set()

    async def drained(self) -> None:
        """Return once everything submitted so far is handled and its answers queued: no
        connection has work waiting and no round is running. A drain calls it after
        stopping the readers, so nothing new comes in meanwhile."""
        while self._ready or self._in_round:
            self._settled.clear()
            await self._settled.wait()

    async def stop(self, timeout: float) -> None:
        """Let the round in progress finish for at most ``timeout`` seconds, then cancel it."""
        task = self._task
        if task is None:
            return
        self._stopping = True
        self._work.set()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            logger.warning("the transaction in progress did not finish in time; cancelling it")
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # we are being cancelled ourselves
        except Exception:
            logger.exception("the receiver's writer failed")

    # -- one round -----------------------------------------------------------------------------

    def wake(self) -> None:
        """Look again at the pruner's work (a client announced a mark)."""
        self._work.set()

    async def _loop(self) -> None:
        while not self._stopping:
            await self._wait()
            self._work.clear()
            if self._stopping:
                return
            batch = self._take()
            if batch:
                self._in_round = True
                try:
                    await self._commit(batch)
                except Exception:  # a bug here must not stop every other connection's messages
                    logger.exception(
                        "the receiver's writer failed; closing the connections involved"
                    )
                    for peer, _, _ in batch:
                        peer.fail(Close(CloseCode.INTERNAL_ERROR, "receiver error"))
                finally:
                    self._in_round = False
                    if self._pruner is not None:
                        self._pruner.round_ended()
                    self._settled.set()  # also when cancelled: drained() must wake
            else:
                self._settled.set()
            await self._prune()

    async def _wait(self) -> None:
        """Until there is work, or the pruner's next step of its own is due."""
        delay = None if self._pruner is None else self._pruner.due_in()
        if delay is not None and delay <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._work.wait()

    async def _prune(self) -> None:
        """One bounded chunk of pruning, in its own transaction, after a round's answers
        are queued: a chunk never delays the acks of the round before it."""
        pruner = self._pruner
        if pruner is None or self._stopping:
            return
        if pruner.due_in() != 0:
            return
        try:
            await pruner.step()
        except Exception as exc:  # backed off by the pruner
            self._log_prune_failure(pruner, exc)
            if self._inbox.in_transaction:
                await self._inbox.rollback()
        self._stats.pruned = pruner.pruned

    def _log_prune_failure(self, pruner: Pruner, exc: BaseException) -> None:
        described = self._inbox.describe_error(exc)
        logger.warning(
            "pruning the inbox failed (%s); trying again in %ss",
            described,
            pruner.retry_after,
            exc_info=described is exc and not isinstance(exc, StoreError),
        )

    async def _commit_folding(self, messages: int) -> None:
        """COMMIT the round, with a step towards a waiting mark in it where the backend can
        (same hop, same fsync); else plain."""
        pruner, folding = self._pruner, self._folding
        step = None if pruner is None or folding is None else pruner.fold(messages)
        if step is None:
            await self._inbox.commit()
            return
        assert pruner is not None and folding is not None
        try:
            done = await folding.commit_with_step(step)
        except Exception:
            pruner.fold_failed(step)  # the round fails (1013); the step goes on alone
            raise
        if isinstance(done, Exception):
            pruner.step_failed(step)
            self._log_prune_failure(pruner, done)
        else:
            pruner.settle(step, done)
            self._stats.pruned = pruner.pruned

    def _take(self) -> Batch:
        """Take an equal share of every ready connection's queue (waking its reader).

        A connection with more left stays ready, behind those that were not served.
        """
        ready, self._ready = self._ready, []
        share = max(1, self._max_messages // max(1, len(ready)))
        batch: Batch = []
        for peer in ready:
            peer.queued = False
            if peer.failed:
                continue
            items, sizes = peer.take_pending(share)
            if items:
                batch.append((peer, items, sizes))
            if peer.pending:
                self._requeue(peer, first=False)
        return batch

    def _requeue(self, peer: Peer, *, first: bool) -> None:
        """Put a connection with work left back in the ready list."""
        if peer.queued:
            if not first:
                return
            self._ready.remove(peer)
        peer.queued = True
        if first:
            self._ready.insert(0, peer)
        else:
            self._ready.append(peer)
        self._work.set()

    async def _commit(self, batch: Batch) -> None:
        inbox = self._inbox
        try:
            results = await self._transaction(batch)
        except Exception as exc:
            self._stats.storage_errors += 1
            described = inbox.describe_error(exc)
            clients = sorted({clip(peer.client_id, 80) for peer, _, _ in batch})
            logger.error(
                "inbox transaction failed for %d connection(s) (%s): %s; closing them with "
                "1013 so their clients resend later",
                len(batch),
                ", ".join(clients[:5]) + (", ..." if len(clients) > 5 else ""),
                # Say what to do about it (locked, full, corrupt), not only what SQLite said.
                described,
                exc_info=not isinstance(described, StoreError),
            )
            for peer, _, _ in batch:
                peer.fail(Close(CloseCode.TRY_AGAIN_LATER, "inbox unavailable, resend later"))
            return
        finally:
            if inbox.in_transaction:
                try:
                    await inbox.rollback()
                except Exception:
                    logger.exception("rollback failed on %s", inbox.path)
        skipped = []
        for (peer, out), (_, items, sizes) in zip(results, batch, strict=True):
            try:
                self._deliver(peer, out)
            except Exception:  # a bug answering one connection is that connection's alone
                logger.exception(
                    "could not answer client %r; closing its connection", peer.client_id
                )
                peer.fail(Close(CloseCode.INTERNAL_ERROR, "receiver error"))
                continue
            if out.unreached:
                peer.put_back(items[-out.unreached :], sizes[-out.unreached :])
                if out.unreached == len(items):
                    skipped.append(peer)
                elif not peer.failed:
                    self._requeue(peer, first=False)
        for peer in reversed(skipped):  # first in the next round, in this round's order
            if not peer.failed:
                self._requeue(peer, first=True)

    def _deliver(self, peer: Peer, out: _Outcome) -> None:
        """After COMMIT: count the outcome and queue its answers on the connection."""
        stats = self._stats
        stats.messages += out.handled
        stats.rejected += out.rejected
        stats.duplicates += out.duplicates
        stats.conflicts += len(out.conflicts)
        stats.nacks += len(out.nacks) + len(out.conflicts)
        stats.handler_errors += int(out.handler_failed)
        stats.superseded += int(out.superseded)
        for frame in ack_frames(out.acks, out.nacks, peer.batch_ack):
            peer.send(frame)
        if out.conflicts:
            _log_conflicts(peer, out.conflicts)
        flag = wire.FEATURE_ID_CONFLICT in getattr(peer.ws, "outbox_features", ())
        for message_id, reason in out.conflicts:
            peer.send(wire.encode_nack(message_id, reason, conflict=flag))
        if out.close is not None:
            peer.fail(out.close)

    async def _transaction(self, batch: Batch) -> list[tuple[Peer, _Outcome]]:
        inbox = self._inbox
        keys = [
            (peer.client_id, item.id)
            for peer, items, _ in batch
            for item in items
            if isinstance(item, wire.Message)
        ]
        known: dict[Key, Recorded] = {}
        started = time.perf_counter()
        superseded: set[Peer] = set()
        began = bool(keys)
        if began:
            await inbox.begin()
            superseded = await self._fence(batch)
            if superseded:
                gone = _identities(superseded, batch)
                keys = [key for key in keys if key[0] not in gone]
            if keys:
                known = await inbox.seen(keys)
                if self._pruner is not None:
                    unknown = [key[0] for key in keys if key not in known]
                    if unknown:
                        await self._pruner.load(unknown)
        rows: list[InboxRow] = []
        now = time.time()
        self._deadline = asyncio.get_running_loop().time() + self._max_time
        results = await self._apply_all(batch, known, rows, now, superseded)
        if began:
            if rows:
                await inbox.record(rows)
            await self._commit_folding(len(keys))
            self._stats.transactions += 1
            if self._observers:
                self._observe(time.perf_counter() - started)
        return results

    async def _fence(self, batch: Batch) -> set[Peer]:
        """The connections of ``batch`` superseded by a newer one for their identity (their
        epoch is not the identity's current one, read with its row locked until COMMIT)."""
        fenced = [peer for peer, _, _ in batch if _epoch(peer) is not None]
        if not fenced:
            return set()
        current = await self._inbox.fence([peer.client_id for peer in fenced])
        return {peer for peer in fenced if current.get(peer.client_id) != _epoch(peer)}

    def _observe(self, elapsed: float) -> None:
        """After COMMIT: a failing observer (metrics) must not look like a failed commit."""
        for observe in self._observers:
            try:
                observe(elapsed)
            except Exception:
                logger.exception("a transaction observer failed; ignored")

    async def _apply_all(
        self,
        batch: Batch,
        known: dict[Key, Recorded],
        rows: list[InboxRow],
        now: float,
        superseded: set[Peer],
    ) -> list[tuple[Peer, _Outcome]]:
        """Every connection's share: through the batch handler, or one message at a time.
        A superseded connection's share is dropped, unhandled (see ``_superseded``)."""
        if self._batch_handler is not None:
            live = [entry for entry in batch if entry[0] not in superseded]
            handled = iter(await self._apply_batch(self._batch_handler, live, known, rows, now))
            return [
                (peer, _superseded()) if peer in superseded else next(handled)
                for peer, _, _ in batch
            ]
        return [
            (
                peer,
                _superseded()
                if peer in superseded
                else await self._apply(peer, items, known, rows, now),
            )
            for peer, items, _ in batch
        ]

    # -- one connection's share, one message at a time -----------------------------------------

    async def _apply(
        self,
        peer: Peer,
        items: list[Item],
        known: dict[Key, Recorded],
        rows: list[InboxRow],
        now: float,
    ) -> _Outcome:
        """Handle one connection's share of the transaction, in order.

        ``known`` maps every key already recorded, including by earlier messages of this
        same transaction, to its reject reason (None = acked) and payload digest; new rows
        go to ``rows``. A repeat is a duplicate only if its payload has the same digest.
        """
        out = _Outcome()
        client_id = peer.client_id
        loop = asyncio.get_running_loop()
        for index, item in enumerate(items):
            if rows and self._handler is not None and loop.time() >= self._deadline:
                out.unreached = len(items) - index  # the next round starts with them
                break
            if isinstance(item, Malformed):
                out.nacks.append((item.id, item.reason))
                continue
            if isinstance(item, Close):
                out.close = item
                break
            key = (client_id, item.id)
            try:
                payload = encode_payload(item.data)
            except (TypeError, ValueError) as exc:  # the parse-time checks make this rare
                out.nacks.append((item.id, f"cannot be stored: {clip(str(exc))}"))
                continue
            digest = payload_digest(payload)
            if key in known:
                reason, recorded = known[key]
                if recorded == digest:
                    out.answer_again(item.id, reason)
                else:
                    out.conflicts.append((item.id, _conflict_reason(item.id)))
                continue
            if self._pruner is not None and self._pruner.covers(client_id, item.id):
                # Handled and forgotten below the client's floor: a resend. Our client never
                # sends a pending row below its own mark, so from a client that renumbers
                # conflicts this is a reused id (a restored outbox, a spoofed client id):
                # refuse it, never ack unhandled what may be a new message.
                if _renumbers(peer):
                    out.conflicts.append((item.id, _below_floor_reason(item.id)))
                else:
                    out.answer_again(item.id, None)
                continue
            verdict = await self._handle(client_id, item)
            if isinstance(verdict, Close):
                # Later messages wait: handling them would break the client's order.
                out.handler_failed = True
                out.close = verdict
                break
            rows.append((client_id, item.id, payload, now, verdict, digest))
            known[key] = (verdict, digest)
            out.decided(item.id, verdict)
        return out

    async def _handle(self, client_id: str, item: wire.Message) -> Verdict:
        """Run the handler on one new message; keep its writes only if it returned."""
        handler = self._handler
        if handler is None:
            return None
        message = Incoming(client_id, item.id, item.data, self._inbox)
        try:
            await handler(message)
        except Reject as exc:
            self._check_transaction(item.id)
            await message._finish(keep=False)
            return exc.reason or "rejected by the receiver"
        except BaseException as exc:
            if not _handler_failure(exc):
                raise
            logger.exception(
                "handler failed on message %s from client %r; not acked, closing the "
                "connection with 1011 so the client resends it",
                item.id,
                client_id,
            )
            self._check_transaction(item.id)
            await message._finish(keep=False)
            return Close(CloseCode.INTERNAL_ERROR, f"handler failed on message {item.id}")
        self._check_transaction(item.id)
        try:
            await message._finish(keep=True)
        except StatementFailed as exc:  # PostgreSQL: the handler swallowed a failed statement
            logger.error(
                "message %s from client %r: %s; closing with 1011", item.id, client_id, exc
            )
            return Close(CloseCode.INTERNAL_ERROR, f"handler failed on message {item.id}")
        return None

    def _check_transaction(self, message_id: int) -> None:
        if not self._inbox.in_transaction:
            raise StoreError(
                f"the inbox transaction ended while handling message {message_id}: the handler "
                "committed or rolled back through message.tx, or SQLite rolled back after an "
                "error"
            )

    # -- every connection's share at once, through a batch handler ------------------------------

    async def _apply_batch(
        self,
        handler: BatchHandler,
        batch: Batch,
        known: dict[Key, Recorded],
        rows: list[InboxRow],
        now: float,
    ) -> list[tuple[Peer, _Outcome]]:
        """Handle the whole round with one call of the batch handler.

        Each connection's items are first sorted out (malformed, duplicate, conflict, new),
        then every new message goes to the handler in one :class:`Batch`. If it raises, its
        writes are undone and the new messages are handled again one at a time, in order,
        to find the one that fails: that connection is closed with 1011 after what came
        before it (as for a failing per-message handler), the others are unaffected.
        """
        pending: dict[Key, _New] = {}
        covers = None if self._pruner is None else self._pruner.covers
        plans = [_plan(peer, items, known, pending, covers) for peer, items, _ in batch]
        fresh = [new for plan in plans for new in plan.fresh]
        if fresh:
            failure = await self._call_batch(handler, fresh)
            if failure is not None:
                if len(fresh) > 1:  # a batch of one is judged (and logged) at once
                    logger.warning(
                        "batch handler failed on a batch of %d messages (%s: %s); its writes "
                        "are rolled back and its messages handled again one at a time",
                        len(fresh),
                        type(failure).__name__,
                        clip(str(failure)),
                        exc_info=None if isinstance(failure, Reject) else failure,
                    )
                await self._one_by_one(handler, plans, fresh, failure)
        return [plan.resolve(known, rows, now) for plan in plans]

    async def _call_batch(self, handler: BatchHandler, fresh: list[_New]) -> BaseException | None:
        """One handler call in a SAVEPOINT; the verdicts go to each ``_New``. Returns the
        handler's exception (its writes then undone), or None."""
        tx = self._inbox.transaction()
        view = HandlerBatch(
            [Incoming(new.client_id, new.item.id, new.item.data, self._inbox, tx) for new in fresh],
            tx,
        )
        try:
            await handler(view)
        except BaseException as exc:
            if not _handler_failure(exc):
                raise
            view._close()
            self._check_transaction(fresh[0].item.id)
            await tx._finish(keep=False)
            return exc
        verdicts = view._close()
        self._check_transaction(fresh[0].item.id)
        try:
            await tx._finish(keep=True)
        except StatementFailed as exc:  # PostgreSQL: the handler swallowed a failed statement
            return exc
        for new, verdict in zip(fresh, verdicts, strict=True):
            new.verdict = verdict
            new.done = True
        return None

    async def _one_by_one(
        self,
        handler: BatchHandler,
        plans: list[_Plan],
        fresh: list[_New],
        failure: BaseException,
    ) -> None:
        """After a failed batch: each new message as a batch of one, in order.

        A connection stops at its first failure (later ones would break its order) and the
        round stops calling the handler after ``max_time``, like the per-message path.
        """
        loop = asyncio.get_running_loop()
        if len(fresh) == 1:  # nothing to retry: this is the culprit (or a Reject of it)
            self._single_failed(fresh[0], failure)
            return
        decided = 0
        for new in fresh:
            plan = new.plan
            plan.hold_behind_repeats(new.index)
            if plan.stop is not None and plan.stop <= new.index:
                continue  # this connection already failed, or was cut
            if decided and loop.time() >= self._deadline:
                plan.cut(new.index)  # the next round starts with it
                continue
            error = await self._call_batch(handler, [new])
            if error is not None:
                self._single_failed(new, error)
            decided += 1

    def _single_failed(self, new: _New, error: BaseException) -> None:
        """A batch of one raised: Reject rejects it; anything else fails its connection."""
        if isinstance(error, Reject):
            new.verdict = error.reason or "rejected by the receiver"
            new.done = True
            return
        logger.error(
            "batch handler failed on message %s from client %r; not acked, closing the "
            "connection with 1011 so the client resends it",
            new.item.id,
            new.client_id,
            exc_info=error,
        )
        close = Close(CloseCode.INTERNAL_ERROR, f"handler failed on message {new.item.id}")
        new.plan.fail(new.index, close)


@dataclass(slots=True, eq=False)
class _New:
    """A first delivery waiting for the batch handler."""

    plan: _Plan
    index: int
    """Position among the connection's items of the round."""
    client_id: str
    item: wire.Message
    payload: str
    digest: str
    verdict: str | None = None
    done: bool = False


# What a connection's item needs once the handler has run, in item order:
_NACK, _AGAIN, _CONFLICT, _FRESH, _REPEAT = range(5)
_Step = tuple[int, int, Any]
"""``(kind, index among the items, detail)``."""


@dataclass(slots=True, eq=False)
class _Plan:
    """One connection's share of a batch round, sorted out before the handler runs."""

    peer: Peer
    count: int
    """Items in the share."""
    steps: list[_Step] = field(default_factory=list)
    fresh: list[_New] = field(default_factory=list)
    close: Close | None = None
    """A Close item ended the share (a frame the reader could not use)."""
    stop: int | None = None
    """Index of the first item not to answer in this round: a failure or a cut."""
    failed: Close | None = None
    repeats: list[tuple[int, _New]] = field(default_factory=list)
    """``(index, first delivery)`` of each repeat of an id another connection of the same
    client delivered first in this round."""

    def hold_behind_repeats(self, index: int) -> None:
        """In the retry, before handling the item at ``index``: a repeat before it whose
        first delivery failed or was cut is answered in a later round (``resolve``), so
        nothing after it may be handled now (its effect would commit unanswered, unrecorded,
        and be handled again then)."""
        for at, first in self.repeats:
            if at >= index:
                return
            if not first.done:
                self.cut(at)
                return

    def cut(self, index: int) -> None:
        """Leave the items from ``index`` on for the next round."""
        if self.stop is None or index < self.stop:
            self.stop = index

    def fail(self, index: int, close: Close) -> None:
        self.cut(index)
        self.failed = close

    def resolve(
        self, known: dict[Key, Recorded], rows: list[InboxRow], now: float
    ) -> tuple[Peer, _Outcome]:
        """After the handler: the answers, in item order, and the inbox rows of the new."""
        out = _Outcome()
        client_id = self.peer.client_id
        for kind, index, detail in self.steps:
            if self.stop is not None and index >= self.stop:
                break
            if kind in (_NACK, _CONFLICT):
                message_id, reason = detail
                (out.nacks if kind == _NACK else out.conflicts).append((message_id, reason))
            elif kind == _AGAIN:
                out.answer_again(*detail)
            elif kind == _FRESH:
                new: _New = detail
                assert new.done, "a new message left without a verdict"
                rows.append((client_id, new.item.id, new.payload, now, new.verdict, new.digest))
                known[(client_id, new.item.id)] = (new.verdict, new.digest)
                out.decided(new.item.id, new.verdict)
            else:  # a repeat of a message first delivered in this same round
                message_id, digest = detail
                recorded = known.get((client_id, message_id))
                if recorded is None:  # the first one was not handled: try it next round
                    self.cut(index)
                    break
                if recorded[1] == digest:
                    out.answer_again(message_id, recorded[0])
                else:
                    out.conflicts.append((message_id, _conflict_reason(message_id)))
        if self.failed is not None:
            out.handler_failed = True
            out.close = self.failed
        elif self.stop is not None:
            out.unreached = self.count - self.stop
        else:
            out.close = self.close
        return self.peer, out


def _plan(
    peer: Peer,
    items: list[Item],
    known: dict[Key, Recorded],
    pending: dict[Key, _New],
    covers: Callable[[str, int], bool] | None = None,
) -> _Plan:
    """Sort one connection's items out before the batch handler runs (no I/O).

    A repeat of an id first delivered earlier in the same round (by this connection, or by
    another of the same client) is answered once that first delivery's outcome is known.
    ``covers``: is an id below the client's floor (handled and forgotten, see ``_apply``)?
    """
    plan = _Plan(peer, len(items))
    steps = plan.steps
    client_id = peer.client_id
    for index, item in enumerate(items):
        if isinstance(item, Malformed):
            steps.append((_NACK, index, (item.id, item.reason)))
            continue
        if isinstance(item, Close):
            plan.close = item
            break
        try:
            payload = encode_payload(item.data)
        except (TypeError, ValueError) as exc:  # the parse-time checks make this rare
            steps.append((_NACK, index, (item.id, f"cannot be stored: {clip(str(exc))}")))
            continue
        digest = payload_digest(payload)
        key = (client_id, item.id)
        recorded = known.get(key)
        if recorded is not None:
            if recorded[1] == digest:
                steps.append((_AGAIN, index, (item.id, recorded[0])))
            else:
                steps.append((_CONFLICT, index, (item.id, _conflict_reason(item.id))))
            continue
        if covers is not None and covers(client_id, item.id):
            if _renumbers(peer):
                steps.append((_CONFLICT, index, (item.id, _below_floor_reason(item.id))))
            else:
                steps.append((_AGAIN, index, (item.id, None)))
            continue
        first = pending.get(key)
        if first is not None:
            steps.append((_REPEAT, index, (item.id, digest)))
            if first.plan is not plan:  # its own first delivery failing stops it anyway
                plan.repeats.append((index, first))
            continue
        new = _New(plan, index, client_id, item, payload, digest)
        pending[key] = new
        steps.append((_FRESH, index, new))
        plan.fresh.append(new)
    return plan


def _handler_failure(exc: BaseException) -> bool:
    """Whether ``exc``, out of a handler, is the handler's failure (its message's 1011):
    any Exception, and a CancelledError while the writer itself is not being cancelled
    (the handler awaited something that was cancelled). A cancellation of the writer
    (``stop``), KeyboardInterrupt and SystemExit go on up."""
    if isinstance(exc, Exception):
        return True
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is not None and not task.cancelling()
    return False


def _epoch(peer: Peer) -> int | None:
    """The epoch the handshake claimed for this connection; None where nothing is fenced."""
    epoch: int | None = getattr(peer.ws, "outbox_epoch", None)
    return epoch


def _identities(superseded: set[Peer], batch: Batch) -> set[str]:
    """Identities none of whose connections in ``batch`` is current: their keys need no
    dedup (a current connection of the same identity keeps its keys)."""
    current = {peer.client_id for peer, _, _ in batch if peer not in superseded}
    return {peer.client_id for peer in superseded} - current


def _superseded() -> _Outcome:
    """A superseded connection: nothing handled, recorded or answered; closed with 4409."""
    return _Outcome(
        close=Close(SUPERSEDED, "superseded: this client id connected again; resend there"),
        superseded=True,
    )


def _conflict_reason(message_id: int) -> str:
    """The nack for a repeat of a recorded id with other content: never a duplicate ack,
    which would tell the client "handled" for a message nobody handled."""
    return (
        f"conflict: message id {message_id} was already received from this client with "
        "other content; an id must never be reused (was the outbox restored from a backup?)"
    )


def _renumbers(peer: Peer) -> bool:
    features = getattr(peer.ws, "outbox_features", ())
    return wire.FEATURE_ID_CONFLICT in features and wire.FEATURE_LOW_WATER in features


def _below_floor_reason(message_id: int) -> str:
    return (
        f"conflict: message id {message_id} is below this client's floor (handled and "
        "forgotten); this client announced a low-water mark above it, so it is not a resend "
        "(was the outbox restored from a backup?)"
    )


def _log_conflicts(peer: Peer, conflicts: list[tuple[int, str]]) -> None:
    """One WARNING per connection and transaction, however many ids conflicted."""
    ids = [message_id for message_id, _ in conflicts]
    peer_log.warning(
        "conflict: %s sent %d message id(s) already recorded under the same identity with "
        "other content (%s); refused with a nack, not acked as duplicates. A reused id: an "
        "outbox restored from a backup, or a peer sending under another's client id",
        describe_peer(peer.ws),
        len(ids),
        ", ".join(map(str, ids[:5])) + (", ..." if len(ids) > 5 else ""),
    )
