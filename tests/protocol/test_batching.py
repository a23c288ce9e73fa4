"""Packing rows into frames: pure, no socket."""

from __future__ import annotations

import json
from collections.abc import Sequence

from hypothesis import example, given
from hypothesis import strategies as st

from outbox.protocol import wire
from outbox.protocol.batching import encode_frames, frame_groups
from outbox.protocol.feed import Row


def test_solo_rows_go_one_per_frame() -> None:
    rows = [Row(n, '{"n": 1}', 0) for n in range(1, 6)]
    groups = frame_groups(rows, max_messages=100, max_bytes=1 << 20, solo={2, 3})
    assert [[r.id for r in g] for g in groups] == [[1], [2], [3], [4, 5]]
    frames = encode_frames(rows, batch=True, max_messages=100, max_bytes=1 << 20, solo={2, 3})
    assert len(frames) == 4


payloads = st.sampled_from(['"a"', '{"n":1}', '"é"', '"' + "x" * 40 + '"', '"日本"', "[]"])


@given(
    st.lists(payloads, max_size=10),
    st.integers(min_value=1, max_value=12),
    st.integers(min_value=1, max_value=40),
    st.sets(st.integers(min_value=1, max_value=10), max_size=2) | st.just(set()),
)
@example(['"a"'] * 4, 10, 10, set())  # 12 bytes: two frames, however it fits in count
@example(['"é"'] * 3, 10, 9, set())  # 9 characters, but 12 bytes of UTF-8
def test_groups_are_greedy_within_both_bounds(
    texts: list[str], max_messages: int, max_bytes: int, solo: set[int]
) -> None:
    """One rule for every page (the one-frame shortcut included): rows in order, at most
    max_messages and max_bytes of UTF-8 per frame (a row larger alone goes alone), a frame
    cut only where the next row would not fit, solo rows alone; the frames read back."""
    rows = [Row(n, text, 0) for n, text in enumerate(texts, start=1)]
    groups = frame_groups(rows, max_messages=max_messages, max_bytes=max_bytes, solo=solo)
    assert [row for group in groups for row in group] == rows

    def size(group: Sequence[Row]) -> int:
        return sum(len(row.payload.encode()) for row in group)

    for index, group in enumerate(groups):
        assert 1 <= len(group) <= max_messages
        assert len(group) == 1 or size(group) <= max_bytes
        if any(row.id in solo for row in group):
            assert len(group) == 1
        if index + 1 < len(groups):
            following = groups[index + 1][0]
            assert (
                len(group) == max_messages
                or size([*group, following]) > max_bytes
                or following.id in solo
                or group[-1].id in solo
            )
    frames = encode_frames(
        rows, batch=True, max_messages=max_messages, max_bytes=max_bytes, solo=solo
    )
    read = [m for frame in frames for m in _messages(wire.parse_client_frame(frame))]
    assert [(m.id, m.data) for m in read] == [(r.id, json.loads(r.payload)) for r in rows]


def _messages(parsed: list[wire.Message] | wire.Ping) -> list[wire.Message]:
    assert isinstance(parsed, list)
    return parsed
