"""Prometheus gauges of our own, exported at the truss server's `/metrics` beside vLLM's.

vLLM's `vllm:num_requests_running` is refreshed only when the engine steps, so an idle engine
keeps reporting the last value; ours is read at scrape time from the engine itself, which is
what an operator (and the disconnect tests) need to see that aborted work is really gone.
"""

from __future__ import annotations

from prometheus_client import Gauge

from truss_llm.engine import Engine

UNFINISHED_REQUESTS = "truss_llm_engine_unfinished_requests"
_UNFINISHED = Gauge(UNFINISHED_REQUESTS, "Requests the vLLM engine has not finished or aborted.")


def register_engine_metrics(engine: Engine) -> None:
    """Point the gauge at this engine (a later load, after a scale to zero or a restart,
    replaces the one before)."""
    _UNFINISHED.set_function(engine.unfinished_requests)
