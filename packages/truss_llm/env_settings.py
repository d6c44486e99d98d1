"""Settings from `PREFIX_<FIELD>` environment variables, one way for every settings object.

A deployment or a test changes one value without editing config.yaml. A variable with the
prefix but no matching field is an error naming the known ones: a typo must not be ignored.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping


def prefixed_values(environ: Mapping[str, str], prefix: str, fields: Collection[str],
                    what: str, lists: Collection[str] = ()) -> dict[str, str | list[str]]:
    """`PREFIX_MAX_MODEL_LEN=1024` -> {"max_model_len": "1024"}; fields in `lists` are
    comma-separated (empty items dropped). `what` names the settings in the error."""
    values: dict[str, str | list[str]] = {}
    for key, value in environ.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):].lower()
        if name not in fields:
            raise ValueError(f"{key}: no {what} setting named {name!r}; known: "
                             f"{', '.join(sorted(fields))}")
        values[name] = [item for item in value.split(",") if item] if name in lists else value
    return values
