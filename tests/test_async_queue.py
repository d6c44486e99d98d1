"""The durable async-request queue on its own: no server, no model, a SQLite file in tmp.

Time is passed explicitly (`now=`) wherever it matters, so nothing here sleeps; the crash
test kills a real child process with SIGKILL by its PID and reopens what it left behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pydantic
import pytest
from truss_llm.runner.models import (
    MAX_MODEL_INPUT_BYTES,
    AsyncErrorCode,
    AsyncPredictRequest,
    AsyncStatus,
    RetryConfig,
    WebhookStatus,
)
from truss_llm.runner.queue import (
    BACKOFF_JITTER,
    MAX_CRASH_RECOVERIES,
    AsyncQueue,
    InvalidTransitionError,
    PayloadTooLargeError,
    QueueFullError,
    backoff_delay_s,
)

T0 = 1_800_000_000.0  # a fixed "now" for the tests that control time
HOOK = "http://127.0.0.1:9/webhook"
ENV = "production"


@pytest.fixture
def queue(tmp_path: Path):
    with AsyncQueue(tmp_path / "queue.db", "model-1", "deploy-1",
                    rng=random.Random(7)) as q:
        yield q


def req(priority: int = 0, webhook: str | None = None, **fields) -> AsyncPredictRequest:
    return AsyncPredictRequest(model_input=fields.pop("model_input", {"prompt": "hi"}),
                               priority=priority, webhook_endpoint=webhook, **fields)


def retrying(max_attempts: int, initial_delay_ms: int = 1000, max_delay_ms: int = 5000,
             **fields) -> AsyncPredictRequest:
    config = RetryConfig(max_attempts=max_attempts, initial_delay_ms=initial_delay_ms,
                         max_delay_ms=max_delay_ms)
    return req(inference_retry_config=config, **fields)


# -- ordering ---------------------------------------------------------------------------

def test_lower_priority_number_first_then_fifo(queue: AsyncQueue) -> None:
    order = [(2, "a"), (0, "b"), (1, "c"), (0, "d"), (2, "e"), (1, "f")]
    ids = {queue.enqueue(req(p, model_input=name), ENV, now=T0): name for p, name in order}
    claimed = []
    while (job := queue.claim_next(now=T0 + 1)) is not None:
        claimed.append(ids[job.request_id])
        assert job.status is AsyncStatus.IN_PROGRESS and job.attempts == 1
        assert job.started_at == T0 + 1 and job.environment == ENV
    assert claimed == ["b", "d", "c", "f", "a", "e"]


def test_model_input_round_trips_as_json(queue: AsyncQueue) -> None:
    body = {"messages": [{"role": "user", "content": "héllo ✓"}], "n": 1.5, "x": None}
    queue.enqueue(req(model_input=body), ENV)
    assert queue.claim_next().model_input == body


# -- backoff, retries, failure ------------------------------------------------------------

def test_backoff_doubles_up_to_the_cap_with_bounded_jitter() -> None:
    rng = random.Random(1)
    for attempt, full_ms in [(1, 1000), (2, 2000), (3, 4000), (4, 5000), (9, 5000)]:
        for _ in range(50):
            delay = backoff_delay_s(attempt, 1000, 5000, rng)
            assert full_ms * (1 - BACKOFF_JITTER) / 1000 <= delay <= full_ms / 1000
    assert backoff_delay_s(1000, 10_000, 60_000) <= 60.0  # no overflow for silly attempts
    assert backoff_delay_s(3, 0, 60_000) == 0.0


def test_retry_respects_not_before_then_fails_after_max_attempts(queue: AsyncQueue) -> None:
    rid = queue.enqueue(retrying(3, initial_delay_ms=1000, webhook=HOOK), ENV, now=T0)
    now = T0
    for attempt in (1, 2):
        job = queue.claim_next(now=now)
        assert job.request_id == rid and job.attempts == attempt
        assert queue.fail(rid, "MODEL_PREDICT_ERROR", f"boom {attempt}", now=now) == "retry"
        queued = queue.get_job(rid)
        assert queued.status is AsyncStatus.QUEUED and queued.errors == ()
        delay = queued.not_before - now
        full = 2 ** (attempt - 1)
        assert full * (1 - BACKOFF_JITTER) <= delay <= full
        assert queue.claim_next(now=now + delay - 0.01) is None  # still backing off
        assert queue.next_wakeup(now=now) == pytest.approx(delay)
        now += delay
    assert queue.claim_next(now=now).attempts == 3
    assert queue.fail(rid, "MODEL_PREDICT_ERROR", "boom 3", now=now + 1) == "failed"
    record = queue.get(rid)
    assert record.status is AsyncStatus.FAILED
    assert record.webhook_status is WebhookStatus.PENDING
    assert [e.model_dump() for e in record.errors] == [
        {"code": "MODEL_PREDICT_ERROR", "message": "boom 3"}]
    assert [j.request_id for j in queue.pending_webhooks()] == [rid]
    assert queue.claim_next(now=now + 100) is None


def test_backed_off_request_does_not_block_the_ones_behind_it(queue: AsyncQueue) -> None:
    first = queue.enqueue(retrying(2, initial_delay_ms=10_000), ENV, now=T0)
    second = queue.enqueue(req(), ENV, now=T0)
    queue.claim_next(now=T0)
    assert queue.fail(first, "MODEL_PREDICT_ERROR", "x", now=T0) == "retry"
    assert queue.claim_next(now=T0 + 1).request_id == second
    assert queue.claim_next(now=T0 + 1) is None
    assert queue.claim_next(now=T0 + 10).request_id == first


def test_not_retryable_fails_at_once(queue: AsyncQueue) -> None:
    rid = queue.enqueue(retrying(5), ENV)
    queue.claim_next()
    assert queue.fail(rid, "MODEL_INVALID_INPUT", "bad", retryable=False) == "failed"
    assert queue.get(rid).status is AsyncStatus.FAILED


def test_transitions_from_the_wrong_state_raise(queue: AsyncQueue) -> None:
    rid = queue.enqueue(req(webhook=HOOK), ENV)
    with pytest.raises(InvalidTransitionError, match="QUEUED"):
        queue.complete(rid, "{}")
    with pytest.raises(InvalidTransitionError):
        queue.fail(rid, "MODEL_PREDICT_ERROR", "x")
    with pytest.raises(InvalidTransitionError):
        queue.set_webhook_result(rid, True)
    with pytest.raises(InvalidTransitionError, match="unknown"):
        queue.complete("nope", "{}")
    queue.claim_next()
    queue.complete(rid, "{}")
    with pytest.raises(InvalidTransitionError, match="SUCCEEDED"):
        queue.complete(rid, "{}")
    assert queue.get(rid).status is AsyncStatus.SUCCEEDED  # the failed call changed nothing


# -- expiry -----------------------------------------------------------------------------

def test_overdue_requests_expire_instead_of_running(queue: AsyncQueue) -> None:
    late = queue.enqueue(req(webhook=HOOK, max_time_in_queue_seconds=10), ENV, now=T0)
    later = queue.enqueue(req(max_time_in_queue_seconds=20), ENV, now=T0)
    assert queue.next_wakeup(now=T0) == 0.0  # both runnable now
    assert queue.expire_overdue(now=T0 + 9.9) == []
    expired = queue.expire_overdue(now=T0 + 10)
    assert [j.request_id for j in expired] == [late]
    assert expired[0].webhook_status is WebhookStatus.PENDING  # its webhook is still owed
    record = queue.get(late)
    assert record.status is AsyncStatus.EXPIRED
    assert record.errors[0].code == AsyncErrorCode.EXPIRED == "EXPIRED"
    assert "10 s" in record.errors[0].message
    # claim_next never runs an overdue request, and leaves it to expire_overdue, which
    # hands it back for its webhook (a claim that expired it would lose the webhook).
    assert queue.claim_next(now=T0 + 25) is None
    assert queue.get(later).status is AsyncStatus.QUEUED
    assert [j.request_id for j in queue.expire_overdue(now=T0 + 25)] == [later]
    assert queue.get(later).status is AsyncStatus.EXPIRED
    assert queue.queue_status().num_queued_requests == 0


def test_a_retry_is_not_expired(queue: AsyncQueue) -> None:
    rid = queue.enqueue(retrying(2, initial_delay_ms=5000, max_time_in_queue_seconds=10),
                        ENV, now=T0)
    queue.claim_next(now=T0 + 9)
    queue.fail(rid, "MODEL_PREDICT_ERROR", "x", now=T0 + 9)
    assert queue.expire_overdue(now=T0 + 100) == []
    assert queue.claim_next(now=T0 + 100).request_id == rid


def test_next_wakeup_is_the_earliest_backoff_or_expiry(queue: AsyncQueue) -> None:
    assert queue.next_wakeup(now=T0) is None
    rid = queue.enqueue(retrying(2, initial_delay_ms=8000, max_delay_ms=8000), ENV, now=T0)
    queue.claim_next(now=T0)
    queue.fail(rid, "MODEL_PREDICT_ERROR", "x", now=T0)
    not_before = queue.get_job(rid).not_before
    assert queue.next_wakeup(now=T0) == pytest.approx(not_before - T0)
    queue.enqueue(req(max_time_in_queue_seconds=10), ENV, now=T0 - 5)  # runnable now
    assert queue.next_wakeup(now=T0) == 0.0


# -- cancel -----------------------------------------------------------------------------

def test_cancel_only_while_queued(queue: AsyncQueue) -> None:
    with_hook = queue.enqueue(req(webhook=HOOK), ENV)
    without_hook = queue.enqueue(req(), ENV)
    running = queue.enqueue(req(), ENV)
    assert queue.cancel(with_hook) and queue.cancel(without_hook)
    assert queue.get(with_hook).status is AsyncStatus.CANCELED
    assert queue.get(with_hook).webhook_status is WebhookStatus.CANCELED
    assert queue.get(without_hook).webhook_status is WebhookStatus.NO_WEBHOOK_PROVIDED
    assert queue.claim_next().request_id == running  # canceled ones are never claimed
    assert not queue.cancel(running)
    queue.complete(running, None)
    assert not queue.cancel(running)
    assert not queue.cancel(with_hook)  # twice
    assert not queue.cancel("unknown")
    assert queue.get(running).status is AsyncStatus.SUCCEEDED


# -- webhooks ---------------------------------------------------------------------------

def test_webhook_delivered(queue: AsyncQueue) -> None:
    rid = queue.enqueue(req(webhook=HOOK), ENV)
    queue.claim_next()
    done = queue.complete(rid, '{"text": "hi"}')
    assert done.status is AsyncStatus.SUCCEEDED and done.output_json == '{"text": "hi"}'
    assert [j.output_json for j in queue.pending_webhooks()] == ['{"text": "hi"}']
    queue.set_webhook_result(rid, ok=True)
    record = queue.get(rid)
    assert (record.status, record.webhook_status) == (AsyncStatus.SUCCEEDED,
                                                      WebhookStatus.SUCCEEDED)
    assert queue.get_job(rid).output_json is None  # Baseten keeps no outputs
    assert queue.pending_webhooks() == []
    with pytest.raises(InvalidTransitionError):
        queue.set_webhook_result(rid, ok=False)  # already settled


def test_webhook_failure_makes_the_request_webhook_failed(queue: AsyncQueue) -> None:
    ok_run = queue.enqueue(req(webhook=HOOK), ENV)
    bad_run = queue.enqueue(req(webhook=HOOK), ENV)
    queue.claim_next()
    queue.complete(ok_run, "{}")
    queue.claim_next()
    queue.fail(bad_run, "MODEL_PREDICT_ERROR", "boom")
    for rid in (ok_run, bad_run):
        queue.set_webhook_result(rid, ok=False)
        record = queue.get(rid)
        assert record.status is AsyncStatus.WEBHOOK_FAILED
        assert record.webhook_status is WebhookStatus.FAILED
    assert queue.get(bad_run).errors[0].message == "boom"  # the model's error is kept
    assert queue.get_job(ok_run).output_json is None


def test_no_webhook_means_no_output_stored_and_nothing_to_deliver(queue: AsyncQueue) -> None:
    rid = queue.enqueue(req(), ENV)
    queue.claim_next()
    assert queue.complete(rid, '{"big": "output"}').output_json is None
    assert queue.pending_webhooks() == []
    with pytest.raises(InvalidTransitionError):
        queue.set_webhook_result(rid, ok=True)


# -- validation -------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    {"priority": 3}, {"priority": -1}, {"priority": "1"}, {"priority": True},
    {"priority": 1.5},
    {"max_time_in_queue_seconds": 5}, {"max_time_in_queue_seconds": 259_201},
    {"inference_retry_config": {"max_attempts": 11}},
    {"inference_retry_config": {"max_attempts": 0}},
    {"inference_retry_config": {"initial_delay_ms": 10_001}},
    {"inference_retry_config": {"max_delay_ms": 60_001}},
    {"inference_retry_config": {"max_attempts": 2, "jitter": True}},
    {"extra_key": 1},
    {"webhook_endpoint": "ftp://example.com/hook"},
    {"webhook_endpoint": "not a url"},
    {"webhook_endpoint": "https://"},
])
def test_out_of_range_bodies_are_rejected(body: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        AsyncPredictRequest.model_validate({"model_input": {"x": 1}, **body})
    with pytest.raises(pydantic.ValidationError):
        AsyncPredictRequest.model_validate_json(json.dumps({"model_input": 1, **body}))


def test_model_input_is_required() -> None:
    with pytest.raises(pydantic.ValidationError):
        AsyncPredictRequest.model_validate({"priority": 1})


def test_defaults_and_boundaries() -> None:
    default = AsyncPredictRequest.model_validate({"model_input": None})
    assert (default.priority, default.max_time_in_queue_seconds, default.webhook_endpoint) == (
        0, 600, None)
    assert default.inference_retry_config == RetryConfig(
        max_attempts=1, initial_delay_ms=1000, max_delay_ms=5000)
    edge = AsyncPredictRequest.model_validate_json(json.dumps({
        "model_input": [1], "priority": 2, "max_time_in_queue_seconds": 259_200,
        "webhook_endpoint": "https://example.com/hook?x=1",
        "inference_retry_config": {"max_attempts": 10, "initial_delay_ms": 0,
                                   "max_delay_ms": 60_000}}))
    assert edge.inference_retry_config.max_attempts == 10
    low = AsyncPredictRequest.model_validate(
        {"model_input": 1, "max_time_in_queue_seconds": 10, "webhook_endpoint": "",
         "inference_retry_config": None})
    assert low.webhook_endpoint is None and low.inference_retry_config == RetryConfig()


def test_oversized_or_non_json_input_is_refused(queue: AsyncQueue) -> None:
    with pytest.raises(PayloadTooLargeError):
        queue.enqueue(req(model_input="x" * (MAX_MODEL_INPUT_BYTES + 1)), ENV)
    with pytest.raises(PayloadTooLargeError):  # counted in UTF-8 bytes, not characters
        queue.enqueue(req(model_input="é" * (MAX_MODEL_INPUT_BYTES // 2 + 1)), ENV)
    queue.enqueue(req(model_input="x" * (MAX_MODEL_INPUT_BYTES - 2)), ENV)  # quotes count
    with pytest.raises(ValueError):
        queue.enqueue(req(model_input={"x": float("nan")}), ENV)
    assert queue.queue_status().num_queued_requests == 1


# -- status, limits, persistence ---------------------------------------------------------

def test_status_record_shape(queue: AsyncQueue) -> None:
    rid = queue.enqueue(req(webhook=HOOK), ENV, now=T0)
    queue.claim_next(now=T0 + 2.5)
    body = queue.get(rid).model_dump(mode="json")
    assert set(body) == {"request_id", "model_id", "deployment_id", "status",
                         "webhook_status", "created_at", "status_at", "errors"}
    assert body["request_id"] == rid and len(rid) == 32 and int(rid, 16) >= 0
    assert (body["model_id"], body["deployment_id"]) == ("model-1", "deploy-1")
    assert (body["status"], body["webhook_status"], body["errors"]) == (
        "IN_PROGRESS", "PENDING", [])
    created = datetime.fromisoformat(body["created_at"])
    assert body["created_at"].endswith("Z") and created.timestamp() == pytest.approx(T0)
    assert datetime.fromisoformat(body["status_at"]).timestamp() == pytest.approx(T0 + 2.5)
    assert queue.get("0" * 32) is None


def test_queue_status_and_active_limit(tmp_path: Path) -> None:
    with AsyncQueue(tmp_path / "q.db", "m", "d", max_active_requests=3) as q:
        ids = [q.enqueue(req(), ENV) for _ in range(3)]
        with pytest.raises(QueueFullError):
            q.enqueue(req(), ENV)
        q.claim_next()
        status = q.queue_status()
        assert (status.num_queued_requests, status.num_in_progress_requests) == (2, 1)
        assert status.model_dump() == {"model_id": "m", "deployment_id": "d",
                                       "num_queued_requests": 2,
                                       "num_in_progress_requests": 1}
        q.complete(ids[0], None)  # a finished request frees its place
        q.enqueue(req(), ENV)
        assert q.queue_status().num_queued_requests == 3


def test_state_survives_reopening_and_schema_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with AsyncQueue(path, "m", "d") as q:
        done = q.enqueue(req(webhook=HOOK), ENV)
        waiting = q.enqueue(req(priority=1), ENV)
        q.claim_next()
        q.complete(done, '"out"')
    with AsyncQueue(path, "m", "d") as q:
        assert q.get(done).status is AsyncStatus.SUCCEEDED
        assert q.pending_webhooks()[0].output_json == '"out"'
        assert q.claim_next().request_id == waiting
        assert q.counts()[AsyncStatus.SUCCEEDED] == 1
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_purge_finished_keeps_unsettled_requests(queue: AsyncQueue) -> None:
    settled = queue.enqueue(req(), ENV, now=T0)
    owed = queue.enqueue(req(webhook=HOOK), ENV, now=T0)
    queued = queue.enqueue(req(), ENV, now=T0)
    for rid in (settled, owed):
        queue.claim_next(now=T0)
        queue.complete(rid, "{}", now=T0)
    assert queue.purge_finished(older_than=T0 + 1) == 1
    assert queue.get(settled) is None
    assert queue.get(owed) is not None and queue.get(queued) is not None
    assert sum(queue.counts().values()) == 2


# -- crashes ----------------------------------------------------------------------------

def test_recovery_allows_one_more_run_beyond_max_attempts(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    q = AsyncQueue(path, "m", "d")
    rid = q.enqueue(req(webhook=HOOK), ENV)  # max_attempts 1
    assert q.claim_next().attempts == 1
    q.close()  # the runner "dies" with the request in progress
    with AsyncQueue(path, "m", "d") as q:
        assert q.recover_after_crash() == 1
        job = q.get_job(rid)
        assert (job.status, job.attempts, job.crash_count) == (AsyncStatus.QUEUED, 1, 1)
        assert q.claim_next().attempts == 2  # over max_attempts, still run once more
        assert q.fail(rid, "MODEL_PREDICT_ERROR", "x") == "failed"
        assert q.recover_after_crash() == 0


def test_a_request_that_keeps_killing_the_runner_is_failed(queue: AsyncQueue) -> None:
    rid = queue.enqueue(req(), ENV)
    for _ in range(MAX_CRASH_RECOVERIES):
        queue.claim_next()
        assert queue.recover_after_crash() == 1
    queue.claim_next()
    assert queue.recover_after_crash() == 0
    record = queue.get(rid)
    assert record.status is AsyncStatus.FAILED
    assert record.errors[0].code == AsyncErrorCode.INTERNAL_SERVER_ERROR


CHILD = """
import sys
from pathlib import Path
from truss_llm.runner.models import AsyncPredictRequest
from truss_llm.runner.queue import AsyncQueue

q = AsyncQueue(Path(sys.argv[1]), "m", "d")
body = AsyncPredictRequest(model_input={"prompt": "x" * 200}, webhook_endpoint="http://h/w")
for _ in range(50):
    q.enqueue(body, "production")
held = [q.claim_next() for _ in range(5)]  # "running" until the process dies
print("HELD", flush=True)
i = 0
while True:  # churn: every iteration is three transactions, so SIGKILL lands in one
    q.enqueue(body, "production")
    job = q.claim_next()
    q.complete(job.request_id, '{"ok": true}')
    i += 1
    if i % 50 == 0:
        print("DONE", i, flush=True)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kill_after", [50, 300, 700])
def test_sigkill_mid_churn_leaves_a_consistent_queue(tmp_path: Path, kill_after: int) -> None:
    path = tmp_path / "q.db"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "HELD"
        completed = 0
        while completed < kill_after:
            line = child.stdout.readline()
            assert line.startswith("DONE"), line
            completed = int(line.split()[1])
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    by_status = dict(conn.execute("SELECT status, COUNT(*) FROM async_requests GROUP BY 1"))
    conn.close()
    with AsyncQueue(path, "m", "d") as q:
        counts = {s.value: n for s, n in q.counts().items() if n}
        assert counts == by_status  # the trigger-kept counts match the rows
        total = sum(by_status.values())
        assert total >= 50 + completed
        in_progress = by_status["IN_PROGRESS"]
        assert in_progress in (5, 6)  # the 5 held, plus one if killed between claim/complete
        assert by_status["SUCCEEDED"] >= completed
        queued_before = by_status["QUEUED"]
        assert q.recover_after_crash() == in_progress
        status = q.queue_status()
        assert status.num_in_progress_requests == 0
        assert status.num_queued_requests == queued_before + in_progress
        # The requeued ones keep their place (they are the oldest), so they run first.
        seen: list[str] = []
        while (job := q.claim_next()) is not None:
            assert job.crash_count == (1 if len(seen) < in_progress else 0)
            seen.append(job.request_id)
            q.complete(job.request_id, "{}")
        assert len(seen) == len(set(seen)) == queued_before + in_progress
        assert q.counts()[AsyncStatus.SUCCEEDED] == total
        assert len(q.pending_webhooks()) == total


# -- threads ----------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_four_threads_never_claim_the_same_request(queue: AsyncQueue) -> None:
    ids = {queue.enqueue(req(priority=i % 3), ENV) for i in range(200)}
    claimed: list[list[str]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(mine: list[str]) -> None:
        try:
            start.wait()
            while (job := queue.claim_next()) is not None:
                mine.append(job.request_id)
                queue.complete(job.request_id, None)
                time.sleep(0)  # yield the GIL: one fast thread must not drain the queue alone
        except BaseException as exc:  # surfaced below; a thread cannot fail the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(mine,)) for mine in claimed]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    everything = [rid for mine in claimed for rid in mine]
    assert len(everything) == len(set(everything)) == 200
    assert set(everything) == ids
    assert sum(1 for mine in claimed if mine) >= 2, "the threads did not overlap"
    assert queue.counts()[AsyncStatus.SUCCEEDED] == 200
    assert time.monotonic() - started < 30
