"""The benchmark harness's statistics and the budget report's arithmetic (no engine), and
one short run of the load generator against the session's server.

The benchmarks are scripts in benchmarks/, not a package: their folder goes on sys.path.
"""

from __future__ import annotations

import asyncio
import math
import sys
from pathlib import Path

import pytest
from conftest import Server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import budget_report
import loadgen
import peer_bench


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert loadgen.percentile(values, 0) == 1.0
    assert loadgen.percentile(values, 100) == 4.0
    assert loadgen.percentile(values, 50) == pytest.approx(2.5)
    assert loadgen.percentile(values, 90) == pytest.approx(3.7)  # numpy: 3.7
    assert loadgen.percentile([7.0], 99) == 7.0
    assert loadgen.percentile([], 50) is None


def test_tpot_excludes_the_first_token() -> None:
    result = loadgen.RequestResult(True, ttft_s=0.1, e2e_s=1.1, output_tokens=11)
    assert result.tpot_s == pytest.approx(0.1)
    assert loadgen.RequestResult(True, ttft_s=0.1, e2e_s=0.1, output_tokens=1).tpot_s is None
    assert loadgen.RequestResult(False, e2e_s=1.0).tpot_s is None


def test_summarize_counts_only_successes_over_the_wall_time() -> None:
    good = [loadgen.RequestResult(True, ttft_s=0.1 * k, e2e_s=1.0 + k, output_tokens=100,
                                  prompt_tokens=64, chunks=90) for k in range(1, 5)]
    bad = loadgen.RequestResult(False, error="HTTP 500: boom")
    summary = loadgen.summarize([*good, bad], wall_s=10.0)
    assert summary["requests"] == 5
    assert summary["ok"] == 4
    assert summary["errors"] == 1
    assert summary["first_error"] == "HTTP 500: boom"
    assert summary["output_tokens"] == 400
    assert summary["output_tokens_per_s"] == pytest.approx(40.0)
    assert summary["requests_per_s"] == pytest.approx(0.4)
    assert summary["ttft_s"]["p50"] == pytest.approx(0.25)
    assert summary["e2e_s"]["mean"] == pytest.approx(3.5)
    assert summary["prompt_tokens"] == {"min": 64, "max": 64, "mean": 64.0}
    assert set(summary["tpot_s"]) == {"p50", "p90", "p95", "p99", "mean"}


def test_exact_prompts_have_the_requested_length_and_differ() -> None:
    factory = loadgen.PromptFactory(["a", "b", "c"], template_tokens=10, tokens_per_word=1.0,
                                    exact=True)
    first = factory.messages(40, 0)[0]["content"]
    second = factory.messages(40, 1)[0]["content"]
    # The fixed first word plus 30 one-token words: 10 + 30 = 40 with the template.
    assert first.split()[0] == loadgen.FIRST_WORD
    assert len(first.split()) == 31
    assert first != second
    with pytest.raises(ValueError):
        factory.messages(5, 0)


def test_request_body_asks_for_exact_output_and_usage() -> None:
    body = loadgen.PromptFactory.short_sentences().body("m", loadgen.Workload(None, 32), 3)
    assert body["max_tokens"] == 32
    assert body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"][0]["content"] == "Tell me a story about request 3."


def test_command_line_masks_the_api_key() -> None:
    line = loadgen.command_line(["x.py", "--api-key", "secret", "--api-key=other", "--n", "1"])
    assert "secret" not in line and "other" not in line
    assert loadgen.Target("t", "http://h/v1", "secret").public()["api_key"] == "set"


def test_margin_is_at_most_a_quarter_of_the_budget() -> None:
    assert budget_report.effective_margin(1200, 10) == 10
    assert budget_report.effective_margin(4, 10) == 1.0


def test_max_tokens_within_the_budget() -> None:
    # 1200 s less 10 s, TTFT 2 s, 0.5 s per token after the first: 1 + 1188 / 0.5 tokens.
    assert budget_report.max_tokens_within(1200, 10, 2.0, 0.5) == 2377
    assert budget_report.predicted_e2e_s(2.0, 0.5, 2377) == pytest.approx(1190.0)
    assert budget_report.predicted_e2e_s(2.0, 0.5, 2378) > 1190.0
    assert budget_report.max_tokens_within(1200, 10, 1191.0, 0.5) == 0
    assert budget_report.max_tokens_within(10, 0, 1.0, 0.0) == sys.maxsize


def test_fit_is_capped_by_the_context() -> None:
    by_budget = budget_report.fit(3.0, 10, 0.25, 0.01, context_tokens=512, prompt_tokens=64)
    assert by_budget == budget_report.Fit(201, "budget")  # 1 + (3 - 0.75 - 0.25) / 0.01
    by_context = budget_report.fit(1200, 10, 0.25, 0.01, context_tokens=512, prompt_tokens=64)
    assert by_context == budget_report.Fit(448, "context")
    unknown = budget_report.fit(1200, 10, 0.25, 0.01, context_tokens=None, prompt_tokens=64)
    assert unknown.limited_by == "budget"
    assert unknown.max_tokens == math.floor((1190 - 0.25) / 0.01 + 1e-9) + 1


def _level(tokens_per_s: float, ttft: float) -> dict:
    dist = {"p50": ttft, "p90": ttft, "p95": ttft, "p99": ttft, "mean": ttft}
    # One stream of 128-token requests, the median one lasting 128 / tokens_per_s.
    e2e = {key: 128 / tokens_per_s for key in dist}
    return {"output_tokens_per_s": tokens_per_s, "requests_per_s": tokens_per_s / 128,
            "ttft_s": dist, "tpot_s": dist, "e2e_s": e2e, "errors": 0, "concurrency": 1,
            "output_tokens_per_request": {"min": 128, "max": 128, "mean": 128.0}}


def test_peer_ratios_are_paired_within_a_round() -> None:
    runs = [{"round": r, "target": name, "result": _level(tps, ttft)}
            for r, (peer, ours) in enumerate([(100, 110), (50, 60), (100, 90)])
            for name, tps, ttft in ((peer_bench.PEER, peer, 0.010),
                                    (peer_bench.OURS_SYNC, ours, 0.012))]
    summary = peer_bench.summarize_level(runs, [peer_bench.PEER, peer_bench.OURS_SYNC])
    ratios = summary["ratios"][peer_bench.OURS_SYNC]
    # Per round 1.1, 1.2, 0.9: the median of the ratios, not the ratio of the medians.
    assert ratios["output_tokens_per_s"]["median"] == pytest.approx(1.1)
    assert ratios["output_tokens_per_s"]["min"] == pytest.approx(0.9)
    assert ratios["goal_tokens_met"] is True
    # Little's law on the median latency gives the same throughput here.
    assert ratios["typical_tokens_per_s"]["median"] == pytest.approx(1.1)
    assert ratios["ttft_p50"]["median"] == pytest.approx(1.2)
    assert ratios["goal_ttft_met"] is False
    assert summary["per_target"][peer_bench.PEER]["output_tokens_per_s"] == 100


def test_the_control_is_paired_with_the_peer_like_ours(tmp_path: Path) -> None:
    """`--control`: the second `vllm serve` gets per-round ratios to the first, in the
    summary and the table, so the noise floor sits beside our ratios."""
    names = [peer_bench.PEER, peer_bench.OURS_SYNC, peer_bench.CONTROL]
    runs = [{"round": r, "level": 1, "target": name, "result": _level(tps, 0.010)}
            for r, row in enumerate([(100, 105, 95), (100, 98, 110)])
            for name, tps in zip(names, row, strict=True)]
    summary = peer_bench.summarize_level(runs, names)
    control = summary["ratios"][peer_bench.CONTROL]["output_tokens_per_s"]
    assert (control["min"], control["max"]) == (pytest.approx(0.95), pytest.approx(1.10))
    assert peer_bench.PEER not in summary["ratios"]
    report = {"targets": names, "levels": {"1": summary}, "rounds": 2,
              "arrivals": "staggered", "environment": {"cpus": 2}}
    table = peer_bench.markdown_table(report)
    assert f"| 1 | {peer_bench.CONTROL} |" in table and "**1.02** [0.95..1.10]" in table
    peer_bench.plot(report, tmp_path / "control.png")
    assert (tmp_path / "control.png").stat().st_size > 10_000


def test_staggered_streams_start_spread_over_one_request(server: Server) -> None:
    """Bursts keep every stream in step; staggered, stream k starts k/N of a request late."""
    async def level(stagger: bool) -> dict:
        async with loadgen.make_client(4) as client:
            target = await loadgen.resolve_model(
                client, loadgen.Target("ours", f"{server.base_url}/v1"))
            return await loadgen.run_level(
                client, target, loadgen.PromptFactory.short_sentences(),
                loadgen.Workload(prompt_tokens=None, max_tokens=24), 4, 8, stagger=stagger)

    burst, staggered = asyncio.run(level(False)), asyncio.run(level(True))
    assert burst["ok"] == staggered["ok"] == 8
    assert burst["stagger_s"] == 0 and burst["last_stream_started_s"] < 0.05
    assert staggered["stagger_s"] > 0
    assert staggered["last_stream_started_s"] >= 3 * staggered["stagger_s"]
