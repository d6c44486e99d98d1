"""A client that goes away aborts its engine request, streaming or not.

The tiny model is fast (~600 tokens/s a stream), so each test starts several long requests
at once, drops them early and then checks on the engine's own counters that no request is
left unfinished and that the engine stopped generating for them: far fewer tokens than the
requests asked for (vLLM 0.32 does not count client aborts in `request_success_total`).
"""

from __future__ import annotations

import threading

import httpx
from conftest import MODEL_NAME, Server, drop_streams_midway, wait_until_idle

CONCURRENT = 6
LONG = {"model": MODEL_NAME, "max_tokens": 480, "ignore_eos": True, "temperature": 1.0,
        "messages": [{"role": "user", "content": "Write a very long story."}]}
# The non-streaming requests ask for n answers each: a decoding step then makes n tokens
# for one step's time, so the requests outlast the client's timeout on a fast machine too.
N = 8


def generated_tokens(server: Server) -> float:
    return server.metric("vllm:generation_tokens_total")


def test_streaming_disconnect_aborts(server: Server) -> None:
    wait_until_idle(server)
    tokens_before = generated_tokens(server)
    drop_streams_midway(server, "/v1/chat/completions", LONG, CONCURRENT)
    wait_until_idle(server)
    assert generated_tokens(server) - tokens_before < CONCURRENT * LONG["max_tokens"] / 2


def test_non_streaming_disconnect_aborts(server: Server) -> None:
    wait_until_idle(server)
    tokens_before = generated_tokens(server)
    results: list[BaseException | None] = []

    def call() -> None:
        try:
            # The read timeout is the disconnect: httpx closes the connection.
            httpx.post(f"{server.base_url}/v1/chat/completions", json={**LONG, "n": N},
                       timeout=0.4)
            results.append(None)
        except httpx.TimeoutException as exc:
            results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(CONCURRENT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert all(isinstance(r, httpx.TimeoutException) for r in results), results
    wait_until_idle(server)
    assert generated_tokens(server) - tokens_before < CONCURRENT * N * LONG["max_tokens"] / 2


def test_predict_disconnect_aborts(server: Server) -> None:
    wait_until_idle(server)
    tokens_before = generated_tokens(server)
    try:
        httpx.post(f"{server.base_url}/v1/models/model:predict", json={**LONG, "n": 2 * N},
                   timeout=0.3)
    except httpx.TimeoutException:
        pass
    wait_until_idle(server)
    assert generated_tokens(server) - tokens_before < 2 * N * LONG["max_tokens"] / 2
