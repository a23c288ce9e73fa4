"""Several text frames in one socket write: the per-frame path's cost is mostly the write.

``websockets`` writes each frame with its own ``transport.write``; on an idle socket each is
a ``send()`` system call, and on loopback that call also runs the peer's TCP receive path.
A page of small frames (the seed's one message per frame, or a round's acks) written at
once costs one call instead of one per frame. The frames go through the connection's own
protocol object inside ``send_context``, the way websockets documents for writing through
it, so state checks, close handling and flow control stay websockets' own.
"""

from __future__ import annotations

from collections.abc import Iterable

from websockets.asyncio.connection import Connection

__all__ = ["write_text_frames"]


async def write_text_frames(ws: Connection, frames: Iterable[bytes]) -> None:
    """Send each of ``frames`` (UTF-8) as a text frame, with one write to the transport.

    Raises ``ConnectionClosed`` like ``ws.send``. Drains once, after the whole page: a
    caller sending a lot bounds each page by bytes.
    """
    async with ws.send_context():
        protocol = ws.protocol
        for data in frames:
            protocol.send_text(data)
        chunks = protocol.data_to_send()
        data = b"".join(chunks)
        if data:
            ws.transport.write(data)
        if b"" in chunks:  # an end of stream (not after text frames on an open connection)
            if ws.transport.can_write_eof():
                ws.transport.write_eof()
            else:
                ws.transport.close()
