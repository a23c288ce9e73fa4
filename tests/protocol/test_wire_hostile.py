"""Frames a hostile or broken peer sends: refused at parse time, never echoed unbounded."""

from __future__ import annotations

import json

import pytest

from outbox.errors import ProtocolError
from outbox.protocol import wire


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        ('{"id": 9223372036854775808, "data": 1}', "up to 2\\*\\*63-1"),
        ('{"id": 1, "data": NaN}', "not JSON"),
        ('{"id": 1, "data": [Infinity]}', "not JSON"),
        ('{"id": 1, "data": "\\ud800"}', "lone surrogate|surrogate"),
        ('{"id": 1, "data": 123456789012345678901234567890}', "beyond 64 bits"),
        ('{"id": 1, "data": ' + "[" * 100 + "]" * 100 + "}", "deeper than"),
    ],
)
def test_frames_the_inbox_cannot_store_are_refused_at_parse_time(frame: str, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        wire.parse_client_frame(frame)


def test_a_batch_keeps_its_good_messages_and_nacks_the_bad_ones() -> None:
    frame = json.dumps(
        {
            "type": "batch",
            "messages": [
                {"id": 1, "data": "ok"},
                {"id": 2**63, "data": "id out of range"},
                {"id": 3, "data": "ok"},
            ],
        }
    )
    with pytest.raises(ProtocolError) as error:
        wire.parse_client_frame(frame)
    items = wire.salvage(frame, error.value)
    assert [type(item).__name__ for item in items] == ["Message", "Malformed", "Message"]
    bad = items[1]
    assert isinstance(bad, wire.Malformed) and bad.id == 2**63 and "2**63-1" in bad.reason


def test_a_nan_in_a_batch_is_nacked_alone() -> None:
    frame = '{"type":"batch","messages":[{"id":1,"data":1},{"id":2,"data":NaN}]}'
    with pytest.raises(ProtocolError) as error:
        wire.parse_client_frame(frame)
    items = wire.salvage(frame, error.value)
    # NaN makes the whole frame undecodable JSON: nothing can be nacked, the peer is closed.
    assert [type(item).__name__ for item in items] == ["Close"]


def test_a_huge_field_is_not_echoed_back() -> None:
    huge = "x" * 4_000_000
    frame = json.dumps({"id": 1, "type": huge, "data": 1})
    with pytest.raises(ProtocolError) as error:
        wire.parse_client_frame(frame)
    assert len(str(error.value).encode()) < 400
    items = wire.salvage(frame, error.value)
    assert isinstance(items[0], wire.Malformed)
    nack = wire.encode_nack(items[0].id, items[0].reason)
    assert len(nack.encode()) < 400


def test_nack_reasons_are_clipped_both_ways() -> None:
    sent = wire.encode_nack(7, "é" * 10_000)
    assert len(sent.encode()) <= wire.MAX_ECHO_BYTES + 60
    event = wire.parse_server_frame(
        json.dumps({"type": "nack", "messageId": 7, "reason": "y" * 10**6})
    )
    assert isinstance(event, wire.Nack)
    assert len(event.reason.encode()) <= wire.MAX_ECHO_BYTES and event.reason.endswith("...")


def test_clip_cuts_at_a_character_boundary() -> None:
    clipped = wire.clip("é" * 300, 11)
    assert clipped == "éééé..."
    assert wire.clip("short") == "short"


def test_a_huge_unknown_type_from_the_server_is_clipped_in_the_error() -> None:
    with pytest.raises(ProtocolError) as error:
        wire.parse_server_frame(json.dumps({"type": "z" * 10**6}))
    assert len(str(error.value)) < 400


def test_a_very_deep_frame_from_the_server_is_a_protocol_error() -> None:
    """Not a RecursionError: that used to put the client in a reconnect loop."""
    with pytest.raises(ProtocolError):
        wire.parse_server_frame("[" * 100_000 + "]" * 100_000)


def test_a_large_float_is_accepted_as_sent() -> None:
    """Only an integer beyond 64 bits is refused: 1e19 and -2.5e30 are plain floats."""
    [message] = wire.parse_client_frame('{"id": 1, "data": {"a": 1e19, "b": -2.5e30}}')
    assert message.data == {"a": 1e19, "b": -2.5e30}
