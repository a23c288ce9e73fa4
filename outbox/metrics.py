"""Prometheus metrics for an Outbox or a Receiver (the optional extra ``outbox[metrics]``).

``register(box_or_receiver, registry=...)`` adds a collector to a ``prometheus_client``
registry (the default one if none is given). It reads ``stats()`` when the registry is
scraped, so nothing is counted twice and the hot path pays nothing; the one exception is
the receiver's transaction-time histogram, observed after each commit (two
``perf_counter`` calls per transaction). ``serve_metrics(port)`` serves a registry on
``/metrics``, as ``python -m outbox serve --metrics-port P`` does.

Names (all prefixed ``outbox_``, every one labelled with ``db``, the SQLite file):

Client (``Outbox``):
    outbox_rows{status}                     gauge: rows by status (pending, acked, dead, expired)
    outbox_in_flight                        gauge: messages sent and not yet acked
    outbox_oldest_pending_age_seconds       gauge: age of the oldest pending row (0 if none)
    outbox_connected                        gauge: 1 while connected
    outbox_connection_state{state}          gauge: 1 for the current state, 0 for the others
    outbox_messages_sent_total              counter: messages written to the socket
    outbox_messages_acked_total             counter: acks for messages in flight
    outbox_messages_resent_total            counter: messages sent again
    outbox_messages_dead_total              counter: rows that became dead
    outbox_messages_expired_total           counter: rows that expired (ttl)
    outbox_reconnects_total                 counter: connections after the first
    outbox_heartbeat_misses_total           counter: pongs that did not come in time

Receiver (``serve``):
    outbox_receiver_messages_total          counter: first deliveries handled and acked
    outbox_receiver_duplicates_total        counter: resends answered from the inbox
    outbox_receiver_conflicts_total         counter: reused ids refused
    outbox_receiver_pruned_total            counter: inbox rows deleted (a bounded inbox)
    outbox_receiver_rejects_total           counter: messages the handler rejected
    outbox_receiver_transactions_total      counter: group commits
    outbox_receiver_handler_errors_total    counter: handler exceptions
    outbox_receiver_connections_total       counter: connections accepted
    outbox_receiver_open_connections        gauge: connections open now
    outbox_receiver_transaction_seconds     histogram: time of each inbox transaction

Counters start at zero when the Outbox or the Receiver starts (they are this process's).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .client.outbox import Outbox
from .client.supervisor import State
from .receiver.server import Receiver

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = ["MetricsUnavailableError", "register", "serve_metrics", "serve_receiver_metrics"]

TRANSACTION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
"""Seconds: a group commit is usually a millisecond or two; handlers make it longer."""


class MetricsUnavailableError(ImportError):
    """prometheus-client is not installed: ``pip install 'outbox[metrics]'``."""


def _prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError as exc:
        raise MetricsUnavailableError(
            "outbox metrics need prometheus-client, which is not installed: "
            "pip install 'outbox[metrics]' (or pip install prometheus-client)"
        ) from exc
    return prometheus_client


def register(
    target: Outbox | Receiver, registry: CollectorRegistry | None = None
) -> CollectorRegistry:
    """Add the metrics of an Outbox or a Receiver to ``registry`` (default: the global one);
    returns the registry. Register each Outbox or Receiver once per registry."""
    prometheus = _prometheus()
    if registry is None:
        registry = prometheus.REGISTRY
    if isinstance(target, Outbox):
        registry.register(_OutboxCollector(target))
    elif isinstance(target, Receiver):
        registry.register(_ReceiverCollector(target))
        histogram = prometheus.Histogram(
            "outbox_receiver_transaction_seconds",
            "Time of each inbox transaction (the group commit), in seconds.",
            ["db"],
            buckets=TRANSACTION_BUCKETS,
            registry=registry,
        ).labels(db=target.db_path)
        target.transaction_observers.append(histogram.observe)
    else:
        raise TypeError(f"register() takes an Outbox or a Receiver, got {type(target).__name__}")
    assert registry is not None
    return registry


def serve_metrics(
    port: int, host: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> Any:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread; returns the
    server (call ``.shutdown()`` to stop it). Port 0 picks a free port (``server_port``)."""
    prometheus = _prometheus()
    server, _thread = prometheus.start_http_server(
        port, addr=host, registry=prometheus.REGISTRY if registry is None else registry
    )
    return server


def serve_receiver_metrics(
    receiver: Receiver | Outbox, host: str, port: int
) -> tuple[str, Callable[[], None]]:
    """A registry of its own for ``receiver`` (or an Outbox: the relay), served on
    ``/metrics``: (URL, stop)."""
    prometheus = _prometheus()
    registry = register(receiver, prometheus.CollectorRegistry())
    server = serve_metrics(port, host, registry)
    shown = f"[{host}]" if ":" in host else host

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return f"http://{shown}:{server.server_port}/metrics", stop


def _oldest_pending_age(path: str) -> float:
    """Read at scrape time on a short read-only connection of its own (no await, no lock).

    An age for people, from ``created_at`` (wall clock): it decides nothing."""
    try:
        uri = Path(path).resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=1.0)
    except sqlite3.Error:
        return 0.0
    try:
        row = conn.execute(
            "SELECT created_at FROM outbox WHERE status = 'pending' ORDER BY id LIMIT 1"
        ).fetchone()
    except sqlite3.Error:
        return 0.0
    finally:
        conn.close()
    return max(0.0, time.time() - float(row[0])) if row else 0.0


def _gauge(name: str, doc: str, db: str, value: float) -> Any:
    family = _prometheus().core.GaugeMetricFamily(name, doc, labels=["db"])
    family.add_metric([db], value)
    return family


def _counter(name: str, doc: str, db: str, value: float) -> Any:
    family = _prometheus().core.CounterMetricFamily(name, doc, labels=["db"])
    family.add_metric([db], value)
    return family


class _OutboxCollector:
    def __init__(self, box: Outbox) -> None:
        self._box = box

    def describe(self) -> list[Any]:
        return []  # nothing collected at registration (the Outbox may not be open yet)

    def collect(self) -> Iterator[Any]:
        core = _prometheus().core
        box = self._box
        db = box.path
        stats = box.stats()
        counters = stats.counters
        rows = core.GaugeMetricFamily("outbox_rows", "Rows by status.", labels=["db", "status"])
        for status in ("pending", "acked", "dead", "expired"):
            rows.add_metric([db, status], getattr(stats, status))
        yield rows
        yield _gauge("outbox_in_flight", "Messages sent and not yet acked.", db, stats.in_flight)
        age = _oldest_pending_age(db) if stats.pending else 0.0
        yield _gauge("outbox_oldest_pending_age_seconds", "Age of the oldest pending row.", db, age)
        yield _gauge("outbox_connected", "1 while connected to the server.", db, stats.connected)
        state = core.GaugeMetricFamily(
            "outbox_connection_state", "1 for the current connection state.", labels=["db", "state"]
        )
        for each in State:
            state.add_metric([db, each.value], 1.0 if each.value == stats.state else 0.0)
        yield state
        for name, doc, value in (
            ("outbox_messages_sent", "Messages written to the socket.", counters.messages_sent),
            ("outbox_messages_acked", "Acks for messages in flight.", counters.acks),
            ("outbox_messages_resent", "Messages sent again.", counters.resends),
            ("outbox_messages_dead", "Rows that became dead.", counters.dead),
            ("outbox_messages_expired", "Rows that expired before an ack.", counters.expired),
            ("outbox_reconnects", "Connections after the first.", counters.reconnects),
            (
                "outbox_heartbeat_misses",
                "Pongs that did not come in time.",
                counters.heartbeat_misses,
            ),
        ):
            yield _counter(name, doc, db, value)


class _ReceiverCollector:
    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        receiver = self._receiver
        db = receiver.db_path
        stats = receiver.stats
        for name, doc, value in (
            ("messages", "First deliveries handled and acked.", stats.messages),
            ("duplicates", "Resends answered from the inbox.", stats.duplicates),
            ("conflicts", "Reused message ids refused.", stats.conflicts),
            ("pruned", "Inbox rows deleted below floors or past the window.", stats.pruned),
            ("rejects", "Messages the handler rejected.", stats.rejected),
            ("transactions", "Inbox transactions (group commits).", stats.transactions),
            ("handler_errors", "Handler exceptions.", stats.handler_errors),
            ("connections", "Connections accepted.", stats.connections),
        ):
            yield _counter(f"outbox_receiver_{name}", doc, db, value)
        yield _gauge(
            "outbox_receiver_open_connections", "Connections open now.", db, stats.open_connections
        )
