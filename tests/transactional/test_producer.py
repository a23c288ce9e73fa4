"""``Producer``: synchronous sends from many threads, committed in shared transactions."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path

import pytest

import outbox


def committed(path: Path) -> dict[int, str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return dict(conn.execute("SELECT id, payload FROM outbox WHERE status = 'pending'"))


def test_send_commits_and_returns_the_id(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with outbox.Producer(path) as producer:
        msg_id = producer.send({"n": 1}, key="k")
        assert committed(path) == {msg_id: '{"n":1}'}  # durable when send returns
        assert producer.send({"n": 1}, key="k") == msg_id
        ids = producer.send_many(["a", "b"], keys=["k", None])
        assert ids[0] == msg_id and ids[1] > msg_id
        assert producer.send_many([]) == []
    assert len(committed(path)) == 2


def test_many_threads_share_commits(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    threads, per_thread = 16, 50
    results: list[list[int]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads)
    with outbox.Producer(path, synchronous="NORMAL") as producer:

        def work(n: int) -> None:
            start.wait()
            for i in range(per_thread):
                results[n].append(producer.send({"t": n, "i": i}))

        workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        commits = producer.commits
    ids = [i for result in results for i in result]
    assert len(set(ids)) == threads * per_thread
    assert commits < threads * per_thread  # group commit across threads
    rows = committed(path)
    assert set(rows) == set(ids)
    for n, result in enumerate(results):
        assert [rows[i] for i in result] == [f'{{"t":{n},"i":{i}}}' for i in range(per_thread)]


def test_bad_payloads_fail_their_own_call(tmp_path: Path) -> None:
    with outbox.Producer(tmp_path / "app.db", max_message_size=10) as producer:
        with pytest.raises(outbox.PayloadNotJSONError):
            producer.send(object())
        with pytest.raises(outbox.PayloadTooLargeError):
            producer.send("x" * 20)
        with pytest.raises(TypeError):
            producer.send(1, key=2)  # type: ignore[arg-type]
        assert producer.send(1) == 1


def test_send_after_close_is_refused(tmp_path: Path) -> None:
    producer = outbox.Producer(tmp_path / "app.db")
    producer.close()
    producer.close()
    with pytest.raises(outbox.OutboxClosedError):
        producer.send(1)
