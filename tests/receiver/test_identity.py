"""Who a message is from, and when a repeat is really a repeat: spoofed client ids, two
devices of one user, a restored outbox file. Real Outbox clients and a real receiver on
127.0.0.1 port 0, real SQLite files in tmp_path.

Each scenario asks the same thing at the end: was every message of the honest client
handled exactly once, and was none acked without being handled?
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from outbox import Outbox
from outbox.protocol import wire
from outbox.receiver import ConnectRequest, Incoming, Receiver, serve
from outbox.receiver.handshake import dedup_key

from ..support import wait_until

FAST: dict[str, Any] = {
    "reconnect_interval": 0.01,
    "reconnect_max_interval": 0.05,
    "ack_timeout": 2.0,
    "heartbeat_interval": 5.0,
    "acked_retention": None,
}

NOWHERE = "ws://127.0.0.1:9/"
"""A URL nothing listens on: an Outbox opened with it queues its messages on disk."""


class Handled:
    """A handler recording every message it was called with (client id, id, data)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, Any]] = []

    async def __call__(self, message: Incoming) -> None:
        self.calls.append((message.client_id, message.id, message.data))

    def payloads(self, client_id: str | None = None) -> list[Any]:
        return [d for c, _, d in self.calls if client_id is None or c == client_id]


def statuses(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM outbox GROUP BY status"))


def dead_reasons(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [r for (r,) in conn.execute("SELECT last_error FROM outbox WHERE status = 'dead'")]


async def queue_offline(db: Path, payloads: list[Any]) -> str:
    """Commit ``payloads`` to the outbox with no receiver reachable; return its client id."""
    async with Outbox(db, NOWHERE, **FAST) as outbox:
        for payload in payloads:
            await outbox.send(payload)
        return outbox.client_id


async def deliver(db: Path, url: str, **options: Any) -> Outbox:
    """Open the outbox against ``url`` and wait until nothing is pending."""
    outbox = await Outbox(db, url, **{**FAST, **options}).open()
    await outbox.drain(timeout=10)
    return outbox


async def spoof(url: str, claimed: str, count: int, headers: dict[str, str] | None = None) -> None:
    """A peer claiming someone else's client id sends ids 1..count first (seed frames)."""
    extra = {wire.CLIENT_ID_HEADER: claimed, **(headers or {})}
    async with connect(url, additional_headers=extra) as ws:
        for n in range(1, count + 1):
            await ws.send(wire.encode_message(n, f'"spoof {n}"'))
        acked = 0
        while acked < count:
            async with asyncio.timeout(5):
                frame = wire.parse_server_frame(await ws.recv())
            assert isinstance(frame, wire.Ack)
            acked += len(frame.ids)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    return tmp_path / "inbox.db"


@pytest.fixture
async def handled() -> Handled:
    return Handled()


# ---------------------------------------------------------------------------------------------
# A: the client id is a claim
# ---------------------------------------------------------------------------------------------


async def test_a_spoofer_without_authentication_cannot_make_the_victim_lose_messages(
    tmp_path: Path, inbox: Path, handled: Handled, caplog: pytest.LogCaptureFixture
) -> None:
    victim_db = tmp_path / "victim.db"
    payloads = [{"victim": n} for n in range(1, 51)]
    victim = await queue_offline(victim_db, payloads)  # ids 1..50, waiting on disk
    async with serve(handled, inbox) as receiver:
        await spoof(receiver.url, victim, 50)  # the spoofer's ids 1..50 come first
        caplog.set_level(logging.WARNING, "outbox.receiver")
        outbox = await deliver(victim_db, receiver.url)
        await outbox.close()
        conflicts = receiver.stats.conflicts
    # Refused as conflicts, never acked as duplicates; the client then renumbered them.
    assert conflicts == 50
    assert handled.payloads(victim).count({"victim": 1}) == 1
    assert sorted(handled.payloads(victim), key=str) == sorted(
        payloads + [f"spoof {n}" for n in range(1, 51)], key=str
    )
    assert statuses(victim_db) == {"acked": 50}
    warnings = [r.getMessage() for r in caplog.records if "conflict" in r.getMessage()]
    assert warnings and victim in warnings[0] and "unauthenticated" in warnings[0]


async def test_a_seed_client_gets_a_conflict_nack_not_a_duplicate_ack(
    inbox: Path, handled: Handled
) -> None:
    async with serve(handled, inbox) as receiver:
        await spoof(receiver.url, "victim", 3)
        # A client that did not announce id-conflict: a plain nack it marks dead, loudly.
        async with connect(
            receiver.url, additional_headers={wire.CLIENT_ID_HEADER: "victim"}
        ) as ws:
            assert ws.response is not None
            assert wire.HIGH_WATER_HEADER not in ws.response.headers
            await ws.send(wire.encode_message(1, '"real 1"'))
            await ws.send(wire.encode_message(1, '"spoof 1"'))  # the same message again
            async with asyncio.timeout(5):
                answers = [wire.parse_server_frame(await ws.recv()) for _ in range(2)]
        (nack,) = [a for a in answers if isinstance(a, wire.Nack)]
        (ack,) = [a for a in answers if isinstance(a, wire.Ack)]
        assert nack.id == 1 and not nack.conflict
        assert "conflict" in nack.reason and "other content" in nack.reason
        assert ack == wire.Ack((1,))
        assert receiver.stats.conflicts == 1
        assert receiver.stats.duplicates == 1
    assert handled.payloads() == ["spoof 1", "spoof 2", "spoof 3"]


def by_token(tokens: dict[str, str]) -> Any:
    """An authenticate hook: the bearer token names the principal (None: 401)."""

    async def authenticate(request: ConnectRequest) -> str | None:
        header = request.headers.get("Authorization") or ""
        return tokens.get(header.removeprefix("Bearer "))

    return authenticate


TOKENS = {"alice-token": "alice", "mallory-token": "mallory"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_with_authentication_a_spoofer_cannot_reach_the_victims_records(
    tmp_path: Path, inbox: Path, handled: Handled
) -> None:
    victim_db = tmp_path / "victim.db"
    payloads = [{"victim": n} for n in range(1, 51)]
    victim = await queue_offline(victim_db, payloads)
    async with serve(handled, inbox, authenticate=by_token(TOKENS)) as receiver:
        # Mallory proves she is mallory, then claims alice's device id.
        await spoof(receiver.url, victim, 50, bearer("mallory-token"))
        outbox = await deliver(victim_db, receiver.url, additional_headers=bearer("alice-token"))
        await outbox.close()
        assert receiver.stats.conflicts == 0
    alice, mallory = dedup_key("alice", victim), dedup_key("mallory", victim)
    assert handled.payloads(alice) == payloads  # every one, in order, once
    assert handled.payloads(mallory) == [f"spoof {n}" for n in range(1, 51)]  # hers, handled
    assert statuses(victim_db) == {"acked": 50}


async def test_two_devices_of_one_user_never_collide(
    tmp_path: Path, inbox: Path, handled: Handled
) -> None:
    phone, laptop = tmp_path / "phone.db", tmp_path / "laptop.db"
    await queue_offline(phone, [{"phone": n} for n in range(20)])
    await queue_offline(laptop, [{"laptop": n} for n in range(20)])
    # The hook returns the user, nothing else: both devices send ids 1..20 as alice.
    async with serve(handled, inbox, authenticate=by_token(TOKENS)) as receiver:
        first, second = await asyncio.gather(
            deliver(phone, receiver.url, additional_headers=bearer("alice-token")),
            deliver(laptop, receiver.url, additional_headers=bearer("alice-token")),
        )
        await first.close()
        await second.close()
        assert receiver.stats.conflicts == 0
        assert receiver.stats.duplicates == 0
    assert len(handled.calls) == 40
    assert {c.split("/", 1)[0] for c, _, _ in handled.calls} == {"alice"}
    assert statuses(phone) == statuses(laptop) == {"acked": 20}


async def test_two_client_id_headers_get_400(inbox: Path) -> None:
    async with serve(None, inbox) as receiver:
        with pytest.raises(InvalidStatus) as info:
            await connect(
                receiver.url,
                additional_headers=[(wire.CLIENT_ID_HEADER, "a"), (wire.CLIENT_ID_HEADER, "b")],
            )
        assert info.value.response.status_code == 400
        assert b"one Outbox-Client-Id" in info.value.response.body
        assert receiver.stats.refused == 1


async def test_trusting_claimed_ids_is_logged_at_start(
    inbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "outbox.receiver")
    async with serve(None, inbox):
        pass
    assert any("trusted" in r.getMessage() for r in caplog.records)
    caplog.clear()
    async with serve(None, inbox, authenticate=by_token(TOKENS)):
        pass
    assert not any("trusted" in r.getMessage() for r in caplog.records)


def test_dedup_keys_are_unambiguous() -> None:
    assert dedup_key(None, "laptop") == "laptop"  # unauthenticated: the claim, as before
    assert dedup_key("alice", "laptop") == "alice/laptop"
    # A principal cannot be chosen so that its key lands in another principal's space.
    assert dedup_key("alice/laptop", "x") != dedup_key("alice", "laptop/x")
    assert dedup_key("a%2Fb", "c") != dedup_key("a/b", "c")


# ---------------------------------------------------------------------------------------------
# B: a restored outbox file
# ---------------------------------------------------------------------------------------------


def restore(backup: Path, db: Path) -> None:
    """Put a backup back in place of a closed outbox file, as an operator would."""
    shutil.copy(backup, db)
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


@pytest.fixture
async def receiver(inbox: Path, handled: Handled) -> AsyncIterator[Receiver]:
    async with serve(handled, inbox) as rx:
        yield rx


@pytest.mark.parametrize("offline", [True, False], ids=["queued-offline", "sent-online"])
async def test_a_restored_backup_loses_no_new_message(
    tmp_path: Path, receiver: Receiver, handled: Handled, offline: bool
) -> None:
    db, backup = tmp_path / "outbox.db", tmp_path / "backup.db"
    outbox = await deliver(db, receiver.url)
    await outbox.send_many([{"before backup": n} for n in range(10)])
    await outbox.drain(timeout=10)
    await outbox.close()
    shutil.copy(db, backup)  # closed: the WAL is checkpointed into the main file
    outbox = await deliver(db, receiver.url)
    await outbox.send_many([{"after backup": n} for n in range(20)])
    await outbox.drain(timeout=10)
    await outbox.close()
    restore(backup, db)  # older ids, the same client id

    new = [{"after restore": n} for n in range(30)]
    if offline:
        await queue_offline(db, new)  # ids 11..40: all taken at the receiver
        outbox = await deliver(db, receiver.url)
    else:
        outbox = await deliver(db, receiver.url)
        await wait_until(lambda: outbox.state.value == "connected")
        # The session raises the id sequence past the receiver's high-water mark (30) just
        # after connecting; wait for it, or a send racing with it would get conflicting ids.
        await wait_until(
            lambda: (
                outbox.stats().pending == 0
                and outbox._store is not None
                and outbox._store.max_id >= 30
            )
        )
        await outbox.send_many(new)
        await outbox.drain(timeout=10)
    await outbox.close()
    everything = handled.payloads()
    assert all(everything.count(p) == 1 for p in new)  # each new one handled, once
    assert len(everything) == 60
    assert statuses(db).get("dead", 0) == 0
    # Offline, ids 11..40 were given out before the receiver could say its high-water mark
    # (30): 11..30 conflict and are renumbered. Online, new ids start past 30 at once.
    assert receiver.stats.conflicts == (20 if offline else 0)
