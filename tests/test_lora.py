"""LoRA adapters: listed with their parent, picked by `model`, and really applied.

One server of its own (module scope) serves the tiny model with the tiny adapter that
tools/make_tiny_lora.py builds into data/tiny-chat-lora. The adapter's greedy output must
differ from the base model's and match, token for token, a reference computed here with
transformers + peft. Both run in float32 (the CPU profile's dtype) on the same weights, so
their logits agree to rounding; a step whose top two reference logits are closer than
MIN_MARGIN could still flip, so the comparison stops before the first such step and at
least MIN_COMPARED tokens must be compared.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import (
    MODEL_NAME,
    REPO,
    TINY_MODEL,
    Server,
    start_server,
    stop_server_soon,
)
from openai import OpenAI
from truss_llm import lora
from truss_llm.engine import engine_args
from truss_llm.settings import resolve_settings

ADAPTER = "tiny-chat-lora"
ADAPTER_DIR = REPO / "data" / "tiny-chat-lora"
PROMPT = "<|im_start|>user\nHello! What is the weather like in Paris today?<|im_end|>\n" \
         "<|im_start|>assistant\n"
GENERATED = 24
MIN_MARGIN = 1e-3  # logits closer than this may order differently across two fp32 engines
MIN_COMPARED = 16


# -- settings (no server) -----------------------------------------------------------------

def test_listed_adapters_turn_lora_on_sized_for_them(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    config = {"model_metadata": {
        "engine": {"model_path": str(weights), "served_model_name": "base"},
        "lora_adapters": [{"name": ADAPTER, "path": str(ADAPTER_DIR)}]}}
    settings = resolve_settings(config, REPO / "data", environ={}, has_gpu=True)
    assert settings.lora_adapters == [lora.LoraAdapter(name=ADAPTER, path=str(ADAPTER_DIR))]
    args = engine_args(settings)
    # rank 8 adapter, one of them: LoRA on, one slot, vLLM's smallest rank that holds 8
    assert (args.enable_lora, args.max_loras, args.max_lora_rank) == (True, 1, 8)
    assert lora.engine_defaults([]) == {}
    # An explicit engine value wins over what the adapters need.
    config["model_metadata"]["engine"].update(max_lora_rank=16, max_loras=4)
    args = engine_args(resolve_settings(config, REPO / "data", environ={}, has_gpu=True))
    assert (args.enable_lora, args.max_loras, args.max_lora_rank) == (True, 4, 16)


def test_adapters_from_the_environment_and_the_cpu_fallback() -> None:
    env = {"TRUSS_LLM_ENGINE_LORA_ADAPTERS": f"a={ADAPTER_DIR},b={ADAPTER_DIR}"}
    settings = resolve_settings({}, REPO / "data", environ=env, has_gpu=False)
    assert [adapter.name for adapter in settings.lora_adapters] == ["a", "b"]
    assert engine_args(settings).max_loras == 2
    # Adapters configured for the GPU model do not apply to the bundled tiny model.
    configured = {"model_metadata": {"lora_adapters": [{"name": "a", "path": "/nowhere"}]}}
    assert resolve_settings(configured, REPO / "data", environ={},
                            has_gpu=False).lora_adapters == []


def test_an_adapter_without_its_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="LoRA adapter 'gone'"):
        lora.engine_defaults([lora.LoraAdapter(name="gone", path=str(tmp_path))])


# -- served -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("lora-server") / "server.log"
    server = start_server(log_path, extra_env={
        "TRUSS_LLM_ENGINE_LORA_ADAPTERS": f"{ADAPTER}={ADAPTER_DIR}"})
    yield server
    stop_server_soon(server)


@pytest.fixture(scope="module")
def lora_client(lora_server: Server) -> OpenAI:
    return OpenAI(base_url=f"{lora_server.base_url}/v1", api_key="local", max_retries=0,
                  timeout=300)


def test_models_list_the_adapter_with_its_parent(lora_server: Server) -> None:
    for path in ("/v1/models", "/environments/production/sync/v1/models"):
        cards = {card["id"]: card for card in httpx.get(
            f"{lora_server.base_url}{path}", timeout=60).json()["data"]}
        assert set(cards) == {MODEL_NAME, ADAPTER}
        assert cards[ADAPTER]["parent"] == MODEL_NAME and cards[MODEL_NAME]["parent"] is None


def reference(prompt_ids: list[int], adapter: bool) -> tuple[list[int], list[float]]:
    """Greedy token ids from transformers (+ peft), and each step's top-two logit margin."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, ADAPTER_DIR)
    model.eval()
    ids, margins = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(GENERATED):
            logits = model(torch.tensor([ids])).logits[0, -1]
            top = logits.topk(2)
            margins.append(float(top.values[0] - top.values[1]))
            ids.append(int(top.indices[0]))
    return ids[len(prompt_ids):], margins


def served(client: OpenAI, model: str, prompt_ids: list[int]) -> list[int]:
    completion = client.completions.create(
        model=model, prompt=prompt_ids, max_tokens=GENERATED, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True})
    assert completion.model == model
    return completion.choices[0].token_ids


@pytest.fixture(scope="module")
def prompt_ids() -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL)(PROMPT)["input_ids"]


def test_adapter_output_differs_from_the_base_and_matches_peft(
        lora_client: OpenAI, prompt_ids: list[int]) -> None:
    base, through_adapter = (served(lora_client, name, prompt_ids)
                             for name in (MODEL_NAME, ADAPTER))
    assert base != through_adapter
    for ids, adapter in ((through_adapter, True), (base, False)):
        expected, margins = reference(prompt_ids, adapter)
        close = [step for step, margin in enumerate(margins) if margin < MIN_MARGIN]
        compared = close[0] if close else GENERATED
        assert compared >= MIN_COMPARED, f"reference too close to a tie: {margins}"
        assert ids[:compared] == expected[:compared]


def test_other_apis_pick_the_adapter_by_model(lora_server: Server) -> None:
    base = lora_server.base_url
    chat = httpx.post(f"{base}/environments/production/sync/v1/chat/completions", timeout=300,
                      json={"model": ADAPTER, "max_tokens": 2,
                            "messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 200 and chat.json()["model"] == ADAPTER
    response = httpx.post(f"{base}/v1/responses", timeout=300,
                          json={"model": ADAPTER, "input": "Hi", "max_output_tokens": 2})
    assert response.status_code == 200 and response.json()["model"] == ADAPTER
    message = httpx.post(f"{base}/v1/messages", timeout=300, json={
        "model": ADAPTER, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
    assert message.status_code == 200 and message.json()["model"] == ADAPTER
