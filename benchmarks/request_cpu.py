"""CPU per request of each server's HTTP process, one request at a time: ours against `vllm serve`.

    .venv/bin/python benchmarks/request_cpu.py                 # about 6 minutes on 2 cores

Starts both servers on 127.0.0.1 (servers.py) and, with the harness (loadgen.py) at
concurrency 1 (no batching, no queueing), streams chat completions one after another to
the peer's `/v1`, to ours through Baseten's sync path and to the truss server's own `/v1`,
alternating the order every round (ABBA). Per target and round it reads the CPU time
(user + system) the HTTP process itself used (psutil; the engine's process is not counted:
it does the same work for both) and divides it by the requests: the price of one request's
trip through each stack. Two workloads: a one-token answer (what the HTTP layers cost a
request) and 128 tokens (plus what streaming them costs), both with a 64-token prompt.

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
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen
import servers

RESULTS = loadgen.REPO / "benchmarks" / "results"
PROMPT_TOKENS = 64
WORKLOADS = {"1 token": 1, "128 tokens": 128}


def cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def measure(targets: dict[str, tuple[loadgen.Target, int]], rounds: int,
                  requests: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async with loadgen.make_client(1) as client:
        resolved = {name: (await loadgen.resolve_model(client, target), pid)
                    for name, (target, pid) in targets.items()}
        prompts = await loadgen.PromptFactory.calibrate(client, next(iter(resolved.values()))[0])
        index = 0
        for rnd in range(rounds):
            order = list(resolved) if rnd % 2 == 0 else list(resolved)[::-1]
            for workload, max_tokens in WORKLOADS.items():
                for name in order:
                    target, pid = resolved[name]
                    before = cpu_s(pid)
                    level = await loadgen.run_level(
                        client, target, prompts, loadgen.Workload(PROMPT_TOKENS, max_tokens),
                        1, requests, index, warmup=rnd == 0)
                    used = cpu_s(pid) - before
                    index += requests + 1
                    row = {"round": rnd, "workload": workload, "target": name,
                           "ok": level["ok"],
                           "cpu_ms_per_request": used / requests * 1000,
                           "ttft_p50_ms": level["ttft_s"]["p50"] * 1000}
                    rows.append(row)
                    print(f"round {rnd} {workload:10s} {name:13s} "
                          f"{row['cpu_ms_per_request']:6.2f} CPU ms/request  "
                          f"TTFT p50 {row['ttft_p50_ms']:5.2f} ms", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=40,
                        help="requests per target, round and workload")
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
            for key in ("cpu_ms_per_request", "ttft_p50_ms")} for name in targets}
        for workload in WORKLOADS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(loadgen.rounded({
        "command": loadgen.command_line(), "environment": loadgen.environment(),
        "prompt_tokens": PROMPT_TOKENS, "requests_per_run": args.requests,
        "rounds": args.rounds, "note": "psutil counts CPU in 10 ms ticks",
        "summary": summary, "rows": rows, "wall_s": time.perf_counter() - started,
        "load_avg_at_end": psutil.getloadavg()}), indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
