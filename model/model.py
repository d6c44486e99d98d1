"""Truss entry point: builds the settings and the engine, and routes calls to them.

Every method takes the raw request only (no parsed `inputs`): that makes the truss server
skip its own JSON parsing on all routes, so a malformed body gets an OpenAI-shaped error
from us rather than truss's generic one. Everything else lives in `packages/truss_llm`.
"""

import os
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from truss_llm.anthropic_surface import AnthropicSurface, render_anthropic_error
from truss_llm.budget import budget_settings
from truss_llm.engine import Engine, exit_on_engine_death, schedule_exit
from truss_llm.errors import engine_unavailable, no_embeddings
from truss_llm.media.parts import media_policy
from truss_llm.metrics import register_engine_metrics
from truss_llm.openai_surface import OpenAISurface, render_baseten_error, render_openai_error
from truss_llm.responses_surface import ResponsesSurface
from truss_llm.settings import resolve_settings


class Model:
    def __init__(self, config: dict[str, Any], data_dir: Path, secrets: Any = None,
                 environment: dict[str, Any] | None = None, **_: Any) -> None:
        self._config = config
        self._data_dir = Path(data_dir)
        self._secrets = secrets
        self._engine: Engine | None = None
        self._surface: OpenAISurface | None = None
        self._responses: ResponsesSurface | None = None
        self._anthropic: AnthropicSurface | None = None

    def load(self) -> None:
        token = _secret(self._secrets, "hf_access_token")
        if token:  # only used when model_path names a hub repo instead of mounted weights
            os.environ.setdefault("HF_TOKEN", token)
        settings = resolve_settings(self._config, self._data_dir)
        engine = Engine(settings)
        surface = OpenAISurface(engine, media_policy(self._config), budget_settings(self._config))
        responses, anthropic = ResponsesSurface(surface, engine), AnthropicSurface(surface, engine)
        engine.on_death(self._on_engine_death)
        engine.start()
        register_engine_metrics(engine)
        # Publish only a started engine: `loaded` must not be true halfway through a load.
        self._engine, self._surface = engine, surface
        self._responses, self._anthropic = responses, anthropic

    def unload(self) -> None:
        """Stop the engine and free its memory (the local runner's scale-to-zero)."""
        engine, self._engine, self._surface = self._engine, None, None
        self._responses = self._anthropic = None
        if engine is not None:
            engine.shutdown()

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    @property
    def engine_dead(self) -> bool:
        """A started engine that died (the local runner watches this to restart it)."""
        engine = self._engine
        return engine is not None and not engine.alive

    def _on_engine_death(self) -> None:
        if exit_on_engine_death():
            # As `vllm serve` does: end the process, so that the platform restarts the
            # replica (Baseten would otherwise wait restart_threshold_seconds). Requests in
            # flight meanwhile get a 503 with Retry-After.
            schedule_exit()

    async def is_healthy(self) -> bool:
        return self._engine is not None and await self._engine.is_healthy()

    async def predict(self, request: Request) -> Response:
        if self._surface is None:
            return render_baseten_error(_UNLOADED)
        return await self._surface.predict(request)

    async def chat_completions(self, request: Request) -> Response:
        if self._surface is None:
            return render_openai_error(_UNLOADED)
        return await self._surface.chat_completions(request)

    async def completions(self, request: Request) -> Response:
        if self._surface is None:
            return render_openai_error(_UNLOADED)
        return await self._surface.completions(request)

    async def responses(self, request: Request) -> Response:
        """OpenAI's Responses API (truss routes `/v1/responses` here)."""
        if self._responses is None:
            return render_openai_error(_UNLOADED)
        return await self._responses.responses(request)

    async def messages(self, request: Request) -> Response:
        """Anthropic's Messages API (truss routes `/v1/messages` here)."""
        if self._anthropic is None:
            return render_anthropic_error(_UNLOADED)
        return await self._anthropic.messages(request)

    async def embeddings(self, request: Request) -> Response:
        """`/v1/embeddings` (truss routes it here): a 404 in OpenAI's shape. Without this
        method truss answers `{"error": "<a sentence about its own API>"}`, which the
        OpenAI SDK can only report as "Error code: 404"."""
        return render_openai_error(no_embeddings())

    async def models(self) -> dict[str, Any]:
        """`/v1/models` as `vllm serve` answers it (served by the local runner); empty while
        the model is scaled to zero."""
        surface = self._surface
        return await surface.models() if surface else {"object": "list", "data": []}


_UNLOADED = engine_unavailable("it is scaled to zero or restarting (call /wake)")


def _secret(secrets: Any, name: str) -> str | None:
    try:
        return secrets[name] if secrets is not None else None
    except Exception:  # truss raises for a secret that is declared but not provided
        return None
