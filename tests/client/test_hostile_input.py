"""Bad input fails only the call or frame it came in: a lone surrogate among concurrent
sends, a frame from the server too deep for a recursive decoder (issue 9, section 7)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from outbox import Outbox, PayloadNotJSONError

from ..support import ScriptedServer, fast_options, wait_until


async def test_a_lone_surrogate_fails_its_own_send_and_no_other(
    server: ScriptedServer, db: Path
) -> None:
    """It passed the JSON check and then broke the shared group commit: all 50-100 concurrent
    send() calls raised UnicodeEncodeError and no row was written."""
    async with Outbox(db, server.url, **fast_options()) as box:
        good = [box.send({"n": n}) for n in range(50)]
        results = await asyncio.gather(*good, box.send({"s": "\ud800"}), return_exceptions=True)
        *ids, bad = results
        assert isinstance(bad, PayloadNotJSONError) and "lone surrogate" in str(bad)
        assert all(isinstance(i, int) for i in ids)
        await box.drain(timeout=5)
        assert box.stats().acked == 50
    with pytest.raises(PayloadNotJSONError, match="lone surrogate"):
        async with Outbox(db, server.url, **fast_options()) as box:
            await box.send_many([{"ok": 1}, {"\udc00": "key"}])


async def test_a_frame_too_deep_to_decode_is_ignored_not_a_reconnect_loop(db: Path) -> None:
    """A 100k-deep frame from the server used to raise RecursionError in the reader: the
    session ended, and the next connection got the same frame: a reconnect loop."""
    deep = "[" * 100_000 + "]" * 100_000
    async with (
        ScriptedServer(extra_frames=[deep]) as server,
        Outbox(db, server.url, **fast_options()) as box,
    ):
        message_id = await box.send({"after": "the deep frame"})
        await box.wait_acked(message_id, timeout=5)
        await wait_until(lambda: box.stats().counters.protocol_errors >= 1)
        assert box.stats().reconnects == 0
