"""Nothing accepted is lost: `kill -9` of the runner, then a restart on the same queue; a
SIGTERM, which drains the runner first; and scale-to-zero, where requests wait for the model
instead of failing and the model is never unloaded under work in flight."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import (
    MODEL_NAME,
    Server,
    WebhookReceiver,
    start_server,
    stop_server,
    stop_server_soon,
    wait_for_status,
)
from truss_llm.runner.lifecycle import IDLE_CHECK_S, ModelLifecycle
from truss_llm.runner.models import AsyncPredictRequest
from truss_llm.runner.queue import AsyncQueue

SHORT = {"model": MODEL_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
LONG = {**SHORT, "max_tokens": 480, "n": 8, "ignore_eos": True, "temperature": 1.0}
MIN_QUEUE_S = 10  # Baseten's smallest max_time_in_queue_seconds
FINAL = {"SUCCEEDED", "FAILED", "EXPIRED", "CANCELED", "WEBHOOK_FAILED"}
# Generations that take seconds on any machine (decoding steps, not n, make them long), in a
# raised context.
LONG_CONTEXT = {"TRUSS_LLM_ENGINE_MAX_MODEL_LEN": "4096"}
STREAMED = {**SHORT, "max_tokens": 4000, "ignore_eos": True, "temperature": 1.0,
            "stream": True}
IDLE_S = 2  # the scale-to-zero servers' idle period
SMALL_BODY_LIMIT = 1_000_000  # the scale-to-zero server's body limit, compressed from 100 MB


def test_kill_9_then_restart_finishes_every_request(tmp_path, receiver: WebhookReceiver) -> None:
    log = tmp_path / "server.log"  # both runs share the state dir beside it
    first = start_server(log, "--workers", "1")
    enqueued_at = time.monotonic()

    def submit(model_input: dict, **fields) -> str:
        response = httpx.post(f"{first.base_url}/production/async_predict", timeout=30,
                              json={"model_input": model_input, **fields})
        assert response.status_code == 201, response.text
        return response.json()["request_id"]

    running = submit(LONG, webhook_endpoint=f"{receiver.url}/ok/crash/running")
    queued = [submit(SHORT, priority=1, webhook_endpoint=f"{receiver.url}/ok/crash/queued")
              for _ in range(3)]
    doomed = submit(SHORT, priority=2, max_time_in_queue_seconds=MIN_QUEUE_S,
                    webhook_endpoint=f"{receiver.url}/ok/crash/expired")
    wait_for_status(first.base_url, running, {"IN_PROGRESS"}, timeout=10)
    engine = psutil.Process(first.process.pid).children(recursive=True)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    for child in engine:  # the killed runner's EngineCore, started by this test
        if child.is_running():
            child.kill()
    # Let the low-priority request outlive its queue time while nobody serves.
    time.sleep(max(0.0, MIN_QUEUE_S + 1 - (time.monotonic() - enqueued_at)))

    second = start_server(log, "--workers", "1")
    try:
        assert wait_for_status(second.base_url, running, {"SUCCEEDED"}, 120)["errors"] == []
        for request_id in queued:
            assert wait_for_status(second.base_url, request_id, FINAL, 60)["status"] == \
                "SUCCEEDED"
        expired = wait_for_status(second.base_url, doomed, FINAL, 60)
        assert expired["status"] == "EXPIRED"
        assert expired["errors"][0]["code"] == "EXPIRED"
        assert len(receiver.wait_for(1, "/ok/crash/running")) >= 1
        assert len(receiver.wait_for(3, "/ok/crash/queued")) == 3
        assert len(receiver.wait_for(1, "/ok/crash/expired")) == 1
        assert "queued again" in second.log()
    finally:
        stop_server(second)


@pytest.fixture(scope="module")
def sleepy(tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(tmp_path_factory.mktemp("sleepy") / "server.log",
                       "--scale-to-zero", str(IDLE_S),
                       extra_env={**LONG_CONTEXT, "TRUSS_LLM_RUNNER_MAX_BODY_BYTES":
                                  str(SMALL_BODY_LIMIT)})
    yield srv
    stop_server_soon(srv)


def _ready(base_url: str) -> int:
    return httpx.get(f"{base_url}/v1/models/model", timeout=10).status_code


def _wait_ready(base_url: str, status: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _ready(base_url) != status:
        assert time.monotonic() < deadline, f"readiness never became {status}"
        time.sleep(0.2)


def test_scale_to_zero_then_requests_and_wake_bring_it_back(sleepy) -> None:
    base = sleepy.base_url
    _wait_ready(base, 503, timeout=15)  # idle for 2 s: unloaded, and readiness says so
    assert httpx.get(f"{base}/production/async_queue_status").status_code == 200
    started = time.monotonic()
    response = httpx.post(f"{base}/production/predict", json=SHORT, timeout=120)
    assert response.status_code == 200, response.text  # it waited for the model
    assert time.monotonic() - started > 1  # ... which really was loading
    _wait_ready(base, 503, timeout=15)
    assert httpx.post(f"{base}/production/wake", timeout=10).status_code == 202
    _wait_ready(base, 200, timeout=120)


def _stream(base_url: str, path: str, body: dict) -> tuple[int, list[dict], float]:
    """(status, the stream's events, seconds from the first event to the last)."""
    events: list[dict] = []
    first = None
    with httpx.stream("POST", f"{base_url}{path}", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            first = first or time.monotonic()
            data = line[len("data: "):]
            events.append({"done": True} if data == "[DONE]" else json.loads(data))
    return response.status_code, events, time.monotonic() - (first or time.monotonic())


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", STREAMED),
    ("/v1/models/model:predict", STREAMED),
    ("/v1/completions", {**{k: v for k, v in STREAMED.items() if k != "messages"},
                         "prompt": "Tell a long story."}),
])
def test_a_stream_on_a_truss_route_is_not_unloaded_under(sleepy: Server, path: str,
                                                         body: dict) -> None:
    """The truss routes the runner passes through count as activity: scale to zero waits
    for a stream that outlasts the idle period (before, it stopped the engine under it)."""
    status, events, lasted = _stream(sleepy.base_url, path, body)
    assert status == 200
    # Without the accounting the model unloads at most IDLE_S + IDLE_CHECK_S after the last
    # counted activity, which ended before this stream began.
    assert lasted > IDLE_S + IDLE_CHECK_S + 0.5, f"too short ({lasted:.1f} s) to test anything"
    assert not [e for e in events if "error" in e], events[-3:]
    assert events[-1] == {"done": True}


@pytest.mark.parametrize("method,path,shape", [
    ("POST", "/v1/chat/completions", "openai"),
    ("POST", "/v1/completions", "openai"),
    ("POST", "/v1/models/model:predict", "baseten"),
    ("POST", "/production/predict", "baseten"),
    ("POST", "/environments/production/sync/v1/chat/completions", "openai"),
    ("GET", "/metrics", "baseten"),
])
def test_the_body_limit_applies_on_every_route(sleepy: Server, method: str, path: str,
                                               shape: str) -> None:
    response = httpx.request(method, f"{sleepy.base_url}{path}", timeout=60,
                             content=b"x" * (SMALL_BODY_LIMIT + 1),
                             headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text[:300]
    error = response.json()["error"]
    message = error["message"] if shape == "openai" else error
    assert f"{SMALL_BODY_LIMIT:,} byte limit" in message


def test_polling_the_model_list_does_not_keep_the_model_awake(sleepy: Server) -> None:
    base = sleepy.base_url
    assert httpx.post(f"{base}/production/predict", json=SHORT, timeout=300).status_code == 200
    deadline = time.monotonic() + IDLE_S + 30
    while _ready(base) == 200:  # polled all along: it still scales to zero
        assert time.monotonic() < deadline, "the model list kept the model awake"
        listing = httpx.get(f"{base}/v1/models", timeout=10)
        assert listing.status_code == 200
        time.sleep(0.2)
    for _ in range(10):  # ... and polling it asleep does not wake it: its last listing
        listing = httpx.get(f"{base}/v1/models", timeout=10)
        assert [m["id"] for m in listing.json()["data"]] == [MODEL_NAME]
        time.sleep(0.2)
    assert _ready(base) == 503


class _SlowModel:
    """Stands in for the vLLM model in a lifecycle test: its unload takes until released,
    and it reports itself loaded until the unload has finished."""

    def __init__(self) -> None:
        self.loaded = True
        self.loads = 0
        self.unloading = threading.Event()
        self.release = threading.Event()

    def unload(self) -> None:
        self.unloading.set()
        self.release.wait(30)
        self.loaded = False

    def load(self) -> None:
        self.loads += 1
        self.loaded = True

    async def is_healthy(self) -> bool:
        return self.loaded


class _Wrapper:
    """What the lifecycle reads of truss's ModelWrapper."""

    ready, load_failed = True, False

    def __init__(self, model: _SlowModel) -> None:
        self._model = model


def test_a_request_during_an_unload_waits_for_the_model_to_come_back() -> None:
    """wait_ready's fast path must not let a request through while an unload runs."""
    async def scenario() -> None:
        model = _SlowModel()
        lifecycle = ModelLifecycle(_Wrapper(model), idle_s=0.1, wake_timeout_s=30)
        watch = asyncio.create_task(lifecycle.run_idle_watch())
        try:
            assert await asyncio.to_thread(model.unloading.wait, 30)
            assert model.loaded  # the model still says so, mid-unload
            ready = asyncio.create_task(lifecycle.wait_ready())
            await asyncio.sleep(0.3)
            assert not ready.done(), "a request went through to a model being unloaded"
            model.release.set()
            await asyncio.wait_for(ready, 30)
            assert model.loaded and model.loads == 1  # woken again, then served
        finally:
            model.release.set()
            watch.cancel()

    asyncio.run(scenario())


# -- SIGTERM: drain ------------------------------------------------------------------------
def test_an_orderly_stop_requeues_its_own_work_and_counts_nothing(tmp_path) -> None:
    """What a drain does to the queue: a request this runner was running goes back as never
    started, with a fresh queue time; one a dead runner left running is left to the crash
    recovery, which counts the crash."""
    t0 = 1_000_000.0
    with AsyncQueue(tmp_path / "queue.sqlite3", "m", "d") as queue:
        orphan = queue.enqueue(AsyncPredictRequest(model_input={"n": 1}), "production",
                               now=t0)
        queue.claim_next(now=t0 + 1)  # by a runner that then died
        ours = queue.enqueue(AsyncPredictRequest(model_input={"n": 2},
                                                 max_time_in_queue_seconds=MIN_QUEUE_S),
                             "production", now=t0 + 2)
        assert queue.claim_next(now=t0 + 3).request_id == ours  # this runner started at +2
        assert queue.requeue_interrupted(claimed_since=t0 + 2, now=t0 + 100) == 1
        mine = queue.get_job(ours)
        assert (mine.status, mine.attempts, mine.crash_count) == ("QUEUED", 0, 0)
        # past its first queue time, and yet it runs: it had started in time
        assert queue.claim_next(now=t0 + 101).request_id == ours
        assert queue.get_job(orphan).status == "IN_PROGRESS"


DRAINED = {**STREAMED, "max_tokens": 2500}


def test_sigterm_drains_streams_and_requeues_async_work(tmp_path) -> None:
    """Streams in flight complete, new work gets 503 with Retry-After, the running async
    request goes back to the queue with no attempt or crash counted and completes after a
    restart on the same state directory; the process exits 0."""
    log = tmp_path / "server.log"  # both runs share the state dir beside it
    env = {**LONG_CONTEXT, "TRUSS_LLM_RUNNER_DRAIN_GRACE_S": "240"}
    first = start_server(log, "--workers", "1", extra_env=env)
    base = first.base_url
    job = httpx.post(f"{base}/production/async_predict", timeout=30, json={
        "model_input": {**LONG, "max_tokens": 3500, "n": 1}}).json()["request_id"]
    wait_for_status(base, job, {"IN_PROGRESS"}, timeout=60)
    started = [threading.Event(), threading.Event()]

    def stream(path: str, begun: threading.Event) -> tuple[int, list[dict]]:
        events: list[dict] = []
        with httpx.stream("POST", f"{base}{path}", json=DRAINED, timeout=300) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    begun.set()
                    data = line[len("data: "):]
                    events.append({"done": True} if data == "[DONE]" else json.loads(data))
        return response.status_code, events

    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            streams = [pool.submit(stream, path, begun) for path, begun in zip(
                ("/v1/chat/completions", "/production/sync/v1/chat/completions"), started,
                strict=True)]
            for begun in started:
                assert begun.wait(120), "a stream never began"
            first.process.send_signal(signal.SIGTERM)  # the server this test started
            deadline = time.monotonic() + 10
            while True:  # new work is refused, in the route's shape, with Retry-After
                refused = httpx.post(f"{base}/production/predict", json=SHORT, timeout=30)
                if refused.status_code == 503:
                    break
                assert time.monotonic() < deadline, "new work still taken after SIGTERM"
                time.sleep(0.05)
            assert int(refused.headers["retry-after"]) > 0
            assert "shutting down" in refused.json()["error"]
            chat = httpx.post(f"{base}/v1/chat/completions", json=SHORT, timeout=30)
            assert chat.status_code == 503 and chat.json()["error"]["code"] == 503
            assert _ready(base) == 503
            assert httpx.get(f"{base}/async_request/{job}", timeout=30).status_code == 200
            for future in streams:  # ... while the streams in flight run to their end
                status, events = future.result(timeout=300)
                assert status == 200
                assert not [e for e in events if "error" in e], events[-3:]
                assert events[-1] == {"done": True}
        assert first.process.wait(120) == 0
    finally:
        if first.process.poll() is None:
            stop_server(first)
    with AsyncQueue(queue_file(log), "local", "local") as queue:
        interrupted = queue.get_job(job)
    assert interrupted.status == "QUEUED"
    assert (interrupted.attempts, interrupted.crash_count) == (0, 0)

    second = start_server(log, "--workers", "1", extra_env=env)
    try:
        assert wait_for_status(second.base_url, job, {"SUCCEEDED", "FAILED"},
                               timeout=300)["status"] == "SUCCEEDED"
        assert "were running when the runner stopped" not in second.log()  # no crash
    finally:
        stop_server(second)
    with AsyncQueue(queue_file(log), "local", "local") as queue:
        done = queue.get_job(job)
    assert (done.attempts, done.crash_count) == (1, 0)  # the one run that finished


def queue_file(log: Path) -> Path:
    """The queue of a server whose log is `log` (start_server puts its state beside it)."""
    return log.parent / "state" / "async-queue.sqlite3"
