"""Batch handlers end to end: ``serve(handler, db, batch=True)`` with real sockets and files.

Every round that must share one transaction is arranged with a gate (the handler holds the
writer on an event while the other frames are read, counted by ``stats.frames``), never by
timing. Effects go to a real table through ``batch.tx``, so "once" is read back from SQLite.
"""

from __future__ import annotations

import asyncio
import functools
import re
import sqlite3
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.frames import CloseCode

import outbox
from outbox import Outbox
from outbox.protocol import wire
from outbox.receiver import Batch, Incoming, Receiver, Reject, serve

from ..support import fast_options, wait_until
from .test_receiver import acks, batch, closed_with, effects, headers, inbox_rows, message, recv

INSERT = "INSERT INTO effects (client_id, message_id) VALUES (?, ?)"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """An inbox file that already holds the application's own table (unique per message,
    so a second effect of one message would fail loudly, not only be counted)."""
    path = tmp_path / "inbox.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE effects (client_id TEXT, message_id INTEGER, "
            "UNIQUE (client_id, message_id))"
        )
    return path


class BatchRecorder:
    """A batch handler that writes one effect row per accepted message with one
    ``executemany``; scripted by sets of ids, never by timing."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, int]]] = []
        self.reject: dict[int, str] = {}
        """Ids to refuse with ``batch.reject`` (not written)."""
        self.fail_once: set[tuple[str, int]] = set()
        """(client id, message id) whose presence in a batch makes it raise, once per key
        in a batch of one (a bug the handler's author then fixes)."""
        self.fail_always: set[int] = set()
        self.gate: asyncio.Event | None = None
        """If set, the first call waits for it (so the next round gathers every frame)."""
        self.entered = asyncio.Event()

    async def __call__(self, batch: Batch) -> None:
        self.calls.append([(m.client_id, m.id) for m in batch])
        if self.gate is not None:
            gate, self.gate = self.gate, None
            self.entered.set()
            await gate.wait()
        accepted = []
        for m in batch:
            if m.id in self.reject:
                batch.reject(m, self.reject[m.id])
            else:
                accepted.append((m.client_id, m.id))
        await batch.tx.executemany(INSERT, accepted)  # written first, so a raise must undo it
        for m in batch:
            if m.id in self.fail_always:
                raise RuntimeError(f"handler bug on {m.id}")
            if (m.client_id, m.id) in self.fail_once:
                if len(batch) == 1:
                    self.fail_once.discard((m.client_id, m.id))
                raise RuntimeError(f"handler bug on {m.client_id} {m.id}")

    def handled(self, client_id: str | None = None) -> list[int]:
        """Ids in the order of the calls (a retried message appears again)."""
        return [i for call in self.calls for c, i in call if client_id in (None, c)]


async def gather_round(
    receiver: Receiver, recorder: BatchRecorder, sends: Sequence[tuple[ClientConnection, str]]
) -> None:
    """Hold the writer in a first round, send ``sends``, then let the next round take them
    all in one transaction."""
    gate = recorder.gate = asyncio.Event()
    async with connect(receiver.url, additional_headers=headers("warm-up")) as warm:
        await warm.send(message(1, "warm"))
        await asyncio.wait_for(recorder.entered.wait(), 5)
        before = receiver.stats.frames
        for ws, frame in sends:
            await ws.send(frame)
        await wait_until(lambda: receiver.stats.frames == before + len(sends))
        gate.set()
        assert await acks(warm, 1) == [1]


# ---------------------------------------------------------------------------------------------
# Handled once, with effects
# ---------------------------------------------------------------------------------------------


async def test_outbox_clients_get_each_message_handled_once_with_its_effect(
    tmp_path: Path, db: Path
) -> None:
    recorder = BatchRecorder()
    async with serve(recorder, db, batch=True) as receiver:

        async def client(n: int) -> list[int]:
            async with Outbox(tmp_path / f"o{n}.db", receiver.url, **fast_options()) as box:
                ids = await box.send_many([{"n": i} for i in range(300)])
                await box.drain(timeout=10)
                return ids

        sent = await asyncio.gather(*(client(n) for n in range(4)))
        assert receiver.stats.messages == 1200
    clients = sorted({c for call in recorder.calls for c, _ in call})
    assert len(clients) == 4
    rows = effects(db)
    assert len(rows) == len(set(rows)) == 1200
    for client_id in clients:
        handled = recorder.handled(client_id)
        assert handled in sent  # each client's ids once each, in id order
        assert sorted(i for c, i in rows if c == client_id) == handled
    assert len(recorder.calls) < 1200 / 10  # batches, not one call per message


async def test_message_data_and_tx_in_a_batch(db: Path) -> None:
    seen: list[tuple[Any, bool, str]] = []

    async def handler(batch: Batch) -> None:
        assert len(batch) == 2 and list(batch) == [batch[0], batch[1]]
        assert list(batch[:1]) == [batch[0]]
        for m in batch:
            seen.append((m.data, m.tx is batch.tx, repr(m)))
        await batch[0].tx.execute_fetchall("SELECT 1")

    async with (
        serve(handler, db, batch=True) as receiver,
        connect(receiver.url, additional_headers=headers("c1")) as ws,
    ):
        await ws.send(wire.encode_batch([(1, '{"a": 1}'), (2, "[2]")]))
        assert await acks(ws, 2) == [1, 2]
    assert seen == [({"a": 1}, True, "<Incoming 'c1' #1>"), ([2], True, "<Incoming 'c1' #2>")]


async def test_duplicates_are_answered_without_the_handler(db: Path) -> None:
    recorder = BatchRecorder()
    async with serve(recorder, db, batch=True) as receiver:
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([1, 2, 3]))
            assert await acks(ws, 3) == [1, 2, 3]
            await ws.send(batch([2, 3, 4, 4]))  # resends, one new, and a repeat in the frame
            assert await acks(ws, 4) == [2, 3, 4, 4]
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([1, 2, 3, 4]))  # after a reconnect
            assert await acks(ws, 4) == [1, 2, 3, 4]
        assert receiver.stats.duplicates == 7
    assert recorder.calls == [[("c1", 1), ("c1", 2), ("c1", 3)], [("c1", 4)]]
    assert effects(db) == [("c1", i) for i in (1, 2, 3, 4)]


async def test_a_conflict_and_a_malformed_message_are_refused_and_left_out(db: Path) -> None:
    recorder = BatchRecorder()
    async with serve(recorder, db, batch=True) as receiver:
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(message(1, {"n": 1}))
            assert await acks(ws, 1) == [1]
            await ws.send(
                '{"type": "batch", "messages": [{"id": 1, "data": "other"}, {"id": 2}, '
                '{"id": 3, "data": 3}]}'
            )
            answers = [await recv(ws) for _ in range(3)]
        assert receiver.stats.conflicts == 1
    assert {"type": "ack", "messageIds": [3]} in answers
    nacked = {a["messageId"] for a in answers if a["type"] == "nack"}
    assert nacked == {1, 2}
    assert recorder.handled() == [1, 3]


async def test_two_connections_of_one_client_in_one_round_handle_each_id_once(
    db: Path,
) -> None:
    recorder = BatchRecorder()
    async with serve(recorder, db, batch=True) as receiver:
        async with (
            connect(receiver.url, additional_headers=headers("c1")) as a,
            connect(receiver.url, additional_headers=headers("c1")) as b,
        ):
            await gather_round(receiver, recorder, [(a, batch([1, 2, 3])), (b, batch([2, 3, 4]))])
            assert await acks(a, 3) == [1, 2, 3]
            assert await acks(b, 3) == [2, 3, 4]
        assert receiver.stats.duplicates == 2
    assert recorder.handled("c1") == [1, 2, 3, 4]
    assert [i for c, i in effects(db) if c == "c1"] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# Rejections
# ---------------------------------------------------------------------------------------------


async def test_reject_one_of_many_nacks_it_alone_and_a_resend_is_nacked_again(
    db: Path,
) -> None:
    recorder = BatchRecorder()
    recorder.reject = {3: "order 3 is invalid"}
    async with serve(recorder, db, batch=True) as receiver:
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch(range(1, 6)))
            assert await recv(ws) == {"type": "ack", "messageIds": [1, 2, 4, 5]}
            assert await recv(ws) == {
                "type": "nack",
                "messageId": 3,
                "reason": "order 3 is invalid",
            }
            await ws.send(batch([3]))
            assert await recv(ws) == {
                "type": "nack",
                "messageId": 3,
                "reason": "order 3 is invalid",
            }
        assert (receiver.stats.rejected, receiver.stats.nacks) == (1, 2)
    assert recorder.handled() == [1, 2, 3, 4, 5]  # the resend did not reach the handler
    assert [(i, r) for _, i, _, r in inbox_rows(db)] == [
        (1, None),
        (2, None),
        (3, "order 3 is invalid"),
        (4, None),
        (5, None),
    ]
    assert effects(db) == [("c1", i) for i in (1, 2, 4, 5)]


async def test_writes_made_for_a_rejected_message_are_kept(db: Path) -> None:
    """The documented choice: the transaction is shared, so reject decides the answer only."""

    async def handler(batch: Batch) -> None:
        await batch.tx.executemany(INSERT, [(m.client_id, m.id) for m in batch])
        batch.reject(batch[1], "")

    async with (
        serve(handler, db, batch=True) as receiver,
        connect(receiver.url, additional_headers=headers("c1")) as ws,
    ):
        await ws.send(batch([1, 2]))
        assert await recv(ws) == {"type": "ack", "messageIds": [1]}
        assert await recv(ws) == {
            "type": "nack",
            "messageId": 2,
            "reason": "rejected by the receiver",
        }
    assert effects(db) == [("c1", 1), ("c1", 2)]


async def test_raising_reject_from_a_batch_retries_it_and_rejects_that_message(
    db: Path,
) -> None:
    calls: list[list[int]] = []

    async def handler(batch: Batch) -> None:
        calls.append([m.id for m in batch])
        await batch.tx.executemany(INSERT, [(m.client_id, m.id) for m in batch])
        for m in batch:
            if m.data == {"n": 2}:
                raise Reject("no twos")

    async with serve(handler, db, batch=True) as receiver:
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([1, 2, 3]))
            assert await recv(ws) == {"type": "ack", "messageIds": [1, 3]}
            assert await recv(ws) == {"type": "nack", "messageId": 2, "reason": "no twos"}
            await ws.send(batch([4]))  # the connection stays open
            assert await acks(ws, 1) == [4]
        assert receiver.stats.handler_errors == 0
    assert calls == [[1, 2, 3], [1], [2], [3], [4]]
    assert effects(db) == [("c1", i) for i in (1, 3, 4)]  # the batch's writes were undone


async def test_reject_refuses_a_stranger_and_a_late_call(db: Path) -> None:
    kept: list[Batch] = []
    errors: list[Exception] = []

    async def handler(batch: Batch) -> None:
        kept.append(batch)
        stranger = Incoming("c1", batch[0].id, batch[0].data, batch[0]._inbox)
        for bad in (lambda: batch.reject(stranger, "x"), lambda: batch.reject(batch[0], 7)):
            try:
                bad()
            except (TypeError, ValueError) as exc:
                errors.append(exc)

    async with (
        serve(handler, db, batch=True) as receiver,
        connect(receiver.url, additional_headers=headers("c1")) as ws,
    ):
        await ws.send(message(1, "x"))
        assert await acks(ws, 1) == [1]
    assert [type(e) for e in errors] == [ValueError, TypeError]
    assert "not a message of this batch" in str(errors[0])
    with pytest.raises(RuntimeError, match="batch is over"):
        kept[0].reject(kept[0][0], "late")
    with pytest.raises(RuntimeError, match="transaction is over"):
        await kept[0].tx.execute("SELECT 1")


# ---------------------------------------------------------------------------------------------
# A handler that raises
# ---------------------------------------------------------------------------------------------


async def test_raise_in_the_middle_fails_only_the_culprits_connection(db: Path) -> None:
    recorder = BatchRecorder()
    recorder.fail_once = {("b", 3)}
    async with serve(recorder, db, batch=True) as receiver:
        async with (
            connect(receiver.url, additional_headers=headers("a")) as a,
            connect(receiver.url, additional_headers=headers("b")) as b,
            connect(receiver.url, additional_headers=headers("c")) as c,
        ):
            transactions = receiver.stats.transactions
            await gather_round(
                receiver,
                recorder,
                [(a, batch([1, 2, 3])), (b, batch([1, 2, 3, 4, 5])), (c, batch([1, 2]))],
            )
            assert await acks(b, 2) == [1, 2]  # what came before the culprit
            assert await closed_with(b) == CloseCode.INTERNAL_ERROR
            assert await acks(a, 3) == [1, 2, 3]
            assert await acks(c, 2) == [1, 2]
            await c.send(batch([3]))  # the others go on
            assert await acks(c, 1) == [3]
            # All three shared one transaction (after the warm-up's), the retry included.
            assert receiver.stats.transactions == transactions + 3
        # The handler is fixed (fail_once): the client resends from its oldest un-acked.
        async with connect(receiver.url, additional_headers=headers("b")) as b:
            await b.send(batch([3, 4, 5]))
            assert await acks(b, 3) == [3, 4, 5]
        assert receiver.stats.handler_errors == 1
    everyone = [("a", i) for i in (1, 2, 3)] + [("b", i) for i in (1, 2, 3)] + [("b", 4)]
    shared = [*everyone, ("b", 5), ("c", 1), ("c", 2)]
    assert recorder.calls[1] == shared  # one batch for the round, in each client's order
    # then one at a time up to the culprit; b's later messages are not handled
    assert recorder.calls[2:9] == [[k] for k in everyone[:6]] + [[("c", 1)]]
    assert recorder.calls[9] == [("c", 2)]
    assert recorder.handled("b")[-3:] == [3, 4, 5]  # the resend, handled once
    rows = effects(db)
    assert rows == sorted(
        [("warm-up", 1), *[("a", i) for i in (1, 2, 3)], *[("b", i) for i in range(1, 6)]]
        + [("c", i) for i in (1, 2, 3)]
    )  # each once (the UNIQUE constraint would have failed a second one)


async def test_outbox_clients_through_many_failures_get_every_effect_once(
    tmp_path: Path, db: Path
) -> None:
    """Real clients, a handler that fails once on every 37th message of each: each failure
    costs a shared batch, a retry and a 1011 reconnect, and loses or doubles nothing."""
    recorder = BatchRecorder()
    async with serve(recorder, db, batch=True) as receiver:

        async def client(n: int) -> tuple[str, list[int]]:
            async with Outbox(tmp_path / f"o{n}.db", receiver.url, **fast_options()) as box:
                # A fresh outbox numbers its messages from 1: poison them before sending.
                recorder.fail_once |= {(box.client_id, i) for i in range(37, 151, 37)}
                ids = await box.send_many([{"n": i} for i in range(150)])
                assert ids == list(range(1, 151))
                await box.drain(timeout=20)
                assert box.stats().dead == 0
                return box.client_id, ids

        sent = dict(await asyncio.gather(*(client(n) for n in range(5))))
        assert receiver.stats.handler_errors == 5 * 4  # each poisoned message failed once
    rows = effects(db)
    assert sorted(rows) == sorted((c, i) for c, ids in sent.items() for i in ids)
    assert len(rows) == len(set(rows)) == 750  # once each (also UNIQUE in the table)
    for client_id, ids in sent.items():
        first_seen = list(dict.fromkeys(recorder.handled(client_id)))
        assert first_seen == ids  # each client's messages first handled in id order


async def test_a_handler_that_always_fails_stalls_its_client_only(db: Path) -> None:
    recorder = BatchRecorder()
    recorder.fail_always = {2}
    async with serve(recorder, db, batch=True) as receiver:
        for _ in range(2):  # every resend meets the same bug, and is never handled half-way
            async with connect(receiver.url, additional_headers=headers("c1")) as ws:
                await ws.send(batch([1, 2, 3]))
                assert await closed_with(ws) == CloseCode.INTERNAL_ERROR
        async with connect(receiver.url, additional_headers=headers("other")) as ws:
            await ws.send(batch([5, 6]))
            assert await acks(ws, 2) == [5, 6]
        assert receiver.stats.handler_errors == 2
    assert [(i, r) for c, i, _, r in inbox_rows(db) if c == "c1"] == [(1, None)]
    assert effects(db) == [("c1", 1), ("other", 5), ("other", 6)]


async def test_the_retry_respects_max_transaction_time(db: Path) -> None:
    """With no time at all, the retry handles one message per transaction; the rest goes
    back to the head of the queue and is handled, once, in the next one."""
    recorder = BatchRecorder()
    recorder.fail_once = {("c1", 5)}
    async with (
        serve(recorder, db, batch=True, max_transaction_time=1e-9) as receiver,
        connect(receiver.url, additional_headers=headers("c1")) as ws,
    ):
        await ws.send(batch(range(1, 6)))
        assert await acks(ws, 1) == [1]
        assert await acks(ws, 2) == [2, 3]  # the next round's batch failed on 5 again
        assert await acks(ws, 1) == [4]
        assert await closed_with(ws) == CloseCode.INTERNAL_ERROR
    assert effects(db) == [("c1", i) for i in (1, 2, 3, 4)]
    assert [[i for _, i in call] for call in recorder.calls] == [
        [1, 2, 3, 4, 5],
        [1],
        [2, 3, 4, 5],
        [2],
        [3, 4, 5],
        [3],
        [4, 5],
        [4],
        [5],
    ]


async def test_a_repeat_of_a_failed_first_delivery_waits_for_the_next_round(db: Path) -> None:
    """Two connections of one client: the first delivery of 2 fails on one, so the other's
    copy of 2 is not answered from it; it goes back to its queue and is handled next."""
    recorder = BatchRecorder()
    recorder.fail_once = {("c1", 2)}
    async with serve(recorder, db, batch=True) as receiver:
        async with (
            connect(receiver.url, additional_headers=headers("c1")) as a,
            connect(receiver.url, additional_headers=headers("c1")) as b,
        ):
            await gather_round(receiver, recorder, [(a, batch([1, 2, 3])), (b, batch([2, 3]))])
            assert await acks(a, 1) == [1]
            assert await closed_with(a) == CloseCode.INTERNAL_ERROR
            assert await acks(b, 2) == [2, 3]
        assert receiver.stats.handler_errors == 1
    assert [call for call in recorder.calls if ("c1", 3) in call][-1] == [("c1", 2), ("c1", 3)]
    assert [i for c, i in effects(db) if c == "c1"] == [1, 2, 3]


async def test_a_bad_frame_after_good_messages_closes_after_acking_them(db: Path) -> None:
    recorder = BatchRecorder()
    async with (
        serve(recorder, db, batch=True) as receiver,
        connect(receiver.url, additional_headers=headers("good")) as good,
        connect(receiver.url, additional_headers=headers("bad")) as bad,
    ):
        await gather_round(receiver, recorder, [(bad, batch([1, 2])), (bad, "not json")])
        assert await acks(bad, 2) == [1, 2]
        assert await closed_with(bad) == CloseCode.INVALID_DATA
        await good.send(batch([1]))
        assert await acks(good, 1) == [1]
    assert [i for c, i in effects(db) if c == "bad"] == [1, 2]


async def test_close_cancels_a_stuck_batch_handler_and_nothing_is_kept(db: Path) -> None:
    entered = asyncio.Event()

    async def stuck(batch: Batch) -> None:
        await batch.tx.executemany(INSERT, [(m.client_id, m.id) for m in batch])
        entered.set()
        await asyncio.Event().wait()  # waiting on something that never comes

    receiver = serve(stuck, db, batch=True, close_timeout=0.2, drain_timeout=0.2)
    await receiver.start()
    async with connect(receiver.url, additional_headers=headers("c1")) as ws:
        await ws.send(batch([1, 2]))
        await asyncio.wait_for(entered.wait(), 5)
        await asyncio.wait_for(receiver.close(), 5)
        assert await closed_with(ws) == CloseCode.SERVICE_RESTART
    assert inbox_rows(db) == [] and effects(db) == []  # rolled back, never acked
    recorder = BatchRecorder()
    async with (
        serve(recorder, db, batch=True) as receiver,
        connect(receiver.url, additional_headers=headers("c1")) as ws,
    ):
        await ws.send(batch([1, 2]))
        assert await acks(ws, 2) == [1, 2]
    assert effects(db) == [("c1", 1), ("c1", 2)]


@pytest.mark.parametrize("statement", ["COMMIT", "ROLLBACK"])
async def test_a_handler_that_ends_the_transaction_is_detected(db: Path, statement: str) -> None:
    async def handler(batch: Batch) -> None:
        await batch.tx.execute(statement)

    async with serve(handler, db, batch=True) as receiver:
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([1, 2]))
            assert await closed_with(ws) == CloseCode.TRY_AGAIN_LATER
        assert receiver.stats.storage_errors == 1
        assert receiver.stats.messages == 0
    assert inbox_rows(db) == []


# ---------------------------------------------------------------------------------------------
# Order
# ---------------------------------------------------------------------------------------------


async def test_each_client_keeps_its_order_across_batches(db: Path) -> None:
    recorder = BatchRecorder()
    async with serve(recorder, db, batch=True, max_transaction_messages=64) as receiver:

        async def client(n: int) -> None:
            async with connect(receiver.url, additional_headers=headers(f"c{n}")) as ws:
                for start in range(1, 201, 25):
                    await ws.send(batch(range(start, start + 25)))
                assert sorted(await acks(ws, 200)) == list(range(1, 201))

        await asyncio.gather(*(client(n) for n in range(10)))
    for n in range(10):
        assert recorder.handled(f"c{n}") == list(range(1, 201))
    assert all(len(call) <= 64 for call in recorder.calls)
    assert len(effects(db)) == 2000


# ---------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------


def sync_handler(batch: Batch) -> None:
    pass


class SyncCallable:
    def __call__(self, batch: Batch) -> None:
        pass


class AsyncCallable:
    async def __call__(self, batch: Batch) -> None:
        pass


async def async_handler(batch: Batch, extra: int = 0) -> None:
    pass


@pytest.mark.parametrize("handler", [sync_handler, SyncCallable(), lambda batch: None])
@pytest.mark.parametrize("batch_mode", [True, False])
def test_a_non_async_handler_is_refused_at_construction(
    db: Path, handler: Any, batch_mode: bool
) -> None:
    with pytest.raises(TypeError, match=r"not an async function.*async def"):
        serve(handler, db, batch=batch_mode)


def test_bad_batch_arguments_are_refused_at_construction(db: Path) -> None:
    with pytest.raises(TypeError, match="batch must be True or False, got int"):
        serve(async_handler, db, batch=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch=True needs a handler"):
        serve(None, db, batch=True)
    with pytest.raises(TypeError, match=r"handler must be an async function.*got str"):
        serve("handler", db)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "handler", [async_handler, AsyncCallable(), functools.partial(async_handler, extra=1)]
)
def test_async_callables_are_accepted(db: Path, handler: Any) -> None:
    serve(handler, db, batch=True)


def test_batch_is_exported_from_the_top() -> None:
    assert outbox.Batch is Batch


# ---------------------------------------------------------------------------------------------
# The README's example
# ---------------------------------------------------------------------------------------------


def readme_example() -> str:
    """The batch handler block of README.md ("The receiver"), indented in its list item."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```$", readme, re.M | re.S)
    found = [textwrap.dedent(body) for _, body in blocks if "batch=True" in body]
    assert len(found) == 1, found
    return found[0]


async def test_the_readme_example_runs(tmp_path: Path) -> None:
    namespace: dict[str, Any] = {}
    exec(readme_example(), namespace)  # defines setup and handle, builds (not starts) a receiver
    async with (
        serve(
            namespace["handle"], tmp_path / "inbox.db", batch=True, setup=namespace["setup"]
        ) as receiver,
        Outbox(tmp_path / "o.db", receiver.url, **fast_options()) as box,
    ):
        good, bad, other = await box.send_many([{"n": 1}, {"m": 2}, {"n": 3}])
        await box.drain(timeout=10)
        with pytest.raises(outbox.MessageDeadError, match="order without n"):
            await box.wait_acked(bad, timeout=1)
    with sqlite3.connect(tmp_path / "inbox.db") as conn:
        rows = conn.execute("SELECT id, n FROM orders ORDER BY id").fetchall()
    assert rows == [(good, 1), (other, 3)]
