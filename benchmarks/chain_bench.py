"""The document chain on 1, 4 and 16 MB documents, against sequential calls over the same chunks.

    .venv/bin/python benchmarks/chain_bench.py     # about 25 minutes on 2 busy cores

Every setting of a size runs back to back, in an order rotated from size to size, so that
drift in the machine's load does not favour one of them. One round each: the machine is
shared (its load swung 5x within minutes while this ran) and 1 MB mapped one chunk at a
time took two minutes of it; more rounds did not fit the time. At 16 MB the sequential
loop maps every 8th chunk and is scaled by 8, and the chain at concurrency 1 is left out
(see SEQUENTIAL_SAMPLE_EVERY, SKIPPED). Results are written after each size:

* `sequential`: the chunks the chain's splitter makes, mapped by one loop that awaits one
  chat call after another (the same prompts, the same client code): what a script without
  the chain would do. Only model calls are timed: no fetch, split or reduce.
* `chain c=N`: the whole chain under `chains.run_local()` with map concurrency N: the
  document fetched from a pre-signed URL (moto S3 on 127.0.0.1), split, mapped, reduced.

Speed-up, both in the same run: `map` = sequential / the chain's map time (the same calls,
N at a time), `total` = sequential / the chain's whole run (fetch, split and reduce
included, which the sequential loop does not do). Chunk throughput is chunks / map time.

The model is the tiny one on the real vLLM CPU engine, served by `truss-llm serve`, with a
1,024-token context (16 MB is then ~2,000 chunks; the tests' 512 would make it ~5,000),
answers of 8 tokens; a few untimed calls warm the engine first. Compare ratios, not
absolute numbers.

Writes benchmarks/results/chain_bench.json and chain_bench.png.

    .venv/bin/python benchmarks/chain_bench.py --interleaved --sizes 1 4   # about 23 minutes

The map alone (the mapper's `map_chunks`, no fetch, split or reduce) against the sequential
loop, the settings alternating every 16 chunks in rotated order, so that each sees the same
mix of the machine's load; the ratio of summed times. Writes chain_bench_interleaved.json.
"""

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "chain"), str(REPO / "tests")]

import boto3  # noqa: E402
import matplotlib  # noqa: E402
import truss_chains as chains  # noqa: E402
from botocore.config import Config  # noqa: E402
from conftest import LOOPBACK_MEDIA, free_port, start_server, stop_server  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

matplotlib.use("Agg")
# moto's HTTP server logs every request line at INFO, pre-signed query strings included.
logging.getLogger("werkzeug").setLevel(logging.WARNING)
import matplotlib.pyplot as plt  # noqa: E402

MB = 1_000_000
SIZES_MB = (1, 4, 16)
CONCURRENCIES = (1, 4, 16)
# Long prompts cost a CPU mostly attention, which grows with the square of their length:
# 1,024-token chunks map 16 MB about three times faster than 4,096-token ones here.
CONTEXT_TOKENS = 1024
KV_CACHE_BYTES = 128 * 1024 * 1024  # 16 requests of 1,024 tokens, with room to spare
WARMUP_CALLS = 4
# Rounds per size, each running every setting once in rotated order; medians are reported
# and speed-ups are paired within a round. The machine is shared: its load swings by several
# times within minutes, so one run of each setting is not enough where there is time for more.
ROUNDS = {1: 1, 4: 1, 16: 1}
# At 16 MB (~2,200 chunks) the one-at-a-time runs would take most of an hour on the busy
# machine: the sequential loop maps every 8th chunk and its time is scaled by 8, and the
# chain at concurrency 1 (the same one-at-a-time calls, as 1 and 4 MB show) is left out.
SEQUENTIAL_SAMPLE_EVERY = {16: 8}
SKIPPED = {16: {1}}
INTERLEAVE_SLICE_CHUNKS = 16
STAGES = ("fetch_s", "split_s", "map_s", "reduce_s", "total_s")
MAX_OUTPUT_TOKENS = 8
QUESTION = "Which deployment?"
BUCKET = "chain-bench"
RESULTS = REPO / "benchmarks" / "results"
WORDS = ("streaming assistant function arguments integer boolean temperature fahrenheit "
         "tomorrow download deployment throughput question summarize translate previous "
         "response messages").split()
# The chain reads these when its chainlets are built (see chain/doc_config.py).
CHAIN_ENV = {"TRUSS_LLM_CHAIN_CONTEXT_TOKENS": str(CONTEXT_TOKENS), **LOOPBACK_MEDIA}
ENGINE_ENV = {"TRUSS_LLM_ENGINE_MAX_MODEL_LEN": str(CONTEXT_TOKENS),
              "TRUSS_LLM_ENGINE_KV_CACHE_MEMORY_BYTES": str(KV_CACHE_BYTES)}
# With --interleaved the same chunks are mapped four times within minutes: vLLM's prefix
# cache would hand every setting but the first a free prefill. A real run never repeats a
# prompt, so the cache is off there.
INTERLEAVED_ENGINE_ENV = {**ENGINE_ENV, "TRUSS_LLM_ENGINE_ENABLE_PREFIX_CACHING": "false"}


def make_document(size: int, seed: int) -> bytes:
    """Paragraphs of one to four sentences of words the tiny tokenizer knows whole."""
    rng = random.Random(seed)
    paragraphs, total = [], 0
    while total < size:
        paragraph = " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18)))
                             .capitalize() + "." for _ in range(rng.randint(1, 4)))
        paragraphs.append(paragraph)
        total += len(paragraph) + 2
    return "\n\n".join(paragraphs).encode()[:size]


async def sequential(chunks: list[str], model_base: str, first: int = 0,
                     total: int | None = None) -> float:
    """The same map calls, one after another; seconds."""
    from doc_config import chain_settings
    from doc_llm import ChatEndpoint, LocalModel, chat, new_client
    from doc_prompts import map_messages
    from doc_schemas import CallOptions

    endpoint = ChatEndpoint.from_handle(LocalModel(model_base), chain_settings().model_name)
    call = CallOptions(question=QUESTION, max_output_tokens=MAX_OUTPUT_TOKENS, temperature=0.0,
                       max_attempts=1)
    deadline = time.monotonic() + 3600
    async with new_client(1) as client:
        started = time.monotonic()
        for number, chunk in enumerate(chunks, first + 1):
            await chat(client, endpoint, map_messages(chunk, number, total or len(chunks),
                                                      QUESTION), call, deadline)
        return time.monotonic() - started


async def mapped(chunks: list[str], model_base: str, first: int, total: int,
                 concurrency: int) -> float:
    """The mapper's own step (`map_chunks`) on these chunks; seconds."""
    from doc_config import chain_settings
    from doc_llm import ChatEndpoint, LocalModel, new_client
    from doc_mapreduce import map_chunks
    from doc_schemas import CallOptions, MapRequest

    endpoint = ChatEndpoint.from_handle(LocalModel(model_base), chain_settings().model_name)
    request = MapRequest(chunks=chunks, first_index=first, total_chunks=total,
                         concurrency=concurrency, deadline_unix=time.time() + 3600,
                         call=CallOptions(question=QUESTION, max_output_tokens=MAX_OUTPUT_TOKENS,
                                          temperature=0.0, max_attempts=1))
    async with new_client(concurrency) as client:
        started = time.monotonic()
        result = await map_chunks(client, endpoint, request)
        elapsed = time.monotonic() - started
    assert all(r.text is not None for r in result.results)
    return elapsed


def interleaved(sizes: tuple[int, ...], model_base: str) -> list[dict[str, Any]]:
    """The map alone, sequential and at each concurrency, alternating slice by slice.

    The load on a shared machine swings within minutes; alternating the settings every
    INTERLEAVE_SLICE_CHUNKS chunks (in rotated order) gives each the same mix of it, so the
    ratio of the summed times is paired at that grain rather than over whole runs.
    """
    rows = []
    for size_mb in sizes:
        chunks = split_like_the_chain(make_document(size_mb * MB, seed=size_mb))
        settings: list[Any] = ["sequential", *CONCURRENCIES]
        totals = dict.fromkeys(settings, 0.0)
        for k, first in enumerate(range(0, len(chunks), INTERLEAVE_SLICE_CHUNKS)):
            piece = chunks[first:first + INTERLEAVE_SLICE_CHUNKS]
            shift = k % len(settings)
            for setting in settings[shift:] + settings[:shift]:
                if setting == "sequential":
                    totals[setting] += asyncio.run(sequential(piece, model_base, first,
                                                              len(chunks)))
                else:
                    totals[setting] += asyncio.run(mapped(piece, model_base, first,
                                                          len(chunks), setting))
        row = {"size_mb": size_mb, "chunks": len(chunks),
               "sequential_s": round(totals["sequential"], 3),
               "map_s": {str(c): round(totals[c], 3) for c in CONCURRENCIES},
               "speedup": {str(c): round(totals["sequential"] / totals[c], 2)
                           for c in CONCURRENCIES},
               "chunks_per_s": {str(c): round(len(chunks) / totals[c], 2)
                                for c in CONCURRENCIES}}
        print(row, flush=True)
        rows.append(row)
    return rows


def split_like_the_chain(document: bytes) -> list[str]:
    from doc_config import chain_settings
    from doc_prompts import Budget, TokenCounter
    from doc_split import split_text

    counter = TokenCounter(chain_settings().tokenizer_file)
    budget = Budget(counter, CONTEXT_TOKENS, MAX_OUTPUT_TOKENS, QUESTION)
    return [text for text, _ in split_text(document.decode(), budget.map_tokens, counter)]


def run_chain(url: str, concurrency: int, model_base: str) -> dict[str, Any]:
    import doc_chain
    from doc_llm import LocalModel
    from doc_schemas import ChainOptions, ChainRequest

    request = ChainRequest(document_url=url, question=QUESTION, options=ChainOptions(
        max_output_tokens=MAX_OUTPUT_TOKENS, map_concurrency=concurrency, invocation="async"))
    with chains.run_local():
        model = LocalModel(model_base)
        entry = doc_chain.DocumentQA(mapper=doc_chain.Mapper(model=model),
                                     reducer=doc_chain.Reducer(model=model))
        result = asyncio.run(entry.run_remote(request))
    assert not result.missing_chunks, result.missing_chunks
    return {"chunks": result.chunks, "document_tokens": result.document_tokens,
            "reduce_levels": result.reduce_levels, "model_calls": result.usage.model_calls,
            **{k: round(v, 3) for k, v in result.timings.model_dump().items()}}


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def measure(sizes: tuple[int, ...], model_base: str, s3: Any,
            save: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n, size_mb in enumerate(sizes):
        document = make_document(size_mb * MB, seed=size_mb)
        s3.put_object(Bucket=BUCKET, Key=f"doc-{size_mb}mb.txt", Body=document)
        url = s3.generate_presigned_url("get_object", ExpiresIn=7200, Params={
            "Bucket": BUCKET, "Key": f"doc-{size_mb}mb.txt"})
        chunks = split_like_the_chain(document)
        settings: list[Any] = ["sequential", *CONCURRENCIES]
        sequential_s: list[float] = []
        runs: dict[int, list[dict[str, Any]]] = {
            c: [] for c in CONCURRENCIES if c not in SKIPPED.get(size_mb, ())}
        for round_ in range(ROUNDS.get(size_mb, 1)):
            shift = (n + round_) % len(settings)
            for setting in settings[shift:] + settings[:shift]:
                if setting in SKIPPED.get(size_mb, ()):
                    continue
                if setting == "sequential":
                    every = SEQUENTIAL_SAMPLE_EVERY.get(size_mb, 1)
                    seconds = asyncio.run(sequential(chunks[::every], model_base))
                    sequential_s.append(round(seconds * len(chunks) / len(chunks[::every]), 3))
                    print(f"{size_mb} MB round {round_} sequential: {sequential_s[-1]} s",
                          flush=True)
                    continue
                timing = run_chain(url, setting, model_base)
                assert timing["chunks"] == len(chunks), (timing["chunks"], len(chunks))
                runs[setting].append(timing)
                print(f"{size_mb} MB round {round_} chain c={setting}: {timing}", flush=True)
        row: dict[str, Any] = {"size_mb": size_mb, "bytes": len(document), "chunks": len(chunks),
                               "rounds": len(sequential_s), "sequential_runs_s": sequential_s,
                               "sequential_sampled_every": SEQUENTIAL_SAMPLE_EVERY.get(size_mb, 1),
                               "sequential_s": median(sequential_s),
                               "sequential_chunks_per_s": round(
                                   len(chunks) / median(sequential_s), 2), "chain": {}}
        for concurrency, timings in runs.items():
            summary = {stage: median([t[stage] for t in timings]) for stage in STAGES}
            # Paired within a round (the same minutes of machine load), then the median.
            summary["speedup_map"] = median([seq / t["map_s"] for seq, t in
                                             zip(sequential_s, timings, strict=True)])
            summary["speedup_total"] = median([seq / t["total_s"] for seq, t in
                                               zip(sequential_s, timings, strict=True)])
            summary["chunks_per_s"] = round(len(chunks) / summary["map_s"], 2)
            summary["reduce_levels"] = timings[0]["reduce_levels"]
            summary["model_calls"] = timings[0]["model_calls"]
            summary["runs"] = timings
            row["chain"][str(concurrency)] = summary
        rows.append(row)
        save(rows)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for row in rows:
        xs = [int(c) for c in row["chain"]]
        left.plot(xs, [t["speedup_map"] for t in row["chain"].values()], "o-",
                  label=f"{row['size_mb']} MB, map")
        left.plot(xs, [t["speedup_total"] for t in row["chain"].values()], "s--",
                  label=f"{row['size_mb']} MB, whole run")
    left.axhline(1.0, color="grey", lw=0.8)
    left.set(xscale="log", xticks=list(CONCURRENCIES), xlabel="map concurrency",
             ylabel="speed-up over sequential calls", title="Speed-up (same chunks, same run)")
    left.set_xticklabels([str(c) for c in CONCURRENCIES])
    left.legend(fontsize=8)
    labels, stages = [], {"fetch_s": [], "split_s": [], "map_s": [], "reduce_s": []}
    for row in rows:
        labels.append(f"{row['size_mb']} MB\nseq")
        for stage in stages:
            stages[stage].append(row["sequential_s"] if stage == "map_s" else 0.0)
        for concurrency, timing in row["chain"].items():
            labels.append(f"{row['size_mb']} MB\nc={concurrency}")
            for stage in stages:
                stages[stage].append(timing[stage])
    bottom = [0.0] * len(labels)
    for stage, values in stages.items():
        right.bar(range(len(labels)), values, bottom=bottom, label=stage.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    right.set_xticks(range(len(labels)), labels, fontsize=7)
    right.set(ylabel="seconds", yscale="log", title="Where the time goes")
    right.legend(fontsize=8)
    fig.suptitle(f"Document chain, tiny model on a 2-core CPU, context {CONTEXT_TOKENS}, "
                 f"{MAX_OUTPUT_TOKENS}-token answers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save(rows: list[dict[str, Any]], started: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"command": "python benchmarks/chain_bench.py " + " ".join(sys.argv[1:]),
              "context_tokens": CONTEXT_TOKENS, "max_output_tokens": MAX_OUTPUT_TOKENS,
              "concurrencies": list(CONCURRENCIES), "rounds": ROUNDS,
              "load_average": os.getloadavg(), "elapsed_s": round(time.monotonic() - started, 1),
              "rows": rows}
    (RESULTS / "chain_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, RESULTS / "chain_bench.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES_MB),
                        help="document sizes in MB")
    parser.add_argument("--interleaved", action="store_true",
                        help="the map alone, settings alternating every few chunks "
                        "(chain_bench_interleaved.json)")
    args = parser.parse_args()
    os.environ.update(CHAIN_ENV)
    workdir = Path(tempfile.mkdtemp(prefix="chain-bench-"))
    server = start_server(workdir / "server.log",
                          extra_env=INTERLEAVED_ENGINE_ENV if args.interleaved else ENGINE_ENV)
    moto_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    started = time.monotonic()
    try:
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}",
                          region_name="us-east-1", aws_access_key_id="bench",
                          aws_secret_access_key="bench",
                          config=Config(signature_version="s3v4",
                                        s3={"addressing_style": "path"}))
        s3.create_bucket(Bucket=BUCKET)
        model_base = f"{server.base_url}/environments/production"
        asyncio.run(sequential(["warm-up " * 100] * WARMUP_CALLS, model_base))
        if args.interleaved:
            report = {"command": "python benchmarks/chain_bench.py " + " ".join(sys.argv[1:]),
                      "slice_chunks": INTERLEAVE_SLICE_CHUNKS, "prefix_caching": False,
                      "context_tokens": CONTEXT_TOKENS, "max_output_tokens": MAX_OUTPUT_TOKENS,
                      "rows": interleaved(tuple(args.sizes), model_base),
                      "elapsed_s": round(time.monotonic() - started, 1),
                      "load_average": os.getloadavg()}
            (RESULTS / "chain_bench_interleaved.json").write_text(
                json.dumps(report, indent=2) + "\n")
            return
        rows = measure(tuple(args.sizes), model_base, s3, lambda rows: save(rows, started))
    finally:
        moto.stop()
        stop_server(server)
    for row in rows:
        ratios = ", ".join(f"c={c}: map x{t['speedup_map']} whole x{t['speedup_total']} "
                           f"({t['chunks_per_s']} chunks/s)" for c, t in row["chain"].items())
        print(f"{row['size_mb']:>3} MB, {row['chunks']} chunks, sequential "
              f"{row['sequential_s']} s ({row['sequential_chunks_per_s']} chunks/s): {ratios}")


if __name__ == "__main__":
    main()
