"""OpenAI's model listing and retrieval: `GET /v1/models` and `GET /v1/models/{id}`.

The truss app has no `GET /v1/models`, and its `GET /v1/models/{name}` is the readiness
probe, which asks for the name `model` and must neither wait for a load nor count as
activity. So a card is answered here only for a served model's name; the probe's name goes
on to the truss app.
"""

from __future__ import annotations

import json

from starlette.responses import JSONResponse, Response

from truss_llm.errors import openai_error
from truss_llm.runner.lifecycle import ModelLifecycle, WakeTimeout

MODELS_PREFIX = "/v1/models/"
TRUSS_MODEL_NAME = "model"  # truss's readiness probe asks for /v1/models/model


def not_found(name: str) -> Response:
    return openai_error(404, f"The model `{name}` does not exist.")


class ModelCards:
    def __init__(self, lifecycle: ModelLifecycle) -> None:
        self.lifecycle = lifecycle

    async def listing(self) -> Response:
        """`GET /v1/models`, waking the model if it is unloaded."""
        try:
            await self.lifecycle.wait_ready()
        except WakeTimeout as exc:
            return openai_error(503, str(exc))
        return JSONResponse(await self.lifecycle.model.models())

    async def card(self, name: str, wake: bool = True) -> Response | None:
        """`GET /v1/models/{name}` for a served model, None for any other name.

        `wake=False` for the route truss's readiness probe shares: a probe must neither
        wait for the model nor count as activity that keeps it from scaling to zero.
        """
        if wake:
            response = await self.listing()
            if response.status_code != 200:
                return response
            listing = json.loads(response.body)
        else:
            listing = await self.lifecycle.model.models()
        for card in listing["data"]:
            if card["id"] == name:
                return JSONResponse(card)
        return None

    async def retrieve_unless_probe(self, name: str) -> Response | None:
        """The card on the path truss's readiness shares, with a loaded model: None (the
        truss app answers) for the probe's name and for names with a `/` (truss's
        `/loaded` and `/schema`); OpenAI's 404, not truss's `{}` (which the OpenAI SDK
        would take for a model with no fields), for any other name not served."""
        card = await self.card(name, wake=False)
        if card is None and name != TRUSS_MODEL_NAME and "/" not in name:
            return not_found(name)
        return card
