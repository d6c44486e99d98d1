"""config.yaml deploys as it is: truss's own loader and build-context accept it offline."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from truss.base.truss_config import TrussConfig
from truss_llm.settings import configured_settings, resolve_settings


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


# -- `vllm serve` deployments translated to config.yaml (examples/) --------------------------

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def _settings_tool():
    spec = importlib.util.spec_from_file_location(
        "write_settings_table", REPO / "tools" / "write_settings_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hub_to_mount(config: dict) -> dict[str, str]:
    """`hf://org/repo@rev` -> its mount location: a hub id in a flag is that mount here."""
    return {w["source"].removeprefix("hf://").split("@")[0]: w["mount_location"]
            for w in config["weights"]}


def _mounted(value, mounts: dict[str, str]):
    if isinstance(value, str):
        return mounts.get(value, value)
    if isinstance(value, dict):
        return {key: _mounted(item, mounts) for key, item in value.items()}
    return value


def test_there_are_three_example_deployments() -> None:
    names = {path.stem for path in EXAMPLES}
    assert {"quantized-awq", "speculative-decoding", "lora-adapters"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_example_config_is_its_vllm_serve_command_one_flag_for_one_key(example: Path) -> None:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    TrussConfig.from_yaml(example)  # truss deploys it
    config = yaml.safe_load(example.read_text())
    parsed = configured_settings(config)  # our check: names and values, offline
    command = shlex.split(_settings_tool().serve_command(example))
    assert command[:2] == ["vllm", "serve"], command
    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args(command[2:])
    mounts = _hub_to_mount(config)

    assert mounts[args.model_tag] == parsed.pop("model_path")
    assert args.served_model_name == [parsed.pop("served_model_name")]
    adapters = parsed.pop("lora_adapters", [])
    assert [(m.name, mounts.get(m.path, m.path)) for m in args.lora_modules or []] == [
        (a["name"], a["path"]) for a in adapters]
    flags = [token for token in command if token.startswith("--")]
    named = {parser._option_string_actions[flag].dest for flag in flags} - {
        "served_model_name", "lora_modules"}
    assert named == set(parsed), "one flag for one key"
    for name, value in parsed.items():
        assert _mounted(getattr(args, name), mounts) == value, name


def test_readme_settings_table_and_examples_are_current() -> None:
    tool = _settings_tool()
    readme = (REPO / "README.md").read_text()
    assert tool.render(readme) == readme, "stale: run python tools/write_settings_table.py"
