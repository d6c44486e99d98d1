"""What fits in Baseten's 20-minute sync budget on this server, and what belongs in async.

    # the committed run: the tiny model here, budgets compressed 400x (3 s sync, 9 s async)
    .venv/bin/python benchmarks/budget_report.py --start-local --budget-s 3 --async-budget-s 9
    # a GPU deployment on Baseten (real budgets; key from --api-key or $BASETEN_API_KEY)
    .venv/bin/python benchmarks/budget_report.py \
        --base-url https://model-<id>.api.baseten.co/environments/production/sync/v1 \
        --prompt-tokens 1000 8000 --concurrency 1 8 32 --name qwen-7b-h100

Measures, with the harness (loadgen.py), time to first token and time per output token at
each concurrency and prompt length (streaming, a fixed probe length with `ignore_eos`),
then computes the largest `max_tokens` whose request still ends inside the budget minus
the margin:

    end-to-end(max_tokens) = TTFT p99 + TPOT p99 x (max_tokens - 1) <= budget - margin

(p99s: the answer is for nearly every request, not the typical one), capped by the
model's context (`max_model_len` - prompt). The margin follows truss_llm.budget: at most a
quarter of a short budget. Each answer is then checked: a run at that `max_tokens` and
concurrency must end every request (p99) inside the budget less the margin. Prints and
writes a recommendation per concurrency: sync up to N tokens, async above (where the model
side's `truncate` policy would otherwise clamp the answer).

Writes benchmarks/results/budget_report.json, .png (predicted latency against the budget
line, the fitted lengths) and .md (the table and the recommendation).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import loadgen
import servers

SYNC_BUDGET_S = 1200.0  # Baseten's sync predict limit (truss_llm.limits.SYNC_TIMEOUT_S)
ASYNC_BUDGET_S = 3600.0  # one async attempt (truss_llm.limits.ASYNC_RUN_TIMEOUT_S)
DEFAULT_MARGIN_S = 10.0  # truss_llm.budget.BudgetSettings.margin_s
MAX_MARGIN_FRACTION = 0.25  # truss_llm.budget.MAX_MARGIN_FRACTION
DEFAULT_PROMPTS = (64, 256)
DEFAULT_LEVELS = (1, 16, 64)
PROBE_MAX_TOKENS = 128
# The statistic the fit uses: a budget answer has to hold for nearly every request.
FIT_PERCENTILE = "p99"


# -- the arithmetic (unit-tested in tests/test_bench_harness.py) ------------------------------
def effective_margin(budget_s: float, margin_s: float) -> float:
    """The margin truss_llm.budget keeps: `margin_s`, at most a quarter of the budget."""
    return min(margin_s, budget_s * MAX_MARGIN_FRACTION)


def max_tokens_within(budget_s: float, margin_s: float, ttft_s: float, tpot_s: float) -> int:
    """Largest n with ttft + tpot * (n - 1) <= budget - margin; 0 if not even one token."""
    room = budget_s - effective_margin(budget_s, margin_s) - ttft_s
    if room < 0:
        return 0
    if tpot_s <= 0:
        return sys.maxsize
    return math.floor(room / tpot_s + 1e-9) + 1


def predicted_e2e_s(ttft_s: float, tpot_s: float, max_tokens: int) -> float:
    return ttft_s + tpot_s * max(max_tokens - 1, 0)


@dataclass(frozen=True)
class Fit:
    max_tokens: int
    limited_by: str  # "budget" or "context"


def fit(budget_s: float, margin_s: float, ttft_s: float, tpot_s: float,
        context_tokens: int | None, prompt_tokens: int) -> Fit:
    by_budget = max_tokens_within(budget_s, margin_s, ttft_s, tpot_s)
    if context_tokens is not None and context_tokens - prompt_tokens <= by_budget:
        return Fit(max(context_tokens - prompt_tokens, 0), "context")
    return Fit(by_budget, "budget")


# -- measuring --------------------------------------------------------------------------------
async def context_length(client: httpx.AsyncClient, target: loadgen.Target) -> int | None:
    """`max_model_len` from GET {base}/models (vLLM and our stack report it)."""
    response = await client.get(f"{target.base_url}/models", headers=target.headers())
    for card in response.json().get("data", []):
        if card.get("id") == target.model:
            return card.get("max_model_len")
    return None


async def measure(target: loadgen.Target, levels: list[int], prompts_tokens: list[int],
                  probe_tokens: int, per_stream: int, budgets: dict[str, float],
                  margin_s: float, context_override: int | None, verify: bool
                  ) -> dict[str, Any]:
    cells: list[dict[str, Any]] = []
    async with loadgen.make_client(max(levels)) as client:
        target = await loadgen.resolve_model(client, target)
        context = context_override or await context_length(client, target)
        prompts = await loadgen.PromptFactory.calibrate(client, target)
        index = 0
        for prompt_tokens in prompts_tokens:
            for level in levels:
                workload = loadgen.Workload(prompt_tokens, probe_tokens)
                n = loadgen.requests_for(level, per_stream)
                probe = await loadgen.run_level(client, target, prompts, workload, level, n,
                                                index, f"probe p={prompt_tokens} c={level}")
                index += n + level
                print(loadgen.level_line(target.name, probe), flush=True)
                ttft = probe["ttft_s"][FIT_PERCENTILE]
                tpot = probe["tpot_s"][FIT_PERCENTILE]
                cell: dict[str, Any] = {"concurrency": level, "prompt_tokens": prompt_tokens,
                                        "probe": probe, "ttft_fit_s": ttft, "tpot_fit_s": tpot,
                                        "fits": {}}
                for kind, budget in budgets.items():
                    if ttft is None or tpot is None:
                        continue
                    found = fit(budget, margin_s, ttft, tpot, context, prompt_tokens)
                    cell["fits"][kind] = {
                        "budget_s": budget, "margin_s": effective_margin(budget, margin_s),
                        "max_tokens": found.max_tokens, "limited_by": found.limited_by,
                        "predicted_e2e_s": predicted_e2e_s(ttft, tpot, found.max_tokens)}
                sync_fit = cell["fits"].get("sync")
                if verify and sync_fit and sync_fit["max_tokens"] > 0:
                    cell["verify"] = await verify_fit(client, target, prompts, prompt_tokens,
                                                      level, sync_fit, n, index)
                    index += n + level
                cells.append(cell)
    return {"target": target.public(), "context_tokens": context,
            "prompts": loadgen.prompt_info(prompts), "cells": cells}


async def verify_fit(client: httpx.AsyncClient, target: loadgen.Target,
                     prompts: loadgen.PromptFactory, prompt_tokens: int, level: int,
                     sync_fit: dict[str, Any], n: int, index: int) -> dict[str, Any]:
    """Run the fitted length at this concurrency: does every request end in time?"""
    workload = loadgen.Workload(prompt_tokens, sync_fit["max_tokens"])
    run = await loadgen.run_level(client, target, prompts, workload, level, n, index,
                                  f"verify p={prompt_tokens} c={level} "
                                  f"n={sync_fit['max_tokens']}")
    limit = sync_fit["budget_s"] - sync_fit["margin_s"]
    p99 = run["e2e_s"]["p99"]
    ok = run["errors"] == 0 and p99 is not None and p99 <= limit
    print(f"  verify c={level} prompt={prompt_tokens} max_tokens={sync_fit['max_tokens']}: "
          f"e2e p99 {p99:.3f} s vs {limit:.3f} s -> {'inside' if ok else 'OVER'}", flush=True)
    return {"max_tokens": sync_fit["max_tokens"], "e2e_p50_s": run["e2e_s"]["p50"],
            "e2e_p99_s": p99, "e2e_max_limit_s": limit, "inside": ok,
            "errors": run["errors"], "output_tokens_per_s": run["output_tokens_per_s"]}


# -- the report -------------------------------------------------------------------------------
def recommendation(report: dict[str, Any]) -> list[str]:
    lines = []
    sync_budget = report["budgets"]["sync"]
    for cell in report["cells"]:
        fits = cell["fits"]
        if "sync" not in fits:
            continue
        s = fits["sync"]
        limit = s["budget_s"] - s["margin_s"]
        if s["limited_by"] == "context":
            advice = (f"every length the context allows (max_tokens <= {s['max_tokens']}) "
                      f"ends inside the {sync_budget:g} s sync budget: sync is fine")
        elif s["max_tokens"] == 0:
            advice = "not even one token fits: use async_predict"
        else:
            advice = (f"sync up to max_tokens {s['max_tokens']} (predicted p99 "
                      f"{s['predicted_e2e_s']:.2f} s <= {limit:.2f} s); above that use "
                      "async_predict")
            a = fits.get("async")
            if a:
                more = ("any length the context allows" if a["limited_by"] == "context"
                        else f"up to {a['max_tokens']}")
                advice += f" ({more} within one {a['budget_s']:g} s async attempt)"
        check = cell.get("verify")
        if check:
            advice += (f"; checked: p99 {check['e2e_p99_s']:.2f} s "
                       f"{'inside' if check['inside'] else 'OVER'}")
        lines.append(f"- concurrency {cell['concurrency']}, prompt {cell['prompt_tokens']} "
                     f"tokens: {advice}.")
    return lines


def markdown(report: dict[str, Any]) -> str:
    b = report["budgets"]
    rows = ["| concurrency | prompt tokens | TTFT p99 s | TPOT p99 ms | sync: max_tokens "
            "(limited by) | async: max_tokens | check at sync max_tokens: e2e p99 s |",
            "|---|---|---|---|---|---|---|"]
    for cell in report["cells"]:
        s, a = cell["fits"].get("sync"), cell["fits"].get("async")
        check = cell.get("verify")
        rows.append(
            f"| {cell['concurrency']} | {cell['prompt_tokens']} | {cell['ttft_fit_s']:.3f} | "
            f"{cell['tpot_fit_s'] * 1e3:.2f} | {s['max_tokens']} ({s['limited_by']}) | "
            f"{a['max_tokens']} ({a['limited_by']}) | "
            + (f"{check['e2e_p99_s']:.3f} {'inside' if check['inside'] else 'OVER'} "
               f"{check['e2e_max_limit_s']:.3f}" if check else "-") + " |")
    return (f"# Budget report: {report['target']['name']}\n\n`{report['command']}`\n\n"
            f"Sync budget {b['sync']:g} s, async attempt {b['async']:g} s, margin "
            f"{effective_margin(b['sync'], report['margin_s']):g} s (--margin-s "
            f"{report['margin_s']:g}, at most {MAX_MARGIN_FRACTION:.0%} of a budget); "
            f"context {report['context_tokens']} tokens; fit on {FIT_PERCENTILE} TTFT and "
            f"TPOT measured at {report['probe_max_tokens']} output tokens.\n\n"
            + "\n".join(rows) + "\n\n## Recommendation\n\n"
            + "\n".join(recommendation(report)) + "\n")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (line_ax, bar_ax) = plt.subplots(1, 2, figsize=(16, 6.5))
    sync = report["budgets"]["sync"]
    margin = effective_margin(sync, report["margin_s"])
    context = report["context_tokens"]
    longest = max([c["fits"]["sync"]["max_tokens"] for c in report["cells"]
                   if "sync" in c["fits"]] + [context or 0, report["probe_max_tokens"]])
    xs = list(range(1, int(longest * 1.3) + 2, max(1, int(longest * 1.3) // 200)))
    for k, cell in enumerate(report["cells"]):
        if "sync" not in cell["fits"]:
            continue
        color = f"C{k % 10}"
        label = f"c={cell['concurrency']}, prompt {cell['prompt_tokens']}"
        line_ax.plot(xs, [predicted_e2e_s(cell["ttft_fit_s"], cell["tpot_fit_s"], x)
                          for x in xs], color=color, label=label)
        f = cell["fits"]["sync"]
        line_ax.scatter([f["max_tokens"]], [f["predicted_e2e_s"]], color=color, zorder=3)
        if cell.get("verify"):
            v = cell["verify"]
            line_ax.scatter([v["max_tokens"]], [v["e2e_p99_s"]], color=color, marker="x",
                            s=70, zorder=4)
    line_ax.axhline(sync, color="red", label=f"sync budget {sync:g} s")
    line_ax.axhline(sync - margin, color="red", linestyle="--",
                    label=f"budget - margin ({sync - margin:g} s)")
    if context:
        line_ax.axvline(context, color="grey", linestyle=":", label=f"context {context}")
    line_ax.set_ylim(0, sync * 1.6)
    line_ax.set_xlabel("max_tokens")
    line_ax.set_ylabel(f"predicted end-to-end latency, {FIT_PERCENTILE} (s)")
    line_ax.set_title("Predicted latency vs the sync budget (dot: largest that fits; "
                      "x: measured p99 there)", fontsize=10)
    line_ax.legend(fontsize=7)

    prompts = sorted({c["prompt_tokens"] for c in report["cells"]})
    levels = sorted({c["concurrency"] for c in report["cells"]})
    width = 0.8 / len(prompts)
    for k, prompt in enumerate(prompts):
        values = []
        for level in levels:
            cell = next(c for c in report["cells"] if c["concurrency"] == level
                        and c["prompt_tokens"] == prompt)
            values.append(cell["fits"]["sync"]["max_tokens"] if "sync" in cell["fits"] else 0)
        bars = bar_ax.bar([x + (k - (len(prompts) - 1) / 2) * width
                           for x in range(len(levels))], values, width,
                          label=f"prompt {prompt} tokens")
        bar_ax.bar_label(bars, fontsize=8)
    bar_ax.set_xticks(range(len(levels)), [str(level) for level in levels])
    bar_ax.set_xlabel("concurrent streams")
    bar_ax.set_ylabel("largest max_tokens inside the sync budget")
    bar_ax.set_title("Sync below the bar, async above", fontsize=10)
    bar_ax.legend(fontsize=8)
    fig.suptitle(f"{report['target']['name']}: sync budget {sync:g} s, margin {margin:g} s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    loadgen.add_target_arguments(parser, required=False)  # or --start-local
    parser.add_argument("--start-local", action="store_true",
                        help="start `truss-llm serve` (the tiny model here) and report on it")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(DEFAULT_LEVELS))
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=list(DEFAULT_PROMPTS))
    parser.add_argument("--probe-max-tokens", type=int, default=PROBE_MAX_TOKENS)
    parser.add_argument("--requests-per-stream", type=int,
                        default=loadgen.DEFAULT_REQUESTS_PER_STREAM)
    parser.add_argument("--budget-s", type=float, default=SYNC_BUDGET_S,
                        help="sync budget (default Baseten's 1200 s; compress it for a quick "
                             "run on a small model)")
    parser.add_argument("--async-budget-s", type=float, default=ASYNC_BUDGET_S)
    parser.add_argument("--margin-s", type=float, default=DEFAULT_MARGIN_S)
    parser.add_argument("--context-tokens", type=int, default=None,
                        help="the model's context (default: max_model_len from /models)")
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--out", type=Path, default=loadgen.RESULTS_DIR / "budget_report.json")
    args = parser.parse_args(argv)
    if not args.base_url and not args.start_local:
        parser.error("give --base-url or --start-local")
    budgets = {"sync": args.budget_s, "async": args.async_budget_s}

    with contextlib.ExitStack() as stack:
        base_url = args.base_url
        name = args.name
        if args.start_local:
            log_dir = Path(tempfile.mkdtemp(prefix="budget-report-"))
            local = stack.enter_context(servers.our_server(log_dir))
            base_url = local.url + servers.OURS_SYNC_BASE
            name = "tiny-chat (local)" if name == "server" else name
        target = loadgen.Target(name, base_url.rstrip("/"), args.api_key, args.model)
        result = asyncio.run(measure(target, args.concurrency, args.prompt_tokens,
                                     args.probe_max_tokens, args.requests_per_stream, budgets,
                                     args.margin_s, args.context_tokens, not args.no_verify))
    report: dict[str, Any] = {"command": loadgen.command_line(),
                              "environment": loadgen.environment(), "budgets": budgets,
                              "margin_s": args.margin_s, "fit_percentile": FIT_PERCENTILE,
                              "probe_max_tokens": args.probe_max_tokens, **result}
    report["recommendation"] = recommendation(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(loadgen.rounded(report), indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    plot(report, args.out.with_suffix(".png"))
    print("\n" + "\n".join(report["recommendation"]))
    print(f"wrote {args.out} (.md, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
