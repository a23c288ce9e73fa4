"""The handshake's pure helpers: what the client claims, and what the hook decides."""

from __future__ import annotations

from http import HTTPStatus

import pytest
from websockets.datastructures import Headers

from outbox.protocol import wire
from outbox.receiver import ANONYMOUS_PREFIX, ConnectRequest, Refuse
from outbox.receiver.handshake import (
    MAX_CLIENT_ID,
    anonymous_id,
    claimed_client_id,
    parse_target,
    run_hook,
    usable_client_id,
)


def request(client_id: str | None = "c1") -> ConnectRequest:
    return ConnectRequest(
        path="/", query={}, headers=Headers(), client_id=client_id, remote_address=None
    )


def test_parse_target_keeps_the_first_value_and_blank_ones() -> None:
    assert parse_target("/in/box?client_id=a&client_id=b&empty=") == (
        "/in/box",
        {"client_id": "a", "empty": ""},
    )
    assert parse_target("/") == ("/", {})


def test_the_header_wins_over_the_query_parameter() -> None:
    headers = Headers({wire.CLIENT_ID_HEADER: "from-header"})
    assert claimed_client_id(headers, {"client_id": "from-query"}) == "from-header"
    assert claimed_client_id(Headers(), {"client_id": "from-query"}) == "from-query"


def test_an_empty_claim_is_no_claim() -> None:
    assert claimed_client_id(Headers({wire.CLIENT_ID_HEADER: ""}), {"client_id": ""}) is None
    assert claimed_client_id(Headers(), {}) is None


def test_usable_client_ids() -> None:
    assert usable_client_id(None)
    assert usable_client_id("x" * MAX_CLIENT_ID)
    assert not usable_client_id("x" * (MAX_CLIENT_ID + 1))
    assert not usable_client_id("a\nb")


def test_anonymous_ids_are_prefixed_and_fresh() -> None:
    first, second = anonymous_id(), anonymous_id()
    assert first.startswith(ANONYMOUS_PREFIX) and second.startswith(ANONYMOUS_PREFIX)
    assert first != second


async def test_run_hook_accepts_sync_and_async_hooks() -> None:
    async def async_hook(req: ConnectRequest) -> str:
        return f"user:{req.client_id}"

    assert await run_hook(lambda req: "alice", request()) == "alice"
    assert await run_hook(async_hook, request("c9")) == "user:c9"


@pytest.mark.parametrize("result", [None, ""])
async def test_a_hook_that_names_nobody_refuses_with_401(result: str | None) -> None:
    decided = await run_hook(lambda req: result, request())
    assert isinstance(decided, Refuse)
    assert decided.status == HTTPStatus.UNAUTHORIZED


async def test_refuse_from_the_hook_is_returned_and_other_errors_propagate() -> None:
    def refuse(req: ConnectRequest) -> str:
        raise Refuse(HTTPStatus.FORBIDDEN, "not you")

    def broken(req: ConnectRequest) -> str:
        raise KeyError("bug")

    decided = await run_hook(refuse, request())
    assert isinstance(decided, Refuse) and decided.reason == "not you"
    with pytest.raises(KeyError):
        await run_hook(broken, request())
