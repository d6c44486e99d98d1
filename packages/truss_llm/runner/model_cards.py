"""OpenAI's model listing and retrieval: `GET /v1/models` and `GET /v1/models/{id}`.

The truss app has no `GET /v1/models`, and its `GET /v1/models/{name}` is the readiness
probe, which asks for the name `model` and must neither wait for a load nor count as
activity. So a card is answered here only for a served model's name; the probe's name goes
on to the truss app.
"""

from __future__ import annotations

import json
from typing import Any

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
        self._last: dict[str, Any] | None = None  # the last listing of a loaded model

    async def listing(self) -> Response:
        """`GET /v1/models`. Clients poll it (for health, or to pick a model), so it is no
        activity: it never keeps the model from scaling to zero, and a model scaled to zero
        answers with its last listing instead of being woken. Only a listing never seen
        (the model has not been loaded since start-up) waits for the model."""
        listing = await self._known()
        if listing is None:
            try:
                await self.lifecycle.wait_ready(activity=False)
            except WakeTimeout as exc:
                return openai_error(503, str(exc))
            listing = await self._known() or await self.lifecycle.model.models()
        return JSONResponse(listing)

    async def card(self, name: str) -> Response | None:
        """`GET .../sync/v1/models/{name}`: the card of a served model, None for any other
        name (or the listing's own error)."""
        response = await self.listing()
        if response.status_code != 200:
            return response
        return _find(json.loads(response.body), name)

    async def retrieve_unless_probe(self, name: str) -> Response | None:
        """`GET /v1/models/{name}`, the path truss's readiness probe shares; never waits.
        None (the truss app answers) for the probe's name and for names with a `/`
        (truss's `/loaded` and `/schema`); OpenAI's 404, not truss's `{}` (which the OpenAI
        SDK would take for a model with no fields), for any other name not served."""
        listing = await self._known()
        if listing is None:  # never loaded yet: truss's readiness answers (503)
            return None
        card = _find(listing, name)
        if card is None and name != TRUSS_MODEL_NAME and "/" not in name:
            return not_found(name)
        return card

    async def _known(self) -> dict[str, Any] | None:
        """The listing of the loaded model, else the last one seen; never waits."""
        if self.lifecycle.loaded:
            listing = await self.lifecycle.model.models()
            if listing["data"]:  # empty: the model was unloaded while it answered
                self._last = listing
        return self._last


def _find(listing: dict[str, Any], name: str) -> Response | None:
    for card in listing["data"]:
        if card["id"] == name:
            return JSONResponse(card)
    return None
