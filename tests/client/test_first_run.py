"""What a new user sees first: why a wait timed out, what the logs say, a refused frame.

Real receivers and servers on 127.0.0.1 port 0, real SQLite files.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from outbox import Outbox, serve
from outbox.receiver import Incoming

from ..support import MS, fast_options, wait_until


def test_the_outbox_logger_has_a_null_handler() -> None:
    handlers = logging.getLogger("outbox").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)


async def test_a_failing_handler_is_named_in_stats_and_in_the_timeout(tmp_path: Path) -> None:
    async def handler(message: Incoming) -> None:
        raise RuntimeError("the handler is broken")

    async with (
        serve(handler, tmp_path / "inbox.db") as receiver,
        Outbox(tmp_path / "o.db", receiver.url, **fast_options()) as box,
    ):
        message_id = await box.send({"n": 1})
        await wait_until(lambda: box.stats().last_error is not None)
        last_error = box.stats().last_error
        assert last_error is not None and "code 1011" in last_error
        with pytest.raises(TimeoutError) as info:
            await box.wait_acked(message_id, timeout=100 * MS)
        assert "code 1011" in str(info.value) and "stay pending" in str(info.value)
        with pytest.raises(TimeoutError, match="code 1011"):
            await box.drain(timeout=100 * MS)


async def test_a_frame_too_big_for_the_server_is_noted_on_its_row(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(None, tmp_path / "inbox.db", max_size=4096) as receiver:
        options = fast_options(max_reconnect_attempts=2, batch=False)
        async with Outbox(tmp_path / "o.db", receiver.url, **options) as box:
            small = await box.send({"n": 1})
            await box.wait_acked(small, timeout=10)
            big = await box.send({"pad": "x" * 10_000})
            await wait_until(lambda: box.state.value == "gave_up", timeout=10)
    with sqlite3.connect(tmp_path / "o.db") as conn:
        (error,) = conn.execute("SELECT last_error FROM outbox WHERE id = ?", (big,)).fetchone()
    assert error.startswith("server closed with 1009"), error
    assert "exceeds limit of 4096 bytes" in error
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "AttributeError" not in messages and "call_soon" not in messages


async def test_wss_to_a_plain_server_says_more_than_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(None, tmp_path / "inbox.db") as receiver:
        url = receiver.url.replace("ws://", "wss://")
        options = fast_options(max_reconnect_attempts=0)
        async with Outbox(tmp_path / "o.db", url, **options) as box:
            await wait_until(lambda: box.state.value == "gave_up", timeout=10)
            last_error = box.stats().last_error
    assert last_error is not None and last_error.startswith("cannot reach the server: ")
    assert not last_error.endswith(": ") and "cannot reach the server: ;" not in caplog.text
