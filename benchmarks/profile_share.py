"""Where a serving process spends its time, from a py-spy raw (collapsed stacks) file.

    .venv/bin/py-spy record -p PID -d 20 -f raw -o profile.txt     # while a load runs
    .venv/bin/python benchmarks/profile_share.py profile.txt [--top 25]

Prints, for the groups below and for the busiest source files, the share of samples whose
stack passes through them (inclusive: a frame counts once per sample however deep), plus
the self share of the busiest functions. Groups answer "our code, vLLM's serving classes,
the HTTP stack, the event loop": the question issue 9 asks of the profile.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

# Inclusive groups, matched against "function (path:line)" frames; first match per group.
GROUPS: dict[str, str] = {
    "our runner surface (runner/)": r"truss_llm/runner/",
    "our OpenAI surface (openai_surface.py)": r"truss_llm/openai_surface\.py",
    "truss server (truss_server.py, model_wrapper.py)": r"/(truss_server|model_wrapper)\.py",
    "vLLM chat serving (chat_completion/serving.py)": r"chat_completion/serving\.py",
    "vLLM AsyncLLM (async_llm.py)": r"v1/engine/async_llm\.py",
    "vLLM output processor": r"output_processor\.py",
    "tokenizer / detokenizer": r"detokenizer|tokenizers?/|tokenization",
    "pydantic model_dump_json": r"model_dump_json",
    "starlette / fastapi": r"/(starlette|fastapi)/",
    "uvicorn h11 protocol": r"uvicorn/protocols/http/h11_impl\.py",
    "uvicorn httptools protocol": r"uvicorn/protocols/http/httptools_impl\.py",
    "asyncio event loop (selector, transports)": r"asyncio/(base_events|selector_events)\.py",
    "socket write (transport.write)": r"^write \(.*asyncio/selector_events\.py",
}
# Exclusive layers, by the source file of the sample's innermost frame (first match wins):
# they add up to 100% and say which layer's own code the thread was running.
LAYERS: dict[str, str] = {
    "ours (truss_llm)": r"truss_llm/",
    "truss server": r"/truss_server\.py|/model_wrapper\.py|_truss_shared|templates/server",
    "vLLM": r"vllm/",
    "tokenizers / transformers": r"tokenizers|transformers/",
    "pydantic": r"pydantic",
    "web framework (starlette, fastapi, anyio)": r"starlette/|fastapi/|anyio/",
    "HTTP server (uvicorn, h11, httptools)": r"uvicorn/|h11/|httptools",
    "event loop and sockets (asyncio, selectors, uvloop)": r"asyncio/|selectors\.py|uvloop",
    "metrics (prometheus_client)": r"prometheus",
    "ZeroMQ / msgpack (engine IPC)": r"zmq/|msgspec|msgpack",
}
FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>[^:()]+)(?::(?P<line>\d+))?\)$")


def parse(path: Path) -> list[tuple[list[str], int]]:
    """Collapsed stacks: `frame;frame;... count` per line, outermost frame first."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def is_worker_thread(frames: list[str]) -> bool:
    """Stacks of threads other than the main one (thread pools mostly wait for work)."""
    return frames[0].startswith(("Thread._bootstrap (threading.py", "_bootstrap (threading.py"))


def shares(stacks: list[tuple[list[str], int]], top: int, duration_s: float | None = None,
           rate_hz: float | None = None) -> dict:
    """Shares of the main thread's samples (the event loop: what saturates first)."""
    workers = sum(count for frames, count in stacks if is_worker_thread(frames))
    stacks = [(frames, count) for frames, count in stacks if not is_worker_thread(frames)]
    total = sum(count for _, count in stacks) or 1
    groups: Counter[str] = Counter()
    files: Counter[str] = Counter()
    file_self: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    selfs: Counter[str] = Counter()
    layer_patterns = {name: re.compile(pattern) for name, pattern in LAYERS.items()}
    compiled = {name: re.compile(pattern) for name, pattern in GROUPS.items()}
    for frames, count in stacks:
        for name, pattern in compiled.items():
            if any(pattern.search(frame) for frame in frames):
                groups[name] += count
        seen = set()
        for frame in frames:
            match = FRAME.match(frame)
            source = match["path"] if match else frame
            source = _short(source)
            if source not in seen:
                seen.add(source)
                files[source] += count
        leaf = FRAME.match(frames[-1])
        file_self[_short(leaf["path"]) if leaf else frames[-1]] += count
        leaf_path = leaf["path"] if leaf else frames[-1]
        layers[next((name for name, pattern in layer_patterns.items()
                     if pattern.search(leaf_path)), "other (stdlib, ...)")] += count
        selfs[f"{leaf['func']} ({_short(leaf['path'])})" if leaf else frames[-1]] += count

    def pct(counter: Counter[str], n: int | None = None) -> dict[str, float]:
        return {k: round(100 * v / total, 1) for k, v in counter.most_common(n)}

    out = {"main_thread_samples": total, "worker_thread_samples": workers,
           "layers_self_pct": pct(layers), "groups_inclusive_pct": pct(groups),
           "files_inclusive_pct": pct(files, top),
           "files_self_pct": pct(file_self, top), "functions_self_pct": pct(selfs, top)}
    if duration_s and rate_hz:
        # Share of wall time the main thread was on a CPU (or waiting for the GIL).
        out["main_thread_busy_pct"] = round(100 * total / (duration_s * rate_hz), 1)
    return out


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--duration", type=float, default=None, help="py-spy's -d")
    parser.add_argument("--rate", type=float, default=100.0, help="py-spy's -r (default 100)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    result = shares(parse(args.profile), args.top, args.duration, args.rate)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['main_thread_samples']} main-thread samples "
          f"({result['worker_thread_samples']} in worker threads, left out); main thread "
          f"busy {result.get('main_thread_busy_pct', '?')}% of the time")
    for title, key in (("layers (self: whose code ran)", "layers_self_pct"),
                       ("groups (inclusive)", "groups_inclusive_pct"),
                       ("files (inclusive)", "files_inclusive_pct"),
                       ("files (self)", "files_self_pct"),
                       ("functions (self)", "functions_self_pct")):
        print(f"\n== {title} ==")
        for name, share in result[key].items():
            print(f"{share:6.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
