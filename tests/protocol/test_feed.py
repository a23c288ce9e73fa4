"""CommittedRows: when the sender may take new rows from memory instead of the store."""

from __future__ import annotations

from outbox.protocol.feed import CommittedRows, Row


def rows(*ids: int) -> list[Row]:
    return [Row(i, f'"m{i}"', 0) for i in ids]


def test_nothing_from_memory_before_a_query_reached_the_end() -> None:
    feed = CommittedRows(limit=100)
    feed.add(rows(1, 2))
    assert feed.take(0, 10, now=0.0) is None
    feed.scanned(0, reached_end=False, now=0.0)  # the query filled its page: more may wait
    assert feed.take(0, 10, now=0.0) is None


def test_rows_committed_after_a_complete_query_come_from_memory_in_order() -> None:
    feed = CommittedRows(limit=100)
    feed.scanned(5, reached_end=True, now=0.0)
    feed.add(rows(6, 7, 8))
    assert feed.take(5, 2, now=0.1) == rows(6, 7)
    assert feed.take(7, 10, now=0.2) == rows(8)
    assert feed.take(8, 10, now=0.3) == []  # nothing new: no query needed either


def test_rows_the_query_already_returned_are_dropped() -> None:
    feed = CommittedRows(limit=100)
    feed.add(rows(1, 2, 3))  # committed while the query ran, which saw 1 and 2
    feed.scanned(2, reached_end=True, now=0.0)
    assert feed.take(2, 10, now=0.0) == rows(3)


def test_a_gap_in_the_ids_sends_the_sender_back_to_the_store() -> None:
    feed = CommittedRows(limit=100)
    feed.scanned(5, reached_end=True, now=0.0)
    feed.add(rows(6, 7))
    feed.add(rows(9))  # 8 was written by another process
    assert feed.take(5, 10, now=0.0) is None
    assert feed.take(5, 10, now=0.0) is None  # and stays there until the next full query
    feed.scanned(9, reached_end=True, now=0.0)
    feed.add(rows(10))
    assert feed.take(9, 10, now=0.0) == rows(10)


def test_a_row_missing_before_the_first_sends_the_sender_back_to_the_store() -> None:
    feed = CommittedRows(limit=100)
    feed.scanned(5, reached_end=True, now=0.0)
    feed.add(rows(7))
    assert feed.take(5, 10, now=0.0) is None


def test_overflow_and_invalidate_and_age_all_mean_query_again() -> None:
    feed = CommittedRows(limit=3, max_age=1.0)
    feed.scanned(0, reached_end=True, now=0.0)
    feed.add(rows(1, 2, 3, 4))  # more than memory keeps
    assert feed.take(0, 10, now=0.0) is None

    feed.scanned(4, reached_end=True, now=0.0)
    feed.add(rows(5))
    feed.invalidate()  # e.g. dead rows were requeued
    assert feed.take(4, 10, now=0.0) is None

    feed.scanned(5, reached_end=True, now=0.0)
    feed.add(rows(6))
    assert feed.take(5, 10, now=1.5) is None  # a periodic re-check of the store
