"""The async queue when its store fails: a lock held by another connection, a full file, a
COMMIT that fails. Each fault is real SQLite on a file in tmp, provoked from outside the
queue object (a second connection, the size cap, RLIMIT_FSIZE in a child process); the
health clock is the only thing injected, so nothing here sleeps past the busy timeout.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from truss_llm.runner.models import AsyncPredictRequest, AsyncStatus
from truss_llm.runner.queue import PURGE_BATCH, AsyncQueue, QueueUnavailable
from truss_llm.runner.store_health import StoreHealth

ENV = "production"
T0 = 1_800_000_000.0
BUSY_S = 0.2  # the queue's busy timeout in these tests
UNHEALTHY_AFTER_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def req(model_input: object = "hi", **fields) -> AsyncPredictRequest:
    return AsyncPredictRequest(model_input=model_input, **fields)


def locker(path: Path) -> sqlite3.Connection:
    """Another process's writer: holds the database's write lock until it rolls back."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_a_locked_store_fails_calls_then_turns_unhealthy_and_recovers(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "queue.db"
    with AsyncQueue(path, "m", "d", busy_timeout_s=BUSY_S,
                    health=StoreHealth(UNHEALTHY_AFTER_S, clock)) as queue:
        queued = queue.enqueue(req(), ENV)
        lock = locker(path)
        started = time.monotonic()
        with pytest.raises(QueueUnavailable, match="database is locked") as raised:
            queue.claim_next()
        assert time.monotonic() - started < BUSY_S + 5  # bounded by the busy timeout
        assert raised.value.headers == {"Retry-After": "5"}
        assert queue.health.healthy  # one failure is not a broken store
        clock.now = UNHEALTHY_AFTER_S
        with pytest.raises(QueueUnavailable):
            queue.expire_overdue()
        assert not queue.health.healthy  # failing for the whole threshold
        started = time.monotonic()
        with pytest.raises(QueueUnavailable, match="failing for 10 s"):
            queue.enqueue(req(), ENV)  # fails fast: no wait on a store known to be broken
        assert time.monotonic() - started < BUSY_S
        assert queue.get(queued).status is AsyncStatus.QUEUED  # reads go on (WAL)
        lock.rollback()
        lock.close()
        assert queue.claim_next().request_id == queued  # the first write that succeeds ...
        assert queue.health.healthy  # ... makes it healthy again
        queue.enqueue(req(), ENV)


def fill(path: Path, max_bytes: int) -> sqlite3.Connection:
    """Another writer fills the file past the queue's cap (its own connection has none)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE junk (blob BLOB)")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    while conn.execute("PRAGMA page_count").fetchone()[0] * page_size <= max_bytes:
        conn.execute("INSERT INTO junk VALUES (zeroblob(32768))")
    return conn


def test_a_full_store_fails_the_enqueue_and_takes_writes_again_once_space_is_freed(
        tmp_path: Path) -> None:
    path, cap = tmp_path / "queue.db", 256 * 1024
    with AsyncQueue(path, "m", "d", max_bytes=cap, busy_timeout_s=BUSY_S) as queue:
        queued = queue.enqueue(req(), ENV)
        junk = fill(path, cap)
        big = "x" * 60_000  # ~15 pages of overflow: never fits in a page's free space
        with pytest.raises(QueueUnavailable, match=r"is full \(database or disk is full\)"):
            queue.enqueue(req(big), ENV)
        # The failed transaction was rolled back: the write lock is free for another writer.
        other = sqlite3.connect(path, isolation_level=None, timeout=0)
        other.execute("BEGIN IMMEDIATE")
        other.rollback()
        other.close()
        assert queue.get(queued).status is AsyncStatus.QUEUED  # nothing lost
        junk.execute("DROP TABLE junk")  # its pages go to the free list
        junk.close()
        queue.enqueue(req(big), ENV)
        assert queue.health.healthy


# The child sets a file-size limit just above the database, so the WAL cannot take the
# transaction's pages: the COMMIT fails with SQLite's I/O error, for real.
COMMIT_FAILS = textwrap.dedent("""
    import os, resource, signal, sqlite3, sys
    from truss_llm.runner.models import AsyncPredictRequest
    from truss_llm.runner.queue import AsyncQueue, QueueUnavailable
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    path = sys.argv[1]
    queue = AsyncQueue(path, "m", "d", busy_timeout_s=0.2)
    queue.enqueue(AsyncPredictRequest(model_input="small"), "production")
    sqlite3.connect(path).execute("PRAGMA wal_checkpoint(TRUNCATE)").close()
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 8192, limit[1]))
    try:
        queue.enqueue(AsyncPredictRequest(model_input="x" * 200_000), "production")
        sys.exit("the enqueue should have failed")
    except QueueUnavailable as exc:
        print("failed:", exc)
    resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    conn = queue._conn()  # this thread's connection: its transaction must be over
    print("in transaction:", conn.in_transaction)
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")  # the write lock is free
    other.rollback()
    queue.enqueue(AsyncPredictRequest(model_input="x" * 200_000), "production")
    print("queued:", queue.queue_status().num_queued_requests)
""")


def test_a_failed_commit_leaves_no_transaction_and_the_queue_usable(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", COMMIT_FAILS, str(tmp_path / "queue.db")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "failed: The async queue is unavailable" in done.stdout
    assert "disk I/O error" in done.stdout or "is full" in done.stdout
    assert "in transaction: False" in done.stdout
    assert "queued: 2" in done.stdout


def test_purge_deletes_settled_requests_in_bounded_batches_oldest_first(
        tmp_path: Path) -> None:
    with AsyncQueue(tmp_path / "queue.db", "m", "d") as queue:
        ids = [queue.enqueue(req(), ENV, now=T0) for _ in range(5)]
        for n, rid in enumerate(ids[:4]):
            queue.claim_next(now=T0)
            queue.complete(rid, "{}", now=T0 + n)  # settled at T0, T0+1, T0+2, T0+3
        owed = queue.enqueue(req(webhook_endpoint="http://127.0.0.1:9/hook"), ENV, now=T0)
        assert queue.purge_finished(older_than=T0 + 10, limit=3) == 3
        assert [queue.get(r) is None for r in ids] == [True, True, True, False, False]
        assert queue.purge_finished(older_than=T0 + 10, limit=3) == 1
        assert queue.purge_finished(older_than=T0 + 10) == 0
        assert queue.get(ids[4]).status is AsyncStatus.QUEUED
        assert queue.get(owed) is not None  # its webhook is still owed
    assert PURGE_BATCH > 0


def test_an_overdue_request_wakes_no_worker(tmp_path: Path) -> None:
    """It waits for expire_overdue instead: a wake-up of 0 s would spin the idle workers."""
    with AsyncQueue(tmp_path / "queue.db", "m", "d") as queue:
        queue.enqueue(req(max_time_in_queue_seconds=10), ENV, now=T0)
        assert queue.next_wakeup(now=T0 + 5) == 0.0
        assert queue.next_wakeup(now=T0 + 11) is None
        assert queue.claim_next(now=T0 + 11) is None
        assert len(queue.expire_overdue(now=T0 + 11)) == 1
