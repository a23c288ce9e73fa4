"""The wire protocol, sans I/O: frames in, events out (see docs/protocol.md).

Both halves of the project speak through this module: the client's sender and reader, and
the receiver. Nothing here touches a socket, a clock or a database, so every rule is tested
synchronously.

Compatibility with the seed article's peers is the baseline: one ``{"id", "data"}`` text
frame per message, one ``{"type": "ack", "messageId"}`` per message, and JSON ping/pong.
Batch frames and batched acks are extensions that a peer uses only when the other side
announced them in the handshake headers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from websockets.frames import CloseCode

from ..errors import ProtocolError
from . import codec

CLIENT_ID_HEADER = "Outbox-Client-Id"
"""Request header carrying the client's stable id (created once, stored in its database)."""

FEATURES_HEADER = "Outbox-Features"
"""Request header listing what the client understands; the response lists what the server
accepts. Comma-separated tokens."""

FEATURE_BATCH = "batch"
"""The server accepts ``{"type": "batch", "messages": [...]}`` frames."""

FEATURE_BATCH_ACK = "batch-ack"
"""The client accepts ``{"type": "ack", "messageIds": [...]}`` frames."""

FEATURE_ID_CONFLICT = "id-conflict"
"""The client renumbers a message the receiver refused as an id conflict (``"conflict":
true`` in the nack), and reads the ``Outbox-High-Water`` response header."""

HIGH_WATER_HEADER = "Outbox-High-Water"
"""Response header, only for clients that announced ``id-conflict``: the highest message id
the receiver has recorded for this client's identity (0 for none)."""

FEATURE_LOW_WATER = "low-water"
"""The client announces its low-water mark (``Outbox-Low-Water`` and ``low-water`` frames):
every id below it is acked and will never be sent again, so the receiver may prune its inbox
rows below it (docs/protocol.md, "A bounded inbox")."""

LOW_WATER_HEADER = "Outbox-Low-Water"
"""Request header: the client's low-water mark at connect (see FEATURE_LOW_WATER)."""

CLIENT_FEATURES = (FEATURE_BATCH, FEATURE_BATCH_ACK, FEATURE_ID_CONFLICT, FEATURE_LOW_WATER)

PING_FRAME = '{"type":"ping"}'
PONG_FRAME = '{"type":"pong"}'


MAX_MESSAGE_ID = 2**63 - 1
"""Message ids are SQLite integers: 1 to 2**63 - 1."""

MAX_ECHO_BYTES = 200
"""Most bytes of a peer's own input that we echo back (a nack reason) or write to a log."""


def clip(text: str, limit: int = MAX_ECHO_BYTES) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, marked with "..." when cut.

    Anything a peer controls is clipped before it is echoed or logged: a 4 MB field repeated
    back to a peer that never reads would otherwise cost 4 MB per frame. Lone surrogates
    become "?", so the result always encodes.
    """
    if text.isascii():
        return text if len(text) <= limit else text[: limit - 3] + "..."
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= limit:
        return encoded.decode("utf-8")
    return encoded[: limit - 3].decode("utf-8", "ignore") + "..."


def show(value: Any) -> str:
    """A peer's value for an error message: its repr, clipped."""
    if isinstance(value, str) and len(value) > MAX_ECHO_BYTES:
        value = value[:MAX_ECHO_BYTES]  # no need to repr megabytes to keep 200 bytes
    return clip(repr(value))


def parse_high_water(value: str | None) -> int:
    """Read an ``Outbox-High-Water`` header value; anything but a message id counts as 0."""
    text = (value or "").strip()
    if not (text.isascii() and text.isdigit()):
        return 0
    number = int(text)
    return number if number <= MAX_MESSAGE_ID else 0


def parse_low_water(value: str | None) -> int | None:
    """Read an ``Outbox-Low-Water`` header value: a message id, else None (no mark)."""
    text = (value or "").strip()
    if not (text.isascii() and text.isdigit()):
        return None
    number = int(text)
    return number if 0 < number <= MAX_MESSAGE_ID else None


def parse_features(value: str | None) -> frozenset[str]:
    """Read an ``Outbox-Features`` header value; unknown tokens are kept and ignored."""
    if not value:
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(",") if token.strip())


def format_features(features: Iterable[str]) -> str:
    return ", ".join(sorted(features))


# ---------------------------------------------------------------------------------------------
# Client -> server
# ---------------------------------------------------------------------------------------------


def encode_message(message_id: int, payload_json: str) -> str:
    """One message per frame, the seed's form. ``payload_json`` is already JSON text."""
    return f'{{"id":{message_id},"data":{payload_json}}}'


def encode_batch(items: Sequence[tuple[int, str]] | Sequence[tuple[int, str, int]]) -> str:
    """Many messages in one frame, for servers that announced ``batch``: ``(id, payload)``
    pairs, or the sender's rows (their first two fields), each payload JSON text already."""
    body = ",".join([f'{{"id":{item[0]},"data":{item[1]}}}' for item in items])
    return f'{{"type":"batch","messages":[{body}]}}'


def encode_low_water(mark: int) -> str:
    """The client's low-water mark, only to servers that accepted ``low-water``."""
    return f'{{"type":"low-water","mark":{mark}}}'


@dataclass(frozen=True, slots=True)
class Message:
    """A message as the receiver sees it."""

    id: int
    data: Any


@dataclass(frozen=True, slots=True)
class Ping:
    """The seed's JSON heartbeat; answer with PONG_FRAME."""


@dataclass(frozen=True, slots=True)
class LowWater:
    """The client's low-water mark: every id below ``mark`` is acked and never sent again."""

    mark: int


def _message_id(value: Any, where: str, name: str = "id") -> int:
    if type(value) is not int or not 0 < value <= MAX_MESSAGE_ID:
        raise ProtocolError(
            f"{where}: {name!r} must be a positive integer up to 2**63-1, got {show(value)}"
        )
    return value


def _message(obj: Any, where: str, inexact: bool = False) -> Message:
    if not isinstance(obj, dict):
        raise ProtocolError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise ProtocolError(f"{where}: missing 'id'")
    if "data" not in obj:
        raise ProtocolError(f"{where}: missing 'data'")
    message_id = _message_id(obj["id"], where)
    data = obj["data"]
    try:
        codec.check(data, inexact=inexact)  # what the inbox can store as the client sent it
    except codec.NotJSONError as exc:
        raise ProtocolError(f"{where}: 'data' breaks the payload rule: {exc}") from None
    return Message(message_id, data)


def parse_client_frame(frame: str | bytes) -> list[Message] | Ping | LowWater:
    """Decode a frame from a client into its messages, a Ping, or a LowWater mark.

    Raises ProtocolError naming what is wrong: binary frame, not JSON, not an object, no
    integer id, an unknown type, or a malformed batch.
    """
    if isinstance(frame, bytes):
        raise ProtocolError("binary frames are not part of the protocol; send JSON text frames")
    try:
        return _client_frame(_decode(frame, codec.loads), codec.LOADS_IS_INEXACT)
    except codec.InexactNumber:
        # A float that may have been an integer beyond 64 bits: read the text exactly.
        return _client_frame(_decode(frame, codec.loads_exact), False)


def _decode(frame: str, loads: Callable[[str], Any]) -> Any:
    try:
        return loads(frame)
    except ValueError as exc:
        raise ProtocolError(f"frame is not JSON: {clip(str(exc))}") from None


def _client_frame(obj: Any, inexact: bool) -> list[Message] | Ping | LowWater:
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind is None:
        return [_message(obj, "message", inexact)]
    if kind == "ping":
        return Ping()
    if kind == "low-water":
        return LowWater(_message_id(obj.get("mark"), "low-water", "mark"))
    if kind == "batch":
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ProtocolError("batch: 'messages' must be a non-empty list")
        return [_message(item, f"batch item {i}", inexact) for i, item in enumerate(messages)]
    raise ProtocolError(f"unknown frame type {show(kind)}")


# ---------------------------------------------------------------------------------------------
# Server -> client
# ---------------------------------------------------------------------------------------------


def encode_ack(message_id: int) -> str:
    """The seed's ack, one per message."""
    return f'{{"type":"ack","messageId":{message_id}}}'


def encode_acks(message_ids: Sequence[int]) -> str:
    """Many acks in one frame, for clients that announced ``batch-ack``."""
    return f'{{"type":"ack","messageIds":[{",".join(map(str, message_ids))}]}}'


def encode_nack(message_id: int, reason: str, *, conflict: bool = False) -> str:
    """Refuse a message for good: the client marks it dead with this reason (clipped).

    ``conflict``: the receiver holds this id with other content (only for clients that
    announced ``id-conflict``; they renumber the message instead of marking it dead).
    """
    # The id is formatted, not encoded: a nack may answer an id too large for the payload
    # rule (a peer's 2**64), and that must not fail the answer.
    flag = ',"conflict":true' if conflict else ""
    return (
        f'{{"type":"nack","messageId":{int(message_id)},'
        f'"reason":{codec.dumps(clip(reason))}{flag}}}'
    )


@dataclass(frozen=True, slots=True)
class Ack:
    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Nack:
    id: int
    reason: str
    conflict: bool = False
    """The receiver already holds this id with other content (the ``id-conflict`` feature)."""


@dataclass(frozen=True, slots=True)
class Pong:
    """The seed's JSON heartbeat answer."""


ServerEvent = Ack | Nack | Pong


def parse_server_frame(frame: str | bytes) -> ServerEvent:
    """Decode a frame from the server; ProtocolError says what is wrong with a bad one."""
    if isinstance(frame, bytes):
        raise ProtocolError(f"unexpected binary frame ({len(frame)} bytes) from the server")
    try:
        obj = codec.loads(frame)
    except ValueError:
        raise ProtocolError(f"frame from the server is not JSON: {frame[:80]!r}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame from the server is not a JSON object: {frame[:80]!r}")
    kind = obj.get("type")
    if kind == "ack":
        if "messageIds" in obj:
            ids = obj["messageIds"]
            if not isinstance(ids, list):
                raise ProtocolError("ack: 'messageIds' must be a list of integers")
            # The usual frame, checked in C: only ints, all in range (bool is not int here).
            usual = ids and set(map(type, ids)) == {int}
            if usual and min(ids) > 0 and max(ids) <= MAX_MESSAGE_ID:
                return Ack(tuple(ids))
            return Ack(tuple(_message_id(i, "ack", "messageIds") for i in ids))
        return Ack((_message_id(obj.get("messageId"), "ack", "messageId"),))
    if kind == "nack":
        reason = obj.get("reason")
        return Nack(
            _message_id(obj.get("messageId"), "nack", "messageId"),
            clip(reason) if isinstance(reason, str) else "refused by the server (no reason given)",
            obj.get("conflict") is True,
        )
    if kind == "pong":
        return Pong()
    raise ProtocolError(f"unknown frame type {show(kind)} from the server")


# ---------------------------------------------------------------------------------------------
# What the receiver does with a frame it cannot take as it is
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Malformed:
    """A message whose id can be read but which is otherwise invalid: nack it."""

    id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Close:
    """Stop handling this connection's messages and close it with this code."""

    code: int
    reason: str


Item = Message | Malformed | Close


def close_reason(text: str) -> str:
    """A close reason must fit in 123 bytes of UTF-8 (RFC 6455 section 5.5)."""
    encoded = text.encode()
    return text if len(encoded) <= 123 else encoded[:120].decode(errors="ignore") + "..."


def _readable_id(obj: Any) -> int | None:
    """An id we can nack (any positive integer: a nack for an id out of range is harmless)."""
    value = obj.get("id") if isinstance(obj, dict) else None
    return value if type(value) is int and value > 0 else None


def salvage(frame: str | bytes, error: ProtocolError) -> list[Item]:
    """What to do with a frame that ``wire.parse_client_frame`` refused with ``error``.

    Where a message id can still be read, a :class:`Malformed` to nack (the good messages of
    the same batch are kept, in order); otherwise a :class:`Close`: 1003 for a binary frame,
    1007 for anything else (not JSON, not an object, no usable id). A batch holding a message
    whose id cannot be read is refused as a whole, since there is nothing to nack.
    """
    if isinstance(frame, bytes):
        return [Close(CloseCode.UNSUPPORTED_DATA, close_reason(str(error)))]
    fatal: list[Item] = [Close(CloseCode.INVALID_DATA, close_reason(str(error)))]
    try:
        obj = codec.loads_exact(frame)  # the slow path: read every integer exactly
    except ValueError:
        return fatal
    if not isinstance(obj, dict):
        return fatal
    messages = obj.get("messages")
    if obj.get("type") == "batch" and isinstance(messages, list) and messages:
        items: list[Item] = []
        for message in messages:
            message_id = _readable_id(message)
            if message_id is None:
                return fatal
            try:
                items.append(_message(message, "message"))  # the rule parse_client_frame applies
            except ProtocolError as exc:
                detail = str(exc).split(": ", 1)[-1]
                items.append(Malformed(message_id, f"malformed message: {detail}"))
        return items
    message_id = _readable_id(obj)
    if message_id is None:
        return fatal
    detail = str(error).split(": ", 1)[-1]
    return [Malformed(message_id, f"malformed message: {detail}")]


def ack_frames(acks: Sequence[int], nacks: Sequence[tuple[int, str]], batch: bool) -> list[str]:
    """The frames answering one transaction: one batched ack if the client announced
    ``batch-ack``, else one seed-style ack per message; one nack per refused message."""
    frames: list[str] = []
    if acks:
        if batch:
            frames.append(encode_acks(acks))
        else:
            frames.extend(map(encode_ack, acks))
    frames.extend(encode_nack(message_id, reason) for message_id, reason in nacks)
    return frames
