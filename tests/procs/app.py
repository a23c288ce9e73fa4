"""An application process for the transactional-outbox tests: orders and messages in one
transaction, with ``outbox.enqueue`` (or the sync ``Producer``).

    python tests/procs/app.py DB --count N [--start S] [--mode enqueue|producer] [--rollback]
                                 [--prefix P] [--hold]

Per message: ``enqueue`` mode inserts an order row and enqueues ``{"order": KEY}`` with key
``P-i`` in one transaction, commits (or rolls back with ``--rollback``), then prints
``committed KEY ID`` (``rolledback KEY``). ``producer`` mode sends through a ``Producer``.
Prints ``done`` at the end; ``--hold`` then waits for stdin to close (to be SIGKILLed).
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import sys

import outbox


def main(args: argparse.Namespace) -> int:
    if args.mode == "producer":
        with outbox.Producer(args.db) as producer:
            for i in range(args.start, args.start + args.count):
                key = f"{args.prefix}-{i}"
                print("committed", key, producer.send({"order": key}, key=key), flush=True)
    else:
        with contextlib.closing(sqlite3.connect(args.db, timeout=30)) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS orders (key TEXT PRIMARY KEY)")
            conn.commit()
            for i in range(args.start, args.start + args.count):
                key = f"{args.prefix}-{i}"
                conn.execute("BEGIN IMMEDIATE")  # several writing processes: take the lock first
                conn.execute("INSERT OR IGNORE INTO orders VALUES (?)", (key,))
                msg_id = outbox.enqueue(conn, {"order": key}, key=key)
                if args.rollback:
                    conn.rollback()
                    print("rolledback", key, flush=True)
                else:
                    conn.commit()
                    print("committed", key, msg_id, flush=True)
    print("done", flush=True)
    if args.hold:
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--mode", choices=("enqueue", "producer"), default="enqueue")
    parser.add_argument("--rollback", action="store_true")
    parser.add_argument("--prefix", default="order")
    parser.add_argument("--hold", action="store_true")
    sys.exit(main(parser.parse_args()))
