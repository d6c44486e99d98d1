"""Media parts of the Responses and Anthropic Messages APIs, resolved by the chat resolver.

Our fetcher (its address policy, size limits, deadline) must see every URL a request
carries, whatever the API's shape. Rather than teach the resolver each shape, each part is
translated to its chat form, resolved there, and translated back:

- Responses: `input_image` with an http(s) `image_url` -> the image inline (data URL);
  `input_file` (`file_url` or `file_data`) -> its text as `input_text`.
- Anthropic: `image` with a `url` source -> a `base64` source; `document` with a `url`,
  `base64` or `text` source -> its text as a `text` block.

Errors name the part in the request's own terms (`input[0].content[1]`, `messages[0]...`).
"""

from __future__ import annotations

import re
from typing import Any

from truss_llm.errors import RequestError
from truss_llm.media.parts import MediaResolver

# The resolver names a part by its place in the chat body we hand it.
_CHAT_PLACE = re.compile(r"messages\[(\d+)\]\.content\[0\]")
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*);base64,(?P<data>.*)$", re.DOTALL)


def _is_remote(url: Any) -> bool:
    return isinstance(url, str) and url.lower().startswith(("http://", "https://"))


async def _resolve(resolver: MediaResolver, places: list[str], parts: list[dict[str, Any]],
                   deadline: float) -> list[dict[str, Any]]:
    """Chat parts resolved side by side; an error names the part by `places`."""
    body = {"messages": [{"role": "user", "content": [part]} for part in parts]}
    try:
        resolved = await resolver.resolve(body, deadline=deadline)
    except RequestError as exc:
        def rename(text: str | None) -> str | None:
            return text and _CHAT_PLACE.sub(lambda m: places[int(m[1])], text)
        raise RequestError(rename(exc.message), exc.status, rename(exc.param),
                           exc.retry_after_s) from None
    return [message["content"][0] for message in resolved["messages"]]


def _content_lists(items: Any) -> list[tuple[int, list[Any]]]:
    """(position, content) of every item of `items` whose content is a list of parts."""
    if not isinstance(items, list):
        return []
    return [(i, item["content"]) for i, item in enumerate(items)
            if isinstance(item, dict) and isinstance(item.get("content"), list)]


# -- Responses ----------------------------------------------------------------------------

def _responses_chat_part(part: Any) -> dict[str, Any] | None:
    if not isinstance(part, dict):
        return None
    if part.get("type") == "input_image" and _is_remote(part.get("image_url")):
        return {"type": "image_url", "image_url": {"url": part["image_url"]}}
    if part.get("type") == "input_file":
        return {"type": "file", "file": {key: part[key] for key in (
            "file_url", "file_data", "file_id", "filename") if part.get(key) is not None}}
    return None


def _responses_part(original: dict[str, Any], resolved: dict[str, Any]) -> dict[str, Any]:
    if resolved["type"] == "text":
        return {"type": "input_text", "text": resolved["text"]}
    return {**original, "image_url": resolved["image_url"]["url"]}


async def resolve_responses_input(resolver: MediaResolver, body: dict[str, Any],
                                  deadline: float) -> dict[str, Any]:
    """The Responses body with its media parts resolved (the same body when it has none)."""
    return await _resolve_in_place(resolver, body, "input", _responses_chat_part,
                                   _responses_part, deadline)


# -- Anthropic Messages -------------------------------------------------------------------

def _anthropic_chat_part(block: Any) -> dict[str, Any] | None:
    if not isinstance(block, dict) or not isinstance(block.get("source"), dict):
        return None
    source = block["source"]
    if block.get("type") == "image" and source.get("type") == "url" and _is_remote(
            source.get("url")):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
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
    return await _resolve_in_place(resolver, body, "messages", _anthropic_chat_part,
                                   _anthropic_block, deadline)


# -- shared -------------------------------------------------------------------------------

async def _resolve_in_place(resolver: MediaResolver, body: dict[str, Any], key: str,
                            to_chat, from_chat, deadline: float) -> dict[str, Any]:
    found = [(position, index, chat)
             for position, content in _content_lists(body.get(key))
             for index, part in enumerate(content)
             if (chat := to_chat(part)) is not None]
    if not found:
        return body
    resolved = await _resolve(
        resolver, [f"{key}[{position}].content[{index}]" for position, index, _ in found],
        [chat for *_, chat in found], deadline)
    items = list(body[key])
    for (position, index, _), new in zip(found, resolved, strict=True):
        if items[position] is body[key][position]:  # copy each touched item once
            items[position] = {**items[position], "content": list(items[position]["content"])}
        content = items[position]["content"]
        content[index] = from_chat(content[index], new)
    return {**body, key: items}


def _base64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode("utf-8")).decode("ascii")
