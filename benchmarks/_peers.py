"""What a user would pick instead: NATS JetStream and MQTT QoS 1, from Python, one process.

    python benchmarks/_peers.py nats|mqtt -n N --producers P --size BYTES --dir DIR

Starts the broker (``nats-server`` with JetStream on file storage, or ``mosquitto`` with
persistence on) on a free port of 127.0.0.1 with its files in DIR, then P producer tasks
publish N messages (the same payloads as the outbox rows), each awaiting the broker's ack
before its next publish, as the outbox rows' producers await ``send()``. Prints one
``{"event": "result", ...}`` line as ``_clients.py`` does, with the broker's CPU and peak
RSS as the server's, and ``lost``: acks missing, or (JetStream) messages missing from the
stream afterwards.

What an ack means here (the README says it too): JetStream acks once the message is in the
stream's file, fsynced only every ``sync_interval`` (2 minutes by default; nats-server 2.9
has no setting for it); mosquitto's PUBACK means the broker holds it in memory, and its
persistence file is written every ``autosave_interval`` (30 minutes by default) and on exit.
Neither is an fsync per message, where the outbox rows fsync every commit on both ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from _common import cpu_seconds, emit, latency_summary, payload, peak_rss_mb, watch_stdin

from outbox.protocol import codec

HOST = "127.0.0.1"
BINARIES = {"nats": "nats-server", "mqtt": "mosquitto"}


def missing(kind: str) -> str | None:
    """Why this peer cannot run here (a clear message), or None."""
    binary = BINARIES[kind]
    if shutil.which(binary) is None and not Path(f"/usr/sbin/{binary}").exists():
        return f"{binary} is not installed (Debian: apt-get install {binary})"
    module = {"nats": "nats", "mqtt": "paho.mqtt.client"}[kind]
    try:
        __import__(module)
    except ImportError:
        return f"{module} is not installed (python -m pip install '.[peers]')"
    return None


def _binary(kind: str) -> str:
    name = BINARIES[kind]
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def broker(kind: str, directory: Path) -> Iterator[tuple[int, psutil.Process]]:
    """Start the broker, wait until it accepts connections, stop it on the way out."""
    port = _free_port()
    if kind == "nats":
        conf = directory / "nats.conf"
        store = directory / "js"
        conf.write_text(f'port: {port}\nhost: "{HOST}"\njetstream {{ store_dir: "{store}" }}\n')
    else:
        conf = directory / "mosquitto.conf"
        conf.write_text(
            f"listener {port} {HOST}\nallow_anonymous true\npersistence true\n"
            f"persistence_location {directory}/\nmax_inflight_messages 0\n"
            "max_queued_messages 0\n"
        )
    log = (directory / f"{kind}.log").open("w")
    process = subprocess.Popen([_binary(kind), "-c", str(conf)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                said = (directory / f"{kind}.log").read_text()[-500:]
                raise SystemExit(f"the {kind} broker did not start: {said}")
            time.sleep(0.05)
        yield port, psutil.Process(process.pid)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _peak_rss_mb(process: psutil.Process) -> float | None:
    with contextlib.suppress(OSError, psutil.Error):
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


class Samples:
    """Latency of every k-th publish, from the call to its ack."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.seconds: list[float] = []


async def run_nats(args: argparse.Namespace, port: int, samples: Samples) -> tuple[int, int]:
    import nats
    from nats.js.api import StorageType

    nc = await nats.connect(f"nats://{HOST}:{port}")
    try:
        js = nc.jetstream()
        await js.add_stream(name="BENCH", subjects=["bench"], storage=StorageType.FILE)
        acked = 0

        async def produce(first: int) -> None:
            nonlocal acked
            for seq in range(first, args.n, args.producers):
                data = codec.dumps(payload(seq, args.size)).encode()
                if seq % samples.every == 0:
                    start = time.perf_counter()
                    await js.publish("bench", data)
                    samples.seconds.append(time.perf_counter() - start)
                else:
                    await js.publish("bench", data)
                acked += 1

        async with asyncio.TaskGroup() as group:
            for first in range(args.producers):
                group.create_task(produce(first))
        info = await js.stream_info("BENCH")
        return acked, int(info.state.messages)
    finally:
        await nc.close()


async def run_mqtt(args: argparse.Namespace, port: int, samples: Samples) -> tuple[int, int]:
    import paho.mqtt.client as mqtt

    loop = asyncio.get_running_loop()
    waiting: dict[int, asyncio.Future[None]] = {}

    def on_publish(client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        loop.call_soon_threadsafe(_resolve, mid)

    def _resolve(mid: int) -> None:
        future = waiting.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(None)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="outbox-bench")
    client.max_inflight_messages_set(max(20, args.producers))
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect(HOST, port)
    client.loop_start()
    try:
        if not await asyncio.to_thread(connected.wait, 10):
            raise SystemExit("mosquitto did not answer the MQTT CONNECT")
        acked = 0

        async def produce(first: int) -> None:
            nonlocal acked
            for seq in range(first, args.n, args.producers):
                data = codec.dumps(payload(seq, args.size)).encode()
                start = time.perf_counter()
                info = client.publish("bench", data, qos=1)
                # The callback is scheduled on this loop, so it runs only after this await.
                future = waiting[info.mid] = loop.create_future()
                await future
                if seq % samples.every == 0:
                    samples.seconds.append(time.perf_counter() - start)
                acked += 1

        async with asyncio.TaskGroup() as group:
            for first in range(args.producers):
                group.create_task(produce(first))
        return acked, acked  # nothing to read back: the broker keeps no log of QoS 1 publishes
    finally:
        client.loop_stop()
        client.disconnect()


async def run(args: argparse.Namespace) -> None:
    main_task = asyncio.current_task()
    assert main_task is not None
    watch_stdin(asyncio.get_running_loop(), lambda line: line == "" and main_task.cancel())
    directory = Path(args.dir)
    with broker(args.kind, directory) as (port, process):
        samples = Samples(args.sample)
        server_cpu = process.cpu_times()
        wall, cpu = time.perf_counter(), cpu_seconds()
        scenario = run_nats if args.kind == "nats" else run_mqtt
        acked, stored = await scenario(args, port, samples)
        seconds, cpu_used = time.perf_counter() - wall, cpu_seconds() - cpu
        after = process.cpu_times()
        server_cpu_s = (after.user + after.system) - (server_cpu.user + server_cpu.system)
        server_rss = _peak_rss_mb(process)
    emit(
        "result",
        messages=acked,
        seconds=seconds,
        rate=acked / seconds if seconds > 0 else None,
        rss_mb=peak_rss_mb(),
        cpu_s=cpu_used,
        latency=latency_summary(samples.seconds),
        server={"cpu_s": server_cpu_s, "rss_mb": server_rss},
        lost=args.n - min(acked, stored),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(BINARIES))
    parser.add_argument("-n", type=int, required=True)
    parser.add_argument("--producers", type=int, default=100)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--sample", type=int, default=100, help="time every k-th publish")
    parser.add_argument("--dir", required=True, help="where the broker keeps its files")
    args = parser.parse_args()
    reason = missing(args.kind)
    if reason is not None:
        raise SystemExit(reason)
    with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
        asyncio.run(run(args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
