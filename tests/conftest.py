"""One real server per test session: `truss-llm serve` on 127.0.0.1 with the vLLM CPU engine.

The server is the same process a user starts with the README's run command: the real truss
inference server, the real engine and the tiny model in data/tiny-chat. It is stopped with
SIGINT (what Ctrl-C sends) by its PID, and the teardown checks that nothing it started lives
on.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from openai import OpenAI

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "data" / "tiny-chat"
MODEL_NAME = "tiny-chat"
READY_TIMEOUT_S = 300
STOP_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    base_url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Prometheus samples by their full name (labels included)."""
        text = httpx.get(f"{self.base_url}/metrics/", timeout=10).text
        samples = {}
        for line in text.splitlines():
            match = re.match(r"^([a-zA-Z_:][^ ]*) ([-+0-9.eE]+|NaN)$", line)
            if match:
                samples[match.group(1)] = float(match.group(2))
        return samples

    def metric(self, prefix: str) -> float:
        return sum(v for k, v in self.metrics().items() if k.startswith(prefix))

    def unfinished_requests(self) -> float:
        return self.metrics()["truss_llm_engine_unfinished_requests"]


def start_server(log_path: Path, extra_env: dict[str, str] | None = None) -> Server:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "truss_llm", "serve", "--port", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.base_url}/v1/models/model", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise TimeoutError(f"server not ready in {READY_TIMEOUT_S} s:\n{server.log()[-4000:]}")


def stop_server(server: Server) -> list[psutil.Process]:
    """Ctrl-C the server by PID; returns the processes it started that outlived it."""
    try:
        children = psutil.Process(server.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    server.process.send_signal(signal.SIGINT)
    try:
        server.process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    for leftover in alive:  # only processes this test started, by PID
        leftover.kill()
    return alive


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    started = time.monotonic()
    srv = start_server(log_path)
    print(f"\nserver ready in {time.monotonic() - started:.1f} s at {srv.base_url}")
    yield srv
    leftovers = stop_server(srv)
    assert srv.process.returncode is not None
    assert not leftovers, f"processes outlived the server: {leftovers}"


@pytest.fixture(scope="session")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="local", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as session:
        yield session
