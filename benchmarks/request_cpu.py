"""CPU per request and per token of each server's HTTP process: ours against `vllm serve`.

    .venv/bin/python benchmarks/request_cpu.py                 # about 9 minutes on 2 cores

Starts both servers on 127.0.0.1 (servers.py) and, with the harness (loadgen.py) at
concurrency 1 (no batching, no queueing), streams chat completions one after another to
the peer's `/v1`, to ours through Baseten's sync path and to the truss server's own `/v1`,
alternating the order every round (ABBA). Per target and round it reads the CPU time
(user + system) the HTTP process itself used (psutil; the engine's process is not counted:
it does the same work for both, and is reported apart) and divides it by the requests: the
price of one request's trip through each stack. Three workloads, all with a 64-token
prompt: a one-token answer (what the HTTP layers cost a request), 128 tokens (plus what
streaming them costs), and 128 tokens at 64 concurrent staggered streams (per 1,000 tokens:
does a stack's cost per token grow with the number of streams it serves at once?).

Writes benchmarks/results/request_cpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen
import servers

RESULTS = loadgen.REPO / "benchmarks" / "results"
PROMPT_TOKENS = 64


class Run(NamedTuple):
    max_tokens: int
    concurrency: int
    requests: int  # per target and round; one-stream runs take --requests instead


WORKLOADS = {"1 token": Run(1, 1, 40), "128 tokens": Run(128, 1, 40),
             "128 tokens x64": Run(128, 64, 320)}


def cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def children_cpu_s(pid: int) -> float:
    """The engine's processes (the HTTP process's children, alive ones)."""
    total = 0.0
    for child in psutil.Process(pid).children(recursive=True):
        try:
            total += cpu_s(child.pid)
        except psutil.NoSuchProcess:
            pass
    return total


async def measure(targets: dict[str, tuple[loadgen.Target, int]], rounds: int,
                  requests_at_1: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    concurrency = max(run.concurrency for run in WORKLOADS.values())
    async with loadgen.make_client(concurrency) as client:
        resolved = {name: (await loadgen.resolve_model(client, target), pid)
                    for name, (target, pid) in targets.items()}
        prompts = await loadgen.PromptFactory.calibrate(client, next(iter(resolved.values()))[0])
        index = 0
        for rnd in range(rounds):
            order = list(resolved) if rnd % 2 == 0 else list(resolved)[::-1]
            for workload, run in WORKLOADS.items():
                requests = run.requests if run.concurrency > 1 else requests_at_1
                for name in order:
                    target, pid = resolved[name]
                    stagger = run.concurrency > 1
                    warmup = rnd == 0 or stagger  # staggering times a first wave
                    before, engine_before = cpu_s(pid), children_cpu_s(pid)
                    level = await loadgen.run_level(
                        client, target, prompts,
                        loadgen.Workload(PROMPT_TOKENS, run.max_tokens), run.concurrency,
                        requests, index, warmup=warmup, stagger=stagger)
                    used = cpu_s(pid) - before
                    engine_used = children_cpu_s(pid) - engine_before
                    # The CPU counters include the warm-up wave: so do the counts.
                    served = requests + (run.concurrency if warmup else 0)
                    index += served
                    tokens = served * run.max_tokens
                    row = {"round": rnd, "workload": workload, "target": name,
                           "ok": level["ok"],
                           "cpu_ms_per_request": used / served * 1000,
                           "cpu_ms_per_1k_tokens": used / tokens * 1e6,
                           "engine_cpu_ms_per_1k_tokens": engine_used / tokens * 1e6,
                           "output_tokens_per_s": level["output_tokens_per_s"],
                           "ttft_p50_ms": level["ttft_s"]["p50"] * 1000}
                    rows.append(row)
                    print(f"round {rnd} {workload:14s} {name:13s} "
                          f"{row['cpu_ms_per_request']:6.2f} CPU ms/request "
                          f"{row['cpu_ms_per_1k_tokens']:6.1f} /1k tokens "
                          f"(engine {row['engine_cpu_ms_per_1k_tokens']:6.1f})  "
                          f"TTFT p50 {row['ttft_p50_ms']:6.2f} ms  "
                          f"{row['output_tokens_per_s']:7.0f} tok/s", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=40,
                        help="requests per target, round and one-stream workload")
    parser.add_argument("--out", type=Path, default=RESULTS / "request_cpu.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="request-cpu-"))
    started = time.perf_counter()
    with servers.peer_server(work) as peer, servers.our_server(work) as ours:
        targets = {
            "vllm-serve": (loadgen.Target("vllm-serve", f"{peer.url}/v1"), peer.pid),
            "ours-sync-v1": (loadgen.Target("ours-sync-v1", ours.url + servers.OURS_SYNC_BASE),
                             ours.pid),
            "ours-v1": (loadgen.Target("ours-v1", ours.url + servers.OURS_ROOT_BASE), ours.pid)}
        rows = asyncio.run(measure(targets, args.rounds, args.requests))
    summary = {
        workload: {name: {key: round(statistics.median(
            r[key] for r in rows if r["workload"] == workload and r["target"] == name), 3)
            for key in ("cpu_ms_per_request", "cpu_ms_per_1k_tokens",
                        "engine_cpu_ms_per_1k_tokens", "output_tokens_per_s", "ttft_p50_ms")}
            for name in targets}
        for workload in WORKLOADS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(loadgen.rounded({
        "command": loadgen.command_line(), "environment": loadgen.environment(),
        "prompt_tokens": PROMPT_TOKENS, "requests_per_run_at_1": args.requests,
        "workloads": {name: run._asdict() for name, run in WORKLOADS.items()},
        "rounds": args.rounds, "note": "psutil counts CPU in 10 ms ticks",
        "summary": summary, "rows": rows, "wall_s": time.perf_counter() - started,
        "load_avg_at_end": psutil.getloadavg()}), indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
