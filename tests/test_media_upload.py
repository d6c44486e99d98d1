"""Client side of large media: requests fitted under Baseten's limits through a real S3 API.

S3 is moto's server and Baseten is a small receiver written here, both on 127.0.0.1 and
started by this module. Nothing may reach another address: AWS credentials are fake and
explicit, the EC2 metadata service, shared AWS config files and HTTP proxies are switched
off, and every URL used is 127.0.0.1. The 101 MB file is written to disk in chunks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import BUCKET, REGION
from truss_llm.cli import main as cli_main
from truss_llm.media_client.client_cli import parse_size
from truss_llm.media_client.storage import MULTIPART_CHUNK_BYTES, S3_PRESIGN_MAX_EXPIRY_S, S3Store
from truss_llm.media_client.upload import (
    ASYNC_MODEL_INPUT_LIMIT_BYTES,
    DEFAULT_ASYNC_THRESHOLD_BYTES,
    DEFAULT_SYNC_THRESHOLD_BYTES,
    DEFAULT_URL_EXPIRY_S,
    SYNC_LIMIT_BYTES,
    BodyTooLargeError,
    async_body,
    attach_file,
    encode_json,
    expires_in_for_async,
    fit_request,
    json_size,
    send,
)

MB = 1000 * 1000
BIG_FILE_BYTES = 101 * MB  # over the 100 MB edge cap on its own, before base64
WRITE_CHUNK_BYTES = 4 * 1024 * 1024
IMAGE_BYTES = 300 * 1000
SIGNATURE_PARAM = "X-Amz-Signature"


def chat(content: Any = "Describe the attachment.") -> dict[str, Any]:
    return {"model": "tiny-chat", "max_tokens": 16,
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": content}]}


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_url(url: str) -> tuple[str, httpx.Headers]:
    assert url.startswith("http://127.0.0.1:")
    digest = hashlib.sha256()
    with httpx.stream("GET", url, timeout=60, trust_env=False) as response:
        assert response.status_code == 200, response.read()[:500]
        for chunk in response.iter_bytes():
            digest.update(chunk)
    return digest.hexdigest(), response.headers


def query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def keys_under(s3: Any, store: S3Store, key_prefix: str) -> list[str]:
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=store.object_key(key_prefix))
    return [item["Key"] for item in listing.get("Contents", [])]


@pytest.fixture
def store(s3: Any) -> S3Store:
    return S3Store(BUCKET, client=s3, show_progress=False)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "recording-notes.bin"
    with path.open("wb") as f:
        left = BIG_FILE_BYTES
        while left:
            f.write(os.urandom(min(WRITE_CHUNK_BYTES, left)))
            left -= min(WRITE_CHUNK_BYTES, left)
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("media") / "photo.png"
    path.write_bytes(os.urandom(IMAGE_BYTES))  # a PNG by name: only its bytes matter here
    return path


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    url: str
    requests: list[Received] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A stand-in for Baseten's predict and async_predict routes on 127.0.0.1."""
    requests: list[Received] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            requests.append(Received(self.path, dict(self.headers), body))
            answer = ({"request_id": "req-1"} if self.path.endswith("async_predict") else
                      {"choices": [{"message": {"role": "assistant", "content": "ok"}}]})
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Receiver(f"http://127.0.0.1:{server.server_address[1]}", requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# -- measuring and attaching ----------------------------------------------------------------

def test_size_is_the_bytes_sent() -> None:
    body = chat("naïve café, 東京 \"quoted\" \\ \n tab\t")
    assert json_size(body) == len(encode_json(body))
    assert encode_json(body) == json.dumps(body, separators=(",", ":"),
                                           ensure_ascii=False).encode()


def test_attach_file_shapes(tmp_path: Path, image: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("meeting notes\n")
    audio = tmp_path / "clip.wav"
    audio.write_bytes(b"RIFF0000WAVE")
    original = chat()

    body = attach_file(original, notes)
    assert original == chat(), "the input body must not change"
    content = body["messages"][1]["content"]
    assert content[0] == {"type": "text", "text": "Describe the attachment."}
    assert content[1] == {"type": "file", "file": {
        "file_data": base64.b64encode(b"meeting notes\n").decode(), "filename": "notes.txt"}}

    body = attach_file(attach_file(body, image), audio)
    image_part, audio_part = body["messages"][1]["content"][2:]
    assert image_part["type"] == "image_url"
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
    assert base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1]) == \
        image.read_bytes()
    assert audio_part == {"type": "input_audio", "input_audio": {
        "data": base64.b64encode(b"RIFF0000WAVE").decode(), "format": "wav"}}

    forced = attach_file(chat([{"type": "text", "text": "hi"}]), image, kind="file")
    assert forced["messages"][1]["content"][1]["file"]["filename"] == "photo.png"

    # The last user message, not a later assistant one; a new one when there is none.
    later = {"messages": [*chat()["messages"], {"role": "assistant", "content": "ok"}]}
    assert isinstance(attach_file(later, notes)["messages"][1]["content"], list)
    no_user = attach_file({"messages": [{"role": "system", "content": "x"}]}, notes)
    assert no_user["messages"][1]["role"] == "user"

    with pytest.raises(ValueError, match="messages"):
        attach_file({"prompt": "hello"}, notes)
    with pytest.raises(ValueError, match="image"):
        attach_file(chat(), notes, kind="image")


# -- fitting through S3 ---------------------------------------------------------------------

def test_101_mb_file_goes_by_multipart_upload_and_comes_back_identical(
        big_file: Path, store: S3Store, s3: Any) -> None:
    body = attach_file(chat(), big_file)
    assert json_size(body) > SYNC_LIMIT_BYTES

    result = fit_request(body, store, limit_bytes=DEFAULT_SYNC_THRESHOLD_BYTES,
                         expires_in_s=DEFAULT_URL_EXPIRY_S, key_prefix="big/")

    assert result.original_size_bytes > SYNC_LIMIT_BYTES
    assert result.size_bytes == len(encode_json(result.body)) < DEFAULT_SYNC_THRESHOLD_BYTES
    assert "file_data" in body["messages"][1]["content"][1]["file"], "input was modified"
    part = result.body["messages"][1]["content"][1]
    assert part["type"] == "file"
    assert set(part["file"]) == {"file_url", "filename"}
    assert part["file"]["filename"] == "recording-notes.bin"
    url = part["file"]["file_url"]
    assert query(url)["X-Amz-Expires"] == [str(DEFAULT_URL_EXPIRY_S)]

    [uploaded] = result.uploaded
    assert (uploaded.kind, uploaded.where, uploaded.size_bytes) == (
        "file", "messages[1].content[1]", BIG_FILE_BYTES)
    assert uploaded.location == f"s3://{BUCKET}/{store.object_key(uploaded.key)}"

    digest, _ = sha256_url(url)
    assert digest == sha256_file(big_file)
    etag = s3.head_object(Bucket=BUCKET, Key=store.object_key(uploaded.key))["ETag"]
    parts = math.ceil(BIG_FILE_BYTES / MULTIPART_CHUNK_BYTES)
    assert etag.strip('"').endswith(f"-{parts}"), f"not a {parts}-part upload: {etag}"


def test_async_threshold_moves_the_largest_images_only(image: Path, tmp_path: Path,
                                                       store: S3Store, s3: Any) -> None:
    small = tmp_path / "thumb.png"
    small.write_bytes(os.urandom(60 * 1000))
    body = attach_file(attach_file(chat(), small), image)
    assert DEFAULT_ASYNC_THRESHOLD_BYTES < json_size(body) < 2 * ASYNC_MODEL_INPUT_LIMIT_BYTES

    expires = expires_in_for_async(600)
    result = fit_request(body, store, limit_bytes=DEFAULT_ASYNC_THRESHOLD_BYTES,
                         expires_in_s=expires, key_prefix="async/")

    content = result.body["messages"][1]["content"]
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,"), \
        "the small image fits and stays inline"
    url = content[2]["image_url"]["url"]
    assert url.startswith("http://127.0.0.1:")
    assert content[2] == {"type": "image_url", "image_url": {"url": url}}
    assert [(u.kind, u.where, u.size_bytes) for u in result.uploaded] == [
        ("image", "messages[1].content[2]", IMAGE_BYTES)]
    assert query(url)["X-Amz-Expires"] == [str(expires)]
    digest, headers = sha256_url(url)
    assert digest == hashlib.sha256(image.read_bytes()).hexdigest()
    assert headers["content-type"] == "image/png"
    wrapped = async_body(result.body, webhook_endpoint="https://127.0.0.1/hook")
    assert len(encode_json(wrapped)) <= ASYNC_MODEL_INPUT_LIMIT_BYTES
    assert keys_under(s3, store, "async/") == [store.object_key(result.uploaded[0].key)]


def test_line_wrapped_base64_audio_uploads_intact(store: S3Store) -> None:
    audio = os.urandom(200 * 1000)
    encoded = base64.b64encode(audio).decode()
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    body = chat([{"type": "input_audio", "input_audio": {"data": wrapped, "format": "mp3"}}])

    result = fit_request(body, store, limit_bytes=10_000, key_prefix="audio/")

    part = result.body["messages"][1]["content"][0]
    assert part["input_audio"]["format"] == "mp3"
    digest, headers = sha256_url(part["input_audio"]["data"])
    assert digest == hashlib.sha256(audio).hexdigest()
    assert headers["content-type"] == "audio/mpeg"


def test_small_body_is_left_alone(tmp_path: Path, store: S3Store, s3: Any) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("short\n")
    body = attach_file(chat(), notes)

    result = fit_request(body, store, limit_bytes=DEFAULT_ASYNC_THRESHOLD_BYTES,
                         key_prefix="small/")

    assert result.body == body
    assert result.uploaded == []
    assert result.size_bytes == result.original_size_bytes == len(encode_json(body))
    assert keys_under(s3, store, "small/") == []


def test_body_that_cannot_fit_fails_before_uploading(image: Path, store: S3Store,
                                                      s3: Any) -> None:
    body = attach_file(chat("x" * (400 * 1000)), image)

    with pytest.raises(BodyTooLargeError) as caught:
        fit_request(body, store, limit_bytes=DEFAULT_ASYNC_THRESHOLD_BYTES,
                    key_prefix="too-big/")

    message = str(caught.value)
    assert "messages[1].content[0].text" in message and "400000 bytes" in message
    assert str(DEFAULT_ASYNC_THRESHOLD_BYTES) in message
    assert caught.value.limit_bytes == DEFAULT_ASYNC_THRESHOLD_BYTES
    assert keys_under(s3, store, "too-big/") == [], "nothing is uploaded for a lost cause"

    with pytest.raises(BodyTooLargeError, match="no inline media"):
        fit_request(chat("y" * 10_000), store, limit_bytes=1_000)


def test_presigned_urls_never_reach_the_logs(image: Path, store: S3Store,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, boto3's included

    result = fit_request(attach_file(chat(), image), store, limit_bytes=10_000,
                         key_prefix="logs/")

    url = result.body["messages"][1]["content"][1]["image_url"]["url"]
    assert SIGNATURE_PARAM in url
    logged = caplog.text
    assert urlsplit(url).query not in logged
    assert query(url)[SIGNATURE_PARAM][0] not in logged
    assert SIGNATURE_PARAM not in logged
    assert result.uploaded[0].location in logged, "bucket and key are logged"


def test_url_expiry_defaults() -> None:
    assert DEFAULT_URL_EXPIRY_S == expires_in_for_async() == 600 + 3600 + 1800
    assert expires_in_for_async(72 * 3600) == 72 * 3600 + 3600 + 1800
    assert expires_in_for_async(72 * 3600, max_attempts=10) <= S3_PRESIGN_MAX_EXPIRY_S
    with pytest.raises(ValueError, match="72 h"):
        expires_in_for_async(73 * 3600)
    with pytest.raises(ValueError):
        expires_in_for_async(5)


def test_send_refuses_what_baseten_would_refuse() -> None:
    too_big = chat("z" * ASYNC_MODEL_INPUT_LIMIT_BYTES)
    with pytest.raises(BodyTooLargeError, match="async_predict"):
        send(too_big, "http://127.0.0.1:9/async_predict", async_mode=True)
    with pytest.raises(ValueError, match="async"):
        send(chat(), "http://127.0.0.1:9/predict", webhook_endpoint="https://127.0.0.1/hook")


# -- the command line -----------------------------------------------------------------------

def test_cli_send_sync_uploads_and_posts_with_api_key(
        tmp_path: Path, image: Path, receiver: Receiver, s3_endpoint: str,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    request = tmp_path / "request.json"
    request.write_text(json.dumps(chat()))
    monkeypatch.setenv("BASETEN_API_KEY", "sync-key")

    code = cli_main(["send", "--url", f"{receiver.url}/environments/production/predict",
                     "--body", str(request), "--attach", str(image), "--bucket", BUCKET,
                     "--endpoint-url", s3_endpoint, "--region", REGION,
                     "--limit-bytes", "100KB", "--no-progress"])

    out, err = capsys.readouterr()
    assert code == 0, err
    [received] = receiver.requests
    assert received.path == "/environments/production/predict"
    assert received.headers["Authorization"] == "Api-Key sync-key"
    assert received.headers["Content-Type"] == "application/json"
    sent = json.loads(received.body)
    assert len(received.body) <= 100 * 1000
    assert sent["messages"][1]["content"][0] == {"type": "text",
                                                 "text": "Describe the attachment."}
    url = sent["messages"][1]["content"][1]["image_url"]["url"]
    assert sha256_url(url)[0] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert json.loads(out)["choices"][0]["message"]["content"] == "ok"
    assert f"s3://{BUCKET}/truss-llm-uploads/" in err
    assert SIGNATURE_PARAM not in out + err


def test_cli_send_async_wraps_the_body(tmp_path: Path, image: Path, receiver: Receiver,
                                       s3_endpoint: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    request = tmp_path / "request.json"
    request.write_text(json.dumps(chat()))

    code = cli_main(["send", "--url", f"{receiver.url}/environments/production/async_predict",
                     "--async", "--webhook", "https://127.0.0.1/hook",
                     "--max-time-in-queue", "3600", "--api-key", "async-key",
                     "--body", str(request), "--attach", str(image), "--bucket", BUCKET,
                     "--endpoint-url", s3_endpoint, "--no-progress"])

    out, err = capsys.readouterr()
    assert code == 0, err
    [received] = receiver.requests
    assert received.headers["Authorization"] == "Api-Key async-key"
    assert len(received.body) <= ASYNC_MODEL_INPUT_LIMIT_BYTES
    sent = json.loads(received.body)
    assert set(sent) == {"model_input", "webhook_endpoint", "max_time_in_queue_seconds"}
    assert sent["webhook_endpoint"] == "https://127.0.0.1/hook"
    assert sent["max_time_in_queue_seconds"] == 3600
    url = sent["model_input"]["messages"][1]["content"][1]["image_url"]["url"]
    assert query(url)["X-Amz-Expires"] == [str(expires_in_for_async(3600))]
    assert sha256_url(url)[0] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert json.loads(out) == {"request_id": "req-1"}
    assert SIGNATURE_PARAM not in out + err


def test_cli_small_request_needs_no_bucket(tmp_path: Path, receiver: Receiver,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("BASETEN_API_KEY", raising=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("short\n")
    request = tmp_path / "request.json"
    request.write_text(json.dumps(chat()))
    url = f"{receiver.url}/predict"

    assert cli_main(["send", "--url", url, "--body", str(request), "--attach", str(notes)]) == 0
    [received] = receiver.requests
    assert "Authorization" not in received.headers
    part = json.loads(received.body)["messages"][1]["content"][1]
    assert part["file"]["file_data"] == base64.b64encode(b"short\n").decode()

    capsys.readouterr()
    code = cli_main(["send", "--url", url, "--body", str(request), "--attach", str(notes),
                     "--limit-bytes", "100"])
    assert code == 1
    assert "--bucket" in capsys.readouterr().err
    assert len(receiver.requests) == 1, "an oversized request is not sent"


def test_cli_help_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli_main(["send", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for words in ("--bucket", "--attach", "--async", "async_predict", "BASETEN_API_KEY",
                  "pre-signed", "256 KiB"):
        assert words in text
    assert parse_size("224KiB") == 224 * 1024 and parse_size("90MB") == 90 * MB
