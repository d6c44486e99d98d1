"""config.yaml deploys as it is: truss's own loader and build-context accept it offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO
from truss.base.truss_config import TrussConfig
from truss_llm.settings import resolve_settings


def test_truss_loads_config() -> None:
    config = TrussConfig.from_yaml(REPO / "config.yaml")
    assert config.python_version == "py311"
    assert "vllm==0.32.0" in config.requirements
    assert str(config.resources.accelerator.accelerator.value) == "H100"
    assert config.runtime.predict_concurrency >= 64
    assert config.runtime.streaming_read_timeout >= 300
    assert "hf_access_token" in config.secrets
    engine = config.model_metadata["engine"]
    mounts = [w.mount_location for w in config.weights.root]
    assert engine["model_path"] in mounts
    assert engine["tool_call_parser"]


def test_example_input_is_a_valid_chat_request() -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    example = config["model_metadata"]["example_model_input"]
    ChatCompletionRequest.model_validate(example)


def test_gpu_settings_resolve_from_config(tmp_path: Path) -> None:
    config = TrussConfig.from_yaml(REPO / "config.yaml").to_dict(verbose=True)
    model_path = tmp_path / "weights"
    model_path.mkdir()
    (model_path / "config.json").write_text("{}")
    config["model_metadata"]["engine"]["model_path"] = str(model_path)
    config["resources"]["accelerator"] = "H100:2"
    settings = resolve_settings(config, REPO / "data", environ={}, has_gpu=True)
    assert settings.engine_args["tensor_parallel_size"] == 2
    assert settings.engine_args["structured_outputs_config"].backend == "xgrammar"
    assert settings.enable_auto_tool_choice and settings.tool_call_parser == "hermes"


def test_build_context_works_offline(tmp_path: Path) -> None:
    truss_cli = Path(sys.executable).parent / "truss"
    result = subprocess.run([str(truss_cli), "image", "build-context", str(tmp_path / "ctx"),
                             str(REPO)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    context = tmp_path / "ctx"
    assert (context / "Dockerfile").is_file()
    assert (context / "model" / "model.py").is_file()
    assert (context / "packages" / "truss_llm" / "engine.py").is_file()
    assert (context / "data" / "tiny-chat" / "model.safetensors").is_file()
    requirements = (context / "requirements.txt").read_text()
    assert "vllm==0.32.0" in requirements
    assert not (context / "tests").exists()  # .truss_ignore keeps the image lean
