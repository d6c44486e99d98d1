"""Serve an open chat model on Baseten: Truss glue around an in-process vLLM engine.

Modules, one concept each: `settings` (the typed engine parameters), `engine` (vLLM
lifecycle and health), `openai_surface` (vLLM's own OpenAI serving classes behind Truss
routes), `errors` (OpenAI- and Baseten-shaped error bodies), `cancellation` (abort on
client disconnect), `metrics`, `truss_app` and `cli` (the local runner on the real truss
server). Packages: `media` (the safe URL fetcher, media content parts, and the client side
that uploads large inputs) and `runner` (Baseten's endpoint surface, async queue, limits).
"""
