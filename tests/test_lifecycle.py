"""Readiness, engine death and Ctrl-C, on a server of this module's own (it gets killed)."""

from __future__ import annotations

import re
import signal
import time

import httpx
import psutil
import pytest
from conftest import MODEL_NAME, Server, start_server, stop_server, stop_server_soon

CHAT = {"model": MODEL_NAME, "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}]}
DEATH_NOTICED_S = 15
RESTART_WITHIN_S = 180  # an engine start on 2 busy cores


@pytest.fixture(scope="module")
def doomed_server(tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(tmp_path_factory.mktemp("doomed") / "server.log")
    yield srv
    stop_server_soon(srv)


def engine_core(server: Server) -> psutil.Process:
    children = psutil.Process(server.process.pid).children(recursive=True)
    cores = [c for c in children if "EngineCore" in " ".join(c.cmdline()) + c.name()]
    assert len(cores) == 1, [c.cmdline() for c in children]
    return cores[0]


def test_ready_means_it_can_generate(doomed_server: Server) -> None:
    assert httpx.get(f"{doomed_server.base_url}/v1/models/model").status_code == 200
    started = time.monotonic()
    response = httpx.post(f"{doomed_server.base_url}/v1/chat/completions", json=CHAT, timeout=30)
    assert response.status_code == 200
    assert time.monotonic() - started < 5  # no set-up left for the first request


def test_the_start_up_heap_is_frozen_and_vllm_settings_cached_once_ready(
        doomed_server: Server) -> None:
    """As `vllm serve` does for the heap (otherwise each oldest-generation collection walks
    ~700k start-up objects, a pause of about half a second for every stream of the
    replica), and as vLLM's engine process does for its settings."""
    assert httpx.post(f"{doomed_server.base_url}/v1/chat/completions", json=CHAT,
                      timeout=60).status_code == 200
    log = doomed_server.log()
    frozen = re.search(r"froze the start-up heap: (\d+) objects", log)
    assert frozen, "no heap freeze logged"
    assert int(frozen[1]) > 100_000
    assert "vLLM's environment settings cached" in log


def test_dead_engine_fails_readiness_and_requests_never_get_a_500(doomed_server: Server
                                                                  ) -> None:
    engine_core(doomed_server).send_signal(signal.SIGKILL)  # a process this test started
    deadline = time.monotonic() + DEATH_NOTICED_S
    status = None
    while time.monotonic() < deadline:
        status = httpx.get(f"{doomed_server.base_url}/v1/models/model", timeout=10).status_code
        if status != 200:
            break
        time.sleep(0.5)
    assert status == 503
    # The runner restarts the engine (test_engine_death.py): a request meanwhile waits for
    # it as for a wake and is served, or, before the restart is under way, gets a fast 503.
    started = time.monotonic()
    response = httpx.post(f"{doomed_server.base_url}/v1/chat/completions", json=CHAT,
                          timeout=RESTART_WITHIN_S)
    if response.status_code != 200:
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) > 0 and "error" in response.json()
        assert time.monotonic() - started < 10


def test_ctrl_c_stops_everything_it_started(tmp_path) -> None:
    srv = start_server(tmp_path / "server.log")
    children = psutil.Process(srv.process.pid).children(recursive=True)
    assert children, "the engine runs in a child process"
    leftovers = stop_server(srv)
    assert srv.process.returncode is not None
    assert not leftovers
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
