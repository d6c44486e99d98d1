"""vLLM never fetches media itself: only our fetcher (policy.py, fetch.py) dials out.

vLLM 0.32 downloads any http(s) URL it finds in a content part, with no address checks and
(by default) following redirects; `allowed_media_domains` is its only guard, and an empty
list allows every host. `MediaResolver` (parts.py) replaces every URL it knows of with a
`data:` URL before vLLM sees the request; this module closes the door behind it, so a part
shape we did not anticipate is refused instead of fetched:

- `VLLM_MEDIA_CONNECTOR` names `InlineOnlyMediaConnector`: vLLM builds it for every request
  with media (chat_utils and the structured-decision readers look it up by that name); it
  loads `data:` URLs and refuses everything else (http, https, file) with a ValueError,
  which reaches the client as a 400.
- The engine arguments (`engine_args`) set `allowed_media_domains` to a name that cannot
  resolve and `allowed_local_media_path` to none, so even vLLM's own connector, should the
  variable be overridden, has no host to go to and no directory to read; and
  `VLLM_MEDIA_URL_ALLOW_REDIRECTS=0`.
"""

from __future__ import annotations

import os
from typing import Any

CONNECTOR_NAME = "truss_llm_inline_only"
# RFC 6761: `.invalid` names never resolve. vLLM treats an empty list as "any host".
NO_MEDIA_DOMAIN = "vllm-does-not-fetch.invalid"
ENGINE_MEDIA_ARGS: dict[str, Any] = {
    "allowed_media_domains": [NO_MEDIA_DOMAIN],
    "allowed_local_media_path": "",
}


def refusal(url: str) -> str:
    scheme = url.partition(":")[0][:16] if ":" in url else "(none)"
    return (f"a media URL with scheme {scheme!r} reached the engine: media is fetched only by "
            "this server's fetcher, which accepts image_url, input_image, audio_url, "
            "video_url, input_audio and file parts with http(s) or data: URLs.")


def configure_environment() -> None:
    """Environment vLLM reads; before `import vllm` (and again harmlessly after)."""
    os.environ["VLLM_MEDIA_CONNECTOR"] = CONNECTOR_NAME
    os.environ["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] = "0"
    os.environ.pop("VLLM_MEDIA_CACHE", None)  # a cache keyed by URL would skip our fetcher


def install() -> None:
    """Register the connector with vLLM (idempotent); needs vLLM importable."""
    from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY, MediaConnector

    if CONNECTOR_NAME in MEDIA_CONNECTOR_REGISTRY.name2class:
        return

    @MEDIA_CONNECTOR_REGISTRY.register(CONNECTOR_NAME)
    class InlineOnlyMediaConnector(MediaConnector):
        """vLLM's connector for `data:` URLs only."""

        def load_from_url(self, url: str, media_io: Any, *,
                          fetch_timeout: int | None = None) -> Any:
            if not _is_data_url(url):
                raise ValueError(refusal(url))
            return super().load_from_url(url, media_io, fetch_timeout=fetch_timeout)

        async def load_from_url_async(self, url: str, media_io: Any, *,
                                      fetch_timeout: int | None = None) -> Any:
            if not _is_data_url(url):
                raise ValueError(refusal(url))
            return await super().load_from_url_async(url, media_io,
                                                      fetch_timeout=fetch_timeout)


def _is_data_url(url: Any) -> bool:
    return isinstance(url, str) and url[:5].lower() == "data:"
