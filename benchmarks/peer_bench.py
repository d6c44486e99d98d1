"""Our stack against `vllm serve`, side by side on one machine, same model, same engine.

    .venv/bin/python benchmarks/peer_bench.py                  # about 5 minutes on 2 cores
    .venv/bin/python benchmarks/peer_bench.py --rounds 5 --profile-s 0

Starts both servers on 127.0.0.1 (servers.py: `vllm serve` with the engine settings our
package resolves here, and `truss-llm serve`), then runs the harness (loadgen.py) against
three targets: the peer's `/v1`, ours through Baseten's OpenAI base path
(`/environments/production/sync/v1`, what a Baseten user points an SDK at) and ours on the
truss server's own `/v1` routes. Streaming chat, a 64-token prompt, 128 output tokens
(`ignore_eos`), concurrency 1, 16, 64; every run warms up first. Streams start staggered
over one request's duration, so requests arrive spread out as independent users' do;
`--arrivals burst` starts them together, and since every request is as long, they then stay
in step and each wave's TTFT depends on where it lands in the engine's steps (the same
server's TTFT p50 at 64 streams swings 60-440 ms between identical runs). The order of the targets
flips every round (ABC, CBA, ABC...: ABBA for three), so drift on a shared 2-core machine
hits every target alike, and each round records the CPU that processes outside the
benchmark used meanwhile (a disturbed round shows it). Ratios ours/peer are taken within a
round and summarized by their median; the goal (issue 9) is >= 1.0 for output tokens/s and
<= 1.1 for TTFT p50.

With --control, a second `vllm serve` (`vllm-serve-control`, the same command) joins the
rounds as one more target: its ratios to the first are the noise floor, what two identical
servers read against each other on this machine in the same run. A ratio of ours inside
that band cannot be told apart from parity.

Then, with --profile-s S (default 20), one more 64-stream load per server while py-spy
samples its HTTP process for S seconds: the raw stacks go to
benchmarks/results/profile_<name>.txt and the shares (profile_share.py) into the JSON.

Writes benchmarks/results/peer_bench.json, .png and .md (the table).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import loadgen
import profile_share
import servers

RESULTS_DIR = loadgen.RESULTS_DIR
LEVELS = (1, 16, 64)
ROUNDS = 3
PROMPT_TOKENS = 64
MAX_TOKENS = 128
PEER = "vllm-serve"
OURS_SYNC = "ours-sync-v1"
OURS_ROOT = "ours-v1"
OURS_H11 = "ours-h11-sync-v1"  # the HTTP stack truss's own server runs: the before
CONTROL = "vllm-serve-control"  # the peer again: what identical servers read (A/A)
H11_ENV = {"TRUSS_LLM_UVICORN_HTTP": "h11", "TRUSS_LLM_UVICORN_LOOP": "asyncio"}
GOAL_TOKENS_RATIO = 1.0
GOAL_TTFT_RATIO = 1.1
# A run during which other processes used more than this share of the machine's CPUs is
# disturbed; its round is repeated, at most MAX_REPEATS times per concurrency level.
MAX_FOREIGN_SHARE = 0.15
MAX_REPEATS = 3
PROFILE_CONCURRENCY = 64
PROFILE_RATE_HZ = 100
# Figures per run that the summary takes medians of, with how to read them from a level.
FIGURES = {
    "output_tokens_per_s": lambda lv: lv["output_tokens_per_s"],
    "requests_per_s": lambda lv: lv["requests_per_s"],
    "ttft_p50_s": lambda lv: lv["ttft_s"]["p50"],
    "ttft_p99_s": lambda lv: lv["ttft_s"]["p99"],
    "tpot_p50_s": lambda lv: lv["tpot_s"]["p50"],
    "e2e_p50_s": lambda lv: lv["e2e_s"]["p50"],
    "e2e_p99_s": lambda lv: lv["e2e_s"]["p99"],
    "typical_tokens_per_s": lambda lv: typical_tokens_per_s(lv),
}


def typical_tokens_per_s(level: dict[str, Any]) -> float | None:
    """Output tokens/s that the median request's latency implies for the closed loop
    (Little's law: streams x tokens per request / median latency). Unlike tokens over the
    wall time, a few requests stalled by another process on a shared machine barely move
    it, so it is the figure to compare when rounds were disturbed."""
    e2e = level["e2e_s"]["p50"]
    tokens = level["output_tokens_per_request"]["mean"]
    return level["concurrency"] * tokens / e2e if e2e and tokens else None


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(ours: float | None, peer: float | None) -> float | None:
    return ours / peer if ours is not None and peer else None


def summarize_level(runs: list[dict[str, Any]], targets: list[str]) -> dict[str, Any]:
    """Medians over rounds per target, and per-round ratios of each of ours to the peer."""
    out: dict[str, Any] = {"per_target": {}, "ratios": {}}
    for name in targets:
        rows = [r["result"] for r in runs if r["target"] == name]
        out["per_target"][name] = {key: median([read(row) for row in rows])
                                   for key, read in FIGURES.items()}
        out["per_target"][name]["errors"] = sum(row["errors"] for row in rows)
    rounds = sorted({r["round"] for r in runs})
    for name in targets:
        if name == PEER:
            continue
        per_round = []
        for rnd in rounds:
            by_target = {r["target"]: r["result"] for r in runs if r["round"] == rnd}
            if name in by_target and PEER in by_target:
                ours, peer = by_target[name], by_target[PEER]
                per_round.append({
                    "round": rnd,
                    "output_tokens_per_s": ratio(ours["output_tokens_per_s"],
                                                 peer["output_tokens_per_s"]),
                    "typical_tokens_per_s": ratio(typical_tokens_per_s(ours),
                                                  typical_tokens_per_s(peer)),
                    "ttft_p50": ratio(ours["ttft_s"]["p50"], peer["ttft_s"]["p50"])})
        tokens = [r["output_tokens_per_s"] for r in per_round]
        typical = [r["typical_tokens_per_s"] for r in per_round]
        ttft = [r["ttft_p50"] for r in per_round]
        tokens_median, ttft_median = median(tokens), median(ttft)
        out["ratios"][name] = {
            "per_round": per_round,
            "output_tokens_per_s": {"median": tokens_median, "min": min(tokens, default=None),
                                    "max": max(tokens, default=None)},
            "typical_tokens_per_s": {"median": median(typical),
                                     "min": min(typical, default=None),
                                     "max": max(typical, default=None)},
            "ttft_p50": {"median": ttft_median, "min": min(ttft, default=None),
                         "max": max(ttft, default=None)},
            "goal_tokens_met": tokens_median is not None
                               and tokens_median >= GOAL_TOKENS_RATIO,
            "goal_ttft_met": ttft_median is not None and ttft_median <= GOAL_TTFT_RATIO}
    return out


def disturbed(run: dict[str, Any], limit: float) -> bool:
    """Did processes outside the benchmark use more than `limit` of the machine's CPUs
    during this run? (Other engineers' engines and tests share these 2 cores.)"""
    wall = run["result"]["wall_s"] or 1e-9
    return run["foreign_cpu_s"] / wall / (os.cpu_count() or 1) > limit


async def measure(targets: dict[str, loadgen.Target], levels: list[int], rounds: int,
                  foreign: servers.ForeignCpu, per_stream: int, max_foreign: float,
                  max_repeats: int, save: Callable[[dict[str, Any]], None],
                  stagger: bool) -> dict[str, Any]:
    """Every level, `rounds` rounds of every target in alternating order. A round in which
    some run was disturbed (see `disturbed`) is run again, up to `max_repeats` times per
    level; the discarded rounds stay in the JSON, marked."""
    workload = loadgen.Workload(PROMPT_TOKENS, MAX_TOKENS)
    names = list(targets)
    runs: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    async with loadgen.make_client(max(levels)) as client:
        resolved = {n: await loadgen.resolve_model(client, t) for n, t in targets.items()}
        # One calibration serves every target: they share the model and its tokenizer.
        prompts = await loadgen.PromptFactory.calibrate(client, resolved[PEER])
        index = 0
        for level in levels:
            n = loadgen.requests_for(level, per_stream)
            rnd, repeats = 0, 0
            while rnd < rounds:
                order = names if rnd % 2 == 0 else names[::-1]
                this_round = []
                for name in order:
                    foreign.start()
                    load_before = os.getloadavg()[0]
                    result = await loadgen.run_level(
                        client, resolved[name], prompts, workload, level, n, index,
                        progress=f"round {rnd} {name} c={level}", stagger=stagger)
                    index += n + level
                    this_round.append({"level": level, "round": rnd, "target": name,
                                       "foreign_cpu_s": foreign.stop(),
                                       "load_avg_1m_before": load_before, "result": result})
                    print(f"round {rnd} " + loadgen.level_line(name, result)
                          + f"  foreign CPU {this_round[-1]['foreign_cpu_s']:.1f} s",
                          flush=True)
                if repeats < max_repeats and any(disturbed(r, max_foreign)
                                                 for r in this_round):
                    repeats += 1
                    discarded.extend({**r, "discarded": "disturbed"} for r in this_round)
                    print(f"round {rnd} at c={level} disturbed by other processes: again "
                          f"({repeats}/{max_repeats})", flush=True)
                    continue
                runs.extend(this_round)
                rnd += 1
            # Saved after every level: a run cut short still leaves what it measured.
            save(measured(prompts, runs, discarded, names))
    return measured(prompts, runs, discarded, names)


def measured(prompts: loadgen.PromptFactory, runs: list[dict[str, Any]],
             discarded: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    levels = sorted({r["level"] for r in runs})
    summary = {str(level): summarize_level([r for r in runs if r["level"] == level], names)
               for level in levels}
    return {"prompts": loadgen.prompt_info(prompts), "runs": runs,
            "discarded_runs": discarded, "levels": summary}


async def profile_under_load(target: loadgen.Target, pid: int, seconds: float,
                             tokens_per_s: float, out: Path, stagger: bool
                             ) -> dict[str, Any]:
    """py-spy on `pid` for `seconds` while PROFILE_CONCURRENCY streams run against it."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    # Enough requests to outlast the sampling, from the throughput just measured.
    n = max(int(tokens_per_s * (seconds + 6) / MAX_TOKENS), 2 * PROFILE_CONCURRENCY)
    workload = loadgen.Workload(PROMPT_TOKENS, MAX_TOKENS)
    async with loadgen.make_client(PROFILE_CONCURRENCY) as client:
        target = await loadgen.resolve_model(client, target)
        prompts = await loadgen.PromptFactory.calibrate(client, target, seed=7)
        load = asyncio.create_task(loadgen.run_level(
            client, target, prompts, workload, PROFILE_CONCURRENCY, n, 10_000_000,
            progress=f"profile {target.name}", stagger=stagger))
        await asyncio.sleep(3)  # past the warm-up: sample the steady state
        spy = await asyncio.create_subprocess_exec(
            py_spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r",
            str(PROFILE_RATE_HZ), "-f", "raw", "-o", str(out),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await spy.wait()
        result = await load
    shares = profile_share.shares(profile_share.parse(out), 25, seconds, PROFILE_RATE_HZ)
    shown = out.relative_to(loadgen.REPO) if out.is_relative_to(loadgen.REPO) else out
    return {"raw_stacks": str(shown), "load": result,
            "shares": shares}


def markdown_table(report: dict[str, Any]) -> str:
    names = report["targets"]
    lines = ["| concurrency | target | output tok/s | typical tok/s | TTFT p50 ms | TPOT p50 ms "
             "| tok/s ratio vs peer, median [min..max] | typical tok/s ratio | TTFT p50 "
             "ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for level, summary in report["levels"].items():
        for name in names:
            t = summary["per_target"][name]
            r = summary["ratios"].get(name)
            tok = typical = ttft = "-"
            if r:
                o, y, f = r["output_tokens_per_s"], r["typical_tokens_per_s"], r["ttft_p50"]
                tok = f"**{o['median']:.2f}** [{o['min']:.2f}..{o['max']:.2f}]"
                typical = f"**{y['median']:.2f}** [{y['min']:.2f}..{y['max']:.2f}]"
                ttft = f"**{f['median']:.2f}** [{f['min']:.2f}..{f['max']:.2f}]"
            lines.append(f"| {level} | {name} | {t['output_tokens_per_s']:.0f} | "
                         f"{t['typical_tokens_per_s']:.0f} | {t['ttft_p50_s'] * 1e3:.1f} | "
                         f"{t['tpot_p50_s'] * 1e3:.2f} | {tok} | {typical} | {ttft} |")
    discarded = len(report.get("discarded_runs", []))
    lines.append("")
    arrivals = report.get("arrivals", "burst")  # runs before the option were bursts
    lines.append(f"Arrivals: {arrivals}. "
                 f"Medians over {report['rounds']} kept rounds per level; {discarded} runs of "
                 "rounds disturbed by other processes were run again (kept in the JSON). "
                 "Typical tok/s = streams x tokens / median latency (robust to a few stalled "
                 f"requests). Goals: tok/s ratio >= {GOAL_TOKENS_RATIO}, TTFT p50 ratio <= "
                 f"{GOAL_TTFT_RATIO}.")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["targets"]
    levels = list(report["levels"])
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    (tps_ax, ratio_ax), (ttft_ax, ttft_ratio_ax) = axes
    width = 0.8 / len(names)
    xs = range(len(levels))
    for k, name in enumerate(names):
        offset = (k - (len(names) - 1) / 2) * width
        for ax, key, scale in ((tps_ax, "output_tokens_per_s", 1.0),
                               (ttft_ax, "ttft_p50_s", 1e3)):
            values = [report["levels"][lv]["per_target"][name][key] * scale for lv in levels]
            bars = ax.bar([x + offset for x in xs], values, width, label=name)
            ax.bar_label(bars, labels=[f"{v:.0f}" if scale == 1 else f"{v:.1f}"
                                       for v in values], fontsize=8)
    for ax, ylabel in ((tps_ax, "output tokens/s (median over rounds)"),
                       (ttft_ax, "TTFT p50, ms (median over rounds)")):
        ax.set_xticks(list(xs), levels)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    for ax, key, goal, ylabel in (
            (ratio_ax, "output_tokens_per_s", GOAL_TOKENS_RATIO, "output tokens/s, ours / peer"),
            (ttft_ratio_ax, "ttft_p50", GOAL_TTFT_RATIO, "TTFT p50, ours / peer")):
        ours = [n for n in names if n != PEER]
        for k, name in enumerate(ours):
            offset = (k - (len(ours) - 1) / 2) * 0.25
            for x, lv in zip(xs, levels, strict=True):
                r = report["levels"][lv]["ratios"][name]
                per_round = [p[key] for p in r["per_round"] if p[key] is not None]
                ax.scatter([x + offset] * len(per_round), per_round, alpha=0.5,
                           color=f"C{k + 1}", label=f"{name} per round" if x == 0 else None)
                med = r[key]["median"]
                ax.plot([x + offset - 0.1, x + offset + 0.1], [med, med], color=f"C{k + 1}",
                        linewidth=3, label=f"{name} median" if x == 0 else None)
                ax.annotate(f"{med:.2f}", (x + offset + 0.11, med), fontsize=8, va="center")
        ax.axhline(goal, color="red", linestyle="--", label=f"goal {goal}")
        ax.set_xticks(list(xs), levels)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(f"Ours vs vllm serve, tiny-chat on vLLM CPU, {report['rounds']} rounds "
                 f"(order flipped every round), prompt {PROMPT_TOKENS} / output {MAX_TOKENS} "
                 f"tokens, {report['environment']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out: Path) -> None:
    out.write_text(json.dumps(loadgen.rounded(report), indent=2) + "\n")
    table = markdown_table(report)
    out.with_suffix(".md").write_text(f"# Ours vs vllm serve\n\n`{report['command']}`\n\n"
                                      f"{table}")
    plot(report, out.with_suffix(".png"))
    print("\n" + table)


def resummarize(out: Path) -> int:
    report = json.loads(out.read_text())
    names = report["targets"]
    levels = sorted({r["level"] for r in report["runs"]})
    report["levels"] = {str(level): summarize_level(
        [r for r in report["runs"] if r["level"] == level], names) for level in levels}
    write_outputs(report, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument("--requests-per-stream", type=int,
                        default=loadgen.DEFAULT_REQUESTS_PER_STREAM)
    parser.add_argument("--max-foreign", type=float, default=MAX_FOREIGN_SHARE,
                        help="repeat a round in which other processes used more than this "
                             "share of the CPUs during a run")
    parser.add_argument("--max-repeats", type=int, default=MAX_REPEATS,
                        help="repeated rounds allowed per concurrency level")
    parser.add_argument("--no-root", action="store_true",
                        help="leave out ours on /v1 (two targets: a plain ABBA)")
    parser.add_argument("--baseline-h11", action="store_true",
                        help=f"add a second server of ours on h11 + asyncio ({OURS_H11}): "
                             "truss's own HTTP stack, to show what switching gained")
    parser.add_argument("--control", action="store_true",
                        help=f"add a second `vllm serve` ({CONTROL}): the peer against "
                             "itself, the noise floor of every ratio")
    parser.add_argument("--arrivals", choices=("staggered", "burst"), default="staggered",
                        help="staggered: stream k starts k/N of a request's duration late, "
                             "so requests arrive spread out as independent users' do "
                             "(default); burst: all streams start at once and stay in step, "
                             "so TTFT depends on where each wave lands in the engine's steps")
    parser.add_argument("--profile-s", type=float, default=20.0,
                        help="py-spy seconds per server after the rounds (0: no profile)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "peer_bench.json")
    parser.add_argument("--summarize-only", action="store_true",
                        help="no servers: recompute the summary, table and plot of --out "
                             "from the runs it holds")
    args = parser.parse_args(argv)
    if args.summarize_only:
        return resummarize(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="peer-bench-"))
    print(f"server logs: {log_dir}", flush=True)
    report: dict[str, Any] = {"command": loadgen.command_line(),
                              "environment": loadgen.environment(), "rounds": args.rounds,
                              "arrivals": args.arrivals,
                              "workload": {"prompt_tokens": PROMPT_TOKENS,
                                           "max_tokens": MAX_TOKENS, "ignore_eos": True,
                                           "stream": True, "include_usage": True}}
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        peer = stack.enter_context(servers.peer_server(log_dir))
        ours = stack.enter_context(servers.our_server(log_dir))
        started_servers = [peer, ours]
        targets = {PEER: loadgen.Target(PEER, peer.url + "/v1"),
                   OURS_SYNC: loadgen.Target(OURS_SYNC, ours.url + servers.OURS_SYNC_BASE)}
        if not args.no_root:
            targets[OURS_ROOT] = loadgen.Target(OURS_ROOT, ours.url + servers.OURS_ROOT_BASE)
        if args.baseline_h11:
            h11 = stack.enter_context(servers.our_server(log_dir, H11_ENV, "truss-llm-h11"))
            started_servers.append(h11)
            targets[OURS_H11] = loadgen.Target(OURS_H11, h11.url + servers.OURS_SYNC_BASE)
        if args.control:
            control = stack.enter_context(servers.peer_server(log_dir, CONTROL))
            started_servers.append(control)
            targets[CONTROL] = loadgen.Target(CONTROL, control.url + "/v1")
        report["targets"] = list(targets)
        report["servers"] = {s.name: {"startup_s": s.startup_s, "pid": s.pid,
                                      "command": " ".join(s.process.args)}
                             for s in started_servers}
        _, peer_env = servers.peer_command(0)
        report["servers"][peer.name]["env"] = peer_env
        if args.control:
            report["servers"][CONTROL]["env"] = peer_env
        if args.baseline_h11:
            report["servers"]["truss-llm-h11"]["env"] = H11_ENV
        foreign = servers.ForeignCpu(set().union(*(s.pids() for s in started_servers)))
        def save(partial: dict[str, Any]) -> None:
            args.out.write_text(json.dumps(loadgen.rounded({**report, **partial}), indent=2)
                                + "\n")

        report.update(asyncio.run(measure(targets, args.concurrency, args.rounds, foreign,
                                          args.requests_per_stream, args.max_foreign,
                                          args.max_repeats, save,
                                          stagger=args.arrivals == "staggered")))
        # The measurement is saved before profiling: a failed profile must not lose it.
        args.out.write_text(json.dumps(loadgen.rounded(report), indent=2) + "\n")
        if args.profile_s > 0:
            report["profiles"] = {}
            top = str(max(args.concurrency))
            for name, server in ((PEER, peer), (OURS_SYNC, ours)):
                tokens_per_s = report["levels"][top]["per_target"][name]["output_tokens_per_s"]
                try:
                    report["profiles"][name] = asyncio.run(profile_under_load(
                        targets[name], server.pid, args.profile_s, tokens_per_s,
                        args.out.with_name(f"profile_{name}.txt"),
                        stagger=args.arrivals == "staggered"))
                except (OSError, ValueError) as exc:
                    report["profiles"][name] = {"failed": f"{type(exc).__name__}: {exc}"}
                    print(f"profile {name} failed: {exc}", flush=True)
                    continue
                busy = report["profiles"][name]["shares"].get("main_thread_busy_pct")
                print(f"profile {name}: main thread busy {busy}%", flush=True)
    report["wall_s"] = time.perf_counter() - started
    report["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_outputs(report, args.out)
    print(f"wall {report['wall_s']:.0f} s; wrote {args.out} (.png, .md); logs in {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
