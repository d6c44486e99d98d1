"""A fetched image, fetched by the SERVER, reaches the engine as the same image inlined.

One server, module-scoped: `truss-llm serve` with the tiny BLIP-2 model (as in
test_media_vlm.py), whose fetch policy is relaxed only so far as to reach moto's S3 on
127.0.0.1: plain http, host 127.0.0.1, network 127.0.0.1/32 (conftest.LOOPBACK_MEDIA).
test_media_vlm.py's server keeps the default policy, which refuses 127.0.0.1, because its
SSRF tests depend on that; so the server-side fetch of a presigned URL is proven here.
Every request goes to the server over HTTP; the test process only uploads to moto and signs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import BUCKET, LOOPBACK_MEDIA, Server, start_server, stop_server_soon

# Importing test_media_vlm's plain helpers (not its fixtures or tests) keeps one definition of
# the model, its image token count and the request shapes; pytest puts tests/ on sys.path.
from test_media_vlm import IMAGE_TOKENS, VLM, VLM_NAME, chat, data_url, image_part, png

SYNC_CHAT = "/environments/production/sync/v1/chat/completions"
PREDICT = "/production/predict"  # Baseten's predict: a chat body, answered in OpenAI's shape
IMAGE = png((240, 200, 10), (64, 64))
KEY = "fetched/cat.png"


@pytest.fixture(scope="module")
def fetching_vlm(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str
                 ) -> Iterator[Server]:
    # s3_endpoint first: aws_env's fake credentials and NO_PROXY are then in os.environ,
    # which start_server passes on, so nothing the server does can reach a real AWS.
    log_path = tmp_path_factory.mktemp("vlm-fetched") / "server.log"
    started = time.monotonic()
    server = start_server(log_path, extra_env={
        "TRUSS_LLM_ENGINE_MODEL_PATH": str(VLM), "TRUSS_LLM_ENGINE_SERVED_MODEL_NAME": VLM_NAME,
        # config.yaml's values are for the GPU model; the tiny model's context instead
        "TRUSS_LLM_ENGINE_MAX_MODEL_LEN": "512",
        **LOOPBACK_MEDIA})
    print(f"\nfetching VLM server ready in {time.monotonic() - started:.1f} s "
          f"at {server.base_url}")
    yield server
    stop_server_soon(server)


@pytest.fixture(scope="module")
def http(fetching_vlm: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fetching_vlm.base_url, timeout=120) as session:
        yield session


@pytest.fixture(scope="module")
def presigned(s3: Any) -> str:
    s3.put_object(Bucket=BUCKET, Key=KEY, Body=IMAGE, ContentType="image/png")
    return s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": KEY},
                                     ExpiresIn=300)


@pytest.fixture(scope="module")
def inlined(http: httpx.Client) -> dict[str, Any]:
    """The reference: the same PNG inlined as a data: URL, and the text-only prompt."""
    with_image = answer(http, "/v1/chat/completions", chat(image_part(data_url(IMAGE))))
    text_only = answer(http, "/v1/chat/completions", chat())
    assert with_image["usage"]["prompt_tokens"] == \
        text_only["usage"]["prompt_tokens"] + IMAGE_TOKENS
    return with_image


def answer(http: httpx.Client, route: str, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post(route, json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("route", ["/v1/chat/completions", SYNC_CHAT, PREDICT])
def test_the_server_fetches_a_presigned_url_into_the_same_engine_input_as_inlined(
        http: httpx.Client, presigned: str, inlined: dict[str, Any], route: str) -> None:
    assert presigned.startswith("http://127.0.0.1:") and "X-Amz-Signature" in presigned
    fetched = answer(http, route, chat(image_part(presigned)))
    assert fetched["choices"][0]["message"]["content"]  # equal empty answers prove nothing
    assert fetched["usage"]["prompt_tokens"] == inlined["usage"]["prompt_tokens"]
    assert fetched["usage"]["prompt_tokens_details"]["multimodal_tokens"] == {
        "image": IMAGE_TOKENS}
    assert fetched["choices"][0]["message"]["content"] == \
        inlined["choices"][0]["message"]["content"]


def test_responses_input_image_by_presigned_url_is_fetched_by_the_server(
        http: httpx.Client, presigned: str) -> None:
    def input_tokens_and_text(*images: dict[str, Any]) -> tuple[int, str]:
        body = answer(http, "/v1/responses", {
            "model": VLM_NAME, "max_output_tokens": 4, "temperature": 0,
            "input": [{"role": "user", "content": [
                {"type": "input_text", "text": "what is this?"}, *images]}]})
        text = "".join(c["text"] for item in body["output"] if item["type"] == "message"
                       for c in item["content"] if c["type"] == "output_text")
        return body["usage"]["input_tokens"], text

    def input_image(url: str) -> dict[str, Any]:
        return {"type": "input_image", "image_url": url, "detail": "auto"}

    fetched_tokens, fetched_text = input_tokens_and_text(input_image(presigned))
    assert (fetched_tokens, fetched_text) == input_tokens_and_text(input_image(data_url(IMAGE)))
    assert fetched_tokens == input_tokens_and_text()[0] + IMAGE_TOKENS
    assert fetched_text  # an empty answer on both sides would prove nothing


@pytest.mark.parametrize("route", ["/v1/chat/completions", SYNC_CHAT, PREDICT])
def test_a_presigned_url_to_a_missing_object_is_a_4xx_naming_the_part(
        http: httpx.Client, s3: Any, fetching_vlm: Server, route: str) -> None:
    missing = s3.generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": "fetched/no-such.png"}, ExpiresIn=300)
    response = http.post(route, json=chat(image_part(missing)))
    # 422: the request is well formed and allowed, but what it points at is not there.
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    # Baseten's predict answers errors as a bare message; the OpenAI routes as an object.
    message = error if route == PREDICT else error["message"]
    if route != PREDICT:
        assert error["param"] == "messages[0].content[1].image_url", error
    assert message.startswith("messages[0].content[1].image_url: "), message
    # The store's 404 keeps its meaning: not found (not refused, not an upstream failure).
    assert "(not_found)" in message and "404" in message, message
    # The URL is shown without its query: the signature is a credential.
    assert "X-Amz-Signature" not in response.text
    # The signature is a credential: it never reaches a log line.
    assert "X-Amz-Signature" not in fetching_vlm.log()
