"""The wire protocol, sans I/O: synchronous, no sockets (docs/protocol.md)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbox.errors import ProtocolError
from outbox.protocol import wire

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
ids = st.integers(min_value=1, max_value=2**62)


def test_features_parse_and_format() -> None:
    assert wire.parse_features(None) == frozenset()
    assert wire.parse_features("") == frozenset()
    assert wire.parse_features(" Batch ,batch-ack,, x ") == {"batch", "batch-ack", "x"}
    assert wire.format_features({"batch-ack", "batch"}) == "batch, batch-ack"
    assert wire.parse_features(wire.format_features(wire.CLIENT_FEATURES)) == set(
        wire.CLIENT_FEATURES
    )


@given(ids, json_values)
def test_one_message_round_trips(message_id: int, data: Any) -> None:
    frame = wire.encode_message(message_id, json.dumps(data))
    assert wire.parse_client_frame(frame) == [wire.Message(message_id, data)]


@given(st.lists(st.tuples(ids, json_values), min_size=1, max_size=20))
def test_batch_round_trips_in_order(items: list[tuple[int, Any]]) -> None:
    frame = wire.encode_batch([(i, json.dumps(d)) for i, d in items])
    assert wire.parse_client_frame(frame) == [wire.Message(i, d) for i, d in items]


def test_seed_frames_parse() -> None:
    assert wire.parse_client_frame(wire.PING_FRAME) == wire.Ping()
    assert wire.parse_client_frame('{"id": 3, "data": null}') == [wire.Message(3, None)]
    assert wire.parse_server_frame(wire.PONG_FRAME) == wire.Pong()


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (b'{"id": 1, "data": 1}', "binary"),
        ("{", "not JSON"),
        ("[]", "JSON object"),
        ('{"data": 1}', "missing 'id'"),
        ('{"id": 1}', "missing 'data'"),
        ('{"id": 0, "data": 1}', "positive integer"),
        ('{"id": true, "data": 1}', "positive integer"),
        ('{"id": 1.0, "data": 1}', "positive integer"),
        ('{"type": "batch", "messages": []}', "non-empty list"),
        ('{"type": "batch", "messages": [1]}', "batch item 0"),
        ('{"type": "hello"}', "unknown frame type"),
    ],
)
def test_bad_client_frames_say_what_is_wrong(frame: str | bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        wire.parse_client_frame(frame)


@given(st.lists(ids, min_size=1, max_size=50))
def test_acks_round_trip(message_ids: list[int]) -> None:
    assert wire.parse_server_frame(wire.encode_acks(message_ids)) == wire.Ack(tuple(message_ids))
    assert wire.parse_server_frame(wire.encode_ack(message_ids[0])) == wire.Ack((message_ids[0],))


@given(ids, st.text())
def test_nack_round_trips(message_id: int, reason: str) -> None:
    """A reason comes back as sent, clipped to MAX_ECHO_BYTES (lone surrogates as "?")."""
    assert wire.parse_server_frame(wire.encode_nack(message_id, reason)) == wire.Nack(
        message_id, wire.clip(reason)
    )
    if len(reason.encode("utf-8", "replace")) <= wire.MAX_ECHO_BYTES and reason.isascii():
        assert wire.clip(reason) == reason


def test_nack_without_reason_gets_one() -> None:
    event = wire.parse_server_frame('{"type": "nack", "messageId": 4}')
    assert isinstance(event, wire.Nack) and event.id == 4 and event.reason


@pytest.mark.parametrize(
    "frame",
    [
        b"{}",
        "nope",
        "3",
        '{"type": "ack"}',
        '{"type": "ack", "messageIds": 3}',
        '{"type": "ack", "messageIds": [1, "2"]}',
        '{"type": "what"}',
    ],
)
def test_bad_server_frames_raise(frame: str | bytes) -> None:
    with pytest.raises(ProtocolError):
        wire.parse_server_frame(frame)


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"ack","messageId":007}',  # JSON has no leading zeros
        '{"type":"ack","messageId":0}',
        '{"type":"ack","messageId":1_0}',
        '{"type":"ack","messageId": 5 }x',
        '{"type":"ack","messageId":}',
        '{"type":"ack","messageId":9223372036854775808}',  # 2**63
        '{"type":"ack","messageId":١}',  # a digit, but not ASCII
        '{"type":"ack","messageIds":[1,true]}',  # bool is not an id
        '{"type":"ack","messageIds":[0,1]}',
        '{"type":"ack","messageIds":[1,9223372036854775808]}',
    ],
)
def test_fast_ack_paths_refuse_what_the_general_path_refuses(frame: str) -> None:
    """The seed ack read without a decoder, and batched acks checked in C, accept exactly
    what the full parse accepts."""
    with pytest.raises(ProtocolError):
        wire.parse_server_frame(frame)


def test_fast_ack_paths_read_the_same_ids_as_the_general_path() -> None:
    assert wire.parse_server_frame('{"type":"ack","messageId":9223372036854775807}') == wire.Ack(
        (2**63 - 1,)
    )
    assert wire.parse_server_frame('{"type": "ack", "messageId": 12}') == wire.Ack((12,))
    assert wire.parse_server_frame('{"type":"ack","messageIds":[3,1,2]}') == wire.Ack((3, 1, 2))
    assert wire.parse_server_frame('{"type":"ack","messageIds":[]}') == wire.Ack(())
