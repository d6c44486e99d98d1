"""Client side of large media: keep a chat request under Baseten's size limits, then send it.

Baseten's edge answers 413 to a predict body over 100 MB and refuses an async_predict
payload over 256 KiB, so inline media (base64 documents, data-URL images, base64 audio)
cannot always travel in the body. `fit_request` moves the biggest inline parts to an object
store, largest first and only as many as needed, and rewrites each to the URL form the model
side fetches:

    {"type": "file", "file": {"file_data": "<b64>", "filename": f}}  -> {"file_url": url, ...}
    {"type": "image_url", "image_url": {"url": "data:...;base64,..."}} -> {"url": url}
    {"type": "input_audio", "input_audio": {"data": "<b64>", ...}}    -> {"data": url, ...}

Sizes are the bytes actually sent: one compact, UTF-8 JSON encoding (`encode_json`) is
used to measure and to send, so what was measured is what the edge sees. Pre-signed URLs
are bearer credentials: nothing here logs them or puts them in an error message.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import logging
import mimetypes
import re
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import unquote_to_bytes, urlsplit, urlunsplit

import httpx

from truss_llm.media_client.storage import S3_PRESIGN_MAX_EXPIRY_S, ObjectStore

logger = logging.getLogger(__name__)

PartKind = Literal["file", "image", "audio"]

KiB = 1024
MiB = 1024 * KiB
MB = 1000 * 1000

# Baseten's edge cap for a predict body. "100 MB" is read as decimal, the smaller reading.
SYNC_LIMIT_BYTES = 100 * MB
# Default threshold for sync requests. We send exactly the bytes we measure, so the 10 %
# headroom is only for what we cannot see: how a proxy on the way, or the edge itself,
# counts a body (the published figure is a round number, not a byte count). It costs
# little: only bodies between 90 and 100 MB take the upload path they could have skipped.
DEFAULT_SYNC_THRESHOLD_BYTES = 90 * MB
# Baseten's cap on an async_predict request. Its docs apply it to the whole payload, the
# `model_input` plus the wrapper (`webhook_endpoint`, `priority`, ...), and `send` checks it so.
ASYNC_MODEL_INPUT_LIMIT_BYTES = 256 * KiB
# Default threshold for an async `model_input`: 32 KiB under the cap leaves room for the
# wrapper (a long webhook URL and a retry config are under 3 KiB) and for a service that
# re-serializes the input with spaced separators. Uploading a few hundred KB that could
# have stayed inline costs one PUT; a body over the cap costs a failed request.
DEFAULT_ASYNC_THRESHOLD_BYTES = 224 * KiB

# Baseten async: time in queue 10 s to 72 h (default 600 s), run time up to 1 h per attempt,
# up to 10 attempts with at most 60 s between them (inference_retry_config).
DEFAULT_MAX_TIME_IN_QUEUE_S = 600
MIN_TIME_IN_QUEUE_S = 10
MAX_TIME_IN_QUEUE_S = 72 * 3600
ASYNC_MAX_RUN_S = 3600
MAX_ASYNC_ATTEMPTS = 10
ASYNC_MAX_RETRY_DELAY_S = 60
# Slack beyond the worst case: the time between signing and Baseten accepting the request
# (client retries), and a signer's clock that runs behind S3's (the URL dies early by that much).
URL_EXPIRY_MARGIN_S = 30 * 60
# Covers the default async request (600 s queue + 3600 s run + margin = 6000 s); a sync
# request fetches its media at once, so the same default is ample for it too.
DEFAULT_URL_EXPIRY_S = DEFAULT_MAX_TIME_IN_QUEUE_S + ASYNC_MAX_RUN_S + URL_EXPIRY_MARGIN_S

DEFAULT_TIMEOUT_S = 600.0  # a sync predict waits for the whole generation
CONNECT_TIMEOUT_S = 30.0
B64_CHUNK_CHARS = 4 * MiB  # a multiple of 4: each chunk decodes on its own
MAX_DATA_URL_HEADER_CHARS = 1024  # "data:<type>;base64," is short; don't scan a huge string
DEFAULT_CONTENT_TYPE = "application/octet-stream"
AUDIO_CONTENT_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac",
                       "ogg": "audio/ogg", "m4a": "audio/mp4", "webm": "audio/webm"}


class BodyTooLargeError(ValueError):
    """The request cannot be brought under the size limit; the message says what remains."""

    def __init__(self, message: str, size_bytes: int, limit_bytes: int) -> None:
        super().__init__(message)
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes


class InlineMediaError(ValueError):
    """An inline media part that cannot be decoded (bad base64 or data URL)."""


@dataclass(frozen=True)
class UploadedPart:
    """One inline part moved to the object store (its URL is deliberately not kept here)."""

    where: str  # its place in the body, e.g. "messages[0].content[1]"
    kind: PartKind
    key: str  # the key given to the store (relative to the store's prefix)
    location: str  # e.g. "s3://bucket/truss-llm-uploads/<key>", safe to log
    size_bytes: int  # decoded size, as stored
    content_type: str | None


@dataclass(frozen=True)
class FitResult:
    body: dict[str, Any]  # the request to send: a new dict, the input is left alone
    uploaded: list[UploadedPart]
    size_bytes: int  # len(encode_json(body))
    original_size_bytes: int


# -- measuring ------------------------------------------------------------------------------

def _encoder() -> json.JSONEncoder:
    return json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_json(obj: Any) -> bytes:
    """The bytes sent for `obj`: compact separators, UTF-8 (what httpx's `json=` sends too)."""
    return _encoder().encode(obj).encode("utf-8")


def json_size(obj: Any) -> int:
    """len(encode_json(obj)), without holding the whole encoding in memory."""
    return sum(len(chunk) if chunk.isascii() else len(chunk.encode("utf-8"))
               for chunk in _encoder().iterencode(obj))


# -- attaching ------------------------------------------------------------------------------

def _guess_kind(mime: str | None) -> PartKind:
    if mime and mime.startswith("image/"):
        return "image"
    if mime and mime.startswith("audio/"):
        return "audio"
    return "file"


def _media_part(kind: PartKind, data: str, path: Path, mime: str | None) -> dict[str, Any]:
    if kind == "file":
        return {"type": "file", "file": {"file_data": data, "filename": path.name}}
    if kind == "image":
        if not (mime and mime.startswith("image/")):
            raise ValueError(f"cannot tell the image type of {path.name} from its name; "
                             "give it an image extension such as .png, .jpg or .webp")
        return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}
    if kind == "audio":
        fmt = path.suffix.lstrip(".").lower()
        if not fmt:
            raise ValueError(f"cannot tell the audio format of {path.name}: name it .wav or .mp3")
        return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}
    raise ValueError(f"kind must be 'file', 'image' or 'audio', not {kind!r}")


def attach_file(body: Mapping[str, Any], path: Path,
                kind: PartKind | None = None) -> dict[str, Any]:
    """A copy of the chat `body` with `path` added inline to the last user message.

    The kind (document, image or audio part) is guessed from the file name unless given.
    A string content becomes a text part followed by the new part; with no user message a
    new one is appended. The part is inline base64: `fit_request` decides what to upload.
    """
    path = Path(path)
    mime = mimetypes.guess_type(path.name)[0]
    kind = kind or _guess_kind(mime)
    part = _media_part(kind, base64.b64encode(path.read_bytes()).decode("ascii"), path, mime)
    new = copy.deepcopy(dict(body))  # strings are shared, not copied: cheap for big bodies
    messages = new.get("messages")
    if not isinstance(messages, list):
        raise ValueError("attach_file needs a chat request with a `messages` list")
    user = next((m for m in reversed(messages)
                 if isinstance(m, dict) and m.get("role") == "user"), None)
    if user is None:
        messages.append({"role": "user", "content": [part]})
    elif user.get("content") in (None, ""):
        user["content"] = [part]
    elif isinstance(user["content"], str):
        user["content"] = [{"type": "text", "text": user["content"]}, part]
    elif isinstance(user["content"], list):
        user["content"].append(part)
    else:
        raise ValueError("the last user message's content must be a string or a list of parts")
    return new


# -- finding inline parts -------------------------------------------------------------------

@dataclass
class _InlinePart:
    """An inline media part of the body being fitted, and how to read its bytes."""

    where: str
    parts: list[Any]  # the content list holding it, in the body being rewritten
    index: int
    kind: PartKind
    data: str  # the string carrying the payload
    start: int  # where the payload starts in `data` (after a data URL's header)
    is_base64: bool
    content_type: str | None
    filename: str
    size: int  # json_size of the part as it is

    def with_url(self, url: str) -> dict[str, Any]:
        part = self.parts[self.index]
        if self.kind == "file":
            file = {k: v for k, v in part["file"].items() if k != "file_data"}
            return {**part, "file": {**file, "file_url": url}}
        if self.kind == "image":
            image = part["image_url"]
            return {**part, "image_url": {**image, "url": url} if isinstance(image, dict) else url}
        return {**part, "input_audio": {**part["input_audio"], "data": url}}

    def decode_to(self, dest: Path) -> int:
        with dest.open("wb") as out:
            if not self.is_base64:
                data = unquote_to_bytes(self.data[self.start:])
                out.write(data)
                return len(data)
            try:
                return _write_base64(self.data, self.start, out)
            except (binascii.Error, ValueError):
                pass
            # Line-wrapped (MIME-style) base64: drop the whitespace and try once more.
            out.seek(0)
            out.truncate()
            compact = "".join(self.data[self.start:].split())
            try:
                return _write_base64(compact, 0, out)
            except (binascii.Error, ValueError) as exc:
                raise InlineMediaError(f"{self.where}: inline data is not valid base64 "
                                       f"({exc})") from None


def _write_base64(text: str, start: int, out: IO[bytes]) -> int:
    written = 0
    for i in range(start, len(text), B64_CHUNK_CHARS):
        chunk = base64.b64decode(text[i:i + B64_CHUNK_CHARS], validate=True)
        out.write(chunk)
        written += len(chunk)
    return written


def _parse_data_url(url: str, where: str) -> tuple[str | None, bool, int]:
    """(media type, is base64, payload offset) of a `data:` URL."""
    comma = url.find(",", 0, MAX_DATA_URL_HEADER_CHARS)
    if comma < 0:
        raise InlineMediaError(f"{where}: malformed data URL (no ',' after its header)")
    mime, *params = url[len("data:"):comma].split(";")
    return mime.strip() or None, "base64" in (p.strip().lower() for p in params), comma + 1


def _is_remote(url: str) -> bool:
    return url[:8].lower().startswith(("http://", "https://"))


def _inline_part(where: str, parts: list[Any], index: int) -> _InlinePart | None:
    part = parts[index]
    if not isinstance(part, dict):
        return None
    kind_of = part.get("type")
    mime: str | None
    if kind_of == "file" and isinstance(part.get("file"), dict):
        data = part["file"].get("file_data")
        if not isinstance(data, str) or not data:
            return None
        filename = str(part["file"].get("filename") or "document")
        if data.startswith("data:"):
            mime, is_b64, start = _parse_data_url(data, where)
        else:
            mime, is_b64, start = mimetypes.guess_type(filename)[0], True, 0
        kind: PartKind = "file"
    elif kind_of == "image_url" and part.get("image_url") is not None:
        image = part["image_url"]
        data = image.get("url") if isinstance(image, dict) else image
        if not isinstance(data, str) or not data.startswith("data:"):
            return None
        mime, is_b64, start = _parse_data_url(data, where)
        filename = "image" + (mimetypes.guess_extension(mime or "") or "")
        kind = "image"
    elif kind_of == "input_audio" and isinstance(part.get("input_audio"), dict):
        data = part["input_audio"].get("data")
        if not isinstance(data, str) or not data or _is_remote(data):
            return None
        fmt = str(part["input_audio"].get("format") or "wav").lower()
        if data.startswith("data:"):
            mime, is_b64, start = _parse_data_url(data, where)
        else:
            mime, is_b64, start = AUDIO_CONTENT_TYPES.get(fmt, f"audio/{fmt}"), True, 0
        filename = f"audio.{fmt}"
        kind = "audio"
    else:
        return None
    return _InlinePart(where, parts, index, kind, data, start, is_b64,
                       mime or DEFAULT_CONTENT_TYPE, filename, json_size(part))


def _inline_parts(body: dict[str, Any]) -> Iterator[_InlinePart]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    for m, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for p in range(len(content)):
            found = _inline_part(f"messages[{m}].content[{p}]", content, p)
            if found is not None:
                yield found


def _largest_string(obj: Any, where: str = "body") -> tuple[str, int]:
    """Where the longest string in `obj` is and its length, to say what keeps a body big."""
    if isinstance(obj, str):
        return where, len(obj.encode("utf-8")) if not obj.isascii() else len(obj)
    children: Iterator[tuple[str, Any]]
    if isinstance(obj, dict):
        children = ((f"{where}.{k}" if where != "body" else str(k), v) for k, v in obj.items())
    elif isinstance(obj, list):
        children = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return where, 0
    return max((_largest_string(v, w) for w, v in children), key=lambda t: t[1],
               default=(where, 0))


def _safe_name(name: str) -> str:
    """A key-safe file name that keeps the extension (the model may guess the type by it)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).strip("._")[:100] or "media"


# -- fitting --------------------------------------------------------------------------------

def fit_request(body: Mapping[str, Any], store: ObjectStore, *, limit_bytes: int,
                expires_in_s: int = DEFAULT_URL_EXPIRY_S,
                key_prefix: str | None = None) -> FitResult:
    """Upload inline media, largest first, until the encoded body is at most `limit_bytes`.

    Plans first, so a body that cannot fit (mostly text) raises BodyTooLargeError before
    anything is uploaded. URLs are signed after the last upload, so a long upload does not
    eat into `expires_in_s`. Keys are `<key_prefix><n>-<file name>`, `key_prefix` a fresh
    random `<uuid>/` unless given. The input body is not modified.
    """
    fitted = copy.deepcopy(dict(body))
    original = size = json_size(fitted)
    if size <= limit_bytes:
        return FitResult(fitted, [], size, original)
    prefix = key_prefix if key_prefix is not None else f"{uuid.uuid4().hex}/"
    candidates = sorted(_inline_parts(fitted), key=lambda part: part.size, reverse=True)

    planned: list[tuple[_InlinePart, str]] = []
    for part in candidates:
        if size <= limit_bytes:
            break
        key = f"{prefix}{len(planned):02d}-{_safe_name(part.filename)}"
        # Signing is local: this URL only sizes the rewritten part.
        size += json_size(part.with_url(store.presigned_get_url(key, expires_in_s))) - part.size
        planned.append((part, key))
    if size > limit_bytes:
        raise _cannot_fit(fitted, original, size, limit_bytes, len(candidates))

    uploaded: list[UploadedPart] = []
    with tempfile.TemporaryDirectory(prefix="truss-llm-upload-") as tmp:
        for part, key in planned:
            local = Path(tmp) / key.rsplit("/", 1)[-1]
            size_bytes = part.decode_to(local)
            store.upload(local, key, part.content_type)
            local.unlink()  # one part on disk at a time
            uploaded.append(UploadedPart(part.where, part.kind, key, store.location(key),
                                         size_bytes, part.content_type))
            logger.info("moved %s (%s, %d bytes) to %s", part.where, part.kind, size_bytes,
                        store.location(key))
    for part, key in planned:
        part.parts[part.index] = part.with_url(store.presigned_get_url(key, expires_in_s))

    final = json_size(fitted)
    if final > limit_bytes:  # only if re-signed URLs came out longer than the first ones
        raise BodyTooLargeError(f"the request body is {final} bytes after uploading "
                                f"{len(planned)} part(s), over the {limit_bytes} byte limit",
                                final, limit_bytes)
    logger.info("request body %d -> %d bytes (limit %d), %d part(s) uploaded",
                original, final, limit_bytes, len(uploaded))
    return FitResult(fitted, uploaded, final, original)


def _cannot_fit(body: dict[str, Any], original: int, best: int, limit: int,
                n_parts: int) -> BodyTooLargeError:
    where, length = _largest_string(_without_inline_media(body))
    moved = (f"uploading all {n_parts} inline media part(s) would bring it to {best} bytes"
             if n_parts else "it has no inline media to upload")
    return BodyTooLargeError(
        f"the request body is {original} bytes and {moved}, still over the limit of {limit} "
        f"bytes. The rest is text and other JSON; its largest string is {where} "
        f"({length} bytes). Shorten it or split the request (Baseten accepts up to "
        f"{SYNC_LIMIT_BYTES} bytes on predict, {ASYNC_MODEL_INPUT_LIMIT_BYTES} on async_predict).",
        best, limit)


def _without_inline_media(body: dict[str, Any]) -> dict[str, Any]:
    """The body with every inline media part blanked, for reporting what else is big."""
    copied = copy.deepcopy(body)
    for part in _inline_parts(copied):
        part.parts[part.index] = part.with_url("")
    return copied


# -- sending --------------------------------------------------------------------------------

def expires_in_for_async(max_time_in_queue_seconds: int = DEFAULT_MAX_TIME_IN_QUEUE_S, *,
                         max_attempts: int = 1) -> int:
    """URL lifetime covering an async request's worst case: queue, every attempt, margin.

    Capped at S3's 7-day pre-sign maximum, which Baseten's limits (72 h queue, 10 attempts
    of an hour) stay under anyway.
    """
    if not MIN_TIME_IN_QUEUE_S <= max_time_in_queue_seconds <= MAX_TIME_IN_QUEUE_S:
        raise ValueError(f"max_time_in_queue_seconds must be {MIN_TIME_IN_QUEUE_S} to "
                         f"{MAX_TIME_IN_QUEUE_S} (72 h), not {max_time_in_queue_seconds}")
    if not 1 <= max_attempts <= MAX_ASYNC_ATTEMPTS:
        raise ValueError(f"max_attempts must be 1 to {MAX_ASYNC_ATTEMPTS}, not {max_attempts}")
    worst = (max_time_in_queue_seconds + max_attempts * ASYNC_MAX_RUN_S
             + (max_attempts - 1) * ASYNC_MAX_RETRY_DELAY_S + URL_EXPIRY_MARGIN_S)
    return min(worst, S3_PRESIGN_MAX_EXPIRY_S)


def async_body(model_input: Mapping[str, Any], *, webhook_endpoint: str | None = None,
               priority: int | None = None, max_time_in_queue_seconds: int | None = None,
               inference_retry_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Baseten's async_predict payload around `model_input`; unset options are left out."""
    payload: dict[str, Any] = {"model_input": model_input}
    optional = {"webhook_endpoint": webhook_endpoint, "priority": priority,
                "max_time_in_queue_seconds": max_time_in_queue_seconds,
                "inference_retry_config": inference_retry_config}
    payload.update({k: v for k, v in optional.items() if v is not None})
    return payload


def _without_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def send(body: Mapping[str, Any], url: str, *, api_key: str | None = None,
         async_mode: bool = False, webhook_endpoint: str | None = None,
         priority: int | None = None, max_time_in_queue_seconds: int | None = None,
         inference_retry_config: Mapping[str, Any] | None = None,
         timeout_s: float = DEFAULT_TIMEOUT_S, check_size: bool = True,
         client: httpx.Client | None = None) -> httpx.Response:
    """POST `body` to a predict URL, or wrapped as `{"model_input": body, ...}` to an
    async_predict URL; `Authorization: Api-Key <key>` when a key is given.

    With `check_size`, a payload over Baseten's cap (100 MB sync, 256 KiB async, whole
    payload) raises BodyTooLargeError instead of being sent to a certain 413. The response
    is returned whatever its status: callers decide what an error means to them.
    """
    async_options = (webhook_endpoint, priority, max_time_in_queue_seconds,
                     inference_retry_config)
    if not async_mode and any(option is not None for option in async_options):
        raise ValueError("webhook_endpoint, priority, max_time_in_queue_seconds and "
                         "inference_retry_config apply to async requests only")
    payload = async_body(body, webhook_endpoint=webhook_endpoint, priority=priority,
                         max_time_in_queue_seconds=max_time_in_queue_seconds,
                         inference_retry_config=inference_retry_config) if async_mode else body
    content = encode_json(payload)
    limit = ASYNC_MODEL_INPUT_LIMIT_BYTES if async_mode else SYNC_LIMIT_BYTES
    if check_size and len(content) > limit:
        raise BodyTooLargeError(
            f"the {'async_predict' if async_mode else 'predict'} payload is {len(content)} "
            f"bytes, over Baseten's {limit} byte limit; fit it with fit_request first",
            len(content), limit)
    if async_mode != urlsplit(url).path.rstrip("/").endswith("async_predict"):
        logger.warning("sending a%s request to %s: async requests go to an async_predict URL, "
                       "sync ones to predict", "n async" if async_mode else " sync",
                       _without_query(url))
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Api-Key {api_key}"
    timeout = httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S)
    logger.info("POST %s (%s, %d bytes)", _without_query(url),
                "async" if async_mode else "sync", len(content))
    if client is not None:
        return client.post(url, content=content, headers=headers, timeout=timeout)
    with httpx.Client(timeout=timeout) as session:
        return session.post(url, content=content, headers=headers)
