"""Content parts that point at media by URL, resolved before the request reaches vLLM.

- `{"type": "file", "file": {"file_url": "https://...", "filename": "notes.txt"}}` (or
  `file_data`, base64): a text document, fetched or decoded, then inlined into the prompt as
  a text part. Only UTF-8 text is accepted; a document with more bytes than the model's
  context could hold as tokens is a 400 that says so, before it is downloaded in full.
- `image_url`, `input_audio` (`data` holding an http(s) URL), `audio_url`, `video_url`
  with http(s) URLs: fetched by our fetcher (not vLLM's, which has no SSRF policy of ours)
  and handed to vLLM inline, when the served model takes that modality; otherwise a 400
  naming what the model takes.

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
from pathlib import Path
from typing import Any

from truss_llm.env_settings import prefixed_values
from truss_llm.errors import RequestError
from truss_llm.media.fetch import FetchedFile, fetch_to_file
from truss_llm.media.policy import FetchError, FetchPolicy, redact_url

ENV_PREFIX = "TRUSS_LLM_MEDIA_"
LIST_FIELDS = ("allowed_hosts", "extra_allowed_hosts", "allowed_networks")
# Byte-level BPE tokens are at most this many UTF-8 bytes per vocabulary character.
UTF8_MAX_BYTES_PER_CHAR = 4
DOCUMENT_TEMPLATE = "[file: {name}]\n{text}"
PARALLEL_FETCHES = 8  # media parts of one request fetched at once
URL_PART_KINDS = {"image_url": "image", "audio_url": "audio", "video_url": "video"}


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
    return isinstance(url, str) and url.lower().startswith(("http://", "https://"))


class MediaResolver:
    """Rewrites a chat body's media parts; one per engine (it knows the model's limits)."""

    def __init__(self, policy: FetchPolicy, model_name: str, max_model_len: int,
                 longest_token_chars: int, modalities: frozenset[str]) -> None:
        self.policy = policy.model_copy(update={"hash_body": False})  # nothing reads it here
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.modalities = modalities
        # No document longer than this can fit the context, whatever its text.
        self.max_document_bytes = min(
            policy.max_bytes, max_model_len * longest_token_chars * UTF8_MAX_BYTES_PER_CHAR)
        self._document_policy = self.policy.model_copy(
            update={"max_bytes": self.max_document_bytes})

    @staticmethod
    def needs_resolving(body: Mapping[str, Any]) -> bool:
        """Cheap check, so plain-text requests skip the copy."""
        for message in body.get("messages") or ():
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and any(
                    isinstance(p, dict) and p.get("type") in ("file", "input_audio",
                                                              *URL_PART_KINDS)
                    for p in content):
                return True
        return False

    async def resolve(self, body: dict[str, Any], deadline: float | None = None
                      ) -> dict[str, Any]:
        """The body with every media part resolved; the parts are fetched side by side.

        One deadline covers them all (by default the policy's total timeout from now), so
        a request with many parts still ends in bounded time; the first failure cancels
        the other fetches and is raised.
        """
        if not self.needs_resolving(body):
            return body
        body = copy.deepcopy(body)
        if deadline is None:
            deadline = time.monotonic() + self.policy.total_timeout_s
        slots = asyncio.Semaphore(PARALLEL_FETCHES)

        async def resolve_into(content: list[Any], index: int, where: str) -> None:
            async with slots:
                content[index] = await self._resolve_part(content[index], where, deadline)

        try:
            async with asyncio.TaskGroup() as group:
                for m, message in enumerate(body["messages"]):
                    content = message.get("content") if isinstance(message, dict) else None
                    if not isinstance(content, list):
                        continue
                    for p, part in enumerate(content):
                        if isinstance(part, dict):
                            group.create_task(
                                resolve_into(content, p, f"messages[{m}].content[{p}]"))
        except BaseExceptionGroup as failed:  # the user's mistake first, if there is one
            raise next((e for e in failed.exceptions if isinstance(e, RequestError)),
                       failed.exceptions[0]) from None
        return body

    async def _resolve_part(self, part: dict[str, Any], where: str, deadline: float | None
                            ) -> dict[str, Any]:
        kind = part.get("type")
        if kind == "file":
            return await self._document(part.get("file"), where, deadline)
        if kind in URL_PART_KINDS:
            inner = part.get(kind)
            url = inner.get("url") if isinstance(inner, dict) else inner
            if not _is_remote(url):
                return part  # data: URLs and the like go to vLLM as they are
            self._require(URL_PART_KINDS[kind], where)
            data_url = await self._fetch_as_data_url(url, where, deadline)
            return {"type": kind, kind: {**(inner if isinstance(inner, dict) else {}),
                                         "url": data_url}}
        if kind == "input_audio":
            inner = part.get("input_audio")
            data = inner.get("data") if isinstance(inner, dict) else None
            if not _is_remote(data):
                return part
            self._require("audio", where)
            fetched = await self._fetch(data, self.policy, where, deadline)
            try:
                encoded = await asyncio.to_thread(_base64_file, fetched.path)
            finally:
                fetched.path.unlink(missing_ok=True)
            return {"type": "input_audio", "input_audio": {**inner, "data": encoded}}
        return part

    def _require(self, modality: str, where: str) -> None:
        if modality not in self.modalities:
            raise RequestError(
                f"{where}: the model {self.model_name!r} does not take {modality} input; it "
                f"takes: {', '.join(sorted(self.modalities))}.", param=where)

    async def _document(self, file: Any, where: str, deadline: float | None
                        ) -> dict[str, Any]:
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
                raw = await asyncio.to_thread(fetched.path.read_bytes)
            finally:
                fetched.path.unlink(missing_ok=True)
        elif file.get("file_data") is not None:
            raw = self._decode_base64(file["file_data"], where, name)
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
        if len(data) * 3 // 4 > self.max_document_bytes:
            raise self._document_too_big(where, name, f"{len(data) * 3 // 4:,}")
        try:
            return base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError):
            raise RequestError(f"{where}.file.file_data is not valid base64.",
                               param=where) from None

    def _document_too_big(self, where: str, name: str, size: str) -> RequestError:
        if self.max_document_bytes < self.policy.max_bytes:  # the context is the bound
            return RequestError(
                f"{where}: the document {name!r} ({size} bytes) has too many tokens for the "
                f"model's context: {self.model_name!r} takes at most {self.max_model_len:,} "
                f"tokens, which no text over {self.max_document_bytes:,} bytes fits in. "
                "Send a shorter document, or split it across requests.", param=where)
        return RequestError(f"{where}: the document {name!r} ({size} bytes) exceeds the "
                            f"media size limit of {self.policy.max_bytes:,} bytes.",
                            status=413, param=where)

    async def _fetch(self, url: str, policy: FetchPolicy, where: str, deadline: float | None,
                     document: str | None = None) -> FetchedFile:
        try:
            return await fetch_to_file(url, policy, deadline=deadline)
        except FetchError as exc:
            if exc.reason == FetchError.TOO_LARGE and document is not None:
                raise self._document_too_big(where, document,
                                             f"over {policy.max_bytes:,}") from None
            what = f"document {document!r}" if document else "media"
            message = f"{where}: could not fetch {what} ({exc.reason}): {exc.message}"
            raise RequestError(message, status=exc.status, param=where) from None

    async def _fetch_as_data_url(self, url: str, where: str, deadline: float | None) -> str:
        fetched = await self._fetch(url, self.policy, where, deadline)
        try:
            encoded = await asyncio.to_thread(_base64_file, fetched.path)
        finally:
            fetched.path.unlink(missing_ok=True)
        mime = (fetched.content_type or "").split(";")[0].strip() or \
            mimetypes.guess_type(redact_url(url))[0] or "application/octet-stream"
        return f"data:{mime};base64,{encoded}"


def _base64_file(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")
