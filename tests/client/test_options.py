"""Options: every check of __post_init__ with its message, and from_kwargs. No I/O."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import pytest

from outbox import Outbox
from outbox.client.options import Options

POSITIVE = [
    "heartbeat_interval",
    "heartbeat_timeout",
    "ack_timeout",
    "open_timeout",
    "purge_interval",
]
AT_LEAST_ONE = [
    "max_missed_heartbeats",
    "max_inflight",
    "max_message_size",
    "max_server_frame",
    "max_batch_messages",
    "page_size",
    "max_batch_bytes",
]
AT_LEAST_ONE_OR_NONE = ["max_attempts", "max_pending", "acked_retention_count"]


def test_the_defaults_are_valid() -> None:
    options = Options()
    assert options.heartbeat_interval == 30.0 and options.max_attempts == 3
    assert options.synchronous == "FULL"


def test_options_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Options().ack_timeout = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("name", POSITIVE)
@pytest.mark.parametrize("value", [0, -1.5, math.nan])
def test_intervals_must_be_positive(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be positive, got {value!r}$"):
        Options(**{name: value})


def test_reconnect_max_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"^reconnect_max_interval must be positive, got 0$"):
        Options(reconnect_max_interval=0)


@pytest.mark.parametrize("name", AT_LEAST_ONE)
def test_sizes_and_counts_must_be_at_least_one(name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be at least 1, got 0$"):
        Options(**{name: 0})
    Options(**{name: 1})


def test_heartbeat_mode_is_protocol_or_json() -> None:
    Options(heartbeat="json")
    with pytest.raises(ValueError, match=r"^heartbeat must be 'protocol' or 'json', got 'pong'$"):
        Options(heartbeat="pong")  # type: ignore[arg-type]


def test_synchronous_is_a_sqlite_level() -> None:
    assert Options(synchronous="normal").synchronous == "normal"  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"^synchronous must be OFF, NORMAL, FULL or EXTRA, got 'SOMETIMES'$"
    ):
        Options(synchronous="SOMETIMES")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("interval", "maximum"),
    [(0, 60.0), (-1, 60.0), (61.0, 60.0), (2.0, 1.0)],
)
def test_reconnect_interval_is_positive_and_under_the_cap(interval: float, maximum: float) -> None:
    with pytest.raises(
        ValueError, match=r"^need 0 < reconnect_interval <= reconnect_max_interval$"
    ):
        Options(reconnect_interval=interval, reconnect_max_interval=maximum)


def test_reconnect_interval_may_equal_the_cap() -> None:
    Options(reconnect_interval=5.0, reconnect_max_interval=5.0)


@pytest.mark.parametrize("name", AT_LEAST_ONE_OR_NONE)
def test_limits_are_at_least_one_or_none(name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be at least 1 or None, got 0$"):
        Options(**{name: 0})
    assert getattr(Options(**{name: None}), name) is None
    assert getattr(Options(**{name: 1}), name) == 1


def test_max_reconnect_attempts_is_zero_or_more_or_none() -> None:
    with pytest.raises(ValueError, match=r"^max_reconnect_attempts must be >= 0 or None$"):
        Options(max_reconnect_attempts=-1)
    assert Options(max_reconnect_attempts=0).max_reconnect_attempts == 0
    assert Options(max_reconnect_attempts=None).max_reconnect_attempts is None


def test_acked_retention_is_zero_or_more_or_none() -> None:
    with pytest.raises(ValueError, match=r"^acked_retention must be >= 0 or None$"):
        Options(acked_retention=-1.0)
    assert Options(acked_retention=0).acked_retention == 0
    assert Options(acked_retention=None).acked_retention is None


# -- from_kwargs -----------------------------------------------------------------------------


def test_from_kwargs_builds_options() -> None:
    options = Options.from_kwargs({"ack_timeout": 1.5, "batch": False})
    assert options == Options(ack_timeout=1.5, batch=False)
    assert Options.from_kwargs({}) == Options()


def test_from_kwargs_refuses_unknown_options_and_lists_the_valid_ones() -> None:
    with pytest.raises(TypeError) as caught:
        Options.from_kwargs({"ack_timout": 1.0, "retries": 3, "max_pending": 10})
    message = str(caught.value)
    assert message.startswith("Outbox got unknown option(s) ack_timout, retries; the options are: ")
    listed = message.split("the options are: ", 1)[1].split(", ")
    assert listed == sorted(f.name for f in dataclasses.fields(Options))
    assert "max_pending" not in message.split(";")[0]  # a known one is not called unknown


def test_from_kwargs_still_runs_the_checks() -> None:
    with pytest.raises(ValueError, match="ack_timeout must be positive"):
        Options.from_kwargs({"ack_timeout": 0})


def test_outbox_refuses_unknown_options_when_constructed() -> None:
    kwargs: dict[str, Any] = {"heartbeat_intervall": 1.0}
    with pytest.raises(TypeError, match=re.escape("unknown option(s) heartbeat_intervall")):
        Outbox("unused.db", "ws://127.0.0.1:1/", **kwargs)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ack_timeout": "5"}, "ack_timeout must be a number of seconds (int or float), got str"),
        ({"heartbeat_interval": True}, "heartbeat_interval must be a number of seconds"),
        ({"max_inflight": 10.0}, "max_inflight must be an int, got float"),
        ({"max_pending": "100"}, "max_pending must be an int or None, got str"),
        ({"batch": 1}, "batch must be True or False, got int"),
        ({"synchronous": 2}, "synchronous must be a str, got int"),
        ({"additional_headers": {"X": 1}}, "additional_headers must be a dict of str to str"),
        ({"ssl": "yes"}, "ssl must be an ssl.SSLContext or None, got str"),
        ({"close_flush_timeout": None}, "close_flush_timeout must be a number of seconds"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_option(options: dict[str, Any], message: str) -> None:
    with pytest.raises(TypeError, match=re.escape(message)):
        Outbox("unused.db", "ws://127.0.0.1:9/", **options)


def test_every_option_has_a_type_check() -> None:
    from outbox.client import options as module

    assert set(module._KINDS) == {f.name for f in dataclasses.fields(Options)}


@pytest.mark.parametrize("name", ["close_flush_timeout", "close_timeout", "busy_timeout"])
def test_waits_on_close_are_zero_or_more(name: str) -> None:
    assert getattr(Options(**{name: 0}), name) == 0
    with pytest.raises(ValueError, match=rf"^{name} must be >= 0 seconds, got -1$"):
        Options(**{name: -1})


def test_synchronous_is_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="synchronous must be OFF, NORMAL, FULL or EXTRA"):
        Outbox("unused.db", "ws://127.0.0.1:9/", synchronous="FUL")
