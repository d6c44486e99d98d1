"""The async queue's store fails under a live runner, and the runner lives through it.

Faults are real SQLite on the runner's own queue file, provoked from this test: a second
connection that holds the write lock (another process would), and the file filled past the
runner's size cap (`queue_max_bytes`, SQLite's max_page_count) so that SQLite answers
SQLITE_FULL as on a full disk. The server is this module's own: its store settings are
compressed to seconds (busy timeout, unhealthy threshold, retention), with one worker.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import (
    MODEL_NAME,
    Server,
    WebhookReceiver,
    start_server,
    stop_server_soon,
    wait_for_status,
)

SHORT = {"model": MODEL_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
# Keeps the one worker busy for a few seconds: long enough to lock the store behind it.
LONG = {**SHORT, "max_tokens": 120, "ignore_eos": True, "temperature": 1.0}
LONG_RUN_S = 300  # its generation ends within this, even on a loaded machine
MAX_BYTES = 4 * 1024 * 1024
UNHEALTHY_AFTER_S = 2
RETENTION_S = 6  # settled requests are purged 6-7.5 s after their last change
STORE_ENV = {"TRUSS_LLM_RUNNER_QUEUE_BUSY_TIMEOUT_S": "1",
             "TRUSS_LLM_RUNNER_QUEUE_UNHEALTHY_AFTER_S": str(UNHEALTHY_AFTER_S),
             "TRUSS_LLM_RUNNER_QUEUE_MAX_BYTES": str(MAX_BYTES),
             "TRUSS_LLM_RUNNER_ASYNC_RETENTION_S": str(RETENTION_S)}
# Bounds on the runner noticing a fault or a recovery: a busy timeout plus a worker's
# longest backoff (10 s), with room for a loaded machine.
NOTICE_S = 30
MIN_QUEUE_S = 10  # Baseten's smallest max_time_in_queue_seconds
SECRET_MARKER = "do-not-log-this-input"
HEALTHY = "baseten_surface_async_store_healthy"
ERRORS = "baseten_surface_async_store_errors_total"


@pytest.fixture(scope="module")
def store_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("store") / "server.log"
    srv = start_server(log, "--workers", "1", extra_env=STORE_ENV)
    yield srv
    stop_server_soon(srv)


def db_path(server: Server) -> Path:
    return server.log_path.parent / "state" / "async-queue.sqlite3"


def lock_store(server: Server) -> sqlite3.Connection:
    """Hold the store's write lock, as another process's writer would."""
    conn = sqlite3.connect(db_path(server), isolation_level=None, timeout=10)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def submit(server: Server, model_input: dict, **fields) -> httpx.Response:
    return httpx.post(f"{server.base_url}/production/async_predict", timeout=60,
                      json={"model_input": model_input, **fields})


def readiness(server: Server) -> httpx.Response:
    return httpx.get(f"{server.base_url}/v1/models/model", timeout=30)


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.2)
    return result


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    assert "async queue is unavailable" in response.json()["error"]  # Baseten's shape


def test_a_locked_store_turns_readiness_and_async_predict_into_503s_until_it_recovers(
        store_server: Server) -> None:
    errors_before = store_server.metric(ERRORS)
    done = submit(store_server, SHORT).json()["request_id"]
    wait_for_status(store_server.base_url, done, {"SUCCEEDED"})
    record_url = f"{store_server.base_url}/async_request/{done}"
    lock = lock_store(store_server)
    try:
        # A write (cancel) fails with a 503 once the busy timeout passes; reads go on.
        assert_unavailable(httpx.delete(record_url, timeout=30))
        assert httpx.get(record_url, timeout=30).json()["status"] == "SUCCEEDED"
        wait_until(lambda: readiness(store_server).status_code == 503, NOTICE_S,
                   "readiness 503 on a locked store")
        assert_unavailable(readiness(store_server))
        marked = {**SHORT, "messages": [{"role": "user", "content": SECRET_MARKER}]}
        assert_unavailable(submit(store_server, marked))
        assert store_server.metric(HEALTHY) == 0
        assert store_server.metric(ERRORS) > errors_before
    finally:
        lock.rollback()
        lock.close()
    wait_until(lambda: readiness(store_server).status_code == 200, NOTICE_S,
               "readiness 200 once the lock is gone")
    assert store_server.metric(HEALTHY) == 1
    # The worker lived through it: a new request runs.
    response = submit(store_server, SHORT)
    assert response.status_code == 201, response.text
    wait_for_status(store_server.base_url, response.json()["request_id"], {"SUCCEEDED"})
    log = store_server.log()
    assert "async queue store unhealthy" in log and "async queue store recovered" in log
    assert "database is locked" in log
    assert SECRET_MARKER not in log


def fill(server: Server) -> sqlite3.Connection:
    """Grow the runner's queue file past its cap (this connection has none)."""
    conn = sqlite3.connect(db_path(server), isolation_level=None, timeout=10)
    conn.execute("CREATE TABLE junk (blob BLOB)")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    while conn.execute("PRAGMA page_count").fetchone()[0] * page_size <= MAX_BYTES:
        conn.execute("INSERT INTO junk VALUES (zeroblob(65536))")
    return conn


def test_a_full_store_is_a_503_and_takes_requests_again_once_space_is_freed(
        store_server: Server) -> None:
    big = {**SHORT, "metadata": {"padding": "x" * 100_000}}  # overflow pages: needs new ones
    junk = fill(store_server)
    try:
        response = submit(store_server, big)
        assert_unavailable(response)
        assert "is full (database or disk is full)" in response.json()["error"]
        assert store_server.metric(f'{ERRORS}{{error="SQLITE_FULL",operation="enqueue"}}') >= 1
    finally:
        junk.execute("DROP TABLE junk")  # its pages go to the free list
        junk.close()
    response = submit(store_server, big)
    assert response.status_code == 201, response.text
    response = submit(store_server, SHORT)
    assert response.status_code == 201, response.text
    wait_for_status(store_server.base_url, response.json()["request_id"], {"SUCCEEDED"})


def test_settled_requests_are_purged_after_the_retention_period(store_server: Server) -> None:
    purged_before = store_server.metric("baseten_surface_async_purged_requests_total")
    response = submit(store_server, SHORT)
    assert response.status_code == 201, response.text
    request_id = response.json()["request_id"]
    wait_for_status(store_server.base_url, request_id, {"SUCCEEDED"})
    wait_until(lambda: httpx.get(f"{store_server.base_url}/async_request/{request_id}",
                                 timeout=10).status_code == 404,
               RETENTION_S + NOTICE_S, "the settled request purged")
    assert store_server.metric("baseten_surface_async_purged_requests_total") > purged_before


def complete_errors(server: Server) -> float:
    return sum(value for name, value in server.metrics().items()
               if name.startswith(ERRORS) and 'operation="complete"' in name)


def test_a_stalled_store_loses_no_result_and_no_expiry_webhook(
        store_server: Server, receiver: WebhookReceiver) -> None:
    """While the store is locked, the running request's result waits in memory and a queued
    one expires; once the store is back both are recorded and the expired request's webhook
    goes out, with no restart and no free worker needed."""
    running = submit(store_server, LONG).json()["request_id"]
    wait_for_status(store_server.base_url, running, {"IN_PROGRESS"}, timeout=NOTICE_S)
    response = submit(store_server, SHORT, max_time_in_queue_seconds=MIN_QUEUE_S,
                      webhook_endpoint=f"{receiver.url}/ok/store/expired")
    enqueued = time.monotonic()
    doomed = response.json()["request_id"]
    lock = lock_store(store_server)  # the worker can record nothing, claim nothing
    try:
        time.sleep(max(0.0, MIN_QUEUE_S + 1 - (time.monotonic() - enqueued)))
        wait_until(lambda: store_server.unfinished_requests() == 0, LONG_RUN_S,
                   "the running request's generation done")
        wait_until(lambda: complete_errors(store_server) >= 1, NOTICE_S,
                   "a failed attempt to record its result")
        assert httpx.get(f"{store_server.base_url}/async_request/{running}",
                         timeout=10).json()["status"] == "IN_PROGRESS"
    finally:
        lock.rollback()
        lock.close()
    released = time.monotonic()
    wait_for_status(store_server.base_url, running, {"SUCCEEDED"}, timeout=NOTICE_S)
    [delivery] = receiver.wait_for(1, "/ok/store/expired", timeout=NOTICE_S)
    # Promptly: the first task to see the store back wakes the rest from their backoff.
    assert time.monotonic() - released < NOTICE_S
    assert doomed.encode() in delivery.body and b'"EXPIRED"' in delivery.body
    assert wait_for_status(store_server.base_url, doomed, {"EXPIRED"})["errors"][0]["code"] \
        == "EXPIRED"
