"""The budget's arithmetic and parsing, without an engine (test_budget.py runs it for real)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
from truss_llm.budget import (
    BUDGET_HEADER,
    KIND_HEADER,
    MARKER_FIELD,
    POLICY_HEADER,
    BudgetSettings,
    budget_settings,
    deadline_for,
    finish_stream,
)
from truss_llm.budget_engine import ESTIMATE_SAFETY, SpeedTracker
from truss_llm.errors import RequestError
from truss_llm.limits import ASYNC_RUN_TIMEOUT_S, SYNC_TIMEOUT_S

SETTINGS = BudgetSettings(margin_s=10)


def test_defaults_are_basetens_limits_less_the_margin() -> None:
    sync = deadline_for({}, SETTINGS, arrived=100.0)
    assert (sync.kind, sync.policy, sync.budget_s) == ("sync", "truncate", SYNC_TIMEOUT_S)
    assert sync.at == 100.0 + SYNC_TIMEOUT_S - 10
    async_ = deadline_for({KIND_HEADER: "async"}, SETTINGS, arrived=0.0)
    assert async_.at == ASYNC_RUN_TIMEOUT_S - 10


def test_a_request_can_shorten_its_budget_never_lengthen_it() -> None:
    assert deadline_for({BUDGET_HEADER: "60"}, SETTINGS, arrived=0.0).at == 50.0
    assert deadline_for({BUDGET_HEADER: "99999"}, SETTINGS, arrived=0.0).budget_s == \
        SYNC_TIMEOUT_S
    # A short budget keeps most of itself: the margin is capped at a quarter of it.
    assert deadline_for({BUDGET_HEADER: "4"}, SETTINGS, arrived=0.0).at == 3.0


@pytest.mark.parametrize(("header", "value"), [
    (BUDGET_HEADER, "soon"), (BUDGET_HEADER, "0"), (BUDGET_HEADER, "-5"),
    (BUDGET_HEADER, "nan"), (KIND_HEADER, "batch"), (POLICY_HEADER, "drop")])
def test_bad_headers_are_a_400_naming_them(header: str, value: str) -> None:
    with pytest.raises(RequestError, match=header) as caught:
        deadline_for({header: value}, SETTINGS)
    assert caught.value.status == 400


def test_settings_from_config_then_environment() -> None:
    config = {"model_metadata": {"budget": {"sync_s": 600, "policy": "reject"}}}
    settings = budget_settings(config, {"TRUSS_LLM_BUDGET_MARGIN_S": "2"})
    assert (settings.sync_s, settings.policy, settings.margin_s) == (600, "reject", 2)
    with pytest.raises(ValueError, match="no budget setting"):
        budget_settings({}, {"TRUSS_LLM_BUDGET_SYNC": "1"})


def test_speed_tracker_learns_from_the_engines_timestamps() -> None:
    speed = SpeedTracker()
    assert speed.seconds_for(100) is None  # nothing measured: no clamp, the abort guards
    stats = SimpleNamespace(num_generation_tokens=101, first_token_ts=10.0,
                            last_token_ts=11.0, first_token_latency=0.5)
    speed.observe_output(SimpleNamespace(metrics=stats))
    assert speed.tpot_s == pytest.approx(0.01) and speed.ttft_s == pytest.approx(0.5)
    assert speed.seconds_for(1000) == pytest.approx(ESTIMATE_SAFETY * (0.5 + 10))
    assert speed.tokens_within(ESTIMATE_SAFETY * (0.5 + 2)) == 200
    # A later, slower request moves the estimate towards it, not all the way.
    speed.observe(None, 0.02)
    assert 0.01 < speed.tpot_s < 0.02


def test_speed_tracker_learns_nothing_without_the_engines_timestamps() -> None:
    speed = SpeedTracker()
    speed.observe_output(SimpleNamespace(metrics=None))
    assert speed.tpot_s is None


def _collect(chunks: list[str], truncated: bool, usage_requested: bool,
             expired: bool = False) -> list[str]:
    async def source() -> AsyncIterator[str]:
        for chunk in chunks:
            yield chunk

    deadline = deadline_for({}, SETTINGS)
    deadline.truncated = truncated
    deadline.expired = expired

    async def run() -> list[str]:
        return [c async for c in finish_stream(source(), deadline, usage_requested, 1)]

    return asyncio.run(run())


CHUNKS = ['data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"length"}]}'
          '\n\n',
          'data: {"choices":[],"usage":{"completion_tokens":1}}\n\n', "data: [DONE]\n\n"]


def test_a_truncated_stream_ends_with_the_marker_on_the_usage_chunk() -> None:
    out = _collect(CHUNKS, truncated=True, usage_requested=False)
    usage = json.loads(out[1][len("data: "):])
    assert usage == {"choices": [], "usage": {"completion_tokens": 1}, MARKER_FIELD: True}
    assert out[0] == CHUNKS[0] and out[2] == CHUNKS[2]


def test_usage_the_client_did_not_ask_for_is_dropped_unless_truncated() -> None:
    assert _collect(CHUNKS, truncated=False, usage_requested=False) == [CHUNKS[0], CHUNKS[2]]
    assert _collect(CHUNKS, truncated=False, usage_requested=True) == CHUNKS


def test_remaining_counts_down() -> None:
    deadline = deadline_for({BUDGET_HEADER: "100"}, SETTINGS)
    assert 85 < deadline.remaining() <= 90


def test_a_stream_aborted_before_its_first_token_still_finishes_every_choice() -> None:
    usage = ('data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
             '"choices":[],"usage":{"completion_tokens":0}}\n\n')
    out = _collect([usage, "data: [DONE]\n\n"], truncated=True, usage_requested=False,
                   expired=True)
    finish = json.loads(out[0][len("data: "):])
    assert finish == {"id": "c1", "object": "chat.completion.chunk", "created": 1,
                      "model": "m", "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                 "finish_reason": "length"}]}
    assert json.loads(out[1][len("data: "):])[MARKER_FIELD] is True
    assert out[2] == "data: [DONE]\n\n"
    # A stream that already carried its finish gets no second one.
    assert len(_collect(CHUNKS, truncated=True, usage_requested=False, expired=True)) == 3
