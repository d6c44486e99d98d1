"""Settings resolution, without an engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from truss_llm.settings import CPU_PROFILE, TINY_MODEL_NAME, accelerator_count, resolve_settings

GPU_CONFIG = {
    "resources": {"accelerator": "H100:4"},
    "model_metadata": {"engine": {"model_path": "/weights/qwen", "served_model_name": "qwen",
                                  "max_model_len": 32768, "tool_call_parser": "hermes"}},
}


def weights(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def with_model_path(path: Path) -> dict:
    engine = {**GPU_CONFIG["model_metadata"]["engine"], "model_path": str(path)}
    return {**GPU_CONFIG, "model_metadata": {"engine": engine}}


def test_cpu_without_weights_serves_the_tiny_model(tmp_path: Path) -> None:
    settings = resolve_settings(GPU_CONFIG, tmp_path / "data", environ={}, has_gpu=False)
    assert settings.device == "cpu"
    assert settings.model_path == str(tmp_path / "data" / "tiny-chat")
    assert settings.served_model_name == TINY_MODEL_NAME
    assert settings.kv_cache_memory_bytes == CPU_PROFILE["kv_cache_memory_bytes"]
    assert settings.tensor_parallel_size == 1
    assert settings.tool_call_parser == "hermes"


def test_gpu_takes_config_and_tensor_parallelism_from_the_accelerator(tmp_path: Path) -> None:
    settings = resolve_settings(with_model_path(weights(tmp_path)), tmp_path, environ={},
                                has_gpu=True)
    assert settings.device == "gpu"
    assert settings.tensor_parallel_size == 4
    assert settings.max_model_len == 32768
    assert settings.served_model_name == "qwen"
    assert settings.kv_cache_memory_bytes is None


def test_gpu_without_weights_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="weights"):
        resolve_settings(GPU_CONFIG, tmp_path, environ={}, has_gpu=True)


def test_environment_overrides_win(tmp_path: Path) -> None:
    env = {"TRUSS_LLM_ENGINE_MAX_MODEL_LEN": "1024",
           "TRUSS_LLM_ENGINE_TOOL_CALL_PARSER": "llama3_json"}
    settings = resolve_settings(GPU_CONFIG, tmp_path, environ=env, has_gpu=False)
    assert settings.max_model_len == 1024
    assert settings.tool_call_parser == "llama3_json"


def test_unknown_environment_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="TRUSS_LLM_ENGINE_MAX_LEN"):
        resolve_settings(GPU_CONFIG, tmp_path, environ={"TRUSS_LLM_ENGINE_MAX_LEN": "9"},
                         has_gpu=False)


@pytest.mark.parametrize(("accelerator", "count"),
                         [(None, 1), ("H100", 1), ("H100:4", 4), ("A10G:2", 2)])
def test_accelerator_count(accelerator: str | None, count: int) -> None:
    assert accelerator_count(accelerator) == count
