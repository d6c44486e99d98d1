"""The runner's settings: Baseten's limits (`truss_llm.limits`), and what this machine serves.

Every limit is overridable (the tests compress them to seconds) from the command line or
from `TRUSS_LLM_RUNNER_<FIELD>` environment variables.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from truss_llm.env_settings import prefixed_values
from truss_llm.limits import (
    ASYNC_RUN_TIMEOUT_S,
    MAX_ASYNC_INPUT_BYTES,
    MAX_BODY_BYTES,
    SYNC_TIMEOUT_S,
    WAKE_TIMEOUT_S,
)
from truss_llm.media.policy import Networks
from truss_llm.runner.queue import BUSY_TIMEOUT_S
from truss_llm.runner.store_health import UNHEALTHY_AFTER_S

ENV_PREFIX = "TRUSS_LLM_RUNNER_"
# Within Kubernetes' default 30 s between SIGTERM and SIGKILL, with time left for the rest
# of the shutdown (requeueing async work, stopping the engine).
DRAIN_GRACE_S = 20.0
ASYNC_RETENTION_S = 7 * 24 * 3600.0  # a week: time to read a result's status after the fact
LIST_SETTINGS = ("environments", "webhook_allowed_networks")  # comma-separated in variables


class RunnerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = Field(default=None, description="require `Api-Key <key>` if set")
    model_id: str = "local"
    deployment_id: str = "local"
    environments: tuple[str, ...] = ("production",)
    development: bool = True
    state_dir: Path = Path(".truss-llm")
    webhook_secret: str | None = None
    worker_concurrency: int = Field(default=4, ge=1)
    max_body_bytes: int = Field(default=MAX_BODY_BYTES, gt=0)
    max_async_input_bytes: int = Field(default=MAX_ASYNC_INPUT_BYTES, gt=0)
    sync_timeout_s: float = Field(default=SYNC_TIMEOUT_S, gt=0)
    wake_timeout_s: float = Field(default=WAKE_TIMEOUT_S, gt=0)
    async_run_timeout_s: float = Field(default=ASYNC_RUN_TIMEOUT_S, gt=0)
    webhook_attempts: int = Field(default=3, ge=1)
    webhook_backoff_s: float = Field(default=1.0, ge=0)
    webhook_timeout_s: float = Field(default=30.0, gt=0)
    # Webhooks go to public addresses only; these networks are allowed besides (CIDR), e.g.
    # 127.0.0.1/32 for a receiver on this machine.
    webhook_allowed_networks: Networks = ()
    scale_to_zero_idle_s: float | None = Field(default=None, gt=0)
    # On SIGTERM, sync requests in flight get this long to finish (runner/drain.py).
    drain_grace_s: float = Field(default=DRAIN_GRACE_S, ge=0)
    # The async queue's store (SQLite): settled requests are deleted this long after their
    # last change; a write waits this long for a lock; a store whose every write has failed
    # for this long turns readiness and async_predict into 503s; the file's size cap (none:
    # the disk's), past which async_predict answers 503 instead of filling the disk.
    async_retention_s: float = Field(default=ASYNC_RETENTION_S, gt=0)
    queue_busy_timeout_s: float = Field(default=BUSY_TIMEOUT_S, gt=0)
    queue_unhealthy_after_s: float = Field(default=UNHEALTHY_AFTER_S, ge=0)
    queue_max_bytes: int | None = Field(default=None, gt=0)
    # Tell the model which budget each request runs under and how much of it is left
    # (`truss_llm.budget`), so that it answers before our timeout fires. Off, the runner
    # treats the model as one that knows nothing of budgets: only the 504 remains.
    forward_budget: bool = True

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, key: str | None) -> str | None:
        # An empty key would turn auth on and then accept `Authorization: Bearer ` as it.
        if key is not None and not key.strip():
            raise ValueError("the API key is empty: give a non-empty --api-key "
                             "(TRUSS_LLM_RUNNER_API_KEY), or none to serve this machine only")
        return key

    @model_validator(mode="after")
    def _open_only_on_loopback(self) -> RunnerSettings:
        if self.api_key is None and not is_loopback(self.host):
            raise ValueError(f"refusing to bind {self.host} without an API key: every route "
                             "would be open to other machines. Pass --api-key, or bind "
                             "127.0.0.1.")
        return self

    @property
    def queue_path(self) -> Path:
        return self.state_dir / "async-queue.sqlite3"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, str | list[str]]:
    """`TRUSS_LLM_RUNNER_SYNC_TIMEOUT_S=5` -> {"sync_timeout_s": "5"} (lists comma-separated)."""
    environ = os.environ if environ is None else environ
    return prefixed_values(environ, ENV_PREFIX, RunnerSettings.model_fields, "runner",
                           lists=LIST_SETTINGS)
