"""The servers of the throughput benchmark, one per process.

    python benchmarks/_servers.py KIND [--port P] [--db PATH] [--compression]

KIND is one of:

- ``count``: plain ``websockets``; counts frames and, once it has the ``?n=`` the client
  asked for, sends one ``{"type": "done"}`` frame. No parsing, no acks, no disk.
- ``ack``: the seed article's server: one ``{"type": "ack", "messageId"}`` per message.
- ``naive``: the same, plus one ``INSERT`` and commit (SQLite, WAL, ``synchronous=FULL``) per
  message before its ack.
- ``receiver``: ``outbox.receiver.serve`` with a handler that counts its calls per
  (client id, message id), to measure duplicates handled.

It prints ``{"event": "ready", "url": ...}`` once listening, stops at end of file on stdin
(or a "stop" line), then prints ``{"event": "stats", ...}`` with its peak RSS and counters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import time
import urllib.parse
from typing import Any

from _common import cpu_seconds, emit, peak_rss_mb, run_loop, watch_stdin
from websockets.asyncio.server import ServerConnection, serve

from outbox.receiver import Incoming
from outbox.receiver import serve as serve_outbox

HOST = "127.0.0.1"


class HandlerCounter:
    """An outbox receiver handler that counts calls per (client id, message id).

    One byte per message id and client (a bytearray), so a million messages cost a
    megabyte, not a set of a million tuples: the receiver's peak RSS stays its own.
    """

    def __init__(self, record_times: bool = False) -> None:
        self.times: dict[int, float] | None = {} if record_times else None
        """With ``--record-times``: each message id's first handler call, ``time.time()``."""
        self.calls = 0
        self.duplicates = 0
        self._seen: dict[str, bytearray] = {}

    async def __call__(self, message: Incoming) -> None:
        if self.times is not None:
            self.times.setdefault(message.id, time.time())
        self.calls += 1
        seen = self._seen.get(message.client_id)
        if seen is None:
            seen = self._seen[message.client_id] = bytearray()
        if message.id >= len(seen):
            seen.extend(bytes(max(message.id + 1 - len(seen), len(seen))))
        if seen[message.id]:
            self.duplicates += 1
        else:
            seen[message.id] = 1


class PlainServer:
    """The three plain ``websockets`` servers (count, ack, naive)."""

    def __init__(self, kind: str, db: str | None) -> None:
        self.kind = kind
        self.frames = 0
        self.db: sqlite3.Connection | None = None
        if kind == "naive":
            if db is None:
                raise SystemExit("the naive server needs --db")
            self.db = sqlite3.connect(db)
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS inbox (message_id INTEGER PRIMARY KEY, payload TEXT)"
            )

    async def handle(self, ws: ServerConnection) -> None:
        if self.kind == "count":
            await self._count(ws)
        else:
            await self._ack(ws)

    async def _count(self, ws: ServerConnection) -> None:
        query = urllib.parse.urlsplit(ws.request.path if ws.request else "/").query
        wanted = int(urllib.parse.parse_qs(query).get("n", ["0"])[0])
        count = 0
        async for _ in ws:
            count += 1
            if count == wanted:
                await ws.send('{"type":"done"}')
        self.frames += count

    async def _ack(self, ws: ServerConnection) -> None:
        db = self.db
        async for frame in ws:
            self.frames += 1
            message = json.loads(frame)
            if db is not None:
                with db:  # one transaction, one fsync, per message
                    db.execute(
                        "INSERT OR IGNORE INTO inbox (message_id, payload) VALUES (?, ?)",
                        (message["id"], json.dumps(message["data"])),
                    )
            await ws.send(json.dumps({"type": "ack", "messageId": message["id"]}))


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_line(line: str) -> None:
        if line in ("", "stop"):
            stop.set()

    watch_stdin(loop, on_line)
    compression = "deflate" if args.compression else None
    stats: dict[str, Any]
    if args.kind == "receiver":
        counter = HandlerCounter(args.record_times)
        receiver = serve_outbox(counter, args.db, port=args.port, compression=compression)
        async with receiver:
            cpu_at_ready = cpu_seconds()
            emit("ready", url=receiver.url)
            await stop.wait()
        s = receiver.stats
        stats = {
            "handler_calls": counter.calls,
            "duplicates_handled": counter.duplicates,
            "frames": s.frames,
            "messages": s.messages,
            "resends_answered": s.duplicates,
            "transactions": s.transactions,
            "storage_errors": s.storage_errors,
            "handler_errors": s.handler_errors,
            "protocol_errors": s.protocol_errors,
            "connections": s.connections,
            "pruned": s.pruned,
        }
        if counter.times is not None:
            stats["handled_at"] = sorted(counter.times.items())
    else:
        plain = PlainServer(args.kind, args.db)
        async with serve(plain.handle, HOST, args.port, compression=compression) as server:
            port = server.sockets[0].getsockname()[1]
            cpu_at_ready = cpu_seconds()
            emit("ready", url=f"ws://{HOST}:{port}/")
            await stop.wait()
        if plain.db is not None:
            plain.db.close()
        stats = {"frames": plain.frames}
    emit("stats", rss_mb=peak_rss_mb(), cpu_s=cpu_seconds() - cpu_at_ready, **stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("count", "ack", "naive", "receiver"))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--db")
    parser.add_argument("--compression", action="store_true", help="permessage-deflate")
    parser.add_argument(
        "--record-times", action="store_true", help="receiver: report when each id was handled"
    )
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    args = parser.parse_args()
    run_loop(run(args), args.uvloop)


if __name__ == "__main__":
    main()
