"""Write the README's table of engine settings and its `vllm serve` translations.

Both are generated from the code, so they cannot drift: the table from this package's
settings and vLLM's own argument parser (`truss_llm.vllm_args`), the translations from the
configs in `examples/`. tests/test_readme_settings.py fails when the README is stale;
`python tools/write_settings_table.py` rewrites the parts between the markers.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "packages"))

README = REPO / "README.md"
EXAMPLES = REPO / "examples"
TABLE_MARKERS = ("<!-- settings-table:begin (tools/write_settings_table.py) -->",
                 "<!-- settings-table:end -->")
EXAMPLE_MARKERS = ("<!-- serve-examples:begin (tools/write_settings_table.py) -->",
                   "<!-- serve-examples:end -->")
VLLM_DOCS = "https://docs.vllm.ai/en/v0.32.0/configuration/engine_args.html"
MAX_DEFAULT_CHARS = 40
COMMAND_START = "#   vllm serve "
# What this package's own settings stand for on a `vllm serve` command line.
OWN_FLAGS = {"model_path": "the positional model (its mount path)",
             "served_model_name": "`--served-model-name`",
             "lora_adapters": "`--lora-modules` (under `model_metadata`)"}


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _default(value: Any) -> str:
    if value is None or isinstance(value, bool | int | float):
        return f"`{value}`"
    if isinstance(value, str):
        return f"`{value!r}`" if len(value) <= MAX_DEFAULT_CHARS else "(vLLM's)"
    if value in ([], {}):
        return f"`{value}`"
    return "(vLLM's)"


def _profile(name: str, cpu_profile: dict[str, Any]) -> str:
    if name not in cpu_profile:
        return ""
    value = cpu_profile[name]
    return f"`{value}`" if not isinstance(value, dict) else f"`{_cell(value)}`"


def _engine_part(group: str | None) -> str:
    """The vLLM config an engine argument lands in (its parser group)."""
    return f"engine (`{group}`)" if group and group[0].isupper() else "engine"


def settings_table() -> str:
    from truss_llm import vllm_args
    from truss_llm.settings import CPU_PROFILE, OWN_SETTINGS, EngineSettings

    lines = ["| Key | `vllm serve` flag | Type | Default | CPU profile | Where it goes |",
             "|---|---|---|---|---|---|"]
    for name in OWN_SETTINGS:
        field = EngineSettings.model_fields[name]
        default = "required" if field.is_required() else _default(field.get_default(
            call_default_factory=True))
        lines.append(f"| `{name}` | {OWN_FLAGS.get(name, '')} | | {default} | "
                     f"{_profile(name, CPU_PROFILE)} | "
                     f"this package: {_cell(field.description or '')} |")
    for name, action in vllm_args.serving_actions().items():
        lines.append(f"| `{name}` | `{vllm_args.flag(action)}` | "
                     f"{_cell(vllm_args.describe_type(action))} | {_default(action.default)} | "
                     f"{_profile(name, CPU_PROFILE)} | vLLM's serving classes |")
    groups = {action.dest: group.title for group in vllm_args._parser()._action_groups
              for action in group._group_actions}
    for name, action in sorted(vllm_args.engine_actions().items()):
        lines.append(f"| `{name}` | `{vllm_args.flag(action)}` | "
                     f"{_cell(vllm_args.describe_type(action))} | {_default(action.default)} | "
                     f"{_profile(name, CPU_PROFILE)} | {_engine_part(groups.get(name))} |")
    return "\n".join(lines)


def serve_command(example: Path) -> str:
    """The `vllm serve` command line written in the example's header comment."""
    lines, inside = [], False
    for line in example.read_text().splitlines():
        if line.startswith(COMMAND_START):
            inside = True
        if inside:
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("#").strip().rstrip("\\").strip())
            if not line.rstrip().endswith("\\"):
                break
    return " ".join(lines)


def metadata_excerpt(example: Path) -> str:
    """The example's `model_metadata` section, verbatim."""
    text = example.read_text()
    match = re.search(r"^model_metadata:\n(?:[ #].*\n|\n)*", text, flags=re.MULTILINE)
    if match is None:
        raise ValueError(f"{example}: no model_metadata section")
    return match.group(0).rstrip()


def examples_section() -> str:
    parts = []
    for example in sorted(EXAMPLES.glob("*.yaml")):
        title = example.read_text().splitlines()[0].lstrip("# ").strip()
        command = serve_command(example).replace(" --", " \\\n    --")
        parts.append(f"**{title}** ([`examples/{example.name}`](examples/{example.name}))\n\n"
                     f"```bash\n{command}\n```\n\n```yaml\n{metadata_excerpt(example)}\n```")
    return "\n\n".join(parts)


def replace_between(text: str, markers: tuple[str, str], body: str) -> str:
    begin, end = markers
    start, stop = text.index(begin) + len(begin), text.index(end)
    return f"{text[:start]}\n{body}\n{text[stop:]}"


def render(readme: str) -> str:
    readme = replace_between(readme, TABLE_MARKERS, settings_table())
    return replace_between(readme, EXAMPLE_MARKERS, examples_section())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is stale")
    args = parser.parse_args()
    current = README.read_text()
    updated = render(current)
    if args.check:
        sys.exit(0 if updated == current else 1)
    README.write_text(updated)


if __name__ == "__main__":
    main()
