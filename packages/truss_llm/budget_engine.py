"""The engine as vLLM's serving classes see it, with every generation held to its deadline.

vLLM's `OpenAIServingChat` and `OpenAIServingCompletion` call `engine_client.generate(...)`
and build the whole answer (usage, tool calls, SSE) from what it yields. Handing them this
wrapper instead of the bare `AsyncLLM` lets the budget act below them, so they still
produce a complete, well-formed answer:

- before a generation starts, if its `max_tokens` cannot finish by the deadline at the
  replica's measured speed, it is clamped to what fits (`truncate`) or refused (`reject`);
- when the deadline passes mid-generation, the engine request is aborted; vLLM then yields
  a final output with the tokens so far, whose `finish_reason` we report as `"length"`.

The speed is measured live from the generations themselves (time to first token and time
per output token, smoothed), so it reflects the current load.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from truss_llm import budget
from truss_llm.budget import BudgetRejected, Deadline

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

# Weight of the newest observation in the moving averages: recent enough to follow the
# load within a handful of requests, smooth enough to ignore one odd request.
SMOOTHING = 0.3
# Estimates are padded by this factor: a clamp that is slightly short is better than an
# abort, which ends the answer mid-sentence anyway.
ESTIMATE_SAFETY = 1.15


class SpeedTracker:
    """Time to first token and time per output token, as moving averages."""

    def __init__(self) -> None:
        self.ttft_s: float | None = None
        self.tpot_s: float | None = None

    @staticmethod
    def _mix(old: float | None, new: float) -> float:
        return new if old is None else old + SMOOTHING * (new - old)

    def observe(self, ttft_s: float | None, tpot_s: float) -> None:
        if ttft_s is not None:
            self.ttft_s = self._mix(self.ttft_s, ttft_s)
        self.tpot_s = self._mix(self.tpot_s, tpot_s)

    def observe_output(self, out: Any) -> None:
        """Learn from a finished generation, by the engine's own timestamps: they tell
        queueing and prefill (time to first token) from decoding, streamed or not. An
        engine run with `disable_log_stats` keeps none: nothing is learnt, nothing is
        clamped, and the abort at the deadline still holds."""
        stats = getattr(out, "metrics", None)
        generated = getattr(stats, "num_generation_tokens", 0)
        if generated >= 2 and stats.last_token_ts > stats.first_token_ts:
            self.observe(stats.first_token_latency,
                         (stats.last_token_ts - stats.first_token_ts) / (generated - 1))

    def seconds_for(self, max_tokens: int) -> float | None:
        if self.tpot_s is None:
            return None
        return ESTIMATE_SAFETY * ((self.ttft_s or 0.0) + max_tokens * self.tpot_s)

    def tokens_within(self, seconds: float) -> int:
        assert self.tpot_s is not None
        usable = seconds / ESTIMATE_SAFETY - (self.ttft_s or 0.0)
        return max(1, math.floor(usable / self.tpot_s)) if self.tpot_s > 0 else 1


class BudgetedEngineClient:
    """`AsyncLLM` for vLLM's serving classes, with the request's deadline applied."""

    def __init__(self, inner: AsyncLLM, speed: SpeedTracker | None = None) -> None:
        self._inner = inner
        self.speed = speed or SpeedTracker()
        self._aborts: set[asyncio.Task] = set()

    def __getattr__(self, name: str) -> Any:  # everything else is the engine's own
        return getattr(self._inner, name)

    def generate(self, prompt: Any, sampling_params: Any, request_id: str, *args: Any,
                 **kwargs: Any) -> AsyncIterator[Any]:
        # A plain function, called by vLLM in the request's task: the deadline is read
        # now, from the request's context, not later by whoever iterates the stream.
        deadline = budget.current()
        if deadline is None:
            return self._inner.generate(prompt, sampling_params, request_id, *args, **kwargs)
        sampling_params = self._fit(sampling_params, deadline)
        return self._bounded(
            self._inner.generate(prompt, sampling_params, request_id, *args, **kwargs),
            request_id, deadline)

    def _fit(self, params: Any, deadline: Deadline) -> Any:
        max_tokens = getattr(params, "max_tokens", None)
        if not isinstance(max_tokens, int):
            return params
        needed = self.speed.seconds_for(max_tokens)
        left = deadline.remaining()
        if needed is None or needed <= left:
            return params
        fits = self.speed.tokens_within(max(left, 0.0))
        if deadline.policy == "reject":
            raise BudgetRejected(
                f"This request asks for up to {max_tokens:,} tokens: at this replica's "
                f"current speed (about {self.speed.tpot_s * 1000:.1f} ms per token) that "
                f"takes about {needed:.0f} s, past its {deadline.kind} budget of "
                f"{deadline.budget_s:.0f} s ({max(left, 0):.0f} s left). Ask for at most "
                f"{fits:,} tokens, or send long generations through async_predict.",
                param="max_tokens")
        clamped = params.clone()
        clamped.max_tokens = fits
        deadline.clamped_to = fits
        logger.info("max_tokens %d clamped to %d to finish inside the %s budget",
                    max_tokens, fits, deadline.kind)
        return clamped

    def _expire(self, request_id: str, deadline: Deadline) -> None:
        deadline.expired = True
        task = asyncio.ensure_future(self._inner.abort(request_id))
        self._aborts.add(task)  # keep a reference until it is done
        task.add_done_callback(self._aborts.discard)

    async def _bounded(self, outputs: AsyncIterator[Any], request_id: str,
                       deadline: Deadline) -> AsyncIterator[Any]:
        # One timer a request, nothing per token: this sits on every stream's hot path.
        # (A delay, not `call_at`: uvloop's clock need not be `time.monotonic`'s.)
        timer = asyncio.get_running_loop().call_later(
            max(0.0, deadline.remaining()), self._expire, request_id, deadline)
        try:
            async for out in outputs:
                if out.finished:
                    self._finish(out, deadline)
                    self.speed.observe_output(out)
                yield out
        finally:
            timer.cancel()

    @staticmethod
    def _finish(out: Any, deadline: Deadline) -> None:
        """Report a generation the budget ended as one that reached its length limit."""
        if deadline.expired:
            for completion in out.outputs:
                if completion.finish_reason in (None, "abort"):
                    completion.finish_reason = "length"
                    completion.stop_reason = None
                    deadline.truncated = True
        elif deadline.clamped_to is not None and any(
                c.finish_reason == "length" for c in out.outputs):
            deadline.truncated = True
