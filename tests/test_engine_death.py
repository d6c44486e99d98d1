"""A dead engine: 503 with Retry-After (never a 500); a deployment's process exits so that the
platform restarts it; the local runner restarts the engine itself and keeps its queue.

Each test kills the server's vLLM EngineCore process with SIGKILL, by PID: it is a child of
the server this test started.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import (
    MODEL_NAME,
    READY_TIMEOUT_S,
    REPO,
    Server,
    free_port,
    start_server,
    stop_server,
    wait_for_status,
)

# Seconds of work on any machine (decoding steps, not n, make it long), in a raised context.
LONG_CONTEXT = {"TRUSS_LLM_ENGINE_MAX_MODEL_LEN": "4096"}
LONG = {"model": MODEL_NAME, "max_tokens": 3000, "n": 4, "ignore_eos": True,
        "temperature": 1.0, "messages": [{"role": "user", "content": "Tell a long story."}]}
SHORT = {"model": MODEL_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
# The runner serves again within this long after the kill (an engine start on 2 busy cores).
RESTART_WITHIN_S = 180
# A deployment's process is gone within this long after the kill.
EXIT_WITHIN_S = 30


def engine_core(pid: int) -> psutil.Process:
    for child in psutil.Process(pid).children(recursive=True):
        if "EngineCore" in " ".join([child.name(), *child.cmdline()]):
            return child
    raise AssertionError("no EngineCore process under the server")


def post_chat(base_url: str, path: str, body: dict) -> tuple[int, dict, str]:
    """(status, headers, text) of a request, streamed or not, read to its end."""
    with httpx.stream("POST", f"{base_url}{path}", json=body, timeout=120) as response:
        text = response.read().decode()
    return response.status_code, dict(response.headers), text


def assert_clear_error(status: int, headers: dict, text: str, streamed: bool) -> None:
    assert status != 500 and "Internal Server Error" not in text
    if streamed and status == 200:  # the stream had begun: it ends with an error event
        events = [line[len("data: "):] for line in text.splitlines()
                  if line.startswith("data: ")]
        errors = [json.loads(e)["error"] for e in events if e != "[DONE]"
                  and "error" in json.loads(e)]
        assert errors, text[-500:]
    else:
        assert status == 503, text
        assert int(headers["retry-after"]) > 0
        assert "unavailable" in text


def test_runner_restarts_a_dead_engine_and_keeps_its_queue(tmp_path: Path) -> None:
    server = start_server(tmp_path / "server.log", extra_env=LONG_CONTEXT)
    try:
        _kill_under_load_then_recover(server)
    finally:
        stop_server(server)


def _kill_under_load_then_recover(server: Server) -> None:
    base = server.base_url
    retrying = {"max_attempts": 5, "initial_delay_ms": 1000, "max_delay_ms": 5000}
    queued = [httpx.post(f"{base}/production/async_predict", timeout=30, json={
        "model_input": {**LONG, "n": 1}, "inference_retry_config": retrying}
    ).json()["request_id"] for _ in range(2)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        in_flight = [
            (pool.submit(post_chat, base, path, {**LONG, "stream": stream}), stream)
            for path in ("/v1/chat/completions", "/production/predict",
                         "/environments/production/sync/v1/chat/completions")
            for stream in (False, True)]
        time.sleep(1.0)
        engine_core(server.process.pid).send_signal(signal.SIGKILL)
        killed = time.monotonic()
        for future, stream in in_flight:
            assert_clear_error(*future.result(timeout=60), streamed=stream)
    assert time.monotonic() - killed < 60
    while True:  # serves again, by itself
        status, _, text = post_chat(base, "/v1/chat/completions", SHORT)
        if status == 200:
            break
        assert status == 503, text  # while it restarts: unavailable, never a 500
        assert time.monotonic() - killed < RESTART_WITHIN_S, "the engine did not come back"
        time.sleep(1.0)
    print(f"\nserving again {time.monotonic() - killed:.1f} s after the kill")
    assert server.metric("truss_llm_engine_restarts_total") == 1
    after = httpx.post(f"{base}/production/async_predict", timeout=30,
                       json={"model_input": SHORT}).json()["request_id"]
    for request_id in [*queued, after]:  # the queue outlived the engine
        assert wait_for_status(base, request_id, {"SUCCEEDED", "FAILED"},
                               timeout=RESTART_WITHIN_S)["status"] == "SUCCEEDED"
    assert server.process.poll() is None


DEPLOYED = """
import sys
from pathlib import Path

from truss_llm.truss_app import build_server

if __name__ == "__main__":  # vLLM's EngineCore re-imports this module
    build_server(Path(sys.argv[1]), port=int(sys.argv[2])).run()
"""


def test_a_deployment_exits_when_its_engine_dies(tmp_path: Path) -> None:
    """The truss server alone, as Baseten runs it: no runner, so the process ends."""
    script = tmp_path / "deployed.py"
    script.write_text(DEPLOYED)
    port = free_port()
    env = {**os.environ, **LONG_CONTEXT, "PYTHONPATH": str(REPO / "packages"),
           "PYTHONUNBUFFERED": "1"}
    env.pop("TRUSS_LLM_EXIT_ON_ENGINE_DEATH", None)
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen([sys.executable, str(script), str(REPO), str(port)], env=env,
                               stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready"
            try:
                if httpx.get(f"{base}/v1/models/model", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(post_chat, base, "/v1/chat/completions", LONG)
            time.sleep(1.0)
            engine_core(process.pid).send_signal(signal.SIGKILL)
            killed = time.monotonic()
            assert_clear_error(*in_flight.result(timeout=60), streamed=False)
        returncode = process.wait(EXIT_WITHIN_S)
        print(f"\nexited {time.monotonic() - killed:.1f} s after the kill, status {returncode}")
        assert returncode != 0
    finally:
        if process.poll() is None:  # only the process this test started, by PID
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
            process.wait()
        log.close()


@pytest.mark.parametrize("render", ["openai", "baseten"])
def test_unavailable_errors_carry_retry_after(render: str) -> None:
    from truss_llm.errors import engine_unavailable
    from truss_llm.openai_surface import render_baseten_error, render_openai_error

    renderer = render_openai_error if render == "openai" else render_baseten_error
    response = renderer(engine_unavailable())
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
