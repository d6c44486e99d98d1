"""`truss-llm send`: send a chat request to a deployed model, big attachments by S3 URL.

Registered on the main CLI by `add_send_command`; `python -m truss_llm.media_client.client_cli
send ...` runs it on its own. Progress and what was uploaded go to stderr, the model's
answer to stdout, so `... > answer.json` keeps only the answer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from truss_llm.media_client.storage import DEFAULT_PREFIX, S3Store
from truss_llm.media_client.upload import (
    DEFAULT_ASYNC_THRESHOLD_BYTES,
    DEFAULT_MAX_TIME_IN_QUEUE_S,
    DEFAULT_SYNC_THRESHOLD_BYTES,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL_EXPIRY_S,
    attach_file,
    expires_in_for_async,
    fit_request,
    json_size,
    send,
)

ENV_API_KEY = "BASETEN_API_KEY"
EXIT_FAILED = 1  # the request failed or the server answered an error
EXIT_USAGE = 2  # argparse's code for bad arguments
SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
              "kib": 1024, "mib": 1024**2, "gib": 1024**3}

DESCRIPTION = """\
Send an OpenAI chat request (a JSON file) to a model on Baseten, with local files attached.

Baseten refuses a predict body over 100 MB and an async_predict request over 256 KiB. When
the request (attachments included, base64-encoded) is over --limit-bytes, its largest
attachments are uploaded to an S3 bucket and replaced by pre-signed URLs, which the model
downloads. Smaller requests are sent as they are, and need no bucket.

AWS credentials and region come from the usual places (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws). The pre-signed URLs are never printed."""

EPILOG = f"""\
examples:
  # sync: a 300 MB recording, uploaded because it cannot travel inline
  export {ENV_API_KEY}=...
  truss-llm send --url https://model-ID.api.baseten.co/environments/production/predict \\
      --body request.json --attach meeting.wav --bucket my-bucket

  # async: results go to your webhook; anything that would take the request over
  # 224 KiB is uploaded
  truss-llm send --url https://model-ID.api.baseten.co/environments/production/async_predict \\
      --async --webhook https://example.com/hook --body request.json --attach scan.png \\
      --bucket my-bucket --region eu-west-1

request.json is a chat completions body, e.g.
  {{"model": "m", "messages": [{{"role": "user", "content": "Summarize the attachment."}}]}}
Each --attach goes into the last user message: images (.png, .jpg, ...) as image_url parts,
audio (.wav, .mp3) as input_audio parts, anything else as a file part."""


def parse_size(text: str) -> int:
    """Bytes from "262144", "224KiB", "90MB" or "1.5GB" (KB/MB/GB are powers of 1000)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: use bytes or a unit, e.g. 262144, 224KiB, 90MB")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def add_send_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `send` on an argparse subparsers object; its handler returns an exit code."""
    cmd = subparsers.add_parser(
        "send", help="send a chat request to a deployed model, big attachments via S3",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    what = cmd.add_argument_group("what to send")
    what.add_argument("--url", required=True,
                      help="the model's predict URL, or its async_predict URL with --async")
    what.add_argument("--body", required=True, type=Path, metavar="REQUEST.json",
                      help="chat request body as a JSON file ('-' reads standard input)")
    what.add_argument("--attach", action="append", default=[], type=Path, metavar="PATH",
                      help="a local file to add to the last user message (repeatable)")
    where = cmd.add_argument_group("where big attachments go")
    where.add_argument("--bucket", help="S3 bucket for attachments that must be uploaded "
                                        "(needed only when the request is over the limit)")
    where.add_argument("--endpoint-url",
                       help="S3-compatible endpoint (MinIO, R2, ...); default: AWS S3")
    where.add_argument("--region", help="the bucket's region; URLs are signed for it "
                                        "(default: from your AWS configuration)")
    where.add_argument("--prefix", default=DEFAULT_PREFIX,
                       help="key prefix in the bucket; give it a lifecycle rule that deletes "
                            "old uploads (default: %(default)s)")
    where.add_argument("--limit-bytes", type=parse_size, metavar="SIZE",
                       help="upload attachments until the request is at most this big "
                            f"(default: {DEFAULT_SYNC_THRESHOLD_BYTES // 10**6}MB sync, "
                            f"{DEFAULT_ASYNC_THRESHOLD_BYTES // 1024}KiB async)")
    where.add_argument("--expires-in", type=int, metavar="SECONDS",
                       help="how long the URLs work (default: sync "
                            f"{DEFAULT_URL_EXPIRY_S} s; async: queue time + 1 h run + 30 min)")
    where.add_argument("--no-progress", action="store_true", help="no upload progress bar")
    how = cmd.add_argument_group("how to send")
    how.add_argument("--async", dest="async_mode", action="store_true",
                     help="wrap as an async request: {\"model_input\": <body>, ...}")
    how.add_argument("--webhook", metavar="URL",
                     help="async only: HTTPS URL that receives the result")
    how.add_argument("--max-time-in-queue", type=int, metavar="SECONDS",
                     help="async only: give up after this long in the queue, 10 to 259200 "
                          f"(Baseten's default: {DEFAULT_MAX_TIME_IN_QUEUE_S})")
    how.add_argument("--priority", type=int, choices=[0, 1, 2],
                     help="async only: 0 is served first (Baseten's default: 0)")
    how.add_argument("--api-key", help=f"Baseten API key (default: ${ENV_API_KEY}; prefer the "
                                       "variable, a command line is visible to other users)")
    how.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                     help="how long to wait for the answer (default: %(default)s)")
    cmd.set_defaults(handler=run_send)
    return cmd


def _load_body(path: Path) -> dict[str, Any]:
    text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    body = json.loads(text)
    if not isinstance(body, dict):
        raise ValueError(f"{path}: the request body must be a JSON object")
    return body


def _print_response(response: Any) -> None:
    print(f"HTTP {response.status_code}", file=sys.stderr)
    try:
        print(json.dumps(response.json(), indent=2, ensure_ascii=False))
    except ValueError:
        print(response.text)


def run_send(args: argparse.Namespace) -> int:
    def fail(message: str, code: int = EXIT_FAILED) -> int:
        print(f"error: {message}", file=sys.stderr)
        return code

    async_only = (args.webhook, args.max_time_in_queue, args.priority)
    if not args.async_mode and any(option is not None for option in async_only):
        return fail("--webhook, --max-time-in-queue and --priority need --async", EXIT_USAGE)
    limit = args.limit_bytes or (DEFAULT_ASYNC_THRESHOLD_BYTES if args.async_mode
                                 else DEFAULT_SYNC_THRESHOLD_BYTES)
    try:
        expires_in = args.expires_in or (
            expires_in_for_async(args.max_time_in_queue or DEFAULT_MAX_TIME_IN_QUEUE_S)
            if args.async_mode else DEFAULT_URL_EXPIRY_S)
        body = _load_body(args.body)
        for path in args.attach:
            body = attach_file(body, path)
        if args.bucket:
            store = S3Store(args.bucket, endpoint_url=args.endpoint_url, region=args.region,
                            prefix=args.prefix, show_progress=False if args.no_progress else None)
            fitted = fit_request(body, store, limit_bytes=limit, expires_in_s=expires_in)
            for part in fitted.uploaded:
                print(f"uploaded {part.where} ({part.kind}, {part.size_bytes} bytes) "
                      f"to {part.location}", file=sys.stderr)
            body, size = fitted.body, fitted.size_bytes
        else:
            size = json_size(body)
            if size > limit:
                return fail(f"the request is {size} bytes, over the {limit} byte limit: "
                            "pass --bucket to upload its attachments")
        print(f"sending {size} bytes ({'async' if args.async_mode else 'sync'})",
              file=sys.stderr)
        response = send(body, args.url, api_key=args.api_key or os.environ.get(ENV_API_KEY),
                        async_mode=args.async_mode, webhook_endpoint=args.webhook,
                        priority=args.priority,
                        max_time_in_queue_seconds=args.max_time_in_queue,
                        timeout_s=args.timeout)
    except Exception as exc:  # a one-line message beats a traceback for a command-line user
        return fail(f"{type(exc).__name__}: {exc}")
    _print_response(response)
    return 0 if response.is_success else EXIT_FAILED
