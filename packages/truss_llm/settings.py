"""One typed object holding every engine parameter, and how it is resolved.

Sources, later ones winning:
1. `model_metadata.engine` of config.yaml: the production settings for the GPU model;
2. the CPU profile, when no GPU is present and the configured weights are not mounted: the
   tiny bundled model in `data/tiny-chat` with settings that fit 2 cores;
3. environment variables `TRUSS_LLM_ENGINE_<FIELD>` (for example
   `TRUSS_LLM_ENGINE_MAX_MODEL_LEN=1024`), so a deployment or a test can change one value
   without editing config.yaml.

Tensor parallelism follows `resources.accelerator` (`H100:4` -> 4) unless set explicitly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from truss_llm.env_settings import prefixed_values
from truss_llm.lora import LoraAdapter, parse_adapters

logger = logging.getLogger(__name__)

ENV_PREFIX = "TRUSS_LLM_ENGINE_"
TINY_MODEL_DIR = "tiny-chat"
TINY_MODEL_NAME = "tiny-chat"
MiB = 1024 * 1024

# Settings that make the tiny random-weight model run well on a 2-core CPU. See FACTS.md:
# without an explicit KV-cache size vLLM reserves ~7 GiB; a random model emits whitespace
# forever inside JSON unless the engine forbids it; strict tool calling would let that
# whitespace into arguments, so the arguments are constrained by their schema instead.
CPU_PROFILE: dict[str, Any] = {
    "dtype": "float32",
    "max_model_len": 512,
    "enforce_eager": True,
    "kv_cache_memory_bytes": 64 * MiB,
    "disable_any_whitespace": True,
    "enforce_strict_tool_calling": False,
    "tensor_parallel_size": 1,
}


class EngineSettings(BaseModel):
    """Everything `engine` needs to start vLLM and `openai_surface` needs to serve it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str = Field(description="Directory of the weights (config.json inside).")
    served_model_name: str = Field(description="The `model` name clients send.")
    device: Literal["cpu", "gpu"] = "gpu"
    dtype: str = "auto"
    max_model_len: int | None = Field(default=None, gt=0)
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.90, gt=0, le=1)
    kv_cache_memory_bytes: int | None = Field(default=None, gt=0)
    max_num_seqs: int | None = Field(default=None, gt=0)
    # Admission control (vLLM's own): requests generating or waiting in the engine past
    # this are refused at once with a 429 and Retry-After, instead of queueing without
    # bound while time to first token degrades for everyone. None: QUEUE_DEPTH_FACTOR
    # times the engine's max_num_seqs (whatever vLLM chose for this device).
    max_num_queued_reqs: int | None = Field(default=None, gt=0)
    enforce_eager: bool = False
    # Tool calling: a parser that fits the model's chat format (hermes for Qwen and our
    # tiny model, llama3_json for Llama 3.x, mistral for Mistral...). None disables tools.
    tool_call_parser: str | None = "hermes"
    enforce_strict_tool_calling: bool = True
    structured_outputs_backend: Literal["xgrammar", "guidance", "outlines", "auto"] = "xgrammar"
    disable_any_whitespace: bool = False
    chat_template: str | None = None
    seed: int = 0
    enable_prefix_caching: bool | None = None
    # `model_metadata.lora_adapters` (see truss_llm.lora); TRUSS_LLM_ENGINE_LORA_ADAPTERS
    # takes `name=path,...` or JSON.
    lora_adapters: list[LoraAdapter] = Field(default_factory=list)

    _parse_adapters = field_validator("lora_adapters", mode="before")(parse_adapters)

    @property
    def is_cpu(self) -> bool:
        return self.device == "cpu"


def gpu_available() -> bool:
    """True where a CUDA device is usable (the `vllm` GPU build is then the one installed)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def accelerator_count(accelerator: str | None) -> int:
    """`H100:4` -> 4, `H100` -> 1, none -> 1."""
    if not accelerator or ":" not in accelerator:
        return 1
    return int(accelerator.rsplit(":", 1)[1])


def _has_weights(path: str | None) -> bool:
    return bool(path) and (Path(path) / "config.json").is_file()


def resolve_settings(
    config: Mapping[str, Any],
    data_dir: Path,
    environ: Mapping[str, str] | None = None,
    has_gpu: bool | None = None,
) -> EngineSettings:
    """Build the settings from a truss config (as a dict), the data dir and the environment."""
    environ = os.environ if environ is None else environ
    has_gpu = gpu_available() if has_gpu is None else has_gpu
    configured = dict((config.get("model_metadata") or {}).get("engine") or {})
    overrides = prefixed_values(environ, ENV_PREFIX, EngineSettings.model_fields, "engine")
    values: dict[str, Any] = dict(configured)
    adapters = (config.get("model_metadata") or {}).get("lora_adapters")
    if adapters:
        values["lora_adapters"] = adapters
    accelerator = (config.get("resources") or {}).get("accelerator")
    values.setdefault("tensor_parallel_size", accelerator_count(accelerator))

    model_path = overrides.get("model_path", configured.get("model_path"))
    if has_gpu:
        values["device"] = "gpu"
        if not _has_weights(model_path):
            raise FileNotFoundError(
                f"No model weights at {model_path!r} (no config.json). Check `weights:` in "
                "config.yaml and `model_metadata.engine.model_path`, which must match its "
                "mount_location.")
    else:
        values["device"] = "cpu"
        if not _has_weights(model_path):
            tiny = data_dir / TINY_MODEL_DIR
            logger.info("No GPU and no weights at %s: serving the bundled tiny model %s",
                        model_path, tiny)
            values.update(model_path=str(tiny), served_model_name=TINY_MODEL_NAME)
            values.pop("lora_adapters", None)  # they adapt the configured model, not this one
        values.update(CPU_PROFILE)
    values.update(overrides)
    return EngineSettings.model_validate(values)
