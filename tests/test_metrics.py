"""Prometheus metrics: collectors read stats() at scrape time; ``serve --metrics-port``.

Real receivers on 127.0.0.1 port 0, real SQLite files, a real ``python -m outbox serve``
whose ``/metrics`` endpoint is scraped over HTTP.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import os
import sqlite3
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect

import outbox
from outbox import Outbox, serve
from outbox import metrics as outbox_metrics
from outbox.protocol import wire

from .chaos_support import ROOT
from .support import fast_options, wait_until
from .test_cli import run_cli, start_serve, stop


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_client_and_receiver_metrics_in_an_application_registry(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    async with serve(None, tmp_path / "inbox.db") as receiver:
        box = Outbox(tmp_path / "o.db", receiver.url, **fast_options())
        outbox_metrics.register(box, registry)  # before open: a scrape then shows zeros
        outbox_metrics.register(receiver, registry)
        db, inbox = str(tmp_path / "o.db"), str(tmp_path / "inbox.db")
        assert value(registry, "outbox_rows", db=db, status="pending") == 0
        async with box:
            ids = await box.send_many([{"n": n} for n in range(5)])
            await box.wait_acked(ids[-1], timeout=10)
            await wait_until(lambda: box.stats().acked == 5)
            assert value(registry, "outbox_rows", db=db, status="acked") == 5
            assert value(registry, "outbox_rows", db=db, status="expired") == 0
            assert value(registry, "outbox_messages_sent_total", db=db) == 5
            assert value(registry, "outbox_messages_acked_total", db=db) == 5
            assert value(registry, "outbox_connected", db=db) == 1
            assert value(registry, "outbox_connection_state", db=db, state="connected") == 1
            assert value(registry, "outbox_connection_state", db=db, state="closed") == 0
            assert value(registry, "outbox_in_flight", db=db) == 0
            assert value(registry, "outbox_oldest_pending_age_seconds", db=db) == 0
            assert value(registry, "outbox_receiver_messages_total", db=inbox) == 5
            assert value(registry, "outbox_receiver_connections_total", db=inbox) == 1
            assert value(registry, "outbox_receiver_open_connections", db=inbox) == 1
            transactions = value(registry, "outbox_receiver_transactions_total", db=inbox)
            assert transactions is not None and transactions >= 1
            observed = value(registry, "outbox_receiver_transaction_seconds_count", db=inbox)
            assert observed == transactions


async def test_oldest_pending_age_and_dead_counter(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    wall = [time.time() - 7200]  # two hours ago
    db = tmp_path / "o.db"
    async with (
        serve(None, tmp_path / "inbox.db", max_size=4096) as receiver,
        Outbox(db, receiver.url, wall_clock=lambda: wall[0], **fast_options(max_attempts=1)) as box,
    ):
        outbox_metrics.register(box, registry)
        big = await box.send({"pad": "x" * 10_000})
        await wait_until(lambda: box.stats().dead == 1)
        assert value(registry, "outbox_messages_dead_total", db=str(db)) == 1
        assert value(registry, "outbox_rows", db=str(db), status="dead") == 1
        assert big
    # A pending row written an hour "ago" by the wall clock shows its age.
    async with Outbox(db, "ws://127.0.0.1:9/", wall_clock=lambda: wall[0], **fast_options()) as box:
        registry = CollectorRegistry()
        outbox_metrics.register(box, registry)
        await box.send({"n": 1})
        age = value(registry, "outbox_oldest_pending_age_seconds", db=str(db))
        assert age is not None and age > 3600


def test_a_missing_prometheus_client_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_prometheus(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("prometheus_client"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_prometheus)
    box = Outbox("unused.db", "ws://127.0.0.1:9/")
    with pytest.raises(ImportError, match=r"pip install 'outbox\[metrics\]'"):
        outbox_metrics.register(box)


def test_register_refuses_other_objects() -> None:
    with pytest.raises(TypeError, match="Outbox or a Receiver"):
        outbox_metrics.register(object(), CollectorRegistry())  # type: ignore[arg-type]


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


async def test_serve_metrics_port_serves_the_receiver_metrics(tmp_path: Path) -> None:
    process = await start_serve(tmp_path / "inbox.db", "--metrics-port", "0")
    try:
        assert process.stdout is not None
        async with asyncio.timeout(10):
            url = (await process.stdout.readline()).decode().strip()
            metrics_line = (await process.stdout.readline()).decode().strip()
        assert metrics_line.startswith("metrics: http://127.0.0.1:"), metrics_line
        metrics_url = metrics_line.removeprefix("metrics: ")
        assert metrics_url.endswith("/metrics")
        headers = {wire.CLIENT_ID_HEADER: "metrics-test", wire.FEATURES_HEADER: "batch, batch-ack"}
        async with connect(url, additional_headers=headers) as ws:
            await ws.send(wire.encode_batch([(1, '{"n":1}'), (2, '{"n":2}')]))
            async with asyncio.timeout(5):
                assert json.loads(await ws.recv())["messageIds"] == [1, 2]
        text = await asyncio.to_thread(_scrape, metrics_url)
        db = str(tmp_path / "inbox.db")
        assert f'outbox_receiver_messages_total{{db="{db}"}} 2.0' in text
        assert f'outbox_receiver_connections_total{{db="{db}"}} 1.0' in text
        assert "outbox_receiver_transaction_seconds_bucket" in text
    finally:
        stderr = await stop(process)
    assert process.returncode == 0, stderr.decode()


def test_serve_refuses_a_bad_metrics_port(tmp_path: Path) -> None:
    done = run_cli("serve", "--db", str(tmp_path / "inbox.db"), "--metrics-port", "99999")
    assert done.returncode == 2 and "--metrics-port 99999 is not a port" in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_failing_transaction_observer_does_not_fail_the_commit(tmp_path: Path) -> None:
    def broken(elapsed: float) -> None:
        raise RuntimeError("observer bug")

    async with serve(None, tmp_path / "inbox.db") as receiver:
        receiver.transaction_observers.append(broken)
        async with Outbox(tmp_path / "o.db", receiver.url, **fast_options()) as box:
            message_id = await box.send({"n": 1})
            await box.wait_acked(message_id, timeout=10)
        assert receiver.stats.storage_errors == 0


async def test_relay_metrics_port_serves_the_senders_metrics(tmp_path: Path) -> None:
    """``outbox relay --metrics-port 0``: the relay's Outbox, scraped over real HTTP."""
    db = tmp_path / "app.db"
    outbox.migrate(db)
    with sqlite3.connect(db) as conn:
        outbox.enqueue_many(conn, [{"n": 1}, {"n": 2}])
    async with serve(None, tmp_path / "inbox.db") as rx:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "outbox",
            "relay",
            "--db",
            str(db),
            "--url",
            rx.url,
            "--metrics-port",
            "0",
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            async with asyncio.timeout(10):
                line = (await process.stdout.readline()).decode().strip()
            assert line.startswith("metrics: http://127.0.0.1:"), line
            await wait_until(lambda: rx.stats.messages == 2, timeout=10)
            text = await asyncio.to_thread(_scrape, line.removeprefix("metrics: "))
            assert f'outbox_messages_acked_total{{db="{db}"}}' in text
            assert f'outbox_rows{{db="{db}",status="pending"}}' in text
        finally:
            process.terminate()
            async with asyncio.timeout(10):
                await process.wait()
