"""Baseten's route table: which deployment a path targets and what it asks for.

`/{production|development|environments/{env}|deployment/{id}}/{action}` plus the regional
forms without a target. Only the parsing lives here, so the table can be read in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from truss_llm.runner.settings import RunnerSettings

_TARGETED = re.compile(
    r"^/(?:(?P<alias>production|development)|environments/(?P<env>[^/]+)"
    r"|deployment/(?P<deployment>[^/]+))(?P<action>/.*)?$")

# action -> allowed method
ACTIONS = {
    "/predict": "POST",
    "/async_predict": "POST",
    "/async_queue_status": "GET",
    "/wake": "POST",
}
REGIONAL = {"/async_queue_status": "GET", "/wake": "POST", "/async_predict": "POST",
            "/predict": "POST"}
SYNC_PREFIX = "/sync"


@dataclass(frozen=True)
class Target:
    kind: str  # "environment" | "development" | "deployment"
    name: str

    def describe(self) -> str:
        return {"environment": f"environments/{self.name}", "development": "development",
                "deployment": f"deployment/{self.name}"}[self.kind]


@dataclass(frozen=True)
class Match:
    target: Target | None  # None: a regional route
    action: str            # "/predict", "/sync/v1/chat/completions", ...


class UnknownTarget(Exception):
    pass


def match(path: str) -> Match | None:
    """Parse a Baseten path; None when it is not one (truss's own routes, say)."""
    found = _TARGETED.match(path)
    if found is None:
        if path in REGIONAL:
            return Match(None, path)
        return None
    if found["alias"] == "production":
        target = Target("environment", "production")
    elif found["alias"] == "development":
        target = Target("development", "development")
    elif found["env"] is not None:
        target = Target("environment", found["env"])
    else:
        target = Target("deployment", found["deployment"])
    return Match(target, found["action"] or "")


def known_targets(settings: RunnerSettings) -> list[str]:
    names = [f"environments/{env}" for env in settings.environments]
    if "production" in settings.environments:
        names.insert(0, "production")
    if settings.development:
        names.append("development")
    names.append(f"deployment/{settings.deployment_id}")
    return names


def check_target(target: Target, settings: RunnerSettings) -> None:
    exists = {
        "environment": target.name in settings.environments,
        "development": settings.development,
        "deployment": target.name == settings.deployment_id,
    }[target.kind]
    if not exists:
        raise UnknownTarget(
            f"No deployment at '{target.describe()}'. This runner serves: "
            f"{', '.join(known_targets(settings))}.")
