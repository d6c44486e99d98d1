"""How fast and how big the async-request queue is, at the store level (no HTTP, no model).

For each SQLite `synchronous` mode (FULL, the default: an fsync per commit; NORMAL: none),
with small model_input bodies and one transaction per call, as the HTTP layer makes them:
- 50,000 queued requests (Baseten's per-organization limit): time to enqueue them (the
  enqueue rate), the file size on disk (database + WAL + shared memory), and the latency of
  claim_next, get, queue_status and next_wakeup at that depth;
- the drain rate (claim_next + complete) and claim_next latency as the queue drains from
  50,000 to 0 (it should not depend on the depth);
then the drain rate of four threads sharing one queue (the HTTP layer and the worker call in
through `asyncio.to_thread`), and the peak RSS of this process.

    .venv/bin/python benchmarks/queue_bench.py            # about a minute on 2 cores

Writes benchmarks/results/queue_bench.json and queue_bench.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from truss_llm.runner.models import AsyncPredictRequest
from truss_llm.runner.queue import DEFAULT_SYNCHRONOUS, AsyncQueue

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUEUED = 50_000  # Baseten's limit of QUEUED + IN_PROGRESS requests per organization
MODES: tuple[Literal["NORMAL", "FULL"], ...] = ("FULL", "NORMAL")
LATENCY_SAMPLES = 1_000
THREADED_JOBS = 10_000
THREADS = 4
DEPTH_BUCKET = 2_500  # claim latency is summarized per this many claims while draining
# Distinct request objects, reused in turn: building 50,000 pydantic objects up front would
# put the benchmark's own memory into the peak RSS that is meant to be the queue's.
REQUEST_POOL = 300
PRIORITIES = 3
WEBHOOK = "https://example.com/webhook"
ENVIRONMENT = "production"
OUTPUT = '{"text": "hello"}'
MiB = 1024 * 1024


def small_request(i: int) -> AsyncPredictRequest:
    """A typical small chat body, mixed priorities, every other one with a webhook."""
    return AsyncPredictRequest(
        model_input={"messages": [{"role": "user", "content": f"Say hello #{i}"}],
                     "max_tokens": 64},
        priority=i % PRIORITIES, webhook_endpoint=WEBHOOK if i % 2 else None)


def rss_mib() -> float:
    """Peak RSS of this process so far (ru_maxrss is in KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def percentiles_us(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6, 1)

    return {"p50_us": pick(0.50), "p99_us": pick(0.99), "max_us": round(ordered[-1] * 1e6, 1),
            "mean_us": round(statistics.fmean(ordered) * 1e6, 1)}


def timed(call: Callable[[], Any], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def disk_bytes(db: Path) -> dict[str, int]:
    files = {suffix or "db": db.parent / (db.name + suffix) for suffix in ("", "-wal", "-shm")}
    sizes = {name: path.stat().st_size for name, path in files.items() if path.exists()}
    sizes["total"] = sum(sizes.values())
    return sizes


def enqueue_many(queue: AsyncQueue, pool: list[AsyncPredictRequest], n: int) -> float:
    """Seconds to enqueue n requests (from the pool, in turn), one transaction each."""
    start = time.perf_counter()
    for i in range(n):
        queue.enqueue(pool[i % len(pool)], ENVIRONMENT)
    return time.perf_counter() - start


def scenario(workdir: Path, mode: Literal["NORMAL", "FULL"],
             pool: list[AsyncPredictRequest]) -> dict[str, Any]:
    """Fill to 50,000, measure at that depth, then drain to 0, in one synchronous mode."""
    db = workdir / f"queue-{mode.lower()}.db"
    queue = AsyncQueue(db, "model-bench", "deployment-bench", synchronous=mode)
    out: dict[str, Any] = {}
    seconds = enqueue_many(queue, pool, QUEUED)
    out["enqueue_50k_s"] = round(seconds, 2)
    out["enqueue_per_s"] = round(QUEUED / seconds)
    out["disk_bytes_50k_queued"] = disk_bytes(db)

    probe = queue.claim_next().request_id
    queue.complete(probe, OUTPUT)
    out["latency_at_50k"] = {
        "get": percentiles_us(timed(lambda: queue.get(probe), LATENCY_SAMPLES)),
        "queue_status": percentiles_us(timed(queue.queue_status, LATENCY_SAMPLES)),
        "next_wakeup": percentiles_us(timed(queue.next_wakeup, LATENCY_SAMPLES)),
    }

    # Drain everything, timing each claim; its latency per depth bucket feeds the plot.
    claims: list[float] = []
    by_depth: list[dict[str, float]] = []
    depth = QUEUED - 1
    start = time.perf_counter()
    while True:
        t = time.perf_counter()
        job = queue.claim_next()
        claims.append(time.perf_counter() - t)
        if len(claims) % DEPTH_BUCKET == 0:  # labelled with the depth the bucket began at
            by_depth.append({"depth": depth + DEPTH_BUCKET - 1,
                             **percentiles_us(claims[-DEPTH_BUCKET:])})
        if job is None:
            break
        queue.complete(job.request_id, OUTPUT)
        depth -= 1
    drain_s = time.perf_counter() - start
    assert depth == 0, depth
    out["latency_at_50k"]["claim_next"] = percentiles_us(claims[:LATENCY_SAMPLES])
    out["drain_50k_s"] = round(drain_s, 2)
    out["drain_per_s"] = round((QUEUED - 1) / drain_s)
    out["claim_latency_by_depth"] = by_depth
    out["disk_bytes_after_drain"] = disk_bytes(db)
    queue.close()
    out["disk_bytes_after_close"] = disk_bytes(db)
    return out


def threaded_drain(workdir: Path, pool: list[AsyncPredictRequest]) -> float:
    """Jobs/s of THREADS threads claiming and completing from one queue."""
    with AsyncQueue(workdir / "threads.db", "m", "d") as queue:
        enqueue_many(queue, pool, THREADED_JOBS)
        done = [0] * THREADS

        def worker(slot: int) -> None:
            while (job := queue.claim_next()) is not None:
                queue.complete(job.request_id, OUTPUT)
                done[slot] += 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        assert sum(done) == THREADED_JOBS, done
        return THREADED_JOBS / elapsed


def run(workdir: Path) -> dict[str, Any]:
    pool = [small_request(i) for i in range(REQUEST_POOL)]
    results: dict[str, Any] = {
        "model_input_bytes_mean": round(
            statistics.fmean(len(json.dumps(r.model_input)) for r in pool)),
        "rss_before_queue_mib": rss_mib(),
        "default_synchronous": DEFAULT_SYNCHRONOUS,
    }
    for mode in MODES:
        results[mode] = scenario(workdir, mode, pool)
    results[f"drain_per_s_{THREADS}_threads_{DEFAULT_SYNCHRONOUS}"] = round(
        threaded_drain(workdir, pool))
    results["peak_rss_mib"] = rss_mib()
    return results


def environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "cpus": os.cpu_count(), "platform": platform.platform(), "queued": QUEUED,
            "threaded_jobs": THREADED_JOBS, "threads": THREADS}


def print_table(results: dict[str, Any]) -> None:
    def lat(mode: str, name: str) -> str:
        point = results[mode]["latency_at_50k"][name]
        return f"{point['p50_us']:.0f} / {point['p99_us']:.0f} us"

    rows = [("", *MODES)]
    rows += [
        ("enqueue rate", *(f"{results[m]['enqueue_per_s']:,} jobs/s" for m in MODES)),
        ("time to enqueue 50,000", *(f"{results[m]['enqueue_50k_s']} s" for m in MODES)),
        ("disk, 50,000 queued (db+wal+shm)",
         *(f"{results[m]['disk_bytes_50k_queued']['total'] / MiB:.1f} MiB" for m in MODES)),
        ("drain rate (claim_next+complete)",
         *(f"{results[m]['drain_per_s']:,} jobs/s" for m in MODES)),
    ]
    for name in ("claim_next", "get", "queue_status", "next_wakeup"):
        rows.append((f"{name} at 50k queued, p50 / p99", *(lat(m, name) for m in MODES)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    key = f"drain_per_s_{THREADS}_threads_{DEFAULT_SYNCHRONOUS}"
    print(f"drain rate, {THREADS} threads on one queue ({DEFAULT_SYNCHRONOUS}): "
          f"{results[key]:,} jobs/s")
    print(f"peak RSS: {results['peak_rss_mib']} MiB "
          f"({results['rss_before_queue_mib']} MiB before the first queue)")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rates, latency) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.38
    for offset, mode in zip((-width / 2, width / 2), MODES, strict=True):
        values = [results[mode]["enqueue_per_s"], results[mode]["drain_per_s"]]
        bars = rates.bar([i + offset for i in range(2)], values, width, label=mode)
        rates.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=8)
    key = f"drain_per_s_{THREADS}_threads_{DEFAULT_SYNCHRONOUS}"
    bars = rates.bar([2], [results[key]], width, color="#64b5cd",
                     label=f"{THREADS} threads, {DEFAULT_SYNCHRONOUS}")
    rates.bar_label(bars, labels=[f"{results[key]:,}"], fontsize=8)
    rates.set_xticks(range(3), ["enqueue", "claim_next + complete", "drain, threads"])
    rates.set_ylabel("jobs / s (one transaction per call)")
    rates.set_title("Store throughput")
    rates.legend()

    for mode, color in zip(MODES, ("#4c72b0", "#dd8452"), strict=True):
        curve = results[mode]["claim_latency_by_depth"]
        depths = [point["depth"] for point in curve]
        latency.plot(depths, [p["p50_us"] for p in curve], marker="o", color=color,
                     label=f"{mode} p50")
        latency.plot(depths, [p["p99_us"] for p in curve], linestyle="--", color=color,
                     label=f"{mode} p99")
    latency.invert_xaxis()
    latency.set_ylim(bottom=0)
    latency.set_xlabel("queued requests (draining)")
    latency.set_ylabel("claim_next latency (µs)")
    latency.set_title("claim_next latency vs queue depth")
    latency.legend(fontsize=8)
    fig.suptitle(f"AsyncQueue on SQLite {sqlite3.sqlite_version} (WAL), "
                 f"{QUEUED:,} queued, {os.cpu_count()} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the scratch databases go (default: a temporary dir)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="queue-bench-", dir=args.workdir))
    started = time.perf_counter()
    try:
        results = run(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "results": results,
              "wall_s": round(time.perf_counter() - started, 1)}
    (args.out / "queue_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.out / "queue_bench.png")
    print_table(results)
    print(f"wall time {report['wall_s']} s; wrote {args.out / 'queue_bench.json'} and "
          f"{args.out / 'queue_bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
