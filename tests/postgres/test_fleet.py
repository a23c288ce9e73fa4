"""Fencing with our real client: its reconnect lands on another receiver while its old
connection is still open on the first, and the old connection's frames reach the first
receiver only afterwards (held by a blackholed proxy). Every message is handled once, in
order, and the late frames are fenced out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg

from outbox import Outbox
from outbox.receiver import Incoming, serve
from outbox.testing.fault_proxy import FaultProxy

from ..support import MS, fast_options, wait_until


async def create_effects(tx: Any) -> None:
    await tx.execute(
        "CREATE TABLE IF NOT EXISTS effects (client_id text NOT NULL, message_id bigint NOT NULL,"
        " receiver text NOT NULL, seq bigserial)"
    )


def recorder(name: str) -> Any:
    async def handle(message: Incoming) -> None:
        await message.tx.execute(
            "INSERT INTO effects (client_id, message_id, receiver) VALUES ($1, $2, $3)",
            (message.client_id, message.id, name),
        )

    return handle


async def test_late_frames_of_a_superseded_connection_are_fenced_out(
    pg_url: str, tmp_path: Path
) -> None:
    # ping_interval None: A must keep the old connection open for its late frames.
    async with (
        serve(recorder("A"), pg_url, setup=create_effects, ping_interval=None) as a,
        serve(recorder("B"), pg_url, setup=create_effects) as b,
        FaultProxy("127.0.0.1", a.port) as to_a,
        FaultProxy("127.0.0.1", b.port) as to_b,
        FaultProxy("127.0.0.1", to_a.port) as front,
    ):
        options = fast_options(
            heartbeat_interval=50 * MS, heartbeat_timeout=100 * MS, max_missed_heartbeats=1
        )
        async with Outbox(tmp_path / "outbox.db", front.url(), **options) as box:
            first = [await box.send({"n": n}) for n in range(50)]
            await box.wait_acked(first[-1], timeout=20)
            # The path to A goes silent; the next connection goes to B.
            to_a.blackhole()
            front.set_upstream("127.0.0.1", to_b.port)
            second = [await box.send({"n": n}) for n in range(50, 100)]
            await box.wait_acked(second[-1], timeout=20)
            assert b.stats.messages == 50
            # Now A reads what the client sent it before giving up on that connection.
            to_a.blackhole(False)
            await wait_until(lambda: a.stats.superseded == 1, timeout=20)
            assert a.stats.messages == 50
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT message_id, receiver FROM effects ORDER BY seq")
        # The rows kept, and those deleted below the client's floor (recorded, then pruned).
        inbox = await conn.fetchval(
            "SELECT (SELECT count(*) FROM inbox) + "
            "(SELECT coalesce(sum(floor - base), 0) FROM inbox_floor)"
        )
    finally:
        await conn.close()
    assert [r[0] for r in rows] == first + second
    assert {r[1] for r in rows[:50]} == {"A"} and {r[1] for r in rows[50:]} == {"B"}
    assert inbox == 100
