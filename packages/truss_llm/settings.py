"""One typed object holding every engine parameter, and how it is resolved.

`model_metadata.engine` in config.yaml takes what `vllm serve` takes, one key per flag
(`max-model-len` or `max_model_len`): every engine argument, the serving options in
`vllm_args.SERVING_OPTIONS`, and this package's own settings (`OWN_SETTINGS`). Names and
values are checked against vLLM's own argument definitions when the settings are resolved
(see `vllm_args`): an unknown name or a bad value is an error naming it.

Sources, later ones winning:
1. what we derive: tensor parallelism from `resources.accelerator` (`H100:4` -> 4);
2. `model_metadata.engine` of config.yaml: the production settings for the GPU model;
3. the CPU profile, when no GPU is present: settings that fit 2 cores. When the configured
   weights are not mounted it serves the tiny bundled model in `data/tiny-chat` and wins
   over config.yaml (whose values are for another model); with the weights mounted the
   configured values win over it;
4. environment variables `TRUSS_LLM_ENGINE_<NAME>` for any of those names (for example
   `TRUSS_LLM_ENGINE_MAX_MODEL_LEN=1024`), parsed like the flag, so a deployment or a test
   can change one value without editing config.yaml.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from truss_llm import vllm_args
from truss_llm.lora import LoraAdapter, parse_adapters

logger = logging.getLogger(__name__)

ENV_PREFIX = "TRUSS_LLM_ENGINE_"
CONFIG_SECTION = "model_metadata.engine"
TINY_MODEL_DIR = "tiny-chat"
TINY_MODEL_NAME = "tiny-chat"
MiB = 1024 * 1024

# Settings that make the tiny random-weight model run well on a 2-core CPU. See FACTS.md:
# without an explicit KV-cache size vLLM reserves ~7 GiB; a random model emits whitespace
# forever inside JSON unless the engine forbids it; strict tool calling would let that
# whitespace into arguments, so the arguments are constrained by their schema instead.
# The context holds a tool round trip (a system prompt, a few tools, the assistant's call and
# the tool's answer: ~800 of this tokenizer's tokens for two tools); the KV cache (1 KiB a
# token for the tiny model) has room for 64k tokens.
CPU_PROFILE: dict[str, Any] = {
    "dtype": "float32",
    "max_model_len": 2048,
    "enforce_eager": True,
    "kv_cache_memory_bytes": 64 * MiB,
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
    "distributed_executor_backend": "uni",
    "tensor_parallel_size": 1,
    "enforce_strict_tool_calling": False,
    # The tiny model's chat template writes tool calls in Hermes' format.
    "tool_call_parser": "hermes",
    "enable_auto_tool_choice": True,
}

# This package's settings that are not `vllm serve` flags.
OWN_SETTINGS = ("model_path", "served_model_name", "enforce_strict_tool_calling",
                "lora_adapters")


class EngineSettings(BaseModel):
    """Everything `engine` needs to start vLLM and `openai_surface` needs to serve it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str = Field(description="Directory of the weights (config.json inside); "
                            "`vllm serve`'s positional model.")
    served_model_name: str = Field(description="The `model` name clients send.")
    device: Literal["cpu", "gpu"] = Field(
        default="gpu", description="Derived: cpu when no GPU is present.")
    enforce_strict_tool_calling: bool = Field(
        default=True, description="Env VLLM_ENFORCE_STRICT_TOOL_CALLING: false constrains "
        "forced tool calls' arguments by their JSON schema instead of a structural tag.")
    # `model_metadata.lora_adapters` (see truss_llm.lora); TRUSS_LLM_ENGINE_LORA_ADAPTERS
    # takes `name=path,...` or JSON.
    lora_adapters: list[LoraAdapter] = Field(
        default_factory=list,
        description="From `model_metadata.lora_adapters`: [{name, path}], each served "
        "under its own name.")

    # `vllm serve`'s serving options (vllm_args.SERVING_OPTIONS), with vLLM's defaults.
    chat_template: str | None = None
    chat_template_content_format: str = "auto"
    default_chat_template_kwargs: dict[str, Any] | None = None
    response_role: str = "assistant"
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False

    # Every engine argument set explicitly (derived, configured, CPU profile, environment),
    # parsed by vLLM's own parser: the keyword arguments of `AsyncEngineArgs`.
    engine_args: dict[str, Any] = Field(default_factory=dict)

    _parse_adapters = field_validator("lora_adapters", mode="before")(parse_adapters)

    @model_validator(mode="after")
    def _check_tools(self) -> EngineSettings:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("enable_auto_tool_choice needs a tool_call_parser (as "
                             "`vllm serve --enable-auto-tool-choice` needs --tool-call-parser).")
        return self

    @property
    def is_cpu(self) -> bool:
        return self.device == "cpu"

    @property
    def reasoning_parser(self) -> str | None:
        return self.engine_args.get("reasoning_parser") or None

    @property
    def max_model_len(self) -> int | None:
        return self.engine_args.get("max_model_len")

    def serve_flags(self) -> list[str]:
        """The `vllm serve` command line (after the model) for the same engine and serving
        settings: the peer that benchmarks compare us with."""
        argv = ["--served-model-name", self.served_model_name]
        for name in vllm_args.SERVING_OPTIONS:
            value = getattr(self, name)
            if value != EngineSettings.model_fields[name].default:
                argv += vllm_args.to_argv(name, value)
        for name, value in self.engine_args.items():
            argv += vllm_args.to_argv(name, value)
        return argv


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


def known_names() -> list[str]:
    """Every name `model_metadata.engine` and `TRUSS_LLM_ENGINE_*` accept."""
    return [*OWN_SETTINGS, *vllm_args.SERVING_OPTIONS, *vllm_args.engine_actions()]


def parse_settings(raw: Mapping[str, Any], where: Callable[[str], str]) -> dict[str, Any]:
    """Check the names of one source and parse its values as `vllm serve` parses its flags;
    `where(key)` names a key in errors (its config path or environment variable)."""
    engine, serving = vllm_args.engine_actions(), vllm_args.serving_actions()
    parsed: dict[str, Any] = {}
    for key, value in raw.items():
        name = vllm_args.normalize(str(key))
        if name in parsed:
            raise vllm_args.EngineArgError(f"{where(key)}: set twice (dashes and underscores "
                                           "name the same setting).")
        if name in OWN_SETTINGS:
            parsed[name] = value  # typed by EngineSettings
        elif name in serving:
            parsed[name] = vllm_args.parse_value(serving[name], value, where(key))
        elif name in engine:
            parsed[name] = vllm_args.parse_value(engine[name], value, where(key))
        else:
            raise vllm_args.unknown_name_error(name, known_names(), where(key))
    return parsed


def configured_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """`model_metadata.engine` (and `lora_adapters`) of a truss config, checked and parsed:
    what the offline config test calls to refuse a config before it is deployed."""
    metadata = config.get("model_metadata") or {}
    section = metadata.get("engine") or {}
    if not isinstance(section, Mapping):
        raise vllm_args.EngineArgError(f"{CONFIG_SECTION} must be a mapping of settings.")
    parsed = parse_settings(section, lambda key: f"{CONFIG_SECTION}.{key}")
    if metadata.get("lora_adapters"):
        parsed["lora_adapters"] = metadata["lora_adapters"]
    _check_parser_names(parsed, lambda name: f"{CONFIG_SECTION}.{name}")
    return parsed


def environment_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    raw = {key[len(ENV_PREFIX):]: value for key, value in environ.items()
           if key.startswith(ENV_PREFIX)}
    parsed = parse_settings(raw, lambda key: f"{ENV_PREFIX}{key}")
    _check_parser_names(parsed, lambda name: f"{ENV_PREFIX}{name.upper()}")
    return parsed


def _check_parser_names(values: Mapping[str, Any], where: Callable[[str], str]) -> None:
    """A misspelt parser would otherwise fail only when the engine starts."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    for name, manager in (("tool_call_parser", ToolParserManager),
                          ("reasoning_parser", ReasoningParserManager)):
        chosen = values.get(name)
        if chosen and chosen not in manager.list_registered():
            raise vllm_args.unknown_choice_error(name, chosen, manager.list_registered(),
                                                 where(name))


def resolve_settings(
    config: Mapping[str, Any],
    data_dir: Path,
    environ: Mapping[str, str] | None = None,
    has_gpu: bool | None = None,
) -> EngineSettings:
    """Build the settings from a truss config (as a dict), the data dir and the environment."""
    environ = os.environ if environ is None else environ
    has_gpu = gpu_available() if has_gpu is None else has_gpu
    configured = configured_settings(config)
    overrides = environment_settings(environ)
    accelerator = (config.get("resources") or {}).get("accelerator")
    derived: dict[str, Any] = {"tensor_parallel_size": accelerator_count(accelerator)}

    model_path = overrides.get("model_path", configured.get("model_path"))
    if has_gpu:
        derived["device"] = "gpu"
        if not _has_weights(model_path):
            raise FileNotFoundError(
                f"No model weights at {model_path!r} (no config.json). Check `weights:` in "
                "config.yaml and `model_metadata.engine.model_path`, which must match its "
                "mount_location.")
        values = {**derived, **configured}
    else:
        derived["device"] = "cpu"
        profile = parse_settings(CPU_PROFILE, lambda key: f"CPU_PROFILE.{key}")
        if _has_weights(model_path):
            values = {**derived, **profile, **configured}
        else:
            tiny = data_dir / TINY_MODEL_DIR
            logger.info("No GPU and no weights at %s: serving the bundled tiny model %s",
                        model_path, tiny)
            values = {**derived, **configured, **profile,
                      "model_path": str(tiny), "served_model_name": TINY_MODEL_NAME}
            values.pop("lora_adapters", None)  # they adapt the configured model, not this one
    values.update(overrides)
    return build_settings(values)


def build_settings(values: Mapping[str, Any]) -> EngineSettings:
    """Parsed values -> settings: ours and the serving options as fields, the rest as
    `AsyncEngineArgs` keyword arguments."""
    fields = {name: value for name, value in values.items()
              if name in EngineSettings.model_fields}
    engine_args = {name: value for name, value in values.items()
                   if name not in EngineSettings.model_fields}
    return EngineSettings.model_validate({**fields, "engine_args": engine_args})
