"""Media parts of the Responses and Anthropic Messages APIs, resolved by the media resolver.

Our fetcher (its address policy, size limits, deadline, byte budget) must see every URL a
request carries, whatever the API's shape. The resolver reads OpenAI chat parts (and
Responses' `input_image`); the parts of these APIs that it does not read are translated to
their chat form, resolved with the rest of their list, and translated back:

- Responses: `input_file` (`file_url` or `file_data`) -> its text as `input_text`;
  `input_image` is read as it is (a fetched image becomes a data URL).
- Anthropic: `image` with a `url` source -> a `base64` source (a `base64` one is counted);
  `document` with a `url`,
  `base64` or `text` source -> its text as a `text` block.

Errors name the part in the request's own terms (`input[0].content[1]`, `messages[0]...`).
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Callable
from typing import Any

from truss_llm.errors import RequestError
from truss_llm.media.parts import MediaResolver

_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*);base64,(?P<data>.*)$", re.DOTALL)
# A part in an API's shape -> its chat form, or None when the resolver reads it as it is.
ToChat = Callable[[Any], "dict[str, Any] | None"]
# (the original part, its resolved chat form) -> the part in the API's shape.
FromChat = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]


# -- Responses ----------------------------------------------------------------------------

def _responses_chat_part(part: Any) -> dict[str, Any] | None:
    if not isinstance(part, dict):
        return None
    if part.get("type") == "input_file":
        return {"type": "file", "file": {key: part[key] for key in (
            "file_url", "file_data", "file_id", "filename") if part.get(key) is not None}}
    return None


def _responses_part(original: dict[str, Any], resolved: dict[str, Any]) -> dict[str, Any]:
    return {"type": "input_text", "text": resolved["text"]}


async def resolve_responses_input(resolver: MediaResolver, body: dict[str, Any],
                                  deadline: float) -> dict[str, Any]:
    """The Responses body with its media parts resolved (the same body when it has none)."""
    return await _resolve_lists(resolver, body, "input", _responses_chat_part,
                                _responses_part, deadline)


# -- Anthropic Messages -------------------------------------------------------------------

def _anthropic_chat_part(block: Any) -> dict[str, Any] | None:
    if not isinstance(block, dict) or not isinstance(block.get("source"), dict):
        return None
    source = block["source"]
    if block.get("type") == "image":  # base64 ones too: their bytes count against the caps
        if source.get("type") == "url":
            return {"type": "image_url", "image_url": {"url": source.get("url")}}
        if source.get("type") == "base64":
            url = f"data:{source.get('media_type') or 'image/jpeg'};base64,{source.get('data')}"
            return {"type": "image_url", "image_url": {"url": url}}
        return None
    if block.get("type") != "document":
        return None
    file: dict[str, Any] = {"filename": block.get("title") or "document"}
    if source.get("type") == "url":
        file["file_url"] = source.get("url")
    elif source.get("type") in ("base64", "text"):
        data = source.get("data")
        file["file_data"] = data if source["type"] == "base64" or not isinstance(data, str) \
            else _base64(data)
    return {"type": "file", "file": file}


def _anthropic_block(original: dict[str, Any], resolved: dict[str, Any]) -> dict[str, Any]:
    if resolved["type"] == "text":
        return {"type": "text", "text": resolved["text"]}
    found = _DATA_URL.match(resolved["image_url"]["url"])
    if found is None:  # the resolver leaves only data URLs; keep the block if it did not
        return original
    return {"type": "image", "source": {"type": "base64", "media_type": found["mime"],
                                        "data": found["data"]}}


async def resolve_anthropic_messages(resolver: MediaResolver, body: dict[str, Any],
                                     deadline: float) -> dict[str, Any]:
    """The Messages body with its media blocks resolved (the same body when it has none)."""
    return await _resolve_lists(resolver, body, "messages", _anthropic_chat_part,
                                _anthropic_block, deadline)


# -- shared -------------------------------------------------------------------------------

async def _resolve_lists(resolver: MediaResolver, body: dict[str, Any], key: str,
                         to_chat: ToChat, from_chat: FromChat, deadline: float
                         ) -> dict[str, Any]:
    """`body` with each content list of `body[key]` resolved, the lists side by side; the
    bytes count against the request's media lease (media.parts.CURRENT_LEASE)."""
    items = body.get(key)
    lists = {position: item["content"] for position, item in enumerate(items or ())
             if isinstance(item, dict) and isinstance(item.get("content"), list)} \
        if isinstance(items, list) else {}
    translated = {position: [to_chat(part) for part in content]
                  for position, content in lists.items()}
    chat_lists = {position: [part if chat is None else chat
                             for part, chat in zip(lists[position], chats, strict=True)]
                  for position, chats in translated.items()}
    wanted = [position for position, parts in chat_lists.items()
              if resolver.needs_resolving({"messages": [{"content": parts}]})]
    if not wanted:
        return body
    try:  # the first failure cancels the other lists' fetches
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(resolver.resolve_parts(
                chat_lists[position], f"{key}[{position}].content", deadline=deadline))
                for position in wanted]
    except BaseExceptionGroup as failed:  # the user's mistake first, if there is one
        raise next((e for e in failed.exceptions if isinstance(e, RequestError)),
                   failed.exceptions[0]) from None
    resolved = [task.result() for task in tasks]
    items = list(items)
    for position, parts in zip(wanted, resolved, strict=True):
        items[position] = {**items[position], "content": [
            part if chat is None else from_chat(original, part)
            for original, chat, part in zip(lists[position], translated[position], parts,
                                            strict=True)]}
    return {**body, key: items}


def _base64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")
