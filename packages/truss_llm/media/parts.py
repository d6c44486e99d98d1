"""Content parts that carry media, resolved before the request reaches vLLM.

vLLM never fetches anything itself (media/engine_guard.py): every URL a part carries is
fetched here, by our fetcher under the media policy, or refused.

- `{"type": "file", "file": {"file_url": "https://...", "filename": "notes.txt"}}` (or
  `file_data`, base64): a text document, fetched or decoded, then inlined into the prompt as
  a text part. Only UTF-8 text is accepted; a document with more bytes than the model's
  context could hold as tokens is a 400 that says so, before it is downloaded in full.
- Media by URL, in every shape vLLM reads: `image_url` (`{"url": ...}` or a bare string),
  `input_image` (Responses style, `image_url` a string), `audio_url`, `video_url`,
  `input_audio` (`data` holding base64 or an http(s) URL), also in parts with no `type` or
  with a `uuid` (which vLLM reads by key). An http(s) URL is fetched and handed to vLLM as a
  `data:` URL, when the served model takes that modality (otherwise a 400 naming what it
  takes); a `data:` URL passes as it is; any other scheme (file:, ftp:, ...) is a 400.
  `image_pil` parts (a Python object, for in-process callers) are a 400.
- Every part, fetched or inlined, counts against its modality's cap, the request's cap and
  the replica's budget of media bytes in memory (media/memory.py).

Every failure is a `RequestError` with a 4xx status and the reason (not found, too large,
refused by policy, timed out); URLs appear in messages as host and path only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import mimetypes
import os
import time
from collections.abc import Mapping
from contextvars import ContextVar
from http import HTTPStatus
from pathlib import Path
from typing import Any

from truss_llm.env_settings import prefixed_values
from truss_llm.errors import RequestError
from truss_llm.media.fetch import FetchedFile, fetch_to_file
from truss_llm.media.memory import MediaBudget, MediaLease
from truss_llm.media.policy import FetchError, FetchPolicy, redact_url

ENV_PREFIX = "TRUSS_LLM_MEDIA_"
LIST_FIELDS = ("allowed_hosts", "extra_allowed_hosts", "allowed_networks")
# Byte-level BPE tokens are at most this many UTF-8 bytes per vocabulary character.
UTF8_MAX_BYTES_PER_CHAR = 4
DOCUMENT_TEMPLATE = "[file: {name}]\n{text}"
PARALLEL_FETCHES = 8  # media parts of one request fetched at once
# Keys vLLM reads a URL from, whatever the part's `type` says (it reads parts without a type,
# or with a `uuid`, by key), and the modality each carries.
URL_PART_KINDS = {"image_url": "image", "audio_url": "audio", "video_url": "video"}
MEDIA_KEYS = frozenset({*URL_PART_KINDS, "input_audio", "file", "image_pil"})
# The lease of the request being served, set by the serving layer around any API's handler
# (OpenAISurface._serve): a `resolve` without a lease of its own counts its bytes there, so
# they stay held until that request's response is sent.
CURRENT_LEASE: ContextVar[MediaLease | None] = ContextVar("truss_llm_media_lease",
                                                          default=None)


def media_policy(config: Mapping[str, Any], environ: Mapping[str, str] | None = None
                 ) -> FetchPolicy:
    """The fetch policy: `model_metadata.media` of config.yaml, then `TRUSS_LLM_MEDIA_*`
    variables (lists comma-separated, e.g. TRUSS_LLM_MEDIA_EXTRA_ALLOWED_HOSTS=a.com,b.com)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = dict((config.get("model_metadata") or {}).get("media") or {})
    values.update(prefixed_values(environ, ENV_PREFIX, FetchPolicy.model_fields, "media",
                                  lists=LIST_FIELDS))
    return FetchPolicy.model_validate(values)


def _is_remote(url: Any) -> bool:
    return isinstance(url, str) and url.strip().lower().startswith(("http://", "https://"))


def _is_data(url: Any) -> bool:
    return isinstance(url, str) and url.strip()[:5].lower() == "data:"


def _base64_size(data: str) -> int:
    """Bytes a base64 text decodes to (without decoding it)."""
    data = data.rstrip()
    return len(data.rstrip("=")) * 3 // 4


def _is_media_part(part: Any) -> bool:
    return isinstance(part, dict) and (
        part.get("type") in ("file", "input_image", "image_pil") or not MEDIA_KEYS.isdisjoint(part))


class MediaResolver:
    """Rewrites the media parts of requests; one per engine (it knows the model's limits and
    holds the replica's media budget).

    Chat bodies: `resolve(body)`. Any other API's list of content parts (Responses,
    Anthropic Messages, once translated to OpenAI chat parts): `resolve_parts(parts, where)`.
    The bytes are held until the response is sent: by the lease passed in, else by the
    request's `CURRENT_LEASE` (which OpenAISurface's serving sets for every API), else
    only while resolving. With a lease of your own, finish with `lease.hold(result)` (or
    `lease.release()` on failure).
    """

    def __init__(self, policy: FetchPolicy, model_name: str, max_model_len: int,
                 longest_token_chars: int, modalities: frozenset[str]) -> None:
        self.policy = policy.model_copy(update={"hash_body": False})  # nothing reads it here
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.modalities = modalities
        self.budget = MediaBudget(policy.replica_media_budget_bytes)
        # No document longer than this can fit the context, whatever its text.
        self._context_document_bytes = (
            max_model_len * longest_token_chars * UTF8_MAX_BYTES_PER_CHAR)
        self.max_document_bytes = min(policy.max_part_bytes("file"),
                                      self._context_document_bytes)
        self._document_policy = self.policy.model_copy(
            update={"max_bytes": self.max_document_bytes})

    def lease(self) -> MediaLease:
        """A new request's account of media bytes (see media/memory.py)."""
        return MediaLease(self.budget, self.policy.max_request_media_bytes)

    @staticmethod
    def needs_resolving(body: Mapping[str, Any]) -> bool:
        """Cheap check, so plain-text requests skip the copy."""
        for message in body.get("messages") or ():
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and any(_is_media_part(p) for p in content):
                return True
        return False

    async def resolve(self, body: dict[str, Any], deadline: float | None = None,
                      lease: MediaLease | None = None) -> dict[str, Any]:
        """The chat body with every media part resolved; the parts are fetched side by side.

        One deadline covers them all (by default the policy's total timeout from now), so
        a request with many parts still ends in bounded time; the first failure cancels
        the other fetches and is raised.
        """
        if not self.needs_resolving(body):
            return body
        body = copy.deepcopy(body)
        lists = [(message["content"], f"messages[{m}].content")
                 for m, message in enumerate(body["messages"])
                 if isinstance(message, dict) and isinstance(message.get("content"), list)]
        await self._resolve_lists(lists, deadline, lease)
        return body

    async def resolve_parts(self, parts: list[Any], where: str, deadline: float | None = None,
                            lease: MediaLease | None = None) -> list[Any]:
        """A copy of one list of OpenAI chat content parts, resolved; `where` names the list
        in error messages (e.g. "input[0].content")."""
        parts = copy.deepcopy(parts)
        await self._resolve_lists([(parts, where)], deadline, lease)
        return parts

    async def _resolve_lists(self, lists: list[tuple[list[Any], str]], deadline: float | None,
                             lease: MediaLease | None) -> None:
        lease = lease or CURRENT_LEASE.get()
        own_lease = lease is None
        lease = lease or self.lease()
        if deadline is None:
            deadline = time.monotonic() + self.policy.total_timeout_s
        slots = asyncio.Semaphore(PARALLEL_FETCHES)

        async def resolve_into(content: list[Any], index: int, where: str) -> None:
            async with slots:
                content[index] = await self._resolve_part(content[index], where, deadline,
                                                          lease)

        try:
            async with asyncio.TaskGroup() as group:
                for content, where in lists:
                    for p, part in enumerate(content):
                        if _is_media_part(part):
                            group.create_task(resolve_into(content, p, f"{where}[{p}]"))
        except BaseExceptionGroup as failed:  # the user's mistake first, if there is one
            raise next((e for e in failed.exceptions if isinstance(e, RequestError)),
                       failed.exceptions[0]) from None
        finally:
            if own_lease:
                lease.release()

    async def _resolve_part(self, part: dict[str, Any], where: str, deadline: float | None,
                            lease: MediaLease) -> dict[str, Any]:
        kind = part.get("type")
        if kind == "file":
            return await self._document(part.get("file"), where, deadline, lease)
        if kind == "image_pil" or "image_pil" in part:
            raise RequestError(
                f"{where}: image_pil parts carry a Python image object and are for in-process "
                "callers; send an image_url part with an http(s) or data: URL.", param=where)
        if "file" in part:
            raise RequestError(f"{where}: a part with a 'file' must have type 'file'.",
                               param=where)
        part = dict(part)
        for key, modality in URL_PART_KINDS.items():
            if key in part:
                part[key] = await self._url_field(part[key], modality, f"{where}.{key}",
                                                  deadline, lease)
        if "input_audio" in part:
            part["input_audio"] = await self._input_audio(part["input_audio"],
                                                          f"{where}.input_audio", deadline,
                                                          lease)
        return part

    async def _url_field(self, value: Any, modality: str, where: str, deadline: float | None,
                         lease: MediaLease) -> Any:
        """`{"url": ...}` or a bare URL string, with the URL made inline."""
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str):
            return value  # absent (a cached uuid) or not a string: vLLM's validation answers
        if _is_data(url):
            self._count(_base64_size(url.partition(",")[2]), modality, where, lease)
            return value
        if not _is_remote(url):
            scheme = url.partition(":")[0][:16] if ":" in url else "(none)"
            raise RequestError(f"{where}: only http(s) and data: URLs are accepted, not "
                               f"scheme {scheme!r}.", param=where)
        self._require(modality, where)
        fetched = await self._fetch(url, self._modality_policy(modality), where, deadline,
                                    modality=modality)
        try:
            lease.take(fetched.size, where)
            encoded = await asyncio.to_thread(_base64_file, fetched.path)
        finally:
            fetched.path.unlink(missing_ok=True)
        mime = (fetched.content_type or "").split(";")[0].strip() or \
            mimetypes.guess_type(redact_url(url))[0] or "application/octet-stream"
        data_url = f"data:{mime};base64,{encoded}"
        return {**value, "url": data_url} if isinstance(value, dict) else data_url

    async def _input_audio(self, inner: Any, where: str, deadline: float | None,
                           lease: MediaLease) -> Any:
        data = inner.get("data") if isinstance(inner, dict) else None
        if not isinstance(data, str):
            return inner
        if not _is_remote(data):  # base64, as OpenAI sends it
            self._count(_base64_size(data.partition(",")[2] if _is_data(data) else data),
                        "audio", where, lease)
            return inner
        self._require("audio", where)
        fetched = await self._fetch(data, self._modality_policy("audio"), where, deadline,
                                    modality="audio")
        try:
            lease.take(fetched.size, where)
            encoded = await asyncio.to_thread(_base64_file, fetched.path)
        finally:
            fetched.path.unlink(missing_ok=True)
        return {**inner, "data": encoded}

    def _modality_policy(self, modality: str) -> FetchPolicy:
        return self.policy.model_copy(update={"max_bytes": self.policy.max_part_bytes(modality)})

    def _count(self, size: int, modality: str, where: str, lease: MediaLease) -> None:
        """An inline part: its own cap, then the request's and the replica's."""
        cap = self.policy.max_part_bytes(modality)
        if size > cap:
            raise RequestError(
                f"{where}: the {modality} is {size:,} bytes, over the limit of {cap:,} bytes "
                f"for one {modality} part (max_{modality}_bytes).",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, param=where)
        lease.take(size, where)

    def _require(self, modality: str, where: str) -> None:
        if modality not in self.modalities:
            raise RequestError(
                f"{where}: the model {self.model_name!r} does not take {modality} input; it "
                f"takes: {', '.join(sorted(self.modalities))}.", param=where)

    async def _document(self, file: Any, where: str, deadline: float | None,
                        lease: MediaLease) -> dict[str, Any]:
        if not isinstance(file, dict):
            raise RequestError(f"{where}.file must be an object with 'file_url' or "
                               "'file_data'.", param=where)
        name = str(file.get("filename") or "document")
        if file.get("file_url") is not None:
            url = file["file_url"]
            if not _is_remote(url):
                raise RequestError(f"{where}.file.file_url must be an http(s) URL.",
                                   param=f"{where}.file.file_url")
            fetched = await self._fetch(url, self._document_policy, where, deadline,
                                        document=name)
            try:
                lease.take(fetched.size, where)
                raw = await asyncio.to_thread(fetched.path.read_bytes)
            finally:
                fetched.path.unlink(missing_ok=True)
        elif file.get("file_data") is not None:
            raw = self._decode_base64(file["file_data"], where, name)
            lease.take(len(raw), where)
        elif file.get("file_id") is not None:
            raise RequestError(f"{where}: file_id needs a Files API this server does not "
                               "have; send file_url or file_data.", param=where)
        else:
            raise RequestError(f"{where}.file needs 'file_url' or 'file_data'.", param=where)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"{where}: {name!r} is not UTF-8 text; only text documents "
                               "can be put in the prompt.", param=where) from None
        return {"type": "text", "text": DOCUMENT_TEMPLATE.format(name=name, text=text)}

    def _decode_base64(self, data: Any, where: str, name: str) -> bytes:
        if not isinstance(data, str):
            raise RequestError(f"{where}.file.file_data must be a base64 string.", param=where)
        if data.startswith("data:"):
            data = data.partition(",")[2]
        if _base64_size(data) > self.max_document_bytes:
            raise self._document_too_big(where, name, f"{_base64_size(data):,}")
        try:
            return base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError):
            raise RequestError(f"{where}.file.file_data is not valid base64.",
                               param=where) from None

    def _document_too_big(self, where: str, name: str, size: str) -> RequestError:
        if self._context_document_bytes < self.policy.max_part_bytes("file"):
            return RequestError(  # the context is the bound
                f"{where}: the document {name!r} ({size} bytes) has too many tokens for the "
                f"model's context: {self.model_name!r} takes at most {self.max_model_len:,} "
                f"tokens, which no text over {self.max_document_bytes:,} bytes fits in. "
                "Send a shorter document, or split it across requests.", param=where)
        return RequestError(f"{where}: the document {name!r} ({size} bytes) exceeds the "
                            f"limit of {self.max_document_bytes:,} bytes for one file part "
                            "(max_file_bytes).", status=413, param=where)

    async def _fetch(self, url: str, policy: FetchPolicy, where: str, deadline: float | None,
                     document: str | None = None, modality: str | None = None) -> FetchedFile:
        try:
            return await fetch_to_file(url, policy, deadline=deadline)
        except FetchError as exc:
            if exc.reason == FetchError.TOO_LARGE and document is not None:
                raise self._document_too_big(where, document,
                                             f"over {policy.max_bytes:,}") from None
            if exc.reason == FetchError.TOO_LARGE and modality is not None:
                raise RequestError(
                    f"{where}: the {modality} is over the limit of {policy.max_bytes:,} bytes "
                    f"for one {modality} part (max_{modality}_bytes).",
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE, param=where) from None
            what = f"document {document!r}" if document else "media"
            message = f"{where}: could not fetch {what} ({exc.reason}): {exc.message}"
            raise RequestError(message, status=exc.status, param=where) from None


def _base64_file(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def model_modalities(model_config: Any) -> frozenset[str]:
    """What the served model takes: text, and the media modalities vLLM allows it (the
    model's processor's own, minus any limited to 0 by `limit_mm_per_prompt`)."""
    if not model_config.is_multimodal_model:
        return frozenset({"text"})
    from vllm.multimodal import MULTIMODAL_REGISTRY

    limits = MULTIMODAL_REGISTRY.get_processing_info(model_config).allowed_mm_limits
    return frozenset({"text", *(modality for modality, limit in limits.items() if limit)})
