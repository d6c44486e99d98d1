"""How long a big request body stalls the other streams of a replica, before and after.

Starts two `truss-llm serve` servers (the real truss server, the Baseten surface, the vLLM
CPU engine, the tiny model) on 127.0.0.1, both exported with `git archive` from `--after REV`
(default HEAD) and run with PYTHONPATH at their packages/: "after" as it is, "before" with
the body decoded as it first was, by json on the event loop (`BEFORE_PATCHES`;
`--before REV` compares with another commit instead). Rounds alternate between
them (ABBA), so that the drift of a shared machine hits both alike. Per round, route and
server: one chat completion is streamed (temperature 0, ignore_eos, 400 tokens: a chunk
every few milliseconds) and, once it flows, a ~90 MB chat body is posted from another
thread. The body is refused (a 400: too long for the context; a 413: an inline image past
the media cap) only after it has been received, copied and decoded, which is the work that ran on
the event loop every stream shares. The stall is the largest gap between two chunks of the
stream while the big body is in flight; the same stream without a big body gives the
baseline gap.

Routes: the truss server's own `/v1/chat/completions` (passed through by the surface) and
the surface's forwarding path `/environments/production/sync/v1/chat/completions` (body read
under the 100 MB limit, then replayed to the truss app). Bodies: `text` (one ~90 MB user
message: a pasted document) and `image` (a ~90 MB base64 data URL, as a client inlining a
big image sends it).

    .venv/bin/python benchmarks/body_stall.py                 # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/body_stall.py --rounds 2 --bodies text   # quicker
    .venv/bin/python benchmarks/body_stall.py --decode-only 5   # the decode alone, no HTTP

Writes benchmarks/results/body_stall.json after every round (`--decode-only`: the stall of
the event loop while a body is decoded by json inline, by json in a thread, and by this tree, in
one process without HTTP or engine: body_stall_decode_only.json). On a shared 2-core machine the
numbers are noisy: compare medians over rounds, beside the baseline gaps of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import REPO, our_server

RESULTS = REPO / "benchmarks" / "results"
BODY_BYTES = 90 * 1000 * 1000
STREAM_TOKENS = 400
CHUNKS_BEFORE_POST = 20
VARIANTS = ("before", "after")
# "before" is the same tree decoding as it first did: the standard library's json on the
# event loop (the threshold raised past any body, jiter swapped for json), so that the
# comparison is those changes alone; --before REV compares with another commit as it is.
AFTER_REV = "HEAD"
BEFORE_PATCHES = (("THREAD_DECODE_BYTES = 1024 * 1024", "THREAD_DECODE_BYTES = 2**62"),
                  ("body = pydantic_core.from_json(raw)", "body = _decode_with_stdlib(raw)"))
WARMUP_STREAMS = 2
ROUTES = {"truss-v1": "/v1/chat/completions",
          "surface-sync": "/environments/production/sync/v1/chat/completions"}
STREAM_BODY = {"messages": [{"role": "user", "content": "Count to a thousand."}],
               "max_tokens": STREAM_TOKENS, "temperature": 0, "ignore_eos": True,
               "stream": True}


def big_body(kind: str) -> bytes:
    if kind == "text":
        content: Any = "word " * (BODY_BYTES // 5)
    else:
        url = "data:image/png;base64," + "A" * BODY_BYTES
        content = [{"type": "text", "text": "Describe it."},
                   {"type": "image_url", "image_url": {"url": url}}]
    return json.dumps({"messages": [{"role": "user", "content": content}],
                       "max_tokens": 2}).encode()


def stream_gaps(base: str, path: str, body: bytes | None) -> dict[str, Any]:
    """Stream one completion; with `body`, post it once the stream flows. Returns the
    largest gap between chunks (after the first), overall and while the body was posted."""
    arrivals: list[float] = []
    post: dict[str, Any] = {}

    def send_big() -> None:
        post["start"] = time.perf_counter()
        try:
            with httpx.Client(timeout=300) as client:
                response = client.post(base + path, content=body,
                                       headers={"content-type": "application/json"})
            post["status"] = response.status_code
        except httpx.HTTPError as exc:
            post["status"] = repr(exc)
        post["end"] = time.perf_counter()

    sender = threading.Thread(target=send_big, daemon=True)
    with httpx.Client(timeout=300) as client, client.stream(
            "POST", base + path, json=STREAM_BODY) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            arrivals.append(time.perf_counter())
            if body is not None and len(arrivals) == CHUNKS_BEFORE_POST:
                sender.start()
    if body is not None:
        sender.join(300)
    gaps = [(b - a, b) for a, b in itertools.pairwise(arrivals[1:])]
    result: dict[str, Any] = {"chunks": len(arrivals),
                              "max_gap_ms": round(max(g for g, _ in gaps) * 1000, 1),
                              "median_gap_ms": round(statistics.median(
                                  g for g, _ in gaps) * 1000, 2)}
    if body is not None:
        # Gaps that ended while the big body was in flight (or just after: its answer).
        during = [g for g, end in gaps if post["start"] <= end <= post["end"] + 0.05]
        result.update(post_status=post.get("status"),
                      post_s=round(post["end"] - post["start"], 3),
                      stream_outlasted_post=arrivals[-1] > post["end"],
                      max_gap_during_post_ms=round(max(during, default=0) * 1000, 1))
    return result


def export_tree(rev: str, into: Path) -> Path:
    """The truss (config, model, packages, data) as of `rev`, without touching this tree."""
    archive = subprocess.run(["git", "archive", rev, "config.yaml", "model", "packages",
                              "data"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def measure_round(server: Any, variant: str, round_index: int,
                  bodies: dict[str, bytes]) -> list[dict[str, Any]]:
    rows = []
    for route, path in ROUTES.items():
        baseline = stream_gaps(server.url, path, None)
        rows.append({"variant": variant, "round": round_index, "route": route, "body": None,
                     **baseline})
        for kind, body in bodies.items():
            row = stream_gaps(server.url, path, body)
            rows.append({"variant": variant, "round": round_index, "route": route,
                         "body": kind, **row})
            print(f"round {round_index} {variant:6} {route:13} {kind:6} stall "
                  f"{row['max_gap_during_post_ms']:7.1f} ms (baseline max "
                  f"{baseline['max_gap_ms']:.1f} ms) post {row['post_s']:.2f} s "
                  f"-> {row['post_status']}", flush=True)
    return rows


def summarize(rows: list[dict[str, Any]], bodies: list[str]) -> dict[str, Any]:
    summary = {}
    for variant in VARIANTS:
        for route in ROUTES:
            for kind in [None, *bodies]:
                picked = [r for r in rows if (r["variant"], r["route"], r["body"])
                          == (variant, route, kind)]
                if not picked:
                    continue
                key = "max_gap_ms" if kind is None else "max_gap_during_post_ms"
                summary[f"{variant}/{route}/{kind or 'baseline'}"] = {
                    "median_ms": statistics.median(r[key] for r in picked),
                    "max_ms": max(r[key] for r in picked), "rounds": len(picked)}
    return summary


async def _loop_stall(decode: Callable[[], Awaitable[object]]) -> float:
    """The largest gap, in ms, between the ticks of a 1 ms timer while `decode` runs."""
    gaps: list[float] = []
    running = True

    async def tick() -> None:
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.02)
    await decode()
    await asyncio.sleep(0.005)
    running = False
    await ticker
    return round(max(gaps) * 1000, 1)


def decode_only(bodies: dict[str, bytes], repeats: int) -> dict[str, Any]:
    """In one process, no HTTP: the event loop's stall while the model decodes each body
    three ways, alternating: json on the loop (the first version), json in a worker thread
    (the second), and this tree's decoder in a worker thread (read_json_object now)."""
    from truss_llm.errors import RequestError
    from truss_llm.openai_surface import _decode_with_stdlib, decode_json_object

    async def json_inline(raw: bytes) -> None:
        with contextlib.suppress(RequestError):
            _decode_with_stdlib(raw)

    async def json_thread(raw: bytes) -> None:
        with contextlib.suppress(RequestError):
            await asyncio.to_thread(_decode_with_stdlib, raw)

    async def now(raw: bytes) -> None:
        with contextlib.suppress(RequestError):
            await asyncio.to_thread(decode_json_object, raw)

    stalls: dict[str, list[float]] = {}
    for _ in range(repeats):
        for kind, raw in bodies.items():
            for name, way in (("json-inline", json_inline), ("json-thread", json_thread),
                              ("now", now)):
                stalls.setdefault(f"{kind}/{name}", []).append(
                    asyncio.run(_loop_stall(lambda way=way, raw=raw: way(raw))))
    return {key: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v),
                  "runs": v} for key, v in stalls.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--after", default=AFTER_REV, help="the commit to measure")
    parser.add_argument("--before", default=None,
                        help="the commit to compare with (default: --after with the decode "
                             "on the event loop)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--bodies", default="text,image")
    parser.add_argument("--decode-only", type=int, metavar="REPEATS", default=0,
                        help="only the in-process decode stall, the three ways (no "
                             "servers), REPEATS times each")
    args = parser.parse_args()
    bodies = {kind: big_body(kind) for kind in args.bodies.split(",")}
    if args.decode_only:
        stalls = decode_only(bodies, args.decode_only)
        out = RESULTS / "body_stall_decode_only.json"
        out.write_text(json.dumps({"stall_ms": stalls, "load_avg": psutil.getloadavg(),
                                   "body_bytes": {k: len(v) for k, v in bodies.items()}},
                                  indent=1) + "\n")
        print(json.dumps({k: v["median_ms"] for k, v in stalls.items()}, indent=1))
        print(f"wrote {out}")
        return
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="body-stall-"))
    revs = {"before": args.before or args.after, "after": args.after}
    trees = {variant: export_tree(rev, Path(tempfile.mkdtemp(prefix=variant, dir=work)))
             for variant, rev in revs.items()}
    if args.before is None:
        surface = trees["before"] / "packages" / "truss_llm" / "openai_surface.py"
        source = surface.read_text()
        for old, new in BEFORE_PATCHES:
            assert old in source, f"{old!r} moved: update BEFORE_PATCHES"
            source = source.replace(old, new)
        surface.write_text(source)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "revs": {variant: subprocess.run(["git", "rev-parse", rev], cwd=REPO, text=True,
                                         capture_output=True, check=True).stdout.strip()
                 for variant, rev in revs.items()},
        "before_is": f"{args.before} as it is" if args.before else
                     "--after with the body decoded by json on the event loop (as first "
                     "written: THREAD_DECODE_BYTES raised past any body, no jiter)",
        "body_bytes": {k: len(v) for k, v in bodies.items()}, "stream_tokens": STREAM_TOKENS,
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(),
                    "load_avg_at_start": psutil.getloadavg()},
        "note": "shared 2-core machine with other work running: noisy; compare medians "
                "of the same run, beside the baseline gaps",
    }
    out = RESULTS / "body_stall.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    with our_server(work, {"PYTHONPATH": str(trees["before"] / "packages")}, "before") as \
            before, our_server(work, {"PYTHONPATH": str(trees["after"] / "packages")},
                               "after") as after:
        servers = {"before": before, "after": after}
        for server in servers.values():
            for _ in range(WARMUP_STREAMS):  # first requests compile and allocate
                stream_gaps(server.url, ROUTES["truss-v1"], None)
        for round_index in range(args.rounds):
            order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]  # ABBA
            for variant in order:
                rows += measure_round(servers[variant], variant, round_index, bodies)
            result.update(summary=summarize(rows, list(bodies)), rows=rows,
                          rounds_done=round_index + 1,
                          elapsed_s=round(time.perf_counter() - started, 1),
                          load_avg_now=psutil.getloadavg())
            out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
