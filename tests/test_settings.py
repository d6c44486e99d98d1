"""Settings resolution, without an engine: names and values checked by vLLM's own parser."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from truss_llm.settings import (
    CPU_PROFILE,
    TINY_MODEL_NAME,
    accelerator_count,
    configured_settings,
    known_names,
    resolve_settings,
)
from truss_llm.vllm_args import EngineArgError, engine_actions

GPU_CONFIG = {
    "resources": {"accelerator": "H100:4"},
    "model_metadata": {"engine": {"model_path": "/weights/qwen", "served_model_name": "qwen",
                                  "max_model_len": 32768, "tool_call_parser": "hermes"}},
}


def weights(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def with_engine(path: Path, **engine: object) -> dict:
    section = {**GPU_CONFIG["model_metadata"]["engine"], "model_path": str(path), **engine}
    return {**GPU_CONFIG, "model_metadata": {"engine": section}}


def engine_section(**engine: object) -> dict:
    return {"model_metadata": {"engine": engine}}


def test_cpu_without_weights_serves_the_tiny_model(tmp_path: Path) -> None:
    settings = resolve_settings(GPU_CONFIG, tmp_path / "data", environ={}, has_gpu=False)
    assert settings.device == "cpu"
    assert settings.model_path == str(tmp_path / "data" / "tiny-chat")
    assert settings.served_model_name == TINY_MODEL_NAME
    assert settings.engine_args["kv_cache_memory_bytes"] == CPU_PROFILE["kv_cache_memory_bytes"]
    assert settings.engine_args["tensor_parallel_size"] == 1
    # config.yaml's values are for another model: the profile wins over them
    assert settings.max_model_len == CPU_PROFILE["max_model_len"]
    assert settings.tool_call_parser == "hermes"


def test_cpu_with_weights_keeps_the_configured_values(tmp_path: Path) -> None:
    settings = resolve_settings(with_engine(weights(tmp_path)), tmp_path, environ={},
                                has_gpu=False)
    assert settings.model_path == str(tmp_path)
    assert settings.max_model_len == 32768  # explicit, over the profile's
    assert settings.engine_args["kv_cache_memory_bytes"] == CPU_PROFILE["kv_cache_memory_bytes"]


def test_gpu_takes_config_and_tensor_parallelism_from_the_accelerator(tmp_path: Path) -> None:
    settings = resolve_settings(with_engine(weights(tmp_path)), tmp_path, environ={},
                                has_gpu=True)
    assert settings.device == "gpu"
    assert settings.engine_args["tensor_parallel_size"] == 4
    assert settings.max_model_len == 32768
    assert settings.served_model_name == "qwen"
    assert "kv_cache_memory_bytes" not in settings.engine_args  # vLLM's own default


def test_an_explicit_tensor_parallel_size_wins_over_the_accelerator(tmp_path: Path) -> None:
    config = with_engine(weights(tmp_path), **{"tensor-parallel-size": 2})
    settings = resolve_settings(config, tmp_path, environ={}, has_gpu=True)
    assert settings.engine_args["tensor_parallel_size"] == 2


def test_gpu_without_weights_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="weights"):
        resolve_settings(GPU_CONFIG, tmp_path, environ={}, has_gpu=True)


def test_environment_overrides_win(tmp_path: Path) -> None:
    env = {"TRUSS_LLM_ENGINE_MAX_MODEL_LEN": "1024",
           "TRUSS_LLM_ENGINE_TOOL_CALL_PARSER": "llama3_json"}
    settings = resolve_settings(GPU_CONFIG, tmp_path, environ=env, has_gpu=False)
    assert settings.max_model_len == 1024
    assert settings.tool_call_parser == "llama3_json"


def test_environment_values_are_parsed_with_the_flags_types(tmp_path: Path) -> None:
    env = {"TRUSS_LLM_ENGINE_ENABLE_PREFIX_CACHING": "false",
           "TRUSS_LLM_ENGINE_SPECULATIVE_CONFIG":
               '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}',
           "TRUSS_LLM_ENGINE_MAX_NUM_BATCHED_TOKENS": "8k",
           "TRUSS_LLM_ENGINE_ENABLE_LORA": "1",
           "TRUSS_LLM_ENGINE_MAX_LORA_RANK": "32",
           "TRUSS_LLM_ENGINE_DEFAULT_CHAT_TEMPLATE_KWARGS": '{"enable_thinking": false}'}
    settings = resolve_settings(GPU_CONFIG, tmp_path, environ=env, has_gpu=False)
    args = settings.engine_args
    assert args["enable_prefix_caching"] is False
    assert args["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 3,
                                          "prompt_lookup_max": 4}
    assert args["max_num_batched_tokens"] == 8000  # vLLM's human-readable integers
    assert args["enable_lora"] is True and args["max_lora_rank"] == 32
    assert settings.default_chat_template_kwargs == {"enable_thinking": False}


@pytest.mark.parametrize(("variable", "suggestion"), [
    ("TRUSS_LLM_ENGINE_MAX_LEN", "max_model_len"),
    ("TRUSS_LLM_ENGINE_GPU_MEMORY_UTILISATION", "gpu_memory_utilization"),
])
def test_unknown_environment_setting_is_refused(tmp_path: Path, variable: str,
                                                suggestion: str) -> None:
    with pytest.raises(EngineArgError, match=f"{variable}.*Did you mean `{suggestion}`"):
        resolve_settings(GPU_CONFIG, tmp_path, environ={variable: "9"}, has_gpu=False)


def test_a_bad_environment_value_names_the_variable_and_the_flag(tmp_path: Path) -> None:
    with pytest.raises(EngineArgError, match=r"TRUSS_LLM_ENGINE_MAX_NUM_SEQS.*--max-num-seqs"):
        resolve_settings(GPU_CONFIG, tmp_path, environ={"TRUSS_LLM_ENGINE_MAX_NUM_SEQS": "a"},
                         has_gpu=False)


def test_flags_are_spelt_with_dashes_or_underscores() -> None:
    parsed = configured_settings(engine_section(**{
        "max-num-batched-tokens": 4096, "kv_cache_dtype": "fp8", "trust-remote-code": True,
        "quantization": "awq", "pipeline_parallel_size": 2,
        "limit-mm-per-prompt": {"image": 2, "video": 0}, "reasoning-parser": "deepseek_r1",
        "chat-template": "{{ messages }}", "response_role": "bot",
        "enable-auto-tool-choice": True, "tool-call-parser": "hermes"}))
    assert parsed == {
        "max_num_batched_tokens": 4096, "kv_cache_dtype": "fp8", "trust_remote_code": True,
        "quantization": "awq", "pipeline_parallel_size": 2,
        "limit_mm_per_prompt": {"image": 2, "video": 0}, "reasoning_parser": "deepseek_r1",
        "chat_template": "{{ messages }}", "response_role": "bot",
        "enable_auto_tool_choice": True, "tool_call_parser": "hermes"}


def test_every_engine_argument_of_vllm_serve_can_be_set() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    names = set(known_names())
    fields = {field.name for field in __import__("dataclasses").fields(AsyncEngineArgs)}
    assert len(engine_actions()) > 200
    assert set(engine_actions()) <= fields
    assert {"quantization", "speculative_config", "max_num_batched_tokens", "kv_cache_dtype",
            "trust_remote_code", "limit_mm_per_prompt", "pipeline_parallel_size",
            "enable_lora", "max_loras", "max_lora_rank", "reasoning_parser"} <= names


@pytest.mark.parametrize(("engine", "message"), [
    ({"max_model_lenght": 4096}, r"max_model_lenght.*Did you mean `max_model_len`"),
    ({"max_model_len": "lots"}, r"engine\.max_model_len: 'lots'.*--max-model-len"),
    ({"max_model_len": 1.5}, r"engine\.max_model_len.*--max-model-len"),
    ({"tensor_parallel_size": True}, r"tensor_parallel_size.*--tensor-parallel-size"),
    ({"enforce_eager": "sometimes"}, r"enforce_eager: expected true or false"),
    ({"kv_cache_dtype": "fp7"}, r"kv_cache_dtype.*invalid choice"),
    ({"speculative_config": "{not json"}, r"speculative_config.*--speculative-config"),
    ({"structured_outputs_config": {"backend": "regexes"}}, r"structured_outputs_config"),
    ({"tool_call_parser": "hermess"}, r"tool_call_parser.*Did you mean `hermes`"),
    ({"reasoning_parser": "deepseek-r1"}, r"reasoning_parser.*Did you mean `deepseek_r1`"),
    ({"enable_auto_tool_choice": True, "tool_call_parser": None}, r"needs a tool_call_parser"),
    ({"port": 8000}, r"port.*truss server"),
    ({"lora_modules": ["a=/x"]}, r"lora_adapters"),
    ({"max_model_len": 4096, "max-model-len": 8192}, r"set twice"),
])
def test_a_config_vllm_serve_would_refuse_is_refused_offline(tmp_path: Path, engine: dict,
                                                             message: str) -> None:
    config = with_engine(weights(tmp_path), **engine)
    with pytest.raises(ValueError, match=message):
        resolve_settings(config, tmp_path, environ={}, has_gpu=True)


def test_serve_flags_are_the_same_settings_for_vllm_serve(tmp_path: Path) -> None:
    """The peer benchmark's `vllm serve` gets exactly our settings."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    settings = resolve_settings(GPU_CONFIG, tmp_path, environ={}, has_gpu=False)
    flags = settings.serve_flags()
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(
        [settings.model_path, *shlex.split(shlex.join(flags))])  # through a shell and back
    for name, value in settings.engine_args.items():
        assert getattr(args, name) == value, name
    assert args.tool_call_parser == "hermes" and args.enable_auto_tool_choice


@pytest.mark.parametrize(("accelerator", "count"),
                         [(None, 1), ("H100", 1), ("H100:4", 4), ("A10G:2", 2)])
def test_accelerator_count(accelerator: str | None, count: int) -> None:
    assert accelerator_count(accelerator) == count
