"""A page of text frames in one socket write, on real connections on 127.0.0.1.

The receiver's own use (a round's acks, paged by bytes, the Close after them) is here too,
end to end: its sender is the one place a page meets a close and a send timeout.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from outbox.protocol.wire import Close
from outbox.receiver import Incoming
from outbox.receiver import serve as serve_receiver
from outbox.receiver.connection import PAGE_BYTES, Peer, send_loop
from outbox.websocket_writes import write_text_frames

from .raw_client import message
from .support import wait_until


def count_writes(ws: ClientConnection | ServerConnection) -> list[int]:
    """The sizes of the transport's writes from now on (the write itself still happens)."""
    sizes: list[int] = []
    transport: Any = ws.transport
    write: Callable[[bytes], None] = transport.write

    def counted(data: bytes) -> None:
        sizes.append(len(data))
        write(data)

    transport.write = counted
    return sizes


@asynccontextmanager
async def collecting_server() -> AsyncIterator[tuple[str, list[str]]]:
    """A plain websockets server that keeps every message it reads, in order."""
    received: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        async for frame in ws:
            assert isinstance(frame, str)
            received.append(frame)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/", received


async def test_a_page_arrives_as_separate_frames_in_order_from_one_write() -> None:
    frames = [json.dumps({"n": n}).encode() for n in range(200)]
    async with collecting_server() as (url, received), connect(url) as ws:
        writes = count_writes(ws)
        await write_text_frames(ws, frames)
        await wait_until(lambda: len(received) == len(frames))
        assert len(writes) == 1
    assert received == [frame.decode() for frame in frames]


async def test_an_empty_page_writes_nothing() -> None:
    async with collecting_server() as (url, received), connect(url) as ws:
        writes = count_writes(ws)
        await write_text_frames(ws, [])
        await write_text_frames(ws, [b'"after"'])
        await wait_until(lambda: received == ['"after"'])
        assert len(writes) == 1


async def test_a_closed_connection_raises_connection_closed_and_writes_nothing() -> None:
    async with collecting_server() as (url, received), connect(url) as ws:
        await ws.close()
        writes = count_writes(ws)
        with pytest.raises(ConnectionClosed):
            await write_text_frames(ws, [b'"late"'])
    assert writes == []
    assert received == []


# -- the receiver's sender -----------------------------------------------------------------


async def test_a_rounds_acks_to_a_seed_client_go_out_in_one_write(tmp_path: Path) -> None:
    """49 messages, one per frame, read while the handler holds the first: their round's
    49 acks are one write, not 49."""
    release = asyncio.Event()

    async def handler(incoming: Incoming) -> None:
        if incoming.id == 1:
            await release.wait()

    async with serve_receiver(handler, tmp_path / "inbox.db") as rx:
        async with connect(rx.url) as ws:  # a seed-style client: one ack frame per message
            await ws.send(message(1, "first"))
            await wait_until(lambda: rx.stats.frames == 1)
            [peer] = rx._peers
            writes = count_writes(peer.ws)
            for i in range(2, 51):
                await ws.send(message(i, i))
            await wait_until(lambda: rx.stats.frames == 50)
            release.set()
            acks = [json.loads(await ws.recv()) for _ in range(50)]
            assert len(writes) == 2  # message 1's round, then the other 49's
        assert acks == [{"type": "ack", "messageId": i} for i in range(1, 51)]


async def test_answers_go_out_in_pages_of_bounded_bytes_then_the_close() -> None:
    """A queue of 3 pages' worth of answers and a Close: written in pages of at most
    PAGE_BYTES (plus the frame that crosses it), all in order, then the close frame."""
    frame = json.dumps({"type": "ack", "messageId": 0, "pad": "x" * 1000})
    count = 3 * PAGE_BYTES // len(frame)
    done = asyncio.Event()
    writes: list[int] = []

    async def handler(ws: ServerConnection) -> None:
        peer = Peer(ws, "c1", batch_ack=False)
        counted = count_writes(ws)
        for _ in range(count):
            peer.send(frame)
        peer.send(Close(CloseCode.GOING_AWAY, "bye"))
        await send_loop(peer, send_timeout=10)
        writes.extend(counted)
        done.set()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/") as ws:
            received = [frame async for frame in ws]
            assert ws.close_code == CloseCode.GOING_AWAY
        await asyncio.wait_for(done.wait(), 10)
    assert received == [frame] * count
    # Three pages, then the close frame's own write. A page's frames are counted by their
    # text; on the wire each also has its 4-byte header.
    pages, close = writes[:-1], writes[-1]
    assert len(pages) == 3, pages
    most = (PAGE_BYTES // len(frame) + 1) * (len(frame) + 4)
    assert max(pages) <= most, (pages, most)
    assert close < 64
