"""CPU per request of each server's HTTP process, one request at a time: ours against `vllm serve`.

    .venv/bin/python benchmarks/request_cpu.py                 # about 3 minutes on 2 cores

Starts both servers on 127.0.0.1 (servers.py) and streams chat completions one after
another (no concurrency, so no batching and no queueing) to the peer's `/v1`, to ours
through Baseten's sync path and to the truss server's own `/v1`, alternating the order
every round (ABBA). Per target and round it reads the CPU time (user + system) the HTTP
process itself used (psutil; the engine's own process is not counted: it does the same
work for both) and divides it by the requests: the price of one request's trip through
each stack. Two workloads: a one-token answer (what the HTTP layers cost a request) and
128 tokens (plus what streaming them costs). A fixed ~64-token prompt, `ignore_eos`.

Writes benchmarks/results/request_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen
import servers

RESULTS = loadgen.REPO / "benchmarks" / "results"
PROMPT = "hello " * 60
WORKLOADS = {"1 token": 1, "128 tokens": 128}
WARMUP_REQUESTS = 10


def body(max_tokens: int) -> dict[str, Any]:
    return {"model": "tiny-chat", "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}


def run(client: httpx.Client, url: str, pid: int, max_tokens: int, requests: int
        ) -> dict[str, float]:
    """`requests` streams one after another: CPU ms of process `pid` per request, and the
    median time to first token."""
    process = psutil.Process(pid)
    ttfts = []
    before = process.cpu_times()
    for _ in range(requests):
        started = time.perf_counter()
        first = None
        with client.stream("POST", url, json=body(max_tokens)) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.perf_counter() - started
        ttfts.append(first or 0.0)
    after = process.cpu_times()
    used = (after.user + after.system) - (before.user + before.system)
    return {"cpu_ms_per_request": used / requests * 1000,
            "ttft_p50_ms": statistics.median(ttfts) * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=40,
                        help="requests per target, round and workload")
    parser.add_argument("--out", type=Path, default=RESULTS / "request_cpu.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="request-cpu-"))
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with servers.peer_server(work) as peer, servers.our_server(work) as ours, \
            httpx.Client(timeout=60) as client:
        targets = {"vllm-serve": (f"{peer.url}/v1/chat/completions", peer.pid),
                   "ours-sync-v1": (f"{ours.url}{servers.OURS_SYNC_BASE}/chat/completions",
                                    ours.pid),
                   "ours-v1": (f"{ours.url}{servers.OURS_ROOT_BASE}/chat/completions",
                               ours.pid)}
        for url, pid in targets.values():
            run(client, url, pid, 8, WARMUP_REQUESTS)
        for rnd in range(args.rounds):
            order = list(targets) if rnd % 2 == 0 else list(targets)[::-1]
            for workload, max_tokens in WORKLOADS.items():
                for name in order:
                    row = {"round": rnd, "workload": workload, "target": name,
                           **run(client, *targets[name], max_tokens, args.requests)}
                    rows.append(row)
                    print(f"round {rnd} {workload:10s} {name:13s} "
                          f"{row['cpu_ms_per_request']:6.2f} CPU ms/request  "
                          f"TTFT p50 {row['ttft_p50_ms']:5.2f} ms", flush=True)
    summary = {
        workload: {name: {key: round(statistics.median(
            r[key] for r in rows if r["workload"] == workload and r["target"] == name), 3)
            for key in ("cpu_ms_per_request", "ttft_p50_ms")} for name in targets}
        for workload in WORKLOADS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(loadgen.rounded({
        "command": loadgen.command_line(), "environment": loadgen.environment(),
        "prompt_words": len(PROMPT.split()), "requests_per_run": args.requests,
        "rounds": args.rounds, "summary": summary, "rows": rows,
        "wall_s": time.perf_counter() - started,
        "load_avg_at_end": psutil.getloadavg()}), indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
