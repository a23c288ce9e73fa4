"""A message the server refuses as too big (1009) is counted, then dead; the queue moves on.

Real receivers (a websockets server with a small ``max_size``) on 127.0.0.1 port 0, real
SQLite files.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from outbox import MessageDeadError, Outbox, serve

from ..support import fast_options, wait_until


def _rows(path: Path) -> dict[int, tuple[str, int, str | None]]:
    with sqlite3.connect(path) as conn:
        found = conn.execute("SELECT id, status, attempts, last_error FROM outbox")
        return {int(n): (status, attempts, error) for n, status, attempts, error in found}


@pytest.mark.parametrize("batch", [False, True])
async def test_a_message_too_big_for_the_server_dies_and_the_rest_are_delivered(
    tmp_path: Path, batch: bool
) -> None:
    async with serve(None, tmp_path / "inbox.db", max_size=4096) as receiver:
        options = fast_options(max_attempts=2, batch=batch)
        async with Outbox(tmp_path / "o.db", receiver.url, **options) as box:
            before = await box.send({"n": 0})
            big = await box.send({"pad": "x" * 10_000})
            after = await box.send_many([{"n": n} for n in range(1, 20)])
            for message_id in (before, *after):
                await box.wait_acked(message_id, timeout=10)
            with pytest.raises(MessageDeadError, match="1009") as info:
                await box.wait_acked(big, timeout=10)
            assert info.value.message_id == big
            assert box.stats().dead == 1
    rows = _rows(tmp_path / "o.db")
    status, attempts, error = rows[big]
    assert status == "dead" and attempts == 2
    assert error is not None and "server closed with 1009" in error and "2 times" in error
    assert all(rows[n][0] == "acked" for n in (before, *after))


async def test_a_batch_too_big_for_the_server_is_sent_one_per_frame(tmp_path: Path) -> None:
    """Each message fits the server's max_size alone, their batch does not: none is blamed."""
    async with serve(None, tmp_path / "inbox.db", max_size=8192) as receiver:
        options = fast_options(max_attempts=1, batch=True)
        async with Outbox(tmp_path / "o.db", receiver.url, **options) as box:
            ids = await box.send_many([{"pad": "y" * 3000, "n": n} for n in range(6)])
            for message_id in ids:
                await box.wait_acked(message_id, timeout=10)
    rows = _rows(tmp_path / "o.db")
    assert all(status == "acked" and attempts == 0 for status, attempts, _ in rows.values())


async def test_max_attempts_none_never_gives_up_on_a_message_too_big(tmp_path: Path) -> None:
    async with serve(None, tmp_path / "inbox.db", max_size=4096) as receiver:
        options = fast_options(max_attempts=None, batch=False)
        async with Outbox(tmp_path / "o.db", receiver.url, **options) as box:
            big = await box.send({"pad": "x" * 10_000})
            await wait_until(lambda: _rows(tmp_path / "o.db")[big][1] >= 3, timeout=10)
            assert box.stats().dead == 0
    status, _, error = _rows(tmp_path / "o.db")[big]
    assert status == "pending" and error is not None and "1009" in error
