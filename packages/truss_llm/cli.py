"""`truss-llm serve`: the package on this machine, through the real truss server.

Without a GPU it serves the tiny bundled model on the CPU; with one, the model config.yaml
names. Binds 127.0.0.1 unless told otherwise, prints the URL and a ready-to-paste OpenAI
example once the engine can generate, and stops everything it started on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import httpx

from truss_llm.truss_app import DEFAULT_HOST, DEFAULT_PORT, build_server, load_truss_config

READY_POLL_S = 0.5
READY_TIMEOUT_S = 1800  # big GPU weights can take many minutes to load


def _default_truss_dir() -> Path:
    # packages/truss_llm/cli.py -> the repository root, where config.yaml lives.
    return Path(__file__).resolve().parents[2]


def _model_name(truss_dir: Path) -> str:
    from truss_llm.settings import resolve_settings

    config = load_truss_config(truss_dir)
    data_dir = truss_dir / config.get("data_dir", "data")
    try:
        return resolve_settings(config, data_dir).served_model_name
    except Exception:
        return "<model>"


def _banner(base_url: str, model: str) -> str:
    return f"""
Ready: {base_url}
  OpenAI base URL: {base_url}/v1      Baseten predict: {base_url}/v1/models/model:predict

  from openai import OpenAI
  client = OpenAI(base_url="{base_url}/v1", api_key="local")
  reply = client.chat.completions.create(
      model="{model}", messages=[{{"role": "user", "content": "Hello!"}}], max_tokens=32)
  print(reply.choices[0].message.content)

Ctrl-C stops the server and the engine.
"""


def _announce_when_ready(base_url: str, model: str, stop: threading.Event) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/v1/models/model", timeout=5).status_code == 200:
                print(_banner(base_url, model), flush=True)
                return
        except httpx.HTTPError:
            pass
        stop.wait(READY_POLL_S)


def serve(args: argparse.Namespace) -> int:
    truss_dir = args.truss_dir.resolve()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: the server has no authentication", file=sys.stderr)
    server = build_server(truss_dir, host=args.host, port=args.port, log_level=args.log_level)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    stop = threading.Event()
    threading.Thread(target=_announce_when_ready, daemon=True,
                     args=(f"http://{host}:{args.port}", _model_name(truss_dir), stop)).start()
    try:
        server.run()
    finally:
        stop.set()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="truss-llm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "serve", help="serve the truss on this machine (tiny model on a CPU)",
        description="Serve the truss through the real truss server on this machine. "
                    "Engine settings can be overridden with TRUSS_LLM_<SETTING> variables, "
                    "e.g. TRUSS_LLM_MAX_MODEL_LEN=1024.")
    run.add_argument("--truss-dir", type=Path, default=_default_truss_dir(),
                     help="directory holding config.yaml (default: this repository)")
    run.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s)")
    run.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    run.set_defaults(handler=serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
