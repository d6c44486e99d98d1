"""`truss-llm serve`: the package on this machine, as Baseten would serve it.

The real truss server runs the model (the tiny bundled one on a CPU, the one config.yaml
names on a GPU), fronted on the same port by Baseten's endpoint surface: predict,
async_predict with a persistent queue, async_request status and cancel, queue status, wake,
the `.../sync/v1` OpenAI base path, and Baseten's limits. Binds 127.0.0.1 unless told
otherwise, prints the URLs and a ready-to-paste OpenAI example once the engine can
generate, and stops everything it started on Ctrl-C.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import pydantic

from truss_llm.engine import EXIT_ON_DEATH_ENV
from truss_llm.media_client.client_cli import add_send_command
from truss_llm.runner.settings import RunnerSettings, env_overrides, is_loopback
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


def _banner(base_url: str, model: str, api_key: str | None) -> str:
    key = "YOUR_API_KEY" if api_key else "local"
    return f"""
Ready: {base_url}
  OpenAI base URL:  {base_url}/environments/production/sync/v1   (or {base_url}/v1)
  Baseten predict:  POST {base_url}/production/predict
  Async predict:    POST {base_url}/production/async_predict, GET {base_url}/async_request/<id>
  Auth:             {"Authorization: Api-Key <key> required" if api_key else "none (open)"}

  from openai import OpenAI
  client = OpenAI(base_url="{base_url}/environments/production/sync/v1", api_key="{key}")
  reply = client.chat.completions.create(
      model="{model}", messages=[{{"role": "user", "content": "Hello!"}}], max_tokens=32)
  print(reply.choices[0].message.content)

Ctrl-C stops the server and the engine.
"""


def _announce_when_ready(base_url: str, model: str, api_key: str | None,
                         stop: threading.Event) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
            if httpx.get(f"{base_url}/v1/models/model", headers=headers,
                         timeout=5).status_code == 200:
                print(_banner(base_url, model, api_key), flush=True)
                return
        except httpx.HTTPError:
            pass
        stop.wait(READY_POLL_S)


def runner_settings(args: argparse.Namespace) -> RunnerSettings:
    """Command-line values win over `TRUSS_LLM_RUNNER_*` variables, which win over defaults."""
    values: dict = env_overrides()
    given = {
        "host": args.host, "port": args.port, "api_key": args.api_key,
        "environments": args.environment, "deployment_id": args.deployment_id,
        "model_id": args.model_id, "webhook_secret": args.webhook_secret,
        "worker_concurrency": args.workers, "scale_to_zero_idle_s": args.scale_to_zero,
        "state_dir": args.state_dir.resolve() if args.state_dir else None,
        "sync_timeout_s": args.sync_timeout,
    }
    values.update({name: value for name, value in given.items() if value is not None})
    values.setdefault("state_dir", Path(".truss-llm").resolve())
    return RunnerSettings.model_validate(values)


def _is_wildcard(host: str) -> bool:
    """An all-interfaces bind address: the banner then shows the loopback URL."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def serve(args: argparse.Namespace) -> int:
    truss_dir = args.truss_dir.resolve()
    try:
        settings = runner_settings(args)
    except pydantic.ValidationError as exc:
        for error in exc.errors(include_url=False):
            where = ".".join(str(part) for part in error["loc"])
            print(f"error: {where + ': ' if where else ''}{error['msg']}", file=sys.stderr)
        return 2
    if settings.api_key is None:
        print("note: no API key configured: every route is open, on this machine only. Pass "
              "--api-key (or set TRUSS_LLM_RUNNER_API_KEY) to require "
              "'Authorization: Api-Key <key>'.", file=sys.stderr)
    elif not is_loopback(settings.host):
        print(f"warning: binding {settings.host}: reachable from other machines",
              file=sys.stderr)
    # A dead engine is restarted by the runner (lifecycle.run_engine_watch), not by ending
    # the process as a deployment does.
    os.environ[EXIT_ON_DEATH_ENV] = "0"
    server = build_server(truss_dir, host=settings.host, port=settings.port,
                          log_level=args.log_level, runner=settings)
    host = "127.0.0.1" if _is_wildcard(settings.host) else settings.host
    stop = threading.Event()
    threading.Thread(target=_announce_when_ready, daemon=True,
                     args=(f"http://{host}:{settings.port}", _model_name(truss_dir),
                           settings.api_key, stop)).start()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        return 130
    finally:
        stop.set()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="truss-llm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "serve", help="serve the truss on this machine (tiny model on a CPU)",
        description="Serve the truss through the real truss server on this machine. "
                    "Engine settings can be overridden with TRUSS_LLM_ENGINE_<SETTING> variables, "
                    "e.g. TRUSS_LLM_ENGINE_MAX_MODEL_LEN=1024.")
    run.add_argument("--truss-dir", type=Path, default=_default_truss_dir(),
                     help="directory holding config.yaml (default: this repository)")
    run.add_argument("--host", default=None,
                     help=f"address to bind (default: {DEFAULT_HOST}, this machine only)")
    run.add_argument("--port", type=int, default=None, help=f"port (default: {DEFAULT_PORT})")
    run.add_argument("--api-key", default=None,
                     help="require 'Authorization: Api-Key <key>' (or 'Bearer <key>') on "
                          "every route; default: open, and said so at start-up")
    run.add_argument("--environment", action="append", default=None, metavar="NAME",
                     help="an environment this runner answers for, as in "
                          "/environments/NAME/predict (repeatable; default: production)")
    run.add_argument("--deployment-id", default=None,
                     help="the id answered at /deployment/ID/... (default: local)")
    run.add_argument("--model-id", default=None, help="model id in async status (default: local)")
    run.add_argument("--state-dir", type=Path, default=None,
                     help="where the async queue lives (default: ./.truss-llm)")
    run.add_argument("--webhook-secret", default=None,
                     help="sign webhooks with X-BASETEN-SIGNATURE: v1=<HMAC-SHA256>")
    run.add_argument("--workers", type=int, default=None,
                     help="async requests run at once (default: 4)")
    run.add_argument("--scale-to-zero", type=float, default=None, metavar="SECONDS",
                     help="unload the model after SECONDS idle; /wake or a request loads it")
    run.add_argument("--sync-timeout", type=float, default=None, metavar="SECONDS",
                     help="504 for a sync request running longer (default: 1200, Baseten's)")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    run.set_defaults(handler=serve)
    add_send_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
