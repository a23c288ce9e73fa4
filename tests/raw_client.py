"""A raw websockets client speaking our wire: the frames a test sends, the answers it reads.

For receiver tests that need frames a conforming client would not send, or need to see each
answer; shared by the SQLite and the PostgreSQL receiver's tests.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from outbox.protocol import wire

OURS = wire.format_features(wire.CLIENT_FEATURES)


def headers(client_id: str, features: str = OURS) -> dict[str, str]:
    """What our client sends in the handshake."""
    return {wire.CLIENT_ID_HEADER: client_id, wire.FEATURES_HEADER: features}


def low_water_headers(
    client_id: str, features: str = "", mark: int | None = None
) -> dict[str, str]:
    """A handshake that announces only ``features`` (none: a seed-style client) and, with
    ``mark``, our client's low-water mark."""
    result = {wire.CLIENT_ID_HEADER: client_id}
    if features:
        result[wire.FEATURES_HEADER] = features
    if mark is not None:
        result[wire.LOW_WATER_HEADER] = str(mark)
    return result


def features(ws: ClientConnection) -> str:
    """The Outbox-Features header of the server's handshake response."""
    assert ws.response is not None
    return ws.response.headers[wire.FEATURES_HEADER]


def message(message_id: int, data: Any) -> str:
    return wire.encode_message(message_id, json.dumps(data))


def batch(ids: Sequence[int]) -> str:
    return wire.encode_batch([(i, json.dumps({"n": i})) for i in ids])


async def recv(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        frame = await ws.recv()
    result: dict[str, Any] = json.loads(frame)
    return result


async def acks(ws: ClientConnection, count: int) -> list[int]:
    """Read ack frames (either form) until ``count`` ids arrived; fail on anything else."""
    ids: list[int] = []
    while len(ids) < count:
        frame = await recv(ws)
        assert frame["type"] == "ack", frame
        ids.extend(frame["messageIds"] if "messageIds" in frame else [frame["messageId"]])
    return ids


async def closed_with(ws: ClientConnection) -> int:
    """Read until the server closes; return its close code."""
    with pytest.raises(ConnectionClosed) as info:
        async with asyncio.timeout(10):
            while True:
                await ws.recv()
    assert info.value.rcvd is not None
    return int(info.value.rcvd.code)
