"""What the benchmark prints: the table, the ratios against their targets, the JSON document."""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One line of the table; None prints as "-" (does not apply, or not measured)."""

    key: str
    title: str
    messages: int | None = None
    seconds: float | None = None
    rate: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    latency_samples: int = 0
    client_rss_mb: float | None = None
    server_rss_mb: float | None = None
    client_cpu_us: float | None = None
    """CPU (user + sys, every thread) of the sending process per message, in microseconds."""
    server_cpu_us: float | None = None
    """The same for the receiving process."""
    lost: int | None = None
    dups: int | None = None
    error: str | None = None
    other_load: float = 0.0
    """Cores used by other processes on the machine while this row ran (0.1 = 10% of one)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.error is not None


DISTURBED = 0.1
"""A row is marked when other processes used more than this many cores meanwhile."""


def disturbed(rows: Sequence[Row]) -> bool:
    return any(row.other_load > DISTURBED for row in rows)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# name, alignment, width, Row attribute, format
_COLUMNS = (
    ("scenario", "<", 34, "title", ""),
    ("messages", ">", 9, "messages", ","),
    ("seconds", ">", 7, "seconds", ".2f"),
    ("msg/s", ">", 9, "rate", ",.0f"),
    ("p50 ms", ">", 7, "p50_ms", ".2f"),
    ("p99 ms", ">", 7, "p99_ms", ".2f"),
    ("cli us/msg", ">", 10, "client_cpu_us", ".2f"),
    ("srv us/msg", ">", 10, "server_cpu_us", ".2f"),
    ("client MB", ">", 9, "client_rss_mb", ".1f"),
    ("server MB", ">", 9, "server_rss_mb", ".1f"),
    ("lost", ">", 4, "lost", "d"),
    ("dups", ">", 4, "dups", "d"),
)


def format_table(rows: Sequence[Row]) -> str:
    header = "  ".join(f"{name:{align}{width}}" for name, align, width, _, _ in _COLUMNS)
    lines = [header, "-" * len(header)]
    for row in rows:
        if row.messages is None:
            first_line = (row.error or "no result").splitlines()[0]
            lines.append(f"{row.title:<34}  FAILED: {first_line}")
            continue
        cells = [
            getattr(row, attr) if not spec else _fmt(getattr(row, attr), spec)
            for _, _, _, attr, spec in _COLUMNS
        ]
        if row.other_load > DISTURBED:
            cells[0] = f"{row.title[:32]} *"
        lines.append(
            "  ".join(
                f"{cell:{align}{width}}"
                for cell, (_, align, width, _, _) in zip(cells, _COLUMNS, strict=True)
            )
        )
        if row.error:
            lines.append(f"    !! {row.error}")
    return "\n".join(lines)


@dataclass
class Verdict:
    label: str
    value: float | None
    unit: str
    target: str
    met: bool | None
    """None: informational, or not measured in this run."""


# label, numerator row, denominator row, lowest ratio that meets the target (None: no target)
_RATIOS: tuple[tuple[str, str, str, float | None], ...] = (
    ("outbox 1 msg/frame / ceiling windowed acks", "outbox-frame", "ceiling-acks", 0.5),
    ("outbox 1 msg/frame / naive durable", "outbox-frame", "naive", 15),
    ("outbox batch frames / ceiling windowed acks", "outbox-batch", "ceiling-acks", 2),
    ("outbox batch frames / naive durable", "outbox-batch", "naive", None),
    ("send() x100 / sqlite3 1 commit per message", "enqueue-send-100", "enqueue-sqlite", 10),
    ("send() x100 / send() x1", "enqueue-send-100", "enqueue-send-1", None),
    ("send_many(100) x100 / sqlite3 1 commit per msg", "enqueue-send-many-100", "enqueue-sqlite",
     None),
    ("backlog drain / outbox batch frames", "backlog-drain", "outbox-batch", 0.9),
    ("deflate / none, ceiling windowed acks", "ceiling-acks-deflate", "ceiling-acks", None),
    ("deflate / none, outbox batch frames", "outbox-deflate", "outbox-batch", None),
    ("outbox batch frames / NATS JetStream publish", "outbox-batch", "peer-nats", 2),
    ("outbox batch frames / MQTT QoS 1", "outbox-batch", "peer-mqtt", None),
    ("uvloop / asyncio, ceiling windowed acks", "ceiling-acks-uvloop", "ceiling-acks", None),
    ("uvloop / asyncio, outbox 1 msg/frame", "outbox-frame-uvloop", "outbox-frame", None),
    ("uvloop / asyncio, outbox batch frames", "outbox-batch-uvloop", "outbox-batch", None),
)  # fmt: skip


def verdicts(rows: Sequence[Row]) -> list[Verdict]:
    """The ratios that matter and the absolute targets, each against its target."""
    by_key = {row.key: row for row in rows if not row.failed}
    out: list[Verdict] = []
    for label, top, bottom, floor in _RATIOS:
        a, b = by_key.get(top), by_key.get(bottom)
        value = None if a is None or b is None or not a.rate or not b.rate else a.rate / b.rate
        target = "" if floor is None else f">= {floor:g}x"
        met = None if floor is None or value is None else value >= floor
        out.append(Verdict(label, value, "x", target, met))
    paced = by_key.get("outbox-paced")
    p99 = None if paced is None else paced.p99_ms
    out.append(
        Verdict("p99 send-to-ack, paced at 50% of max", p99, " ms", "< 10 ms",
                None if p99 is None else p99 < 10)
    )  # fmt: skip
    drain = by_key.get("backlog-drain")
    rss = None if drain is None else drain.client_rss_mb
    rows_text = "" if drain is None or drain.messages is None else f"{drain.messages:,} "
    out.append(
        Verdict(f"sender peak RSS draining {rows_text}rows", rss, " MB", "< 100 MB",
                None if rss is None else rss < 100)
    )  # fmt: skip
    return out


def format_verdicts(items: Sequence[Verdict]) -> str:
    lines = []
    for item in items:
        shown = "-" if item.value is None else f"{item.value:.2f}{item.unit}"
        target = f"target {item.target}" if item.target else ""
        verdict = {True: "met", False: "NOT MET", None: ""}[item.met]
        lines.append(f"{item.label:<48} {shown:>10}   {target:<16} {verdict}".rstrip())
    return "\n".join(lines)


def fsync_probe(directory: str, seconds: float) -> dict[str, float]:
    """fdatasync latency of the disk under ``directory``, the floor of every durable row."""
    sync = getattr(os, "fdatasync", os.fsync)
    latencies: list[float] = []
    with tempfile.NamedTemporaryFile(dir=directory) as handle:
        fd = handle.fileno()
        block = b"\0" * 4096
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            os.write(fd, block)
            start = time.perf_counter()
            sync(fd)
            latencies.append(time.perf_counter() - start)
    latencies.sort()
    return {
        "fsyncs": len(latencies),
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


def code_version(root: Path) -> str:
    """The commit measured, and whether the library had uncommitted changes then."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "outbox", "migrations"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    changed = sorted(line[3:] for line in dirty if line.strip())
    return commit + (f" + uncommitted {', '.join(changed)}" if changed else "")


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    from outbox.protocol import codec

    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "websockets": version("websockets"),
        "sqlite": sqlite3.sqlite_version,
        "json_decoder": codec.BACKEND,
    }


NOTES = """\
Latency: outbox rows, from send() returning to wait_acked() returning, timed on every 100th
message (every 10th when paced); ceiling, from a frame's send to its ack; naive, from the
INSERT's commit to the UPDATE's commit; enqueue N procs, one transaction from its first
enqueue() to its COMMIT returning (the slowest producer's p50/p99); relay pickup, from the
producer's COMMIT returning to the receiver's handler call (time.time() in both). RSS: each
process's peak (getrusage); the backlog drain row shows the sender's peak sampled during the
drain. lost: ids send() returned that the receiver's inbox does not hold (enqueue rows: the
outbox file); dups: receiver handler calls beyond one per message id.
Durable rows run with synchronous=FULL in WAL mode on both ends (also naive and sqlite3).
Paced: each producer sleeps until its message's slot; that pacing costs client CPU too."""


def write_json(
    path: str,
    machine: dict[str, Any],
    settings: Any,
    rows: Sequence[Row],
    measured: Sequence[Verdict],
    status: int,
) -> None:
    """``--json PATH``: the run as one document (``settings`` is the script's dataclass)."""
    document = {
        "version": 1,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "settings": asdict(settings),
        "rows": [asdict(row) for row in rows],
        "verdicts": [asdict(item) for item in measured],
        "exit_status": status,
    }
    Path(path).write_text(json.dumps(document, indent=2) + "\n")
