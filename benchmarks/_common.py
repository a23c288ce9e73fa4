"""What the benchmark's processes share: the payload, the line protocol, memory, percentiles.

Every server and client of ``throughput.py`` runs in its own process and talks to the parent
with one JSON object per line on stdout (``emit``). The parent talks back on the child's
stdin: a line is a command ("go"), and end of file means "stop now", so a child never
outlives a parent that died (``watch_stdin``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

PING_INTERVAL = 0.2
"""Seconds between progress lines."""


def payload(seq: int, size: int) -> dict[str, Any]:
    """A small order-like message whose JSON text is about ``size`` bytes."""
    note = "x" * max(0, size - 60)
    return {"type": "order", "seq": seq, "sku": "ABC-12345", "qty": 3, "note": note}


def emit(event: str, **fields: Any) -> None:
    """One line to the parent: ``{"event": ..., **fields}``."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def peak_rss_mb() -> float:
    """This process's peak resident set size since it started, in MiB (kernel high-water)."""
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return float(psutil.Process().memory_info().peak_wset) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def cpu_seconds() -> float:
    """CPU time of this process so far, user and system, every thread."""
    return time.process_time()


def watch_stdin(loop: asyncio.AbstractEventLoop, on_line: Callable[[str], None]) -> None:
    """Call ``on_line`` (in the loop) for each line on stdin, and with "" at end of file."""

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(on_line, line.strip())
        loop.call_soon_threadsafe(on_line, "")

    threading.Thread(target=read, name="stdin-watch", daemon=True).start()


def run_loop(main: Coroutine[Any, Any, None], use_uvloop: bool) -> None:
    """``asyncio.run(main)``, on uvloop's event loop when asked (the ``fast`` extra)."""
    if not use_uvloop:
        asyncio.run(main)
        return
    try:
        import uvloop
    except ImportError:
        main.close()
        raise SystemExit(
            "--uvloop needs uvloop: python -m pip install uvloop (or '.[fast]')"
        ) from None
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


def latency_summary(seconds: list[float]) -> dict[str, Any]:
    """p50 and p99 in milliseconds, and how many samples they come from."""
    values = sorted(seconds)
    if not values:
        return {"p50_ms": None, "p99_ms": None, "samples": 0}
    return {
        "p50_ms": percentile(values, 0.50) * 1000,
        "p99_ms": percentile(values, 0.99) * 1000,
        "samples": len(values),
    }
