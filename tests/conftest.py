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
from typing import Any

import boto3
import httpx
import psutil
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer
from openai import OpenAI

REPO = Path(__file__).resolve().parents[1]
# S3 in tests is moto's server on 127.0.0.1 with fake credentials.
BUCKET = "truss-llm-test"
REGION = "us-east-1"
FAKE_KEY_ID = "testing"
FAKE_SECRET = "testing"
# Variables that could send boto3 or httpx somewhere other than 127.0.0.1.
UNSAFE_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN",
              "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
              "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
              "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
TINY_MODEL = REPO / "data" / "tiny-chat"
MODEL_NAME = "tiny-chat"
WEBHOOK_SECRET = "whsec_test_secret"
# The model may fetch media from test servers on 127.0.0.1 (plain http); nothing else.
LOOPBACK_MEDIA = {"TRUSS_LLM_MEDIA_ALLOW_HTTP": "true",
                  "TRUSS_LLM_MEDIA_EXTRA_ALLOWED_HOSTS": "127.0.0.1",
                  "TRUSS_LLM_MEDIA_ALLOWED_NETWORKS": "127.0.0.1/32"}
# Webhooks go to public addresses only; the tests' receiver is on 127.0.0.1.
LOOPBACK_WEBHOOKS = {"TRUSS_LLM_RUNNER_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.1/32"}
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
    headers: dict[str, str]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Prometheus samples by their full name (labels included)."""
        text = httpx.get(f"{self.base_url}/metrics/", headers=self.headers, timeout=10).text
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


# How long the engine may take to drop the work of clients that went away.
SETTLE_TIMEOUT_S = 10


def wait_until_idle(server: Server, timeout: float = SETTLE_TIMEOUT_S) -> float:
    """Wait until the engine has no unfinished request; returns when (time.monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.unfinished_requests() == 0:
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"engine still has {server.unfinished_requests()} requests")


def drop_streams_midway(server: Server, path: str, body: dict, count: int) -> None:
    """Open `count` streams of `body` on `path`, wait until each has begun (the engine then
    runs all of them), and drop every connection mid-stream."""
    clients = [httpx.Client(base_url=server.base_url, timeout=30) for _ in range(count)]
    streams = [c.stream("POST", path, json={**body, "stream": True}) for c in clients]
    # Keep each line iterator referenced: a collected one closes its connection early.
    readers = []
    for stream in streams:
        response = stream.__enter__()
        assert response.status_code == 200
        readers.append(response.iter_lines())
        next(readers[-1])  # generation has started
    assert server.unfinished_requests() == count
    for client in clients:
        client.close()  # drops the connection mid-stream


def start_server(log_path: Path, *args: str, extra_env: dict[str, str] | None = None,
                 port: int | None = None, api_key: str | None = None,
                 loopback_webhooks: bool = True) -> Server:
    """The runner; `loopback_webhooks=False` leaves the webhook policy at its default."""
    port = port or free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           **(LOOPBACK_WEBHOOKS if loopback_webhooks else {}), **(extra_env or {})}
    log = log_path.open("a")
    state_dir = log_path.parent / "state"
    process = subprocess.Popen(
        [sys.executable, "-m", "truss_llm", "serve", "--port", str(port),
         "--state-dir", str(state_dir), *(["--api-key", api_key] if api_key else []), *args],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log_path,
                    {"Authorization": f"Api-Key {api_key}"} if api_key else {})
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.base_url}/v1/models/model", headers=server.headers,
                         timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise TimeoutError(f"server not ready in {READY_TIMEOUT_S} s:\n{server.log()[-4000:]}")


def stop_server(server: Server) -> list[psutil.Process]:
    """Ctrl-C the server by PID; returns the processes it started that outlived it."""
    children = _interrupt(server)
    return _reap(server, children)


# Servers Ctrl-C'ed by `stop_server_soon`, reaped at the end of the session.
_STOPPING: list[tuple[Server, list[psutil.Process]]] = []


def stop_server_soon(server: Server) -> None:
    """Ctrl-C the server by PID now and wait for it at the end of the session (the
    `reap_stopped_servers` fixture). A vLLM engine takes 5-7 s to exit; a module's server
    need not hold up the next module meanwhile. Not for tests that restart on the same
    state directory: those need `stop_server`."""
    _STOPPING.append((server, _interrupt(server)))


@pytest.fixture(scope="session", autouse=True)
def reap_stopped_servers() -> Iterator[None]:
    yield
    leftovers = [(server.base_url, _reap(server, children)) for server, children in _STOPPING]
    _STOPPING.clear()
    assert not [found for _, found in leftovers if found], \
        f"processes outlived their servers: {leftovers}"


def _interrupt(server: Server) -> list[psutil.Process]:
    try:
        children = psutil.Process(server.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
    return children


def _reap(server: Server, children: list[psutil.Process]) -> list[psutil.Process]:
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
    srv = start_server(log_path, "--webhook-secret", WEBHOOK_SECRET, extra_env=LOOPBACK_MEDIA)
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


@dataclass
class Delivery:
    path: str
    body: bytes
    headers: dict[str, str]


class WebhookReceiver:
    """A webhook endpoint on 127.0.0.1: records every POST; paths under /fail answer 500."""

    def __init__(self) -> None:
        import http.server
        import threading

        receiver = self
        self.deliveries: list[Delivery] = []
        self.arrived = threading.Condition()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.arrived:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    receiver.deliveries.append(Delivery(self.path, body, headers))
                    receiver.arrived.notify_all()
                self.send_response(500 if self.path.startswith("/fail") else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, count: int, path_prefix: str = "/", timeout: float = 60) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                found = [d for d in self.deliveries if d.path.startswith(path_prefix)]
                if len(found) >= count or time.monotonic() > deadline:
                    return found
                self.arrived.wait(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def receiver() -> Iterator[WebhookReceiver]:
    hooks = WebhookReceiver()
    yield hooks
    hooks.close()


def wait_for_status(base_url: str, request_id: str, statuses: set[str], timeout: float = 60,
                    headers: dict[str, str] | None = None) -> dict:
    deadline = time.monotonic() + timeout
    record: dict = {}
    while time.monotonic() < deadline:
        record = httpx.get(f"{base_url}/async_request/{request_id}", headers=headers,
                           timeout=10).json()
        if record.get("status") in statuses:
            return record
        time.sleep(0.1)
    raise AssertionError(f"{request_id} never reached {statuses}: {record}")


# -- S3 (moto) fixtures ---------------------------------------------------------------

@pytest.fixture(scope="module")
def aws_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    missing = tmp_path_factory.mktemp("aws") / "absent"
    with pytest.MonkeyPatch.context() as mp:
        for name in UNSAFE_ENV:
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
        mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_CONFIG_FILE", str(missing))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing))
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        mp.setenv("no_proxy", "127.0.0.1,localhost")
        yield


@pytest.fixture(scope="module")
def s3_endpoint(aws_env: None) -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3(s3_endpoint: str) -> Any:
    client = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name=REGION, aws_access_key_id=FAKE_KEY_ID,
        aws_secret_access_key=FAKE_SECRET,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
    client.create_bucket(Bucket=BUCKET)
    return client
