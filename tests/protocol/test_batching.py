"""Packing rows into frames: pure, no socket."""

from __future__ import annotations

from outbox.protocol.batching import encode_frames, frame_groups
from outbox.protocol.feed import Row


def test_solo_rows_go_one_per_frame() -> None:
    rows = [Row(n, '{"n": 1}', 0) for n in range(1, 6)]
    groups = frame_groups(rows, max_messages=100, max_bytes=1 << 20, solo={2, 3})
    assert [[r.id for r in g] for g in groups] == [[1], [2], [3], [4, 5]]
    frames = encode_frames(rows, batch=True, max_messages=100, max_bytes=1 << 20, solo={2, 3})
    assert len(frames) == 4
