"""Found by an adversarial review of the issue 9 fixes; each failed before its fix.

Real receiver (``outbox.serve``) on 127.0.0.1 port 0, real ``Outbox``, SQLite in tmp_path.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from outbox import Outbox
from outbox.errors import OutboxError
from outbox.protocol import wire
from outbox.receiver import Incoming, serve

from ..support import fast_options, wait_until

FAST: dict[str, Any] = fast_options()


async def test_hostile_id_past_2_64_does_not_reconnect_other_clients(tmp_path: Path) -> None:
    async def handler(message: Incoming) -> None:
        await asyncio.sleep(0.02)  # each round lasts, so the hostile frames share rounds

    async with (
        serve(handler, tmp_path / "inbox.db", host="127.0.0.1", port=0) as rx,
        Outbox(tmp_path / "victim.db", rx.url, **FAST) as victim,
    ):
        await victim.send({"n": 0})
        await victim.drain(timeout=5)

        async def hostile() -> None:
            for _ in range(5):
                try:
                    async with connect(
                        rx.url, additional_headers={wire.CLIENT_ID_HEADER: "evil"}
                    ) as ws:
                        for j in range(20):
                            await ws.send(f'{{"id":{2**64 + j},"data":1}}')
                            await asyncio.sleep(0.01)
                except Exception:
                    pass

        await victim.send_many([{"n": i + 1} for i in range(100)])  # a 2 s backlog
        await hostile()
        await victim.drain(timeout=10)
        reconnects = victim.stats().counters.reconnects
    assert reconnects == 0


async def test_a_spoofed_max_id_does_not_brick_the_victims_outbox(tmp_path: Path) -> None:
    handled: list[tuple[str, int, Any]] = []

    async def handler(message: Incoming) -> None:
        handled.append((message.client_id, message.id, message.data))

    db = tmp_path / "victim.db"
    async with serve(handler, tmp_path / "inbox.db", host="127.0.0.1", port=0) as rx:
        async with Outbox(db, rx.url, **FAST) as outbox:
            await outbox.send({"n": 1})
            await outbox.drain(timeout=5)
            victim = outbox.client_id
        async with connect(rx.url, additional_headers={wire.CLIENT_ID_HEADER: victim}) as ws:
            await ws.send(wire.encode_message(2**63 - 1, '"spoof"'))
            await ws.recv()
        async with Outbox(db, rx.url, **FAST) as outbox:
            await wait_until(lambda: outbox.stats().connected)  # it read the high-water mark
            failures = 0
            for n in range(2, 7):
                try:
                    await outbox.send({"n": n})
                except OutboxError:
                    failures += 1
            await outbox.drain(timeout=5)
    assert failures == 0
    assert sorted(d["n"] for c, _, d in handled if c == victim and isinstance(d, dict)) == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM outbox WHERE status != 'acked'").fetchone() == (
            0,
        )
