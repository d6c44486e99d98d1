"""Admission control: past its bound the model answers 429 with Retry-After at once, and
the requests it admits keep a bounded time to first token.

This module's runner runs 2 sequences at once and, by the default bound (as many waiting
as running), admits 4 requests; a flood of 24 gets only 200s and 429s.
"""

from __future__ import annotations

import concurrent.futures
import statistics
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import MODEL_NAME, Server, start_server, stop_server_soon

FLOOD = 24
TOKENS = 2000  # seconds a request: the whole flood arrives while the first ones run
BODY = {"model": MODEL_NAME, "max_tokens": TOKENS, "ignore_eos": True, "stream": True,
        "messages": [{"role": "user", "content": "Count to a thousand."}]}
# An admitted request waits at most for the running batch to finish: its time to first
# token stays within this many unloaded end-to-end times (unbounded, the 24th request would
# wait for about 12).
TTFT_FACTOR = 3.0


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("admission") / "server.log",
                       extra_env={"TRUSS_LLM_ENGINE_MAX_NUM_SEQS": "2",
                                  "TRUSS_LLM_ENGINE_MAX_MODEL_LEN": "4096"})
    yield srv
    stop_server_soon(srv)


def timed_stream(base_url: str, path: str, start: threading.Barrier | None = None
                 ) -> tuple[int, dict, float, float, str]:
    """(status, headers, time to first token, end-to-end time, text) of one request."""
    if start is not None:
        start.wait(timeout=30)  # all at once: a flood, not a trickle
    started = time.monotonic()
    first = None
    chunks = []
    with httpx.stream("POST", f"{base_url}{path}", json=BODY, timeout=180) as response:
        for chunk in response.iter_text():
            first = first or time.monotonic()
            chunks.append(chunk)
    done = time.monotonic()
    return (response.status_code, dict(response.headers), (first or done) - started,
            done - started, "".join(chunks))


def test_a_flood_gets_200s_and_429s_and_the_admitted_stay_fast(busy: Server) -> None:
    unloaded = [timed_stream(busy.base_url, "/v1/chat/completions") for _ in range(3)]
    assert all(result[0] == 200 for result in unloaded)
    unloaded_e2e = statistics.median(result[3] for result in unloaded)
    paths = ["/v1/chat/completions", "/environments/production/sync/v1/chat/completions",
             "/production/predict"]
    start = threading.Barrier(FLOOD)
    with concurrent.futures.ThreadPoolExecutor(FLOOD) as pool:
        results = list(pool.map(
            lambda i: (paths[i % 3], *timed_stream(busy.base_url, paths[i % 3], start)),
            range(FLOOD)))
    statuses = [result[1] for result in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 4 and statuses.count(429) >= FLOOD // 2, statuses
    for path, status, headers, ttft, _, text in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert "capacity" in text
            if path == "/production/predict":
                assert text.startswith('{"error":"')  # Baseten's shape
            else:
                assert '"type":"rate_limit_error"' in text  # OpenAI's
        else:
            assert text.rstrip().endswith("data: [DONE]")
            assert ttft < TTFT_FACTOR * unloaded_e2e, (ttft, unloaded_e2e)
    refused = [r for r in results if r[1] == 429]
    assert max(r[3] for r in refused) < unloaded_e2e  # refused at once, not after a wait
    assert busy.metric("truss_llm_admission_rejections_total") == len(refused)
    # The flood leaves nothing behind.
    deadline = time.monotonic() + 30
    while busy.unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert busy.unfinished_requests() == 0
