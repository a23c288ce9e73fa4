"""One receiver of a fleet, for the fleet chaos test and the PostgreSQL benchmark.

    python tests/procs/fleet_receiver.py DB [--port 0] [--name NAME] [--stats-every SECONDS]

DB is an inbox: a SQLite file, or a ``postgresql://`` URL that several of these processes
share. The handler writes one row per handled message to its own ``fleet_effects`` table
through ``message.tx`` (created by ``setup=``), with no unique constraint, so a message
handled twice, by this process or by another, would leave two rows; ``seq`` numbers the rows
in the order they were written, so a client's effects can be checked against its id order.

Prints its URL as the first line once listening; with ``--stats-every``, then prints
``stats {json}`` (the receiver's counters) that often, because a SIGKILLed process reports
nothing at the end. SIGTERM closes it cleanly and prints the stats once more.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys

from outbox.receiver import Incoming, Transaction, serve

TABLE = "fleet_effects"


def is_postgres(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def effects_schema(db: str) -> str:
    """The handler's table in the inbox's own dialect."""
    seq = (
        "seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
        if is_postgres(db)
        else "seq INTEGER PRIMARY KEY AUTOINCREMENT"
    )
    return (
        f"CREATE TABLE IF NOT EXISTS {TABLE} ({seq}, client_id TEXT NOT NULL,"
        " message_id BIGINT NOT NULL, receiver TEXT NOT NULL)"
    )


def effect_insert(db: str) -> str:
    marks = "$1, $2, $3" if is_postgres(db) else "?, ?, ?"
    return f"INSERT INTO {TABLE} (client_id, message_id, receiver) VALUES ({marks})"


async def main(args: argparse.Namespace) -> int:
    insert = effect_insert(args.db)
    name = args.name or f"pid{os.getpid()}"

    async def setup(tx: Transaction) -> None:
        await tx.execute(effects_schema(args.db))

    async def record_effect(message: Incoming) -> None:
        await message.tx.execute(insert, (message.client_id, message.id, name))

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with serve(record_effect, args.db, port=args.port, setup=setup) as rx:
        print(rx.url, flush=True)

        def report() -> None:
            print("stats", json.dumps(dataclasses.asdict(rx.stats)), flush=True)

        while not stop.is_set():
            if args.stats_every:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.stats_every)
                report()
            else:
                await stop.wait()
    report()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("db", help="a SQLite file or a postgresql:// URL")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="", help="recorded in each effect row (default pidN)")
    parser.add_argument("--stats-every", type=float, default=0.0)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.exit(asyncio.run(main(parser.parse_args())))
