"""The committed tiny model is exactly what the script in the repo builds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO, TINY_MODEL
from transformers import AutoTokenizer


def test_script_rebuilds_the_committed_model_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"), "--out",
                    str(out)], check=True, capture_output=True, timeout=300)
    committed = sorted(p.name for p in TINY_MODEL.iterdir())
    assert sorted(p.name for p in out.iterdir()) == committed
    for name in committed:
        assert (out / name).read_bytes() == (TINY_MODEL / name).read_bytes(), name


def test_chat_template_renders_tools_calls_and_results() -> None:
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=[tool], tokenize=False,
                                         add_generation_prompt=True)
    assert "<tools>" in text and '"get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}' in text
    assert "<tool_response>\n-3 C\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_tokens_to_ids("<tool_call>") != tokenizer.unk_token_id
