"""One payload rule on both JSON backends (outbox.protocol.codec's docstring states it).

CI runs the suite without orjson and again with it, so the table holds for both. Where
orjson is installed, each value is also checked against the standard library directly.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import json
import math
import uuid
from typing import Any

import pytest

from outbox.protocol import codec


class Colour(enum.Enum):
    RED = 1


class Level(enum.IntEnum):
    HIGH = 3


class Name(enum.StrEnum):
    ADA = "ada"


@dataclasses.dataclass
class Point:
    x: int


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


ACCEPTED: list[tuple[Any, Any]] = [  # value, the JSON value the receiver sees
    ({"type": "order", "n": 42}, {"type": "order", "n": 42}),
    ([1.5, "é", None, True], [1.5, "é", None, True]),
    ((1, 2), [1, 2]),
    (2**64 - 1, 2**64 - 1),
    (-(2**63), -(2**63)),
    (Level.HIGH, 3),
    ({Name.ADA: Name.ADA}, {"ada": "ada"}),
    (collections.OrderedDict(a=1), {"a": 1}),
    ("emoji 🎉 and ñ", "emoji 🎉 and ñ"),
    (nested(codec.MAX_DEPTH), nested(codec.MAX_DEPTH)),
]

REFUSED: list[tuple[Any, str]] = [  # value, words of the error
    (math.nan, "nan"),
    ({"x": math.inf}, r"\['x'\] is inf"),
    ([-math.inf], "-inf"),
    (2**64, "beyond 64 bits"),
    (-(2**63) - 1, "beyond 64 bits"),
    ({"s": "\ud800"}, "lone surrogate"),
    ({"\udfff": 1}, "lone surrogate"),
    ({1: "int key"}, "non-string key"),
    ({(1, 2): 3}, "non-string key"),
    (Colour.RED, "plain Enum"),
    (uuid.UUID(int=1), "UUID"),
    (datetime.datetime(2026, 1, 1), "datetime"),
    (Point(1), "Point"),
    ({1, 2}, "set"),
    (b"bytes", "bytes"),
    (object(), "object"),
    (nested(codec.MAX_DEPTH + 1), "deeper than"),
]


@pytest.mark.parametrize(("value", "seen"), ACCEPTED, ids=repr)
def test_accepted_values_encode_to_the_same_json(value: Any, seen: Any) -> None:
    text = codec.dumps(value)
    assert json.loads(text) == seen
    assert codec.loads(text) == seen
    assert codec._dumps_stdlib(value) == json.dumps(seen, ensure_ascii=False, separators=(",", ":"))


@pytest.mark.parametrize(("value", "words"), REFUSED, ids=repr)
def test_refused_values_are_refused_with_a_reason(value: Any, words: str) -> None:
    with pytest.raises(codec.NotJSONError, match=words):
        codec.dumps(value)
    with pytest.raises(codec.NotJSONError, match=words):
        codec._dumps_stdlib(value)


def test_a_refusal_is_a_type_error_and_names_the_path() -> None:
    with pytest.raises(TypeError, match=r"the payload\['a'\]\[1\]\['b'\] is nan"):
        codec.dumps({"a": [0, {"b": math.nan}]})


@pytest.mark.parametrize("text", ["NaN", "[1, Infinity]", '{"x": -Infinity}'])
def test_decoding_refuses_nan_and_infinity(text: str) -> None:
    with pytest.raises(ValueError):
        codec.loads(text)
    with pytest.raises(ValueError):
        codec._loads_stdlib(text)


@pytest.mark.parametrize("as_bytes", [False, True])
def test_a_very_deep_document_is_refused_not_a_crash(as_bytes: bool) -> None:
    """The standard library would raise RecursionError; orjson 3.8 decodes it. Either way
    the result is a ValueError from loads or a NotJSONError from check."""
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises((ValueError, codec.NotJSONError)):
        codec.check(codec.loads(deep.encode() if as_bytes else deep))
    with pytest.raises(ValueError):
        codec._loads_stdlib(deep)


@pytest.mark.parametrize("number", [2**64, 2**70, -(2**63) - 1])
def test_decoded_integers_beyond_64_bits_are_refused_not_changed(number: int) -> None:
    """orjson alone would read them as floats: a changed number, silently. A float that
    large sends the text to the exact decoder, which reads the integer, which is refused."""
    for text in (f'{{"n": {number}}}', f'{{"n": {number}}}'.encode()):
        decoded = codec.loads(text)
        if codec.LOADS_IS_INEXACT:
            with pytest.raises(codec.InexactNumber):
                codec.check(decoded, inexact=True)
        exact = codec.loads_exact(text)
        assert exact == {"n": number} and type(exact["n"]) is int
        with pytest.raises(codec.NotJSONError, match="beyond 64 bits"):
            codec.check(exact)


def test_large_floats_are_still_floats() -> None:
    """1e19 is a float, not an integer in disguise: it passes, after the exact decoder."""
    assert codec.loads_exact('{"x": 1e19}') == {"x": 1e19}
    codec.check({"x": 1e19})
    codec.check(codec.loads_exact('{"x": 1e19}'))


def test_decoded_lone_surrogates_are_refused_by_check() -> None:
    try:
        value = codec.loads('{"s": "\\ud800"}')
    except ValueError:
        return  # orjson refuses it while decoding: as good
    with pytest.raises(codec.NotJSONError, match="lone surrogate"):
        codec.check(value)
