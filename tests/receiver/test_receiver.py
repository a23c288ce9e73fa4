"""The receiver end to end: real websockets clients on 127.0.0.1 port 0, real SQLite files.

Faults are real too: a client that closes before reading its ack, a second SQLite connection
holding the write lock, frames that break the protocol. Tests wait on conditions with
deadlines (``wait_until``), never on sleeps.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.frames import CloseCode

from outbox import Outbox
from outbox.errors import ProtocolError
from outbox.protocol import wire
from outbox.receiver import (
    ANONYMOUS_PREFIX,
    Close,
    ConnectRequest,
    Incoming,
    Malformed,
    Receiver,
    Refuse,
    Reject,
    Transaction,
    ack_frames,
    salvage,
    serve,
)

from ..raw_client import acks, batch, closed_with, features, headers, message, recv
from ..support import fast_options, wait_until


def inbox_rows(db: Path) -> list[tuple[str, int, str, str | None]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT client_id, message_id, payload, reject_reason FROM inbox "
            "ORDER BY client_id, message_id"
        ).fetchall()


class Recorder:
    """A handler that records each call; scripted by sets of ids, never by timing."""

    def __init__(self, *, write: bool = False) -> None:
        self.calls: list[tuple[str, int, Any]] = []
        self.fail_once: set[int] = set()
        self.reject: dict[int, str] = {}
        self.write = write

    async def __call__(self, message: Incoming) -> None:
        self.calls.append((message.client_id, message.id, message.data))
        if self.write:
            await message.tx.execute(
                "INSERT INTO effects (client_id, message_id) VALUES (?, ?)",
                (message.client_id, message.message_id),
            )
        if message.id in self.reject:
            raise Reject(self.reject[message.id])
        if message.id in self.fail_once:
            self.fail_once.discard(message.id)
            raise RuntimeError(f"handler bug on {message.id}")

    def ids(self, client_id: str | None = None) -> list[int]:
        return [i for c, i, _ in self.calls if client_id is None or c == client_id]


def effects(db: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT client_id, message_id FROM effects ORDER BY client_id, message_id"
        ).fetchall()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "inbox.db"


@pytest.fixture
def effects_db(db: Path) -> Path:
    """An inbox file that already holds the application's own table."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE effects (client_id TEXT, message_id INTEGER, "
            "UNIQUE (client_id, message_id))"
        )
    return db


@pytest.fixture
async def recorder_receiver(db: Path) -> AsyncIterator[tuple[Receiver, Recorder]]:
    recorder = Recorder()
    async with serve(recorder, db) as receiver:
        yield receiver, recorder


# ---------------------------------------------------------------------------------------------
# Sans I/O: frames to work, outcomes to frames
# ---------------------------------------------------------------------------------------------


def _salvage(frame: str | bytes) -> list[Any]:
    with pytest.raises(ProtocolError) as info:
        wire.parse_client_frame(frame)
    return salvage(frame, info.value)


def test_salvage_closes_binary_with_1003() -> None:
    [close] = _salvage(b'{"id": 1, "data": 2}')
    assert isinstance(close, Close) and close.code == CloseCode.UNSUPPORTED_DATA


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        "[1, 2]",
        '"text"',
        '{"data": 1}',
        '{"id": "7", "data": 1}',
        '{"id": 1.5, "data": 1}',
        '{"id": 0, "data": 1}',
        '{"id": true, "data": 1}',
        '{"type": "batch", "messages": []}',
        '{"type": "batch", "messages": [{"id": 1, "data": 1}, {"data": 2}]}',
    ],
)
def test_salvage_closes_with_1007_when_no_id_can_be_read(frame: str) -> None:
    [close] = _salvage(frame)
    assert isinstance(close, Close) and close.code == CloseCode.INVALID_DATA
    assert len(close.reason.encode()) <= 123


def test_salvage_nacks_what_has_an_id_and_keeps_good_batch_items() -> None:
    assert _salvage('{"id": 5}') == [Malformed(5, "malformed message: missing 'data'")]
    [nack] = _salvage('{"type": "nope", "id": 6, "data": 1}')
    assert isinstance(nack, Malformed) and nack.id == 6 and "nope" in nack.reason
    items = _salvage('{"type": "batch", "messages": [{"id": 1, "data": 1}, {"id": 2}]}')
    assert items == [wire.Message(1, 1), Malformed(2, "malformed message: missing 'data'")]


def test_ack_frames_follow_the_client_announcement() -> None:
    assert ack_frames([1, 2], [], batch=True) == ['{"type":"ack","messageIds":[1,2]}']
    assert ack_frames([1, 2], [(3, "no")], batch=False) == [
        '{"type":"ack","messageId":1}',
        '{"type":"ack","messageId":2}',
        '{"type":"nack","messageId":3,"reason":"no"}',
    ]
    assert ack_frames([], [], batch=True) == []


# ---------------------------------------------------------------------------------------------
# Protocol
# ---------------------------------------------------------------------------------------------


async def test_port_zero_gives_a_real_port_and_url(db: Path) -> None:
    async with serve(None, db, port=0) as receiver:
        assert receiver.port > 0
        assert receiver.url == f"ws://127.0.0.1:{receiver.port}/"


async def test_seed_client_gets_one_ack_per_message_and_json_pong(
    recorder_receiver: tuple[Receiver, Recorder], db: Path
) -> None:
    receiver, recorder = recorder_receiver
    async with connect(receiver.url) as ws:  # no headers at all, like a browser
        assert features(ws) == "batch"
        await ws.send(wire.PING_FRAME)
        assert await recv(ws) == {"type": "pong"}
        for i in (1, 2, 3):
            await ws.send(message(i, {"text": f"hello {i}"}))
        assert [await recv(ws) for _ in range(3)] == [
            {"type": "ack", "messageId": i} for i in (1, 2, 3)
        ]
    [client_id] = {c for c, _, _ in recorder.calls}
    assert client_id.startswith(ANONYMOUS_PREFIX)
    assert recorder.ids() == [1, 2, 3]
    assert [(i, json.loads(p)) for _, i, p, _ in inbox_rows(db)] == [
        (i, {"text": f"hello {i}"}) for i in (1, 2, 3)
    ]


async def test_batch_frame_is_one_transaction_and_one_batched_ack(
    recorder_receiver: tuple[Receiver, Recorder],
) -> None:
    receiver, recorder = recorder_receiver
    async with connect(receiver.url, additional_headers=headers("c1")) as ws:
        assert wire.parse_features(features(ws)) == {
            "batch",
            "batch-ack",
            "id-conflict",
            "low-water",
        }
        await ws.send(batch(range(1, 301)))
        frame = await recv(ws)
    assert frame == {"type": "ack", "messageIds": list(range(1, 301))}
    assert recorder.ids("c1") == list(range(1, 301))
    assert receiver.stats.transactions == 1
    assert receiver.stats.messages == 300


async def test_batch_without_batch_ack_gets_seed_acks(
    recorder_receiver: tuple[Receiver, Recorder],
) -> None:
    receiver, _ = recorder_receiver
    async with connect(receiver.url, additional_headers=headers("c1", "batch")) as ws:
        assert features(ws) == "batch"
        await ws.send(batch([1, 2, 3]))
        assert [await recv(ws) for _ in range(3)] == [
            {"type": "ack", "messageId": i} for i in (1, 2, 3)
        ]


# ---------------------------------------------------------------------------------------------
# Deduplication
# ---------------------------------------------------------------------------------------------


async def test_same_id_twice_is_acked_twice_and_handled_once(
    recorder_receiver: tuple[Receiver, Recorder],
) -> None:
    receiver, recorder = recorder_receiver
    async with connect(receiver.url, additional_headers=headers("c1")) as ws:
        await ws.send(message(1, "a"))
        assert await acks(ws, 1) == [1]
        await ws.send(message(1, "a"))
        assert await acks(ws, 1) == [1]
        # Duplicates inside one frame too (the same content: another would be a conflict).
        await ws.send(wire.encode_batch([(1, '"a"'), (2, '"b"'), (2, '"b"')]))
        assert await acks(ws, 3) == [1, 2, 2]
    assert recorder.ids() == [1, 2]
    assert receiver.stats.duplicates == 3


async def test_dedup_holds_across_reconnects(
    recorder_receiver: tuple[Receiver, Recorder],
) -> None:
    receiver, recorder = recorder_receiver
    for _ in range(3):
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([1, 2, 3]))
            assert await acks(ws, 3) == [1, 2, 3]
    assert recorder.ids() == [1, 2, 3]
    assert receiver.stats.duplicates == 6


async def test_dedup_holds_across_a_receiver_restart(db: Path) -> None:
    recorder = Recorder()
    async with (
        serve(recorder, db) as receiver,
        connect(receiver.url, additional_headers=headers("c1")) as ws,
    ):
        await ws.send(batch([1, 2]))
        assert await acks(ws, 2) == [1, 2]
    async with serve(recorder, db) as receiver:
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([1, 2, 3]))
            assert await acks(ws, 3) == [1, 2, 3]
        assert receiver.stats.duplicates == 2
    assert recorder.ids() == [1, 2, 3]


async def test_lost_ack_resend_is_acked_without_handling_again(
    recorder_receiver: tuple[Receiver, Recorder],
) -> None:
    receiver, recorder = recorder_receiver
    # The client sends, then goes away without reading: the ack is lost after the commit.
    async with connect(receiver.url, additional_headers=headers("c1")) as ws:
        await ws.send(message(7, "once"))
    await wait_until(lambda: receiver.stats.messages == 1)
    # It comes back and resends, as after any reconnect.
    async with connect(receiver.url, additional_headers=headers("c1")) as ws:
        await ws.send(message(7, "once"))
        assert await acks(ws, 1) == [7]
    assert recorder.calls == [("c1", 7, "once")]
    assert receiver.stats.duplicates == 1


async def test_anonymous_clients_dedup_only_within_one_connection(
    recorder_receiver: tuple[Receiver, Recorder],
) -> None:
    receiver, recorder = recorder_receiver
    for _ in range(2):
        async with connect(receiver.url) as ws:
            await ws.send(message(1, "x"))
            await ws.send(message(1, "x"))
            assert await acks(ws, 2) == [1, 1]
    assert recorder.ids() == [1, 1]  # once per connection: a page load restarts its ids
    assert len({c for c, _, _ in recorder.calls}) == 2


async def test_client_id_query_parameter_names_a_headerless_client(
    recorder_receiver: tuple[Receiver, Recorder],
) -> None:
    receiver, recorder = recorder_receiver
    for _ in range(2):
        async with connect(receiver.url + "?client_id=page-42") as ws:
            await ws.send(message(1, "x"))
            assert await acks(ws, 1) == [1]
    assert recorder.calls == [("page-42", 1, "x")]


async def test_unusable_client_id_is_refused_with_400(
    recorder_receiver: tuple[Receiver, Recorder],
) -> None:
    receiver, _ = recorder_receiver
    with pytest.raises(InvalidStatus) as info:
        await connect(receiver.url, additional_headers=headers("x" * 500))
    assert info.value.response.status_code == 400


# ---------------------------------------------------------------------------------------------
# Handlers: transactional form, errors, rejections, order
# ---------------------------------------------------------------------------------------------


async def test_transactional_handler_effect_is_exactly_once(effects_db: Path) -> None:
    recorder = Recorder(write=True)
    async with serve(recorder, effects_db) as receiver:
        for _ in range(2):
            async with connect(receiver.url, additional_headers=headers("c1")) as ws:
                await ws.send(batch([1, 2, 3]))
                await ws.send(message(2, {"n": 2}))
                assert await acks(ws, 4) == [1, 2, 3, 2]
    assert effects(effects_db) == [("c1", 1), ("c1", 2), ("c1", 3)]
    assert recorder.ids() == [1, 2, 3]


async def test_handler_error_closes_1011_after_acking_what_came_before(
    effects_db: Path,
) -> None:
    recorder = Recorder(write=True)
    recorder.fail_once = {3}
    async with serve(recorder, effects_db) as receiver:
        async with (
            connect(receiver.url, additional_headers=headers("c1")) as ws,
            connect(receiver.url, additional_headers=headers("other")) as bystander,
        ):
            await ws.send(batch([1, 2, 3, 4, 5]))
            assert await acks(ws, 2) == [1, 2]
            assert await closed_with(ws) == CloseCode.INTERNAL_ERROR
            # Other connections are not affected.
            await bystander.send(message(1, "fine"))
            assert await acks(bystander, 1) == [1]
        # The client reconnects and resends from its oldest un-acked message.
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([3, 4, 5]))
            assert await acks(ws, 3) == [3, 4, 5]
        assert receiver.stats.handler_errors == 1
    # Message 3's first attempt wrote through tx, then raised: that write was rolled back.
    assert recorder.ids("c1") == [1, 2, 3, 3, 4, 5]
    assert [i for c, i in effects(effects_db) if c == "c1"] == [1, 2, 3, 4, 5]


async def test_reject_nacks_and_a_resend_is_nacked_again_without_the_handler(
    effects_db: Path,
) -> None:
    recorder = Recorder(write=True)
    recorder.reject = {2: "order 2 is invalid"}
    async with serve(recorder, effects_db) as receiver:
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(batch([1, 2, 3]))
            assert await recv(ws) == {"type": "ack", "messageIds": [1, 3]}
            assert await recv(ws) == {
                "type": "nack",
                "messageId": 2,
                "reason": "order 2 is invalid",
            }
            await ws.send(message(2, {"n": 2}))
            assert wire.parse_server_frame(json.dumps(await recv(ws))) == wire.Nack(
                2, "order 2 is invalid"
            )
        assert receiver.stats.rejected == 1
        assert receiver.stats.nacks == 2
    assert recorder.ids() == [1, 2, 3]
    assert [(i, r) for _, i, _, r in inbox_rows(effects_db)] == [
        (1, None),
        (2, "order 2 is invalid"),
        (3, None),
    ]
    assert effects(effects_db) == [("c1", 1), ("c1", 3)]  # the rejected write rolled back


async def test_handle_refuses_use_after_the_handler_returned(db: Path) -> None:
    kept: list[Incoming] = []

    async def handler(message: Incoming) -> None:
        await message.tx.execute_fetchall("SELECT 1")
        kept.append(message)

    async with (
        serve(handler, db) as receiver,
        connect(receiver.url, additional_headers=headers("c1")) as ws,
    ):
        await ws.send(message(1, "x"))
        assert await acks(ws, 1) == [1]
    with pytest.raises(RuntimeError, match="transaction is over"):
        await kept[0].tx.execute("SELECT 1")


async def test_handler_that_commits_fails_the_group_with_1013(db: Path) -> None:
    async def handler(message: Incoming) -> None:
        await message.tx.execute("COMMIT")

    async with serve(handler, db) as receiver:
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(message(1, "x"))
            assert await closed_with(ws) == CloseCode.TRY_AGAIN_LATER
        assert receiver.stats.storage_errors == 1


async def test_two_connections_of_one_client_never_interleave(
    recorder_receiver: tuple[Receiver, Recorder],
) -> None:
    receiver, recorder = recorder_receiver
    ids = list(range(1, 201))

    async def send_all(ws: ClientConnection) -> list[int]:
        for i in ids:  # one message per frame, so the two connections' frames mix
            await ws.send(message(i, i))
        return await acks(ws, len(ids))

    async with (
        connect(receiver.url, additional_headers=headers("c1")) as a,
        connect(receiver.url, additional_headers=headers("c1")) as b,
    ):
        acked_a, acked_b = await asyncio.gather(send_all(a), send_all(b))
    assert sorted(acked_a) == sorted(acked_b) == ids
    assert recorder.ids() == ids  # each once, in id order
    assert receiver.stats.duplicates == len(ids)


async def test_fifty_clients_each_keep_their_order_and_dedup(
    recorder_receiver: tuple[Receiver, Recorder], db: Path
) -> None:
    receiver, recorder = recorder_receiver

    async def client(n: int) -> None:
        async with connect(receiver.url, additional_headers=headers(f"client-{n}")) as ws:
            for start in range(1, 41, 10):
                await ws.send(batch(range(start, start + 10)))
            await ws.send(batch(range(31, 46)))  # 31..40 again, then 41..45
            assert sorted(await acks(ws, 55)) == sorted([*range(1, 46), *range(31, 41)])

    await asyncio.gather(*(client(n) for n in range(50)))
    for n in range(50):
        assert recorder.ids(f"client-{n}") == list(range(1, 46))
    assert receiver.stats.messages == 50 * 45
    assert receiver.stats.duplicates == 50 * 10
    assert len(inbox_rows(db)) == 50 * 45
    assert receiver.stats.connections == 50


# ---------------------------------------------------------------------------------------------
# Storage failure
# ---------------------------------------------------------------------------------------------


async def test_locked_inbox_closes_1013_and_the_resend_succeeds(db: Path) -> None:
    recorder = Recorder()
    async with serve(recorder, db, busy_timeout=0.05) as receiver:
        blocker = sqlite3.connect(db, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            async with connect(receiver.url, additional_headers=headers("c1")) as ws:
                await ws.send(message(1, "x"))
                assert await closed_with(ws) == CloseCode.TRY_AGAIN_LATER
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        async with connect(receiver.url, additional_headers=headers("c1")) as ws:
            await ws.send(message(1, "x"))
            assert await acks(ws, 1) == [1]
        assert receiver.stats.storage_errors == 1
    assert recorder.ids() == [1]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x00binary", CloseCode.UNSUPPORTED_DATA),
        ("not json", CloseCode.INVALID_DATA),
        ("[1, 2, 3]", CloseCode.INVALID_DATA),
        ('{"data": 1}', CloseCode.INVALID_DATA),
        ('{"id": "1", "data": 1}', CloseCode.INVALID_DATA),
        ('{"id": -1, "data": 1}', CloseCode.INVALID_DATA),
        ('{"type": "batch", "messages": [{"id": 1, "data": 1}, {"data": 2}]}', 1007),
    ],
)
async def test_bad_frame_closes_that_connection_only(
    db: Path, frame: str | bytes, code: int
) -> None:
    recorder = Recorder()
    async with serve(recorder, db, max_size=4096) as receiver:
        async with (
            connect(receiver.url, additional_headers=headers("good")) as good,
            connect(receiver.url, additional_headers=headers("bad")) as bad,
        ):
            await bad.send(message(1, "first"))  # handled and acked before the close
            await bad.send(frame)
            assert await acks(bad, 1) == [1]
            assert await closed_with(bad) == code
            await good.send(message(1, "still served"))
            assert await acks(good, 1) == [1]
        assert receiver.stats.protocol_errors == 1
    assert recorder.ids("bad") == [1]


async def test_frame_over_max_size_closes_1009_that_connection_only(db: Path) -> None:
    async with serve(None, db, max_size=4096) as receiver:
        async with (
            connect(receiver.url, additional_headers=headers("good")) as good,
            connect(receiver.url, additional_headers=headers("bad")) as bad,
        ):
            await bad.send(message(1, "x" * 5000))
            assert await closed_with(bad) == CloseCode.MESSAGE_TOO_BIG
            await good.send(message(1, "still served"))
            assert await acks(good, 1) == [1]
        await wait_until(lambda: receiver.stats.protocol_errors == 1)
        assert receiver.stats.messages == 1


async def test_invalid_utf8_text_frame_closes_1007(
    recorder_receiver: tuple[Receiver, Recorder],
) -> None:
    receiver, _ = recorder_receiver
    async with connect(receiver.url) as ws:
        await ws.send(b'{"id": 1, "data": "\xff"}', text=True)
        assert await closed_with(ws) == CloseCode.INVALID_DATA
    await wait_until(lambda: receiver.stats.protocol_errors == 1)


async def test_malformed_message_with_an_id_is_nacked_and_the_connection_stays(
    recorder_receiver: tuple[Receiver, Recorder],
) -> None:
    receiver, recorder = recorder_receiver
    async with connect(receiver.url, additional_headers=headers("c1")) as ws:
        await ws.send('{"id": 1}')
        nack = await recv(ws)
        assert (nack["type"], nack["messageId"]) == ("nack", 1)
        assert "data" in nack["reason"]
        await ws.send('{"type": "batch", "messages": [{"id": 2, "data": 2}, {"id": 3}]}')
        assert await recv(ws) == {"type": "ack", "messageIds": [2]}
        assert (await recv(ws))["messageId"] == 3
        await ws.send(message(4, "fine"))
        assert await acks(ws, 1) == [4]
    assert recorder.ids() == [2, 4]
    assert receiver.stats.protocol_errors == 2


# ---------------------------------------------------------------------------------------------
# Authentication and TLS
# ---------------------------------------------------------------------------------------------


async def authenticate(request: ConnectRequest) -> str | None:
    token = request.headers.get("Authorization")
    if token is None:
        return None  # 401
    if token != "Bearer good":
        raise Refuse(403, "this token may not send here")
    return "alice"  # the principal; the claimed id is scoped under it


async def test_authenticate_names_the_client(db: Path) -> None:
    recorder = Recorder()
    async with serve(recorder, db, authenticate=authenticate) as receiver:
        extra = {**headers("laptop"), "Authorization": "Bearer good"}
        async with connect(receiver.url, additional_headers=extra) as ws:
            await ws.send(message(1, "x"))
            assert await acks(ws, 1) == [1]
    assert recorder.calls == [("alice/laptop", 1, "x")]


@pytest.mark.parametrize(("token", "status"), [(None, 401), ("Bearer bad", 403)])
async def test_authenticate_refuses_before_the_upgrade(
    db: Path, token: str | None, status: int
) -> None:
    recorder = Recorder()
    async with serve(recorder, db, authenticate=authenticate) as receiver:
        extra = headers("laptop")
        if token is not None:
            extra["Authorization"] = token
        with pytest.raises(InvalidStatus) as info:
            await connect(receiver.url, additional_headers=extra)
        assert info.value.response.status_code == status
        assert receiver.stats.refused == 1
        assert receiver.stats.connections == 0


async def test_tls_with_a_self_signed_certificate(db: Path) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    recorder = Recorder()
    async with serve(recorder, db, ssl=server_context) as receiver:
        assert receiver.url.startswith("wss://127.0.0.1:")
        async with connect(receiver.url, ssl=client_context) as ws:
            await ws.send(message(1, "secret"))
            assert await acks(ws, 1) == [1]
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(receiver.url, ssl=ssl.create_default_context())
    assert recorder.ids() == [1]


# ---------------------------------------------------------------------------------------------
# Shutdown
# ---------------------------------------------------------------------------------------------


async def test_close_says_service_restart_and_releases_the_file(db: Path) -> None:
    receiver = serve(None, db)
    await receiver.start()
    async with connect(receiver.url, additional_headers=headers("c1")) as ws:
        await ws.send(message(1, "x"))
        assert await acks(ws, 1) == [1]
        await receiver.close()
        assert await closed_with(ws) == CloseCode.SERVICE_RESTART
    await receiver.close()  # idempotent
    with sqlite3.connect(db) as conn:  # nothing left locked
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")


async def test_receiver_serves_the_outbox_client(tmp_path: Path, db: Path) -> None:
    from outbox import Outbox

    recorder = Recorder()
    async with (
        serve(recorder, db) as receiver,
        Outbox(tmp_path / "outbox.db", receiver.url) as box,
    ):
        ids = [await box.send({"n": n}) for n in range(200)]
        await box.wait_acked(ids[-1], timeout=10)
    assert recorder.ids() == ids
    assert recorder.calls[0][2] == {"n": 0}
    [client_id] = {c for c, _, _ in recorder.calls}
    assert not client_id.startswith(ANONYMOUS_PREFIX)  # the id stored in the client's file


async def test_small_backlog_slows_reading_without_losing_anything(db: Path) -> None:
    recorder = Recorder()
    async with (
        serve(recorder, db, max_backlog=5) as receiver,
        connect(receiver.url) as ws,  # seed-style: one ack frame per message
    ):
        for i in range(1, 501):
            await ws.send(message(i, i))
        assert await acks(ws, 500) == list(range(1, 501))
    assert recorder.ids() == list(range(1, 501))


async def test_close_cancels_a_stuck_handler_and_the_message_is_handled_after_restart(
    db: Path,
) -> None:
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(message: Incoming) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()  # a handler waiting on something that never comes
        except asyncio.CancelledError:
            cancelled.set()
            raise

    receiver = serve(stuck, db, close_timeout=0.2, drain_timeout=0.2)
    await receiver.start()
    async with connect(receiver.url, additional_headers=headers("c1")) as ws:
        await ws.send(message(1, "x"))
        await asyncio.wait_for(entered.wait(), 5)
        await asyncio.wait_for(receiver.close(), 5)
        assert await closed_with(ws) == CloseCode.SERVICE_RESTART
    assert cancelled.is_set()
    assert inbox_rows(db) == []  # rolled back, never acked

    recorder = Recorder()
    async with (
        serve(recorder, db) as receiver,
        connect(receiver.url, additional_headers=headers("c1")) as ws,
    ):
        await ws.send(message(1, "x"))
        assert await acks(ws, 1) == [1]
    assert recorder.ids() == [1]


async def test_a_port_in_use_fails_start_and_leaves_nothing_running(db: Path) -> None:
    async with serve(None, db) as first:
        before = asyncio.all_tasks()
        second = serve(None, db, port=first.port)
        with pytest.raises(OSError):
            await second.start()
        assert asyncio.all_tasks() == before  # its writer task is gone
        # The first receiver is unaffected, and the shared file has no lock left behind.
        async with connect(first.url, additional_headers=headers("c1")) as ws:
            await ws.send(message(1, "x"))
            assert await acks(ws, 1) == [1]


# -- setup= -----------------------------------------------------------------------------------


async def test_setup_creates_the_handlers_tables_before_the_first_message(
    tmp_path: Path,
) -> None:
    calls = 0

    async def setup(tx: Transaction) -> None:
        nonlocal calls
        calls += 1
        await tx.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER, n INTEGER)")

    async def handler(message: Incoming) -> None:
        await message.tx.execute(
            "INSERT INTO orders (id, n) VALUES (?, ?)", (message.id, message.data["n"])
        )

    for _ in range(2):  # IF NOT EXISTS: a restart runs it again harmlessly
        async with (
            Receiver(handler, tmp_path / "inbox.db", setup=setup) as receiver,
            Outbox(tmp_path / "o.db", receiver.url, **fast_options()) as box,
        ):
            await box.send({"n": 7})
            await box.drain(timeout=10)
    assert calls == 2
    with sqlite3.connect(tmp_path / "inbox.db") as conn:
        assert conn.execute("SELECT id, n FROM orders ORDER BY id").fetchall() == [(1, 7), (2, 7)]


async def test_a_failing_setup_fails_start_and_keeps_nothing(tmp_path: Path) -> None:
    async def setup(tx: Transaction) -> None:
        await tx.execute("CREATE TABLE half (x)")
        raise RuntimeError("setup went wrong")

    receiver = Receiver(None, tmp_path / "inbox.db", setup=setup)
    with pytest.raises(RuntimeError, match="setup went wrong"):
        await receiver.start()
    with sqlite3.connect(tmp_path / "inbox.db") as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "half" not in names and "inbox" in names
