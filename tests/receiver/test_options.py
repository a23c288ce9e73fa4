"""ReceiverOptions: every bad value fails when the Receiver is built, naming the option.

Synchronous and socket-free: nothing here starts a receiver.
"""

from __future__ import annotations

import math
import ssl
from pathlib import Path
from typing import Any

import pytest

from outbox.receiver import DEFAULT_MAX_SIZE, Receiver, ReceiverOptions, serve


def option(name: str, value: Any) -> ReceiverOptions:
    """ReceiverOptions with one option set."""
    kwargs: dict[str, Any] = {name: value}
    return ReceiverOptions(**kwargs)


def test_defaults_are_the_receivers_documented_ones() -> None:
    opts = ReceiverOptions()
    assert opts.host == "127.0.0.1"
    assert opts.port == 0
    assert opts.synchronous == "FULL"
    assert opts.max_size == DEFAULT_MAX_SIZE
    assert opts.max_backlog == 10_000
    assert opts.compression is None
    assert (opts.ping_interval, opts.ping_timeout, opts.close_timeout) == (20.0, 20.0, 5.0)


def test_options_are_frozen() -> None:
    opts = ReceiverOptions()
    with pytest.raises(AttributeError):
        opts.port = 1  # type: ignore[misc]


def test_serve_with_max_backlog_0_raises_at_construction(tmp_path: Path) -> None:
    # It used to be accepted, then the reader stopped after the first message.
    with pytest.raises(ValueError, match="max_backlog must be at least 1, got 0"):
        serve(None, tmp_path / "inbox.db", max_backlog=0)
    assert not (tmp_path / "inbox.db").exists()


def test_receiver_checks_every_option_it_forwards(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"port must be in 0\.\.65535"):
        Receiver(None, tmp_path / "inbox.db", port=70000)
    with pytest.raises(ValueError, match="synchronous must be OFF, NORMAL, FULL or EXTRA"):
        Receiver(None, tmp_path / "inbox.db", synchronous="sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, -1])
@pytest.mark.parametrize("name", ["max_backlog", "max_size"])
def test_counts_must_be_at_least_1(name: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"{name} must be at least 1, got {value}"):
        option(name, value)


@pytest.mark.parametrize("name", ["busy_timeout", "close_timeout"])
def test_timeouts_refuse_negative_and_nan(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a number of seconds >= 0, got -0.5"):
        option(name, -0.5)
    with pytest.raises(ValueError, match=f"{name} must be a number of seconds >= 0, got nan"):
        option(name, math.nan)


@pytest.mark.parametrize("name", ["busy_timeout", "close_timeout"])
def test_timeouts_accept_zero_and_ints(name: str) -> None:
    assert getattr(option(name, 0), name) == 0
    assert getattr(option(name, 3), name) == 3


@pytest.mark.parametrize("value", [0, -1, 0.0])
@pytest.mark.parametrize("name", ["ping_interval", "ping_timeout"])
def test_ping_settings_are_none_or_positive(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a positive number of seconds or None"):
        option(name, value)
    assert getattr(option(name, None), name) is None
    assert getattr(option(name, 0.5), name) == 0.5


@pytest.mark.parametrize("port", [-1, 65536])
def test_port_range(port: int) -> None:
    with pytest.raises(ValueError, match=rf"port must be in 0\.\.65535 .*got {port}"):
        ReceiverOptions(port=port)


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_port_bounds_are_accepted(port: int) -> None:
    assert ReceiverOptions(port=port).port == port


@pytest.mark.parametrize("level", ["off", "Normal", "FULL", "extra"])
def test_synchronous_is_case_insensitive_and_stored_upper_case(level: str) -> None:
    assert ReceiverOptions(synchronous=level).synchronous == level.upper()  # type: ignore[arg-type]


def test_synchronous_refuses_other_levels() -> None:
    with pytest.raises(ValueError, match=r"synchronous must be OFF, NORMAL, FULL or EXTRA.*'ON'"):
        ReceiverOptions(synchronous="ON")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="synchronous must be a str"):
        ReceiverOptions(synchronous=2)  # type: ignore[arg-type]


def test_compression_is_none_or_deflate() -> None:
    assert ReceiverOptions(compression="deflate").compression == "deflate"
    assert ReceiverOptions(compression=None).compression is None
    with pytest.raises(ValueError, match="compression must be None or 'deflate', got 'gzip'"):
        ReceiverOptions(compression="gzip")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("port", "8080"),
        ("port", 80.0),
        ("max_size", "1"),
        ("max_backlog", 1.5),
        ("busy_timeout", "5"),
        ("close_timeout", "5"),
        ("ping_interval", "20"),
        ("ping_timeout", "20"),
    ],
)
def test_wrong_types_raise_type_error_naming_the_option(name: str, value: Any) -> None:
    with pytest.raises(TypeError, match=f"{name} must be"):
        option(name, value)


@pytest.mark.parametrize(
    "name", ["port", "max_size", "max_backlog", "busy_timeout", "close_timeout", "ping_interval"]
)
def test_bool_is_not_a_number(name: str) -> None:
    with pytest.raises(TypeError, match=f"{name} must be .*got bool"):
        option(name, True)


def test_host_and_ssl_types() -> None:
    assert ReceiverOptions(host=None).host is None
    with pytest.raises(TypeError, match="host must be a str or None, got int"):
        ReceiverOptions(host=127)  # type: ignore[arg-type]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    assert ReceiverOptions(ssl=context).ssl is context
    with pytest.raises(TypeError, match=r"ssl must be an ssl\.SSLContext or None"):
        ReceiverOptions(ssl=True)  # type: ignore[arg-type]
