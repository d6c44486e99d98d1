"""Where the chain's model lives, and the numbers that bound a run.

Two profiles, the way `truss_llm.settings` picks the engine's: deployed, the chain serves
the model of config.yaml (Qwen2.5-7B-Instruct, 32,768 tokens of context) and reads its
tokenizer from the weights Baseten mounts into the splitter; on a machine where that
mount is absent and `data/tiny-chat` sits beside this folder (a checkout: `run_local`,
tests, benchmarks) it uses the tiny model and its 512-token context. Variables
`TRUSS_LLM_CHAIN_<FIELD>` override either (e.g. `TRUSS_LLM_CHAIN_CONTEXT_TOKENS=1024`).

`TRUSS_LLM_CHAIN_MODEL_URL`, read when the chain is pushed, chooses how the chainlets reach
the model: unset (the default), the chain deploys this repository's truss beside itself as
a `chains.TrussChainlet`; set, they call that existing deployment's OpenAI base URL.
"""

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

ENV_PREFIX = "TRUSS_LLM_CHAIN_"
MODEL_URL_ENV = f"{ENV_PREFIX}MODEL_URL"
API_KEY_ENV = f"{ENV_PREFIX}API_KEY"

# Baseten's limits: a sync predict is cut at 1200 s (then 504), an async attempt at 3600 s.
SYNC_BUDGET_S = 1200.0
ASYNC_BUDGET_S = 3600.0
# The run ends this long before its budget, so the answer (or the error) still reaches the
# caller before the ingress gives up on it; a twentieth of short test deadlines.
DEADLINE_MARGIN_S = 10.0
DEADLINE_MARGIN_FRACTION = 0.05
# Of what is left when the map starts, the reduce keeps this share for itself: a map that
# runs out of time is stopped early enough for the chunks it did map to be merged.
REDUCE_RESERVE_FRACTION = 0.15

# The deployed model: config.yaml's `weights[0].source` and `model_metadata.engine`
# (tests/test_chain_units.py checks that they agree).
DEPLOYED_MODEL_NAME = "Qwen/Qwen2.5-7B-Instruct"
DEPLOYED_CONTEXT_TOKENS = 32768
DEPLOYED_WEIGHTS_SOURCE = "hf://Qwen/Qwen2.5-7B-Instruct@main"
DEPLOYED_TOKENIZER_DIR = "/app/model_weights/tokenizer"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]

# A checkout: the tiny model the local runner serves on a CPU.
LOCAL_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "tiny-chat"
LOCAL_MODEL_NAME = "tiny-chat"
LOCAL_CONTEXT_TOKENS = 512
LOCAL_MODEL_URL = "http://127.0.0.1:8080/environments/production/sync/v1"


class ChainSettings(BaseModel):
    """The model the chain talks to, as the chainlets see it at run time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field(description="The `model` field of every chat request.")
    context_tokens: int = Field(gt=0, description="The model's context (max_model_len).")
    tokenizer: str = Field(description="tokenizer.json, or a directory holding one.")
    model_url: str | None = Field(
        default=None, description="OpenAI base URL of an existing deployment; None: the "
        "truss deployed with the chain.")
    api_key: str | None = Field(default=None, description="Key for model_url, if any.")

    @property
    def tokenizer_file(self) -> Path:
        path = Path(self.tokenizer)
        return path / "tokenizer.json" if path.is_dir() else path


def _profile() -> dict[str, object]:
    deployed = Path(DEPLOYED_TOKENIZER_DIR)
    if not deployed.exists() and (LOCAL_MODEL_DIR / "tokenizer.json").exists():
        return {"model_name": LOCAL_MODEL_NAME, "context_tokens": LOCAL_CONTEXT_TOKENS,
                "tokenizer": str(LOCAL_MODEL_DIR)}
    return {"model_name": DEPLOYED_MODEL_NAME, "context_tokens": DEPLOYED_CONTEXT_TOKENS,
            "tokenizer": DEPLOYED_TOKENIZER_DIR}


def chain_settings(environ: dict[str, str] | None = None) -> ChainSettings:
    """The profile for this machine, then `TRUSS_LLM_CHAIN_*` variables."""
    environ = dict(os.environ) if environ is None else environ
    values = _profile()
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX) and value:
            name = key[len(ENV_PREFIX):].lower()
            if name not in ChainSettings.model_fields:
                raise ValueError(f"{key}: no chain setting named {name!r}; known: "
                                 f"{', '.join(sorted(ChainSettings.model_fields))}")
            values[name] = value
    return ChainSettings.model_validate(values)


# Read once, when the chain's module is imported: at push time this decides which
# chainlets exist; deployed, the same value arrives through the chainlets' environment.
MODEL_URL: str | None = os.environ.get(MODEL_URL_ENV) or None
