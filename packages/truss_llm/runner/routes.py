"""Baseten's route table: which deployment a path targets and what it asks for, and which of
the truss app's own routes reach the model.

`/{production|development|environments/{env}|deployment/{id}}/{action}` plus the regional
forms without a target. Only the parsing lives here, so the table can be read in one place.

OpenAI-style paths: `.../sync/v1/<path>` is forwarded to the truss app's `/v1/<path>`, so a
new one (say `/v1/responses`, once the model has a `responses` method) needs no routing code;
list it in `TRUSS_OPENAI_PATHS` so that the same path called on the truss app directly is
counted as model work and answers errors in OpenAI's shape.
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

# The truss app's routes that run the model (a method of model.py), by path: POST only.
TRUSS_PREDICT = "/v1/models/model:predict"
TRUSS_OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                "/v1/messages", "/v1/responses"})
_TRUSS_PREDICT_ROUTES = re.compile(r"^/v1/models/[^/]+:predict(?:_binary)?$|^/invocations$")


@dataclass(frozen=True)
class Deployment:
    """What a targeted path names: an environment, the development deployment, or one
    deployment by id."""

    kind: str  # "environment" | "development" | "deployment"
    name: str

    def describe(self) -> str:
        return {"environment": f"environments/{self.name}", "development": "development",
                "deployment": f"deployment/{self.name}"}[self.kind]


@dataclass(frozen=True)
class Match:
    deployment: Deployment | None  # None: a regional route
    action: str            # "/predict", "/sync/v1/chat/completions", ...


class UnknownDeployment(Exception):
    pass


def match(path: str) -> Match | None:
    """Parse a Baseten path; None when it is not one (truss's own routes, say)."""
    found = _TARGETED.match(path)
    if found is None:
        if path in REGIONAL:
            return Match(None, path)
        return None
    if found["alias"] == "production":
        deployment = Deployment("environment", "production")
    elif found["alias"] == "development":
        deployment = Deployment("development", "development")
    elif found["env"] is not None:
        deployment = Deployment("environment", found["env"])
    else:
        deployment = Deployment("deployment", found["deployment"])
    return Match(deployment, found["action"] or "")


def reaches_model(path: str, method: str) -> bool:
    """Whether a call to the truss app runs the model (as against readiness, metrics...)."""
    return method == "POST" and (path in TRUSS_OPENAI_PATHS
                                 or _TRUSS_PREDICT_ROUTES.match(path) is not None)


def is_openai_path(path: str) -> bool:
    """A truss path whose errors take OpenAI's shape (predict answers in Baseten's)."""
    return path in TRUSS_OPENAI_PATHS


def known_deployments(settings: RunnerSettings) -> list[str]:
    names = [f"environments/{env}" for env in settings.environments]
    if "production" in settings.environments:
        names.insert(0, "production")
    if settings.development:
        names.append("development")
    names.append(f"deployment/{settings.deployment_id}")
    return names


def check_deployment(deployment: Deployment, settings: RunnerSettings) -> None:
    exists = {
        "environment": deployment.name in settings.environments,
        "development": settings.development,
        "deployment": deployment.name == settings.deployment_id,
    }[deployment.kind]
    if not exists:
        raise UnknownDeployment(
            f"No deployment at '{deployment.describe()}'. This runner serves: "
            f"{', '.join(known_deployments(settings))}.")
