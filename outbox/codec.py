"""JSON in one place: payloads are stored and sent as JSON text.

Encoding always uses the standard library with ``allow_nan=False``, so the same payload is
refused (or accepted) whether or not orjson is installed. Decoding, the hot path of the
receiver and of the client's ack reader, uses orjson when the ``fast`` extra is installed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

_encode: Callable[[Any], str] = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False
).encode


def dumps(value: Any) -> str:
    """Encode to compact JSON text; TypeError for anything that is not a JSON value."""
    try:
        return _encode(value)
    except ValueError as exc:  # NaN and Infinity have no JSON form
        raise TypeError(str(exc)) from exc


loads: Callable[[str | bytes], Any]
try:  # pragma: no cover - depends on the environment
    import orjson

    loads = orjson.loads
    BACKEND = "orjson"
except ImportError:  # pragma: no cover - depends on the environment
    loads = json.loads
    BACKEND = "json"

__all__ = ["BACKEND", "dumps", "loads"]
