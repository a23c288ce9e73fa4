"""A receiver on PostgreSQL keeps every inbox row for now: it does not accept low-water."""

from __future__ import annotations

import pytest
from websockets.asyncio.client import connect

from outbox.protocol import wire
from outbox.receiver import Incoming, serve


async def handler(message: Incoming) -> None:
    return None


async def test_postgresql_does_not_accept_low_water_yet(pg_url: str) -> None:
    async with serve(handler, pg_url) as rx:
        assert rx._pruner is None
        headers = {
            wire.CLIENT_ID_HEADER: "c1",
            wire.FEATURES_HEADER: wire.format_features(wire.CLIENT_FEATURES),
            wire.LOW_WATER_HEADER: "5",
        }
        async with connect(rx.url, additional_headers=headers) as ws:
            assert ws.response is not None
            accepted = wire.parse_features(ws.response.headers[wire.FEATURES_HEADER])
            assert wire.FEATURE_LOW_WATER not in accepted
    with pytest.raises(ValueError, match="prune=True needs a SQLite inbox"):
        serve(handler, pg_url, prune=True)
