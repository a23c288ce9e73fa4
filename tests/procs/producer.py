"""A producer process for the crash tests: enqueue keyed messages, then drain.

    python tests/procs/producer.py DB URL --count N [--chunk C] [--options JSON] [--hold]

Prints one line per event on stdout, flushed at once, so a test can SIGKILL it at a point of
its choosing: ``open CLIENT_ID``, ``sent KEY ID`` per message (after ``send()`` returned, so
the row is committed), ``enqueued N``, then ``drained {counters}`` once nothing is pending.
Keys are ``msg-0`` .. ``msg-{N-1}``: a restarted producer sends them all again from 0 and
gets the ids of the rows its earlier lives committed. ``--hold`` stays alive after enqueueing
(without draining) until killed. SIGTERM stops enqueueing, drains and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sys

from outbox import Outbox


def payload(i: int, pad: int) -> dict[str, object]:
    return {"i": i, "pad": "x" * pad}


async def main(args: argparse.Namespace) -> int:
    options = json.loads(args.options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with Outbox(args.db, args.url, **options) as box:
        print("open", box.client_id, flush=True)
        reporter = None
        if args.stats_every:

            async def report() -> None:
                while True:
                    await asyncio.sleep(args.stats_every)
                    counters = dataclasses.asdict(box.stats().counters)
                    print("stats", json.dumps(counters), flush=True)

            reporter = asyncio.create_task(report())
        for start in range(0, args.count, args.chunk):
            if stop.is_set():
                break
            numbers = range(start, min(start + args.chunk, args.count))
            keys = [f"msg-{i}" for i in numbers]
            if args.chunk == 1:
                ids = [await box.send(payload(start, args.pad), key=keys[0])]
            else:
                ids = await box.send_many([payload(i, args.pad) for i in numbers], keys=keys)
            sys.stdout.write("".join(f"sent {k} {n}\n" for k, n in zip(keys, ids, strict=True)))
            sys.stdout.flush()
        print("enqueued", args.count, flush=True)
        if args.hold:
            await stop.wait()
        await box.drain(timeout=args.drain_timeout)
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        print("drained", json.dumps(dataclasses.asdict(box.stats().counters)), flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("url")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--chunk", type=int, default=1)
    parser.add_argument("--pad", type=int, default=16)
    parser.add_argument("--options", default="{}")
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--stats-every", type=float, default=0.0)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.exit(asyncio.run(main(parser.parse_args())))
