"""Large media by URL, end to end: client rewrite -> S3 (moto) -> runner -> model fetch.

moto's S3 server and the runner both listen on 127.0.0.1; the model's fetch policy allows
plain http to 127.0.0.1 only (conftest.LOOPBACK_MEDIA).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import BUCKET, MODEL_NAME, Server
from truss_llm.media.parts import DOCUMENT_TEMPLATE
from truss_llm.media_client.storage import S3Store
from truss_llm.media_client.upload import attach_file, fit_request
from truss_llm.settings import CPU_PROFILE

MB = 1000 * 1000
NOTES = ("Queue status: 12 requests waiting, 3 in progress. The weather in Oslo is cold. "
         "Deploy the model to a GPU replica tomorrow morning. ") * 6


def chat(content: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": content}]}


def prompt_tokens(http: httpx.Client, body: dict[str, Any]) -> int:
    response = http.post("/production/predict", json=body)
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


@pytest.fixture
def store(s3: Any) -> S3Store:
    return S3Store(BUCKET, client=s3, show_progress=False)


@pytest.fixture
def notes(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text(NOTES)
    return path


def test_file_data_is_inlined_into_the_prompt(http: httpx.Client) -> None:
    inline = chat([{"type": "text", "text": DOCUMENT_TEMPLATE.format(name="notes.txt",
                                                                     text=NOTES)}])
    as_file = chat([{"type": "file", "file": {
        "file_data": base64.b64encode(NOTES.encode()).decode(), "filename": "notes.txt"}}])
    assert prompt_tokens(http, as_file) == prompt_tokens(http, inline)
    assert prompt_tokens(http, as_file) > prompt_tokens(http, chat("hi")) + 50


def test_uploaded_document_is_fetched_by_the_model(http: httpx.Client, store: S3Store,
                                                   notes: Path, server: Server) -> None:
    body = attach_file(chat("Summarize the attachment."), notes)
    fitted = fit_request(body, store, limit_bytes=1024, expires_in_s=600)
    assert fitted.uploaded, "the document should have been uploaded"
    part = fitted.body["messages"][0]["content"][-1]
    assert part["file"]["file_url"].startswith("http://127.0.0.1:")
    with_url = prompt_tokens(http, fitted.body)
    inline = prompt_tokens(http, chat([
        {"type": "text", "text": "Summarize the attachment."},
        {"type": "text", "text": DOCUMENT_TEMPLATE.format(name="notes.txt", text=NOTES)}]))
    assert with_url == inline
    # The pre-signed URL's signature never reaches a log line.
    assert "X-Amz-Signature" not in server.log()
    assert "X-Amz-Credential" not in server.log()


def test_101_mb_request_is_rewritten_accepted_and_judged_by_the_model(
        http: httpx.Client, store: S3Store, tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    with big.open("wb") as out:
        line = b"The quick brown fox reports the queue status. " * 1000 + b"\n"
        while out.tell() < 76 * MB:  # base64 makes it ~101 MB inline
            out.write(line)
    body = attach_file(chat("Summarize."), big)
    raw_size = len(httpx.Request("POST", "http://x", json=body).content)
    assert raw_size > 100 * MB
    direct = http.post("/production/predict", json=body)
    assert direct.status_code == 413  # what Baseten's edge would do
    fitted = fit_request(body, store, limit_bytes=90 * MB, expires_in_s=600)
    assert len(fitted.uploaded) == 1
    response = http.post("/production/predict", json=fitted.body)
    # Accepted by the runner and fetched by the model, which judges the document: this one
    # has far too many tokens for the tiny model's context, which it says before a full
    # download.
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    assert "big.txt" in message and "too many tokens" in message
    assert f"{CPU_PROFILE['max_model_len']:,}" in message


def test_media_errors_are_4xx_with_the_reason(http: httpx.Client, s3_endpoint: str,
                                              store: S3Store, notes: Path) -> None:
    missing = store.presigned_get_url("no-such-object.txt", 600)
    response = http.post("/production/predict", json=chat([
        {"type": "file", "file": {"file_url": missing, "filename": "gone.txt"}}]))
    assert response.status_code == 422, response.text
    assert "not_found" in response.json()["error"]
    refused = http.post("/production/predict", json=chat([
        {"type": "file", "file": {"file_url": "http://localhost:9/x.txt"}}]))
    assert refused.status_code == 400
    assert "refused" in refused.json()["error"]
    image = http.post("/environments/production/sync/v1/chat/completions", json=chat([
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"{s3_endpoint}/{BUCKET}/cat.png"}}]))
    assert image.status_code == 400
    assert "takes: text" in image.json()["error"]["message"]
    binary = http.post("/production/predict", json=chat([{"type": "file", "file": {
        "file_data": base64.b64encode(b"\xff\xfe\x00binary").decode(), "filename": "x.bin"}}]))
    assert binary.status_code == 400 and "not UTF-8 text" in binary.json()["error"]


def test_a_document_with_too_many_tokens_is_a_400_that_says_so(
        http: httpx.Client, store: S3Store, tmp_path: Path) -> None:
    # Small enough to be fetched and read, too many tokens once read: vLLM's own check.
    longer = tmp_path / "longer.txt"
    longer.write_text(NOTES * 8)
    fitted = fit_request(attach_file(chat("Summarize."), longer), store, limit_bytes=1024,
                         expires_in_s=600)
    response = http.post("/environments/production/sync/v1/chat/completions", json=fitted.body)
    assert response.status_code == 400, response.text
    assert "context length" in response.json()["error"]["message"]
    # Too many bytes for any text to fit: said before anything is fetched or decoded.
    inline = http.post("/environments/production/sync/v1/chat/completions", json=chat([
        {"type": "file", "file": {"file_data": base64.b64encode(b"x" * 2 * MB).decode(),
                                  "filename": "huge.txt"}}]))
    assert inline.status_code == 400, inline.text
    error = inline.json()["error"]
    assert "huge.txt" in error["message"] and "too many tokens" in error["message"]
    assert error["param"] == "messages[0].content[0]"
