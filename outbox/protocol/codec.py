"""JSON in one place: payloads are stored and sent as JSON text, by one rule on both backends.

With the ``fast`` extra (orjson) installed, encoding and decoding use it; without, the
standard library. Either way exactly the same values are accepted and refused, because the
rule is ours, checked by :func:`check` before either library sees the value:

- ``None``, ``bool``, ``str``, ``int``, ``float``, ``list``, ``tuple`` and ``dict``, and their
  subclasses (so an ``IntEnum`` or a ``str`` enum is its value, an ``OrderedDict`` a dict);
- ``str`` is valid Unicode: a lone surrogate (``"\\ud800"``) has no UTF-8 form;
- ``int`` fits in 64 bits (``-2**63`` to ``2**64 - 1``): beyond that orjson refuses it and
  orjson's decoder reads it as a float, so the receiver would store another number;
- ``float`` is finite: NaN and Infinity are not JSON;
- ``dict`` keys are strings: the standard library would turn ``1`` into ``"1"``, orjson
  refuses it, and either way the receiver would see another value than was sent;
- containers nest at most :data:`MAX_DEPTH` deep (orjson stops at 255, the standard
  library at Python's recursion limit: neither is a rule a peer can rely on).

Everything else (datetime, UUID, dataclasses, plain ``Enum``, sets, bytes, numpy values) is
refused on both backends, though orjson alone would encode some of them.

Decoding follows the same rule: :func:`loads` refuses NaN and Infinity on both backends,
and raises ``ValueError``, never ``RecursionError``, for a document too deep to decode;
``check`` then refuses what decoded but breaks the rule (too deep, lone surrogates,
integers beyond 64 bits). orjson reads an integer beyond 64 bits as a float, so a decoded
float that large may have been one: ``check(value, inexact=True)`` raises
:class:`InexactNumber` for it, and the caller decodes the text again with
:func:`loads_exact`, which reads every integer exactly, before judging it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from enum import Enum
from typing import Any

MAX_DEPTH = 64
"""Deepest nesting of lists and dicts in a payload (frames add up to three levels)."""

MAX_FRAME_DEPTH = MAX_DEPTH + 3
"""Deepest nesting a frame may have: a batch, its list, a message object, then the data."""

INT_MIN = -(2**63)
INT_MAX = 2**64 - 1

_TEXT_LIMIT = 60  # characters of a refused value quoted in an error


class NotJSONError(TypeError):
    """The value breaks the payload rule; the message says where and why."""


class InexactNumber(Exception):
    """A float decoded by orjson is large enough to have been an integer beyond 64 bits."""


_INEXACT_FROM = float(2**63)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _TEXT_LIMIT else text[: _TEXT_LIMIT - 3] + "..."


class _Refused(Exception):
    """Raised inside the walk; the path is built on the way out, so success costs nothing."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.path: list[str] = []


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _Refused(
                f"holds a lone surrogate ({_show(text)}), which has no UTF-8 form"
            ) from None


def _check(value: Any, depth: int, inexact: bool) -> None:
    kind = type(value)
    if kind is str:
        _check_text(value)
    elif kind is int:
        if not INT_MIN <= value <= INT_MAX:
            raise _Refused(f"is an integer beyond 64 bits ({_show(value)})")
    elif kind is float:
        if not math.isfinite(value):
            raise _Refused(f"is {value!r}, which JSON cannot represent")
        if inexact and abs(value) >= _INEXACT_FROM:
            raise InexactNumber
    elif value is None or kind is bool:
        return
    elif kind is dict:
        if depth >= MAX_DEPTH:
            raise _Refused(f"nests deeper than {MAX_DEPTH} levels")
        for key, item in value.items():
            # The common entries (an ASCII key, an ASCII string, a 64-bit int, a bool or
            # null) pass inline: a call per value was most of the cost of send()'s check.
            kind = type(item)
            if type(key) is str and key.isascii():
                if kind is str:
                    if item.isascii():
                        continue
                elif kind is int:
                    if INT_MIN <= item <= INT_MAX:
                        continue
                elif kind is bool or item is None:
                    continue
            _check_entry(key, item, depth, inexact)
    elif kind is list or kind is tuple:
        if depth >= MAX_DEPTH:
            raise _Refused(f"nests deeper than {MAX_DEPTH} levels")
        for index, item in enumerate(value):
            kind = type(item)
            if kind is str:
                if item.isascii():
                    continue
            elif kind is int:
                if INT_MIN <= item <= INT_MAX:
                    continue
            elif kind is bool or item is None:
                continue
            try:
                _check(item, depth + 1, inexact)
            except _Refused as refused:
                refused.path.append(f"[{index}]")
                raise
    else:
        _check_subclass(value, depth, inexact)


def _check_entry(key: Any, item: Any, depth: int, inexact: bool) -> None:
    """One entry of a dict, in full (what the inline test in ``_check`` did not pass)."""
    if type(key) is not str:
        if not isinstance(key, str):
            raise _Refused(f"has a non-string key {_show(key)}")
        key = str.__str__(key)
    try:
        _check_text(key)
        _check(item, depth + 1, inexact)
    except _Refused as refused:
        refused.path.append(f"[{_show(key)}]")
        raise


def _check_subclass(value: Any, depth: int, inexact: bool) -> None:
    """Subclasses of the JSON types are their base value (an IntEnum is its int)."""
    # The exact value the encoders write: str.__str__ of a str enum is its value, not
    # "Name.ADA"; int.__int__ of an IntEnum its number.
    plain: Any
    if isinstance(value, str):
        plain = str.__str__(value)
    elif isinstance(value, int):
        plain = int.__int__(value)
    elif isinstance(value, float):
        plain = float.__float__(value)
    elif isinstance(value, dict):
        plain = dict(dict.items(value))
    elif isinstance(value, list | tuple):
        plain = list(value)
    else:
        plain = None
    if plain is not None:
        _check(plain, depth, inexact)
        return
    what = "a plain Enum member" if isinstance(value, Enum) else type(value).__name__
    raise _Refused(f"is {what} ({_show(value)}), not a JSON value")


def check(value: Any, *, inexact: bool = False) -> None:
    """Raise NotJSONError (a TypeError) unless ``value`` follows the payload rule above.

    ``inexact``: the value came from :func:`loads` with orjson (``LOADS_IS_INEXACT``), so a
    float of 2**63 or more raises InexactNumber: decode again with :func:`loads_exact`.
    """
    try:
        _check(value, 0, inexact)
    except _Refused as refused:
        path = "".join(reversed(refused.path))
        if len(path) > _TEXT_LIMIT:
            path = "..." + path[-_TEXT_LIMIT:]
        raise NotJSONError(f"the payload{path} {refused.reason}") from None


_encode_stdlib: Callable[[Any], str] = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False
).encode


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_decode_stdlib: Callable[[str], Any] = json.JSONDecoder(parse_constant=_refuse_constant).decode


def _loads_stdlib(text: str | bytes) -> Any:
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        return _decode_stdlib(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


loads_exact: Callable[[str | bytes], Any] = _loads_stdlib
"""Decode JSON text reading every integer exactly (the standard library), NaN refused."""

LOADS_IS_INEXACT: bool
"""True where :func:`loads` may read an integer beyond 64 bits as a float (orjson)."""

dumps_checked: Callable[[Any], str]
"""Encode a value that already passed :func:`check` (the receiver's parsed messages)."""

loads: Callable[[str | bytes], Any]
"""Decode JSON text; ValueError for anything that is not JSON under the rule above."""

try:  # pragma: no cover - depends on the environment
    import orjson

    def _encode_orjson(value: Any) -> str:
        try:
            return orjson.dumps(value).decode()
        except TypeError:  # not expected after check(); the standard library decides
            return _encode_stdlib(value)

    def _dumps_orjson(value: Any) -> str:
        """The orjson encoder under the rule (tests compare it with the standard library's)."""
        check(value)
        return _encode_orjson(value)

    def _loads_orjson(text: str | bytes) -> Any:
        try:
            return orjson.loads(text)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None

    dumps_checked = _encode_orjson
    loads = _loads_orjson
    BACKEND = "orjson"
    LOADS_IS_INEXACT = True
except ImportError:  # pragma: no cover - depends on the environment
    dumps_checked = _encode_stdlib
    loads = _loads_stdlib
    BACKEND = "json"
    LOADS_IS_INEXACT = False


def dumps(value: Any) -> str:
    """Encode to compact JSON text; NotJSONError (a TypeError) for anything off the rule."""
    check(value)
    return dumps_checked(value)


def _dumps_stdlib(value: Any) -> str:
    """The standard-library encoder under the same rule (tests compare it with orjson's)."""
    check(value)
    return _encode_stdlib(value)


__all__ = [
    "BACKEND",
    "INT_MAX",
    "INT_MIN",
    "LOADS_IS_INEXACT",
    "MAX_DEPTH",
    "MAX_FRAME_DEPTH",
    "InexactNumber",
    "NotJSONError",
    "check",
    "dumps",
    "dumps_checked",
    "loads",
    "loads_exact",
]
