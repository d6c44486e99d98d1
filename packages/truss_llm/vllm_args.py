"""`vllm serve`'s own argument definitions, used to read and check `model_metadata.engine`.

`vllm serve` builds its flags from vLLM's config dataclasses (`AsyncEngineArgs` for the
engine, `FrontendArgs` for the HTTP layer), and `vllm serve --config file.yaml` reads YAML keys
as those flags. We read config.yaml's engine section the same way: each key is a flag's name
(dashes or underscores) and each value goes through that flag's own argparse parser, so the
names, the value types and the errors are the ones `vllm serve` documents, and a new vLLM
version brings its new arguments without an edit here. This module imports vLLM, so it is
imported only where vLLM is installed (the model and the tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
from collections.abc import Iterable
from typing import Any

# The serving-layer options of `vllm serve` (not engine arguments) that our OpenAI surface
# hands to vLLM's serving classes. The server options (host, port, TLS, CORS, API keys...)
# belong to the truss server and Baseten, not to this package.
SERVING_OPTIONS = (
    "chat_template",
    "chat_template_content_format",
    "default_chat_template_kwargs",
    "response_role",
    "tool_call_parser",
    "enable_auto_tool_choice",
)
# Engine arguments that this package sets itself from other settings.
SET_BY_US = {
    "model": "model_path",
    "served_model_name": "served_model_name",
}
# `vllm serve` options that have another home here.
ELSEWHERE = {
    "lora_modules": "list adapters under `model_metadata.lora_adapters` ({name, path})",
    "host": "the truss server binds its own address",
    "port": "the truss server chooses its own port",
    "api_key": "Baseten authenticates requests before they reach the model",
}
_TRUE = ("true", "1", "yes", "on")
MAX_CHOICES_SHOWN = 6  # in the README's table
_FALSE = ("false", "0", "no", "off")


class EngineArgError(ValueError):
    """A setting that `vllm serve` would refuse, explained for config.yaml."""


@functools.cache
def _parser() -> argparse.ArgumentParser:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(exit_on_error=False, add_help=False))


@functools.cache
def engine_actions() -> dict[str, argparse.Action]:
    """Every `AsyncEngineArgs` field that `vllm serve` has a flag for, by field name."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    fields = {field.name for field in dataclasses.fields(AsyncEngineArgs)}
    return {action.dest: action for action in _parser()._actions
            if action.option_strings and action.dest in fields
            and action.dest not in SET_BY_US}


@functools.cache
def serving_actions() -> dict[str, argparse.Action]:
    actions = {action.dest: action for action in _parser()._actions if action.option_strings}
    return {name: actions[name] for name in SERVING_OPTIONS}


def flag(action: argparse.Action) -> str:
    return next(s for s in action.option_strings if s.startswith("--"))


def normalize(name: str) -> str:
    """`max-model-len` and `max_model_len` are the same setting, as on the command line."""
    return name.strip().lstrip("-").replace("-", "_").lower()


def unknown_name_error(name: str, known: Iterable[str], where: str) -> EngineArgError:
    if name in ELSEWHERE:
        return EngineArgError(f"{where}: `{name}` is not set here: {ELSEWHERE[name]}.")
    if name in SET_BY_US:
        return EngineArgError(f"{where}: set `{SET_BY_US[name]}` instead of `{name}`.")
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return EngineArgError(
        f"{where}: `{name}` is neither a vLLM engine argument nor a setting of this "
        f"package.{hint} The README lists everything that can be set.")


def unknown_choice_error(name: str, value: str, choices: Iterable[str], where: str = ""
                         ) -> EngineArgError:
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return EngineArgError(f"{where or name}: vLLM has no {name} `{value}`.{hint} Known: "
                          f"{', '.join(choices)}.")


def _is_bool_flag(action: argparse.Action) -> bool:
    return action.nargs == 0


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise EngineArgError(f"{where}: expected true or false, got {value!r}.")


def _as_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def _argv(action: argparse.Action, value: Any, where: str) -> list[str]:
    """The command line `vllm serve --config` would make of this YAML value."""
    name = flag(action)
    if _is_bool_flag(action):
        if _as_bool(value, where):
            return [name]
        negative = f"--no-{name[2:]}"
        return [negative] if negative in action.option_strings else []
    if action.nargs == "?" and isinstance(value, bool):  # a flag that may carry a value
        return [name] if value else []
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = [item for item in value.split(",") if item]
        items = value if isinstance(value, list) else [value]
        return [name, *(_as_text(item) for item in items)]
    return [name, _as_text(value)]


def parse_value(action: argparse.Action, value: Any, where: str) -> Any:
    """`value` (from YAML, or a string from the environment) as `vllm serve` parses it."""
    if value is None:  # null: vLLM's default
        return action.default
    argv = _argv(action, value, where)
    if not argv:
        return action.default if not _is_bool_flag(action) else False
    try:
        namespace, extra = _parser().parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise EngineArgError(f"{where}: {value!r} is not valid for `vllm serve "
                             f"{flag(action)}` ({exc.message}).") from None
    if extra or getattr(namespace, "model_tag", None) is not None:
        raise EngineArgError(f"{where}: {value!r} is not valid for `vllm serve "
                             f"{flag(action)}`.")
    return getattr(namespace, action.dest)


def to_argv(name: str, value: Any) -> list[str]:
    """The `vllm serve` flags for one parsed setting (the inverse of `parse_value`)."""
    action = engine_actions().get(name) or serving_actions()[name]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        import pydantic

        value = pydantic.TypeAdapter(type(value)).dump_python(
            value, mode="json", exclude_defaults=True)
    return _argv(action, value, name)


def describe_type(action: argparse.Action) -> str:
    """What a value of this flag looks like, for the README's table."""
    if _is_bool_flag(action):
        return "bool"
    if action.choices:
        return _one_of([c for c in action.choices if c is not None])
    if action.metavar and "{" in str(action.metavar):
        return _one_of(str(action.metavar).strip("{}").split(","))
    type_name = getattr(action.type, "__name__", "")
    if type_name == "parse_dataclass":
        kind = "object (JSON)"
    elif type_name == "union_dict_and_str":
        kind = "object or string"
    else:
        kind = _probe_kind(action)
    if action.nargs in ("+", "*"):
        return f"list of {kind}"
    if action.nargs == "?":
        return f"bool or {kind}"
    return kind


def _one_of(choices: list[Any]) -> str:
    shown = ", ".join(f"`{choice}`" for choice in choices[:MAX_CHOICES_SHOWN])
    more = f", ... ({len(choices)} in all)" if len(choices) > MAX_CHOICES_SHOWN else ""
    return f"one of {shown}{more}"


def _probe_kind(action: argparse.Action) -> str:
    """Converters such as `optional_type(int)` hide their target: probe with samples."""
    for sample, kind, expected in (("{}", "object (JSON)", dict), ("1", "int", int),
                                   ("0.5", "float", float)):
        try:
            parsed = action.type(sample) if action.type else sample
        except Exception:
            continue
        if type(parsed) is expected:
            return kind
    return "str"
