"""A streaming load generator for any OpenAI-compatible chat server.

    .venv/bin/python benchmarks/loadgen.py --base-url http://127.0.0.1:8080/v1 \
        --concurrency 1 16 64 --prompt-tokens 64 --max-tokens 128
    .venv/bin/python benchmarks/loadgen.py \
        --base-url https://model-<id>.api.baseten.co/environments/production/sync/v1 \
        --api-key "$BASETEN_API_KEY" --concurrency 1 8 32

For each concurrency level it keeps that many streams busy (closed loop: a stream starts
its next request as soon as one ends) for a fixed number of requests, after a warm-up that
is not recorded; all streams start at once, or with `--stagger` spread over one request's
duration. Every request is a streaming chat completion with a prompt of exactly
`--prompt-tokens` tokens (as the server counts them, chat template included) and exactly
`--max-tokens` output tokens (`ignore_eos`, a vLLM extension, keeps the model from stopping
early; `stream_options.include_usage` makes the server report what it generated). Recorded
per level: time to first token (TTFT), time per output token after the first (TPOT),
end-to-end latency (p50/p90/p99 each), output tokens/s and requests/s. Writes a JSON file
and a PNG plot (default benchmarks/results/loadgen.*).

Used as a module by surface_bench.py, budget_report.py and peer_bench.py: `Target`,
`Workload`, `PromptFactory`, `run_level` and `summarize` are the pieces.

Exact prompt lengths without the server's tokenizer: byte-level BPE tokenizers (GPT-2,
Llama 3, Qwen, our tiny model) split text into pre-tokens at spaces first, and no token
crosses a pre-token boundary, so a word that is one token after a space is one token
wherever it stands. `PromptFactory.calibrate` asks the server (`usage.prompt_tokens` of
one-token requests) which candidate words are single tokens and how many tokens the chat
template adds, then builds every prompt from a distinct random sequence of such words:
distinct, so that prefix caching cannot make later requests cheaper than the first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
CHAT_PATH = "/chat/completions"
PERCENTILES = (50, 90, 95, 99)
DEFAULT_CONCURRENCY = (1, 16, 64)
DEFAULT_PROMPT_TOKENS = 64
DEFAULT_MAX_TOKENS = 128
# Requests per level: this many per stream, at least MIN_REQUESTS (enough samples for p90
# at concurrency 1 without making a 64-stream level take minutes).
DEFAULT_REQUESTS_PER_STREAM = 4
MIN_REQUESTS = 16
REQUEST_TIMEOUT_S = 1800.0  # a budget sweep may run requests close to Baseten's 1200 s
CONNECT_TIMEOUT_S = 10.0
CALIBRATION_CONCURRENCY = 8
# Common English words: most are one token in any byte-level BPE vocabulary of a few
# thousand entries or more. Calibration keeps the ones that are.
CANDIDATE_WORDS = (
    "the of and to in is that it was for on are as with his they at be this from have "
    "or by one had not but what all were when we there can an your which their said if "
    "do will each about how up out them then she many some so these would other into has "
    "more her two like him see time could no make than first been its who now people my "
    "made over did down only way find use may water long little very after words called "
    "just where most know get through back much go good new write our me man too any day "
    "same right look think also around another came come work three word must because does "
    "part even place well such here take why things help put years different away again "
    "off went old number great tell men say small every found still between name should "
    "home big give air line set own under read last never us left end along while might "
    "next sound below saw something thought both few those always looked show large often "
    "together asked house world going want school important until form food keep children "
    "feet land side without boy once animals life enough took sometimes four head above "
    "kind began almost live page got earth need far hand high year mother light parts "
    "country father let night following picture being study second eyes soon times story "
    "boys since white days ever paper hard near sentence better best across during today "
    "others however sure means knew try told young miles sun ways thing whole hear example "
    "heard several change answer room sea against top turned learn point city play toward "
    "five using himself usually").split()
FIRST_WORD = "Story"  # the content's first word has no space before it: a fixed one
MIN_SINGLE_TOKEN_WORDS = 8


# -- what to send, and to whom --------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """An OpenAI-compatible base URL (ending in /v1, or Baseten's .../sync/v1)."""

    name: str
    base_url: str
    api_key: str | None = None
    model: str | None = None  # None: the first model the server lists

    def headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self.api_key:
            # Bearer is what the OpenAI SDK sends; vLLM, Baseten and the local runner take it.
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    def public(self) -> dict[str, Any]:
        """What goes into a results file: never the key."""
        return {"name": self.name, "base_url": self.base_url, "model": self.model,
                "api_key": "set" if self.api_key else None}


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int | None = DEFAULT_PROMPT_TOKENS  # None: a short fixed sentence
    max_tokens: int = DEFAULT_MAX_TOKENS
    ignore_eos: bool = True
    temperature: float = 0.0


async def resolve_model(client: httpx.AsyncClient, target: Target) -> Target:
    """The target with its model name filled in from GET {base}/models when not given."""
    if target.model:
        return target
    response = await client.get(f"{target.base_url}/models", headers=target.headers())
    response.raise_for_status()
    models = response.json()["data"]
    if not models:
        raise RuntimeError(f"{target.base_url}/models lists no model")
    return Target(target.name, target.base_url, target.api_key, models[0]["id"])


class PromptFactory:
    """Distinct prompts of an exact token count (see the module docstring for why it works).

    Without calibration, or when the tokenizer has too few single-token words, prompts are
    built at the measured average tokens per word and their lengths are only approximate;
    the results record the lengths the server reported either way.
    """

    def __init__(self, words: Sequence[str], template_tokens: int, tokens_per_word: float,
                 exact: bool, seed: int = 0) -> None:
        self.words = list(words)
        self.template_tokens = template_tokens
        self.tokens_per_word = tokens_per_word
        self.exact = exact
        self._rng = random.Random(seed)

    def messages(self, prompt_tokens: int | None, index: int) -> list[dict[str, str]]:
        if prompt_tokens is None:
            return [{"role": "user", "content": f"Tell me a story about request {index}."}]
        room = prompt_tokens - self.template_tokens
        if room < 0:
            raise ValueError(f"{prompt_tokens} prompt tokens is less than the chat template's "
                             f"own {self.template_tokens}")
        count = room if self.exact else max(round(room / self.tokens_per_word), 0)
        body = " ".join(self._rng.choice(self.words) for _ in range(count))
        return [{"role": "user", "content": f"{FIRST_WORD} {body}" if body else FIRST_WORD}]

    def body(self, model: str, workload: Workload, index: int, stream: bool = True
             ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model, "messages": self.messages(workload.prompt_tokens, index),
            "max_tokens": workload.max_tokens, "temperature": workload.temperature,
            "stream": stream}
        if workload.ignore_eos:
            body["ignore_eos"] = True
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    @classmethod
    def short_sentences(cls) -> PromptFactory:
        """For workloads with `prompt_tokens=None`: no calibration needed."""
        return cls(CANDIDATE_WORDS, 0, 1.0, exact=False)

    @classmethod
    async def calibrate(cls, client: httpx.AsyncClient, target: Target, seed: int = 0
                        ) -> PromptFactory:
        """Ask the server which words are one token and what the template costs."""
        semaphore = asyncio.Semaphore(CALIBRATION_CONCURRENCY)

        async def count(content: str) -> int:
            async with semaphore:
                return await prompt_token_count(client, target, content)

        base = await count(FIRST_WORD)
        # Four repetitions per word: a word of 1 token adds exactly 4.
        added = await asyncio.gather(*(count(f"{FIRST_WORD}" + f" {w}" * 4)
                                       for w in CANDIDATE_WORDS))
        single = [w for w, n in zip(CANDIDATE_WORDS, added, strict=True) if n - base == 4]
        if len(single) >= MIN_SINGLE_TOKEN_WORDS:
            factory = cls(single, base, 1.0, exact=True, seed=seed)
            # Prove it on one long random prompt before trusting it.
            probe_tokens = base + 100
            probe = factory.messages(probe_tokens, 0)[0]["content"]
            if await count(probe) == probe_tokens:
                factory._rng = random.Random(seed)
                return factory
        per_word = sum(n - base for n in added) / (4 * len(added))
        return cls(CANDIDATE_WORDS, base, per_word, exact=False, seed=seed)


async def prompt_token_count(client: httpx.AsyncClient, target: Target, content: str) -> int:
    """`usage.prompt_tokens` of a one-token, non-streaming request with this user message."""
    body = {"model": target.model, "messages": [{"role": "user", "content": content}],
            "max_tokens": 1, "temperature": 0}
    response = await client.post(f"{target.base_url}{CHAT_PATH}", json=body,
                                 headers=target.headers())
    response.raise_for_status()
    return int(response.json()["usage"]["prompt_tokens"])


# -- one streaming request ------------------------------------------------------------------
@dataclass
class RequestResult:
    ok: bool
    started: float = 0.0  # perf_counter when the request was sent
    ttft_s: float | None = None
    e2e_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    chunks: int = 0  # SSE events with content (several tokens each if the server batches)
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (what decoding speed a user sees)."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


async def stream_chat(client: httpx.AsyncClient, url: str, headers: dict[str, str],
                      payload: bytes) -> RequestResult:
    """One streaming chat completion; parses only what it measures, to keep the client's
    CPU (which shares the machine with the server) small."""
    started = time.perf_counter()
    result = RequestResult(False, started)
    try:
        async with client.stream("POST", url, content=payload, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread())[:300].decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if '"content":' in line:
                    choices = json.loads(line[6:]).get("choices") or []
                    if choices and (choices[0].get("delta") or {}).get("content"):
                        result.chunks += 1
                        if result.ttft_s is None:
                            result.ttft_s = time.perf_counter() - started
                if '"completion_tokens"' in line:
                    usage = json.loads(line[6:]).get("usage") or {}
                    result.output_tokens = usage.get("completion_tokens") or 0
                    result.prompt_tokens = usage.get("prompt_tokens") or 0
                if line.startswith('data: {"error"') or '"object":"error"' in line:
                    result.error = line[6:306]
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.e2e_s = time.perf_counter() - started
    if result.error is None and result.output_tokens == 0:
        result.error = "stream ended without a usage chunk"
    result.ok = result.error is None
    return result


# -- statistics -----------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in 0..100 (numpy's default method); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {f"p{q}": percentile(values, q) for q in PERCENTILES}
    out["mean"] = statistics.fmean(values) if values else None
    return out


def summarize(results: Sequence[RequestResult], wall_s: float) -> dict[str, Any]:
    """Per-level figures. Throughput counts successful requests only, over the wall time from
    the first request sent to the last one finished."""
    good = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    output_tokens = sum(r.output_tokens for r in good)
    return {
        "requests": len(results), "ok": len(good), "errors": len(errors),
        "first_error": errors[0] if errors else None, "wall_s": wall_s,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall_s if wall_s > 0 else None,
        "requests_per_s": len(good) / wall_s if wall_s > 0 else None,
        "ttft_s": distribution([r.ttft_s for r in good if r.ttft_s is not None]),
        "tpot_s": distribution([t for r in good if (t := r.tpot_s) is not None]),
        "e2e_s": distribution([r.e2e_s for r in good]),
        "prompt_tokens": _span([r.prompt_tokens for r in good]),
        "output_tokens_per_request": _span([r.output_tokens for r in good]),
        "chunks_per_request": _span([r.chunks for r in good]),
    }


def _span(values: Sequence[int]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "max": None, "mean": None}
    return {"min": min(values), "max": max(values), "mean": statistics.fmean(values)}


def rounded(value: Any, digits: int = 5) -> Any:
    """Floats rounded for a readable JSON file, recursively."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


# -- a level: N streams busy for M requests ---------------------------------------------------
def requests_for(concurrency: int, per_stream: int = DEFAULT_REQUESTS_PER_STREAM,
                 minimum: int = MIN_REQUESTS) -> int:
    return max(minimum, per_stream * concurrency)


def make_client(max_concurrency: int, timeout_s: float = REQUEST_TIMEOUT_S) -> httpx.AsyncClient:
    """One client (one connection pool) per benchmark: connections are reused across levels."""
    limits = httpx.Limits(max_connections=max_concurrency + 8,
                          max_keepalive_connections=max_concurrency + 8)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
                             limits=limits)


async def run_level(client: httpx.AsyncClient, target: Target, prompts: PromptFactory,
                    workload: Workload, concurrency: int, num_requests: int,
                    first_index: int = 0, progress: str | None = None,
                    warmup: bool = True, stagger: bool = False) -> dict[str, Any]:
    """Keep `concurrency` streams busy until `num_requests` requests have run; returns
    `summarize(...)` plus the settings. With `warmup`, one request per stream runs first,
    unrecorded: connections open and the engine reaches this batch size.

    All streams start at once by default, and since every request is as long as the
    others they stay in step: each wave of `concurrency` requests reaches the server
    together, and the time to first token depends on where in the engine's steps the wave
    lands (it swings several-fold between identical runs). With `stagger`, stream k starts
    k/concurrency of a request's duration (the warm-up's median) late, so arrivals spread
    evenly, as independent users' do, and TTFT measures the server rather than the phase."""
    assert target.model, "resolve_model() first"
    url = f"{target.base_url}{CHAT_PATH}"
    headers = target.headers()
    index = first_index
    stagger_s = 0.0
    if warmup or stagger:
        bodies = [prompts.body(target.model, workload, index + i) for i in range(concurrency)]
        index += concurrency
        warm = await asyncio.gather(*(stream_chat(client, url, headers,
                                                  json.dumps(b).encode()) for b in bodies))
        if stagger:
            stagger_s = statistics.median(r.e2e_s for r in warm) / concurrency
    # Bodies are built before the clock starts: the random prompt text costs client CPU.
    payloads = [json.dumps(prompts.body(target.model, workload, index + i)).encode()
                for i in range(num_requests)]
    results: list[RequestResult] = []
    bar = _progress_bar(num_requests, progress)
    next_request = 0

    first_starts: list[float] = []

    async def stream_worker(k: int) -> None:
        nonlocal next_request
        await asyncio.sleep(k * stagger_s)
        first_starts.append(time.perf_counter() - started)
        while next_request < num_requests:
            i = next_request
            next_request += 1
            results.append(await stream_chat(client, url, headers, payloads[i]))
            if bar is not None:
                bar.update(1)

    started = time.perf_counter()
    await asyncio.gather(*(stream_worker(k) for k in range(concurrency)))
    wall = time.perf_counter() - started
    if bar is not None:
        bar.close()
    summary = summarize(results, wall)
    summary.update(concurrency=concurrency, prompt_tokens_target=workload.prompt_tokens,
                   max_tokens=workload.max_tokens, stagger_s=round(stagger_s, 5),
                   last_stream_started_s=round(max(first_starts), 5))
    return summary


def _progress_bar(total: int, description: str | None) -> Any:
    if description is None:
        return None
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in a log file (where it only adds noise).
    return tqdm(total=total, desc=description, unit="req", leave=False, file=sys.stderr,
                dynamic_ncols=True, disable=None)


@dataclass
class SweepConfig:
    concurrency: list[int] = field(default_factory=lambda: list(DEFAULT_CONCURRENCY))
    workload: Workload = field(default_factory=Workload)
    requests_per_stream: int = DEFAULT_REQUESTS_PER_STREAM
    min_requests: int = MIN_REQUESTS
    progress: bool = True
    stagger: bool = False  # see run_level


async def sweep(target: Target, config: SweepConfig, seed: int = 0) -> dict[str, Any]:
    """Every concurrency level of `config` against one target: the JSON-ready report."""
    async with make_client(max(config.concurrency)) as client:
        target = await resolve_model(client, target)
        prompts = await PromptFactory.calibrate(client, target, seed)
        levels = []
        index = 0
        for concurrency in config.concurrency:
            n = requests_for(concurrency, config.requests_per_stream, config.min_requests)
            label = f"{target.name} c={concurrency}" if config.progress else None
            level = await run_level(client, target, prompts, config.workload, concurrency,
                                    n, index, label, stagger=config.stagger)
            index += n + concurrency
            levels.append(level)
            print(level_line(target.name, level), flush=True)
    return {"target": target.public(), "workload": asdict(config.workload),
            "prompts": prompt_info(prompts), "levels": levels}


def prompt_info(prompts: PromptFactory) -> dict[str, Any]:
    return {"exact_lengths": prompts.exact, "single_token_words": len(prompts.words),
            "template_tokens": prompts.template_tokens,
            "tokens_per_word": prompts.tokens_per_word}


def level_line(name: str, level: dict[str, Any]) -> str:
    def ms(d: dict[str, Any], key: str) -> str:
        return "-" if d[key] is None else f"{d[key] * 1e3:.1f}"

    return (f"{name:>10} c={level['concurrency']:<3} {level['output_tokens_per_s'] or 0:8.1f} "
            f"tok/s {level['requests_per_s'] or 0:6.2f} req/s  TTFT p50/p99 "
            f"{ms(level['ttft_s'], 'p50')}/{ms(level['ttft_s'], 'p99')} ms  TPOT p50 "
            f"{ms(level['tpot_s'], 'p50')} ms  e2e p50 {ms(level['e2e_s'], 'p50')} ms  "
            f"errors {level['errors']}")


# -- the report -----------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "httpx": installed("httpx"),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that made a results file, with any API key masked."""
    argv = list(sys.argv if argv is None else argv)
    for i, arg in enumerate(argv):
        if arg.startswith("--api-key="):
            argv[i] = "--api-key=***"
        elif arg == "--api-key" and i + 1 < len(argv):
            argv[i + 1] = "***"
    return " ".join([".venv/bin/python", *argv])


def plot_sweeps(sweeps: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """One line per target: throughput, TTFT, TPOT and end-to-end latency vs concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    panels = [("output_tokens_per_s", None, "output tokens/s"),
              ("requests_per_s", None, "requests/s"),
              ("ttft_s", 1e3, "time to first token (ms)"),
              ("tpot_s", 1e3, "time per output token (ms)"),
              ("e2e_s", 1.0, "end-to-end latency (s)")]
    for ax, (key, scale, label) in zip(axes.flat, panels, strict=False):
        for name, levels in sweeps.items():
            xs = [lv["concurrency"] for lv in levels]
            if scale is None:
                ax.plot(xs, [lv[key] or 0 for lv in levels], marker="o", label=name)
                continue
            line = ax.plot(xs, [(lv[key]["p50"] or 0) * scale for lv in levels], marker="o",
                           label=f"{name} p50")[0]
            ax.plot(xs, [(lv[key]["p99"] or 0) * scale for lv in levels], marker="^",
                    linestyle="--", color=line.get_color(), alpha=0.6, label=f"{name} p99")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes.flat[-1].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_target_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--base-url", required=required,
                        help="OpenAI base URL, e.g. http://127.0.0.1:8080/v1 or "
                             "https://model-<id>.api.baseten.co/environments/production/sync/v1")
    parser.add_argument("--api-key", default=os.environ.get("BASETEN_API_KEY")
                        or os.environ.get("OPENAI_API_KEY"),
                        help="sent as 'Authorization: Bearer <key>' (default: $BASETEN_API_KEY "
                             "or $OPENAI_API_KEY)")
    parser.add_argument("--model", default=None, help="model name (default: the first listed)")
    parser.add_argument("--name", default="server", help="label in the results and plots")


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(DEFAULT_CONCURRENCY))
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS)
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--requests-per-stream", type=int, default=DEFAULT_REQUESTS_PER_STREAM)
    parser.add_argument("--min-requests", type=int, default=MIN_REQUESTS)
    parser.add_argument("--no-ignore-eos", action="store_true",
                        help="for servers that reject vLLM's ignore_eos (lengths then vary)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--stagger", action="store_true",
                        help="start stream k k/N of a request's duration late, so requests "
                             "arrive spread out instead of in waves (see run_level)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_target_arguments(parser)
    add_workload_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "loadgen.json",
                        help="JSON path; the plot goes beside it as .png")
    args = parser.parse_args(argv)
    target = Target(args.name, args.base_url.rstrip("/"), args.api_key, args.model)
    config = SweepConfig(args.concurrency,
                         Workload(args.prompt_tokens, args.max_tokens, not args.no_ignore_eos),
                         args.requests_per_stream, args.min_requests, not args.no_progress,
                         args.stagger)
    report = {"command": command_line(), "environment": environment()}
    report.update(asyncio.run(sweep(target, config)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rounded(report), indent=2) + "\n")
    png = args.out.with_suffix(".png")
    plot_sweeps({target.name: report["levels"]}, png,
                f"{target.name}: prompt {args.prompt_tokens} tokens, "
                f"{args.max_tokens} output tokens")
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
