"""LoRA adapters listed in config.yaml, served under their own names beside the base model.

`model_metadata.lora_adapters: [{name, path}]`, each path a directory in peft's format
(`adapter_config.json` and the weights) mounted like the base weights. vLLM does the
serving: the adapters are loaded at start-up, listed by `/v1/models` with their `parent`,
and a request whose `model` names one generates through it. Listing adapters turns LoRA on
in the engine, sized for them (slots for all of them in one batch, the smallest rank vLLM
accepts that holds the largest); an explicit engine value always wins.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from vllm.entrypoints.openai.models.protocol import LoRAModulePath

ADAPTER_CONFIG = "adapter_config.json"
# The ranks vLLM's `max_lora_rank` accepts (vllm.config.lora.MaxLoRARanks in 0.32).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class LoraAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="The `model` a request sends to use it.")
    path: str = Field(min_length=1, description="Directory holding adapter_config.json.")


def parse_adapters(value: Any) -> Any:
    """Also accept the environment's spelling: JSON, or `name=path,name2=path2`."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    adapters = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"lora adapter {item!r}: expected name=path")
        adapters.append({"name": name.strip(), "path": path.strip()})
    return adapters


def adapter_rank(adapter: LoraAdapter) -> int:
    """The largest rank in the adapter's config (peft's `r` and any per-module `rank_pattern`)."""
    config_path = Path(adapter.path) / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"LoRA adapter {adapter.name!r}: no readable {ADAPTER_CONFIG} at {adapter.path!r} "
            f"({exc}). Check `model_metadata.lora_adapters` and the adapter's mount.") from None
    return max([int(config.get("r", 0)), *map(int, (config.get("rank_pattern") or {}).values())])


def engine_defaults(adapters: list[LoraAdapter]) -> dict[str, Any]:
    """Engine arguments that serve `adapters`; none without adapters."""
    if not adapters:
        return {}
    rank = max(adapter_rank(adapter) for adapter in adapters)
    fitting = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
    if fitting is None:
        raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest ({VLLM_LORA_RANKS[-1]}).")
    return {"enable_lora": True, "max_loras": len(adapters), "max_lora_rank": fitting}


def module_paths(adapters: list[LoraAdapter], base_model_name: str) -> list[LoRAModulePath]:
    from vllm.entrypoints.openai.models.protocol import LoRAModulePath

    return [LoRAModulePath(name=adapter.name, path=adapter.path,
                           base_model_name=base_model_name) for adapter in adapters]
