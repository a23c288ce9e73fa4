"""The codec accepts and refuses the same payloads with or without orjson."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest

from outbox.protocol import codec

ENCODERS: list[tuple[str, Callable[[Any], str]]] = [("stdlib", codec._dumps_stdlib)]
if codec.BACKEND == "orjson":
    ENCODERS.append(("orjson", codec._dumps_orjson))  # type: ignore[attr-defined]

GOOD: list[Any] = [
    {"type": "order", "n": 42},
    [1.5, "é", None, True],
    "null",
    {"text": "a null inside a string"},
    None,
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


@pytest.mark.parametrize(("name", "dumps"), ENCODERS)
@pytest.mark.parametrize("value", GOOD)
def test_json_values_round_trip(name: str, dumps: Callable[[Any], str], value: Any) -> None:
    assert json.loads(dumps(value)) == json.loads(codec._dumps_stdlib(value))


@pytest.mark.parametrize(("name", "dumps"), ENCODERS)
@pytest.mark.parametrize("value", BAD, ids=repr)
def test_non_json_values_are_refused(name: str, dumps: Callable[[Any], str], value: Any) -> None:
    with pytest.raises(TypeError):
        dumps(value)
