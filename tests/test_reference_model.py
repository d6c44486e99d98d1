"""The served model is the real one: greedy tokens through the server equal `transformers`."""

from __future__ import annotations

import httpx
import torch
from conftest import MODEL_NAME, TINY_MODEL
from transformers import AutoModelForCausalLM, AutoTokenizer

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tell me about the weather in Paris."}]


def test_greedy_tokens_match_transformers(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 32, "temperature": 0,
        "return_token_ids": True, "ignore_eos": True})
    assert response.status_code == 200, response.text
    body = response.json()
    served = body["choices"][0]["token_ids"]

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    assert body["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1]
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=32, min_new_tokens=32,
                                do_sample=False)
    reference = output[0, inputs["input_ids"].shape[1]:].tolist()
    assert served == reference
