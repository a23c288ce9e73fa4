"""Pack pending rows into frames: one per message, or batch frames when the server agreed.

Pure: rows in, frame texts out. Batches are bounded by a message count and by payload
bytes (UTF-8, not characters); one message larger than the byte bound still goes alone.
"""

from __future__ import annotations

from collections.abc import Container, Sequence

from . import wire
from .feed import Row


def payload_bytes(payload: str) -> int:
    """Bytes of ``payload`` on the wire (cheap for the common ASCII case)."""
    return len(payload) if payload.isascii() else len(payload.encode())


def encode_frames(
    rows: Sequence[Row],
    *,
    batch: bool,
    max_messages: int,
    max_bytes: int,
    solo: Container[int] = frozenset(),
) -> list[str]:
    """The frames for these rows, in id order; ids in ``solo`` always go alone."""
    if not batch:
        return [wire.encode_message(row.id, row.payload) for row in rows]
    frames: list[str] = []
    groups = frame_groups(rows, max_messages=max_messages, max_bytes=max_bytes, solo=solo)
    for group in groups:
        if len(group) == 1:
            frames.append(wire.encode_message(group[0].id, group[0].payload))
        else:
            frames.append(wire.encode_batch(group))
    return frames


def frame_groups(
    rows: Sequence[Row],
    *,
    max_messages: int,
    max_bytes: int,
    solo: Container[int] = frozenset(),
) -> list[Sequence[Row]]:
    """The rows of each batch frame ``encode_frames`` makes, in the same order."""
    groups: list[Sequence[Row]] = []
    start, count = 0, len(rows)
    any_solo = bool(solo) if isinstance(solo, set | frozenset) else True
    if not any_solo and 1 < count <= max_messages:
        # The usual page: it all fits in one frame. Sized in C, with no loop of ours.
        payloads = [payload for _, payload, _ in rows]
        if sum(map(len, payloads)) <= max_bytes and all(map(str.isascii, payloads)):
            return [rows]
    while start < count:
        end, size = start, 0
        last = min(count, start + max_messages)
        while end < last:
            message_id, payload, _ = rows[end]
            if any_solo and end > start and message_id in solo:
                break  # a solo row starts its own frame
            # Bytes on the wire (inline payload_bytes: this runs once per message).
            size += len(payload) if payload.isascii() else len(payload.encode())
            if size > max_bytes and end > start:
                break
            end += 1
            if any_solo and message_id in solo:
                break  # and nothing joins it
        groups.append(rows[start:end])
        start = end
    return groups
