"""The codec accepts and refuses the same payloads with or without orjson.

Each encoder is checked against literal expected values, and, when orjson is installed (the
``fast`` extra), orjson's output is compared with the standard library's: two different
encoders, not one compared with itself. Without orjson only that comparison (and the orjson
cases) are skipped; CI runs the suite once without and once with it.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from typing import Any

import pytest

from outbox.protocol import codec

HAVE_ORJSON = codec.BACKEND == "orjson"
NO_ORJSON = "orjson is not installed (the 'fast' extra): only the stdlib encoder is tested"
requires_orjson = pytest.mark.skipif(not HAVE_ORJSON, reason=NO_ORJSON)

_dumps_orjson: Callable[[Any], str] | None = getattr(codec, "_dumps_orjson", None)
ENCODERS = [
    pytest.param(codec._dumps_stdlib, id="stdlib"),
    pytest.param(_dumps_orjson, id="orjson", marks=requires_orjson),
]

GOOD: list[tuple[Any, Any]] = [  # (value, what its JSON text decodes to)
    ({"type": "order", "n": 42}, {"type": "order", "n": 42}),
    ([1.5, "é", None, True], [1.5, "é", None, True]),
    ("null", "null"),
    ({"text": "a null inside a string"}, {"text": "a null inside a string"}),
    (None, None),
]
# Beyond 64 bits and non-string keys: one backend would accept them, so both refuse (the
# receiver would otherwise see another value than was sent; see test_payload_rule.py).
BAD: list[Any] = [
    math.nan,
    {"x": math.inf},
    [-math.inf],
    object(),
    {(1, 2): 3},
    2**70,
    {1: "int key"},
]


def test_the_backend_in_use_is_the_one_installed() -> None:
    installed = importlib.util.find_spec("orjson") is not None
    expected = "orjson" if installed else "json"
    assert expected == codec.BACKEND
    for value, _ in GOOD:
        named = _dumps_orjson if installed else codec._dumps_stdlib
        assert named is not None and codec.dumps(value) == named(value)


@pytest.mark.parametrize("dumps", ENCODERS)
@pytest.mark.parametrize(("value", "expected"), GOOD)
def test_json_values_round_trip(dumps: Callable[[Any], str], value: Any, expected: Any) -> None:
    assert json.loads(dumps(value)) == expected
    assert codec.loads(dumps(value)) == expected


@requires_orjson
@pytest.mark.parametrize(("value", "expected"), GOOD)
def test_orjson_and_the_standard_library_write_the_same_json(value: Any, expected: Any) -> None:
    assert _dumps_orjson is not None
    assert json.loads(_dumps_orjson(value)) == json.loads(codec._dumps_stdlib(value))


@pytest.mark.parametrize("dumps", ENCODERS)
@pytest.mark.parametrize("value", BAD, ids=repr)
def test_non_json_values_are_refused(dumps: Callable[[Any], str], value: Any) -> None:
    with pytest.raises(TypeError):
        dumps(value)
