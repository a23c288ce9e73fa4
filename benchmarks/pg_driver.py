"""Which PostgreSQL driver for the receiver: asyncpg or psycopg 3, by measurement.

One group commit of the receiver's inbox, on each driver, against a throwaway server
(tests/postgres_server.py): BEGIN, one dedup SELECT over the keys, one INSERT of the new rows,
COMMIT. Each round commits ``--rows`` new rows (half of its keys were seen in the round
before, so the SELECT finds something). Prints the median and p90 time per group commit.

    pip install asyncpg "psycopg[binary]"  # psycopg only for this comparison
    python benchmarks/pg_driver.py [--rows 1000] [--rounds 50]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.postgres_server import PostgresServer

SCHEMA = """
CREATE TABLE inbox (
    client_id text NOT NULL, message_id bigint NOT NULL, payload text NOT NULL,
    received_at double precision NOT NULL, reject_reason text, payload_sha256 text NOT NULL,
    PRIMARY KEY (client_id, message_id))
"""
SEEN = (
    "SELECT i.client_id, i.message_id, i.reject_reason, i.payload_sha256 "
    "FROM unnest($1::text[], $2::bigint[]) AS k(c, m) "
    "JOIN inbox AS i ON i.client_id = k.c AND i.message_id = k.m"
)
INSERT = (
    "INSERT INTO inbox (client_id, message_id, payload, received_at, reject_reason, "
    "payload_sha256) SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], "
    "$4::float8[], $5::text[], $6::text[])"
)
PAYLOAD = '{"kind":"order","amount":42,"note":"a typical small message"}'
DIGEST = "0" * 64

Round = Callable[[int], Awaitable[None]]


def columns(start: int, rows: int) -> tuple[list[str], list[int]]:
    clients = [f"client-{i % 10}" for i in range(start, start + rows)]
    return clients, list(range(start, start + rows))


async def asyncpg_round(url: str, rows: int) -> tuple[Round, Callable[[], Awaitable[None]]]:
    import asyncpg

    conn = await asyncpg.connect(url)
    await conn.execute(SCHEMA)

    async def one(start: int) -> None:
        clients, ids = columns(start, rows)
        seen_c, seen_m = columns(start - rows // 2, rows)
        await conn.execute("BEGIN")
        await conn.fetch(SEEN, seen_c, seen_m)
        now = time.time()
        await conn.execute(
            INSERT, clients, ids, [PAYLOAD] * rows, [now] * rows, [None] * rows, [DIGEST] * rows
        )
        await conn.execute("COMMIT")

    return one, conn.close


async def psycopg_round(url: str, rows: int) -> tuple[Round, Callable[[], Awaitable[None]]]:
    import psycopg

    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await conn.execute(SCHEMA)
    seen = SEEN.replace("$1", "%s").replace("$2", "%s")
    insert = INSERT
    for n in range(6, 0, -1):
        insert = insert.replace(f"${n}", "%s")

    async def one(start: int) -> None:
        clients, ids = columns(start, rows)
        seen_c, seen_m = columns(start - rows // 2, rows)
        async with conn.transaction():
            cur = await conn.execute(seen, (seen_c, seen_m))
            await cur.fetchall()
            now = time.time()
            await conn.execute(
                insert,
                (clients, ids, [PAYLOAD] * rows, [now] * rows, [None] * rows, [DIGEST] * rows),
            )

    return one, conn.close


async def measure(
    name: str,
    make: Callable[..., Awaitable[tuple[Round, Callable[[], Awaitable[None]]]]],
    url: str,
    rows: int,
    rounds: int,
) -> None:
    one, close = await make(url, rows)
    try:
        for warm in range(3):
            await one((warm + 1) * rows * 10_000)
        times = []
        for r in range(rounds):
            started = time.perf_counter()
            await one((r + 1) * rows)
            times.append(time.perf_counter() - started)
    finally:
        await close()
    times.sort()
    median = statistics.median(times)
    p90 = times[int(len(times) * 0.9)]
    print(
        f"{name:<10} {rows:>5} rows/commit  median {median * 1e3:7.2f} ms  p90 {p90 * 1e3:7.2f} ms"
        f"  ({rows / median:,.0f} rows/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    with PostgresServer() as pg:
        for name, make in (("asyncpg", asyncpg_round), ("psycopg", psycopg_round)):
            url = pg.create_database(name)
            asyncio.run(measure(name, make, url, args.rows, args.rounds))


if __name__ == "__main__":
    main()
