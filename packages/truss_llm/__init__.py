"""Serve an open chat model on Baseten: Truss glue around an in-process vLLM engine.

Modules, one concept each: `settings` (the typed engine and limit parameters), `engine`
(vLLM lifecycle and health), `openai_surface` (vLLM's own OpenAI serving classes behind
Truss routes), `errors` (OpenAI-shaped error bodies), `cancellation` (abort on client
disconnect), `truss_app` and `cli` (the local runner on the real truss server).
"""
