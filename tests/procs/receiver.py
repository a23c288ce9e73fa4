"""A receiver process for the crash tests: ``outbox.serve`` with an exactly-once handler.

    python tests/procs/receiver.py INBOX_DB [--port 0] [--stats-every SECONDS]

Prints its URL as the first line. The handler writes one row per handled message to an
``effects`` table through ``message.tx`` (no unique constraint: a message handled twice would
leave two rows). With ``--stats-every``, prints ``stats {json}`` lines (the receiver's
counters) that often, and once more on SIGTERM, which closes it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sqlite3
import sys

from outbox.receiver import Incoming, serve

EFFECTS_TABLE = (
    "CREATE TABLE IF NOT EXISTS effects ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " client_id TEXT NOT NULL,"
    " message_id INTEGER NOT NULL)"
)


async def record_effect(message: Incoming) -> None:
    await message.tx.execute(
        "INSERT INTO effects (client_id, message_id) VALUES (?, ?)",
        (message.client_id, message.id),
    )


async def main(args: argparse.Namespace) -> int:
    with contextlib.closing(sqlite3.connect(args.db, timeout=10)) as conn, conn:
        conn.execute(EFFECTS_TABLE)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with serve(record_effect, args.db, port=args.port, busy_timeout=args.busy_timeout) as rx:
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
    parser.add_argument("db")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--busy-timeout", type=float, default=5.0)
    parser.add_argument("--stats-every", type=float, default=0.0)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.exit(asyncio.run(main(parser.parse_args())))
