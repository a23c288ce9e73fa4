"""JSON in one place: payloads are stored and sent as JSON text.

With the ``fast`` extra (orjson) installed, encoding and decoding use it; without, the
standard library. Either way the same payloads are accepted and refused: orjson's output is
checked where it could differ (it writes NaN and Infinity as ``null``, and refuses integers
beyond 64 bits and non-string keys that the standard library accepts), by handing those
cases to the standard encoder with ``allow_nan=False``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

_encode: Callable[[Any], str] = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False
).encode


def _dumps_stdlib(value: Any) -> str:
    try:
        return _encode(value)
    except ValueError as exc:  # NaN and Infinity have no JSON form
        raise TypeError(str(exc)) from exc


dumps: Callable[[Any], str]
loads: Callable[[str | bytes], Any]

try:  # pragma: no cover - depends on the environment
    import orjson

    def _dumps_orjson(value: Any) -> str:
        try:
            encoded = orjson.dumps(value)
        except TypeError:
            return _dumps_stdlib(value)  # accepts what it can (big ints), refuses the rest
        if b"null" in encoded:
            return _dumps_stdlib(value)  # maybe a NaN written as null: let stdlib decide
        return encoded.decode()

    dumps = _dumps_orjson
    loads = orjson.loads
    BACKEND = "orjson"
except ImportError:  # pragma: no cover - depends on the environment
    dumps = _dumps_stdlib
    loads = json.loads
    BACKEND = "json"

dumps.__doc__ = "Encode to compact JSON text; TypeError for anything that is not a JSON value."

__all__ = ["BACKEND", "dumps", "loads"]
