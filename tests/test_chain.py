"""The document chain end to end: `chains.run_local()`, the real runner and engine, moto S3.

The chain's model calls go to the session's runner (tiny model, vLLM CPU engine) over its
OpenAI route; documents come through pre-signed URLs from moto on 127.0.0.1. Fetching from
127.0.0.1 needs a relaxed media policy (the tests' LOOPBACK_MEDIA variables), which the
splitter reads when it is built; one test builds it without and is refused. A failing
model is a small HTTP server on 127.0.0.1 in front of the runner that answers 500 (or 400)
for the chunks carrying a marker and passes everything else through.
"""

import asyncio
import datetime
import http.server
import itertools
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest
import truss_chains as chains
from conftest import BUCKET, LOOPBACK_MEDIA, REPO, Server
from fastapi import HTTPException

# The chain's modules import each other by bare name, as they do deployed (bundled flat).
sys.path.insert(0, str(REPO / "chain"))

import doc_chain
import doc_chain_stream
from doc_llm import LocalModel
from doc_mapreduce import _groups
from doc_prompts import TOKENS_PER_PARTIAL, Budget, TokenCounter
from doc_schemas import ChainOptions, ChainRequest, ChainResult

MiB = 1024 * 1024
# Long words the tiny model's tokenizer learnt whole: about 10 bytes a token, so a 2 MiB
# document is some 600 chunks of the 512-token context rather than 1,800.
WORDS = ("streaming assistant function arguments integer boolean temperature fahrenheit "
         "tomorrow download deployment throughput question summarize translate previous "
         "response messages").split()
FAST = {"max_output_tokens": 8, "map_concurrency": 32}
QUESTION = "Which deployment?"
MARKER_500 = "POISONFIVEHUNDRED"
MARKER_400 = "POISONFOURHUNDRED"
# moto's HTTP server logs every request line at INFO, pre-signed query strings included.
logging.getLogger("werkzeug").setLevel(logging.WARNING)


def make_document(size: int, seed: int = 7, marker_at: dict[int, str] | None = None) -> str:
    """Paragraphs of a few sentences, `size` bytes or a little more; deterministic."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    total = 0
    while total < size:
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18))).capitalize()
                     + "." for _ in range(rng.randint(1, 4))]
        paragraph = " ".join(sentences)
        if marker_at and len(paragraphs) in marker_at:
            paragraph = f"{marker_at[len(paragraphs)]} {paragraph}"
        paragraphs.append(paragraph)
        total += len(paragraph) + 2
    return "\n\n".join(paragraphs)


def run_local(request: ChainRequest, model_base: str) -> ChainResult:
    """The whole chain in this process, the model calls going to `model_base`."""
    with chains.run_local():
        model = LocalModel(model_base)
        entry = doc_chain.DocumentQA(mapper=doc_chain.Mapper(model=model),
                                     reducer=doc_chain.Reducer(model=model))
        return asyncio.run(entry.run_remote(request))


def run_local_streamed(request: ChainRequest, model_base: str) -> list[str]:
    """The streaming entrypoint under run_local: a plain async generator of text."""

    async def collect(stream: Any) -> list[str]:
        return [piece async for piece in stream]

    with chains.run_local():
        model = LocalModel(model_base)
        entry = doc_chain_stream.DocumentQAStream(mapper=doc_chain.Mapper(model=model),
                                                  reducer=doc_chain.Reducer(model=model),
                                                  model=model)
        return asyncio.run(collect(entry.run_remote(request)))


def engine_requests(server: Server) -> float:
    return server.metric("vllm:request_success_total")


def presign(s3: Any, key: str, body: bytes, expires_s: int = 600) -> str:
    s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    return s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key},
                                     ExpiresIn=expires_s)


@pytest.fixture
def loopback_media(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in LOOPBACK_MEDIA.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def model_base(server: Server) -> str:
    return f"{server.base_url}/environments/production"


class FlakyModel:
    """127.0.0.1 HTTP server in front of the runner: a marked chunk's call fails, every time."""

    def __init__(self, upstream: str) -> None:
        self.failures = {MARKER_500: 0, MARKER_400: 0}
        flaky = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status, payload = flaky.answer(self.path, body)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_: object) -> None:
                pass

        self.lock = threading.Lock()
        self.upstream = httpx.Client(base_url=upstream, timeout=120)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, path: str, body: bytes) -> tuple[int, bytes]:
        for marker, status in ((MARKER_500, 500), (MARKER_400, 400)):
            if marker.encode() in body:
                with self.lock:
                    self.failures[marker] += 1
                return status, json.dumps({"error": {"message": f"refusing {marker}",
                                                     "code": status}}).encode()
        response = self.upstream.post(path, content=body,
                                      headers={"content-type": "application/json"})
        return response.status_code, response.content

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.upstream.close()


@pytest.fixture
def flaky(server: Server) -> Iterator[FlakyModel]:
    model = FlakyModel(server.base_url)
    yield model
    model.close()


# -- the whole pipeline -------------------------------------------------------------------


def test_multi_megabyte_document_by_presigned_url(server: Server, s3: Any, loopback_media: None,
                                                  model_base: str) -> None:
    document = make_document(2 * MiB).encode()
    url = presign(s3, "chain/big.txt", document)
    before = engine_requests(server)
    started = time.monotonic()
    result = run_local(ChainRequest(document_url=url, question=QUESTION,
                                    options=ChainOptions(**FAST)), model_base)
    elapsed = time.monotonic() - started
    calls = engine_requests(server) - before
    print(f"\n2 MiB: {result.chunks} chunks, levels {result.reduce_levels}, "
          f"{elapsed:.1f} s, timings {result.timings}")

    assert result.document_bytes == len(document) and result.missing_chunks == []
    assert result.chunks > 100
    # Every chunk mapped exactly once: one engine request per chunk, none retried, and the
    # engine saw exactly the calls the result accounts for.
    assert result.usage.map_calls == result.chunks == len(result.partial_results)
    assert result.usage.retries == 0
    assert calls == result.usage.model_calls == result.usage.map_calls + result.usage.reduce_calls
    # The reduce tree is as deep as the sizes require: level 1 is exactly how the map's
    # answers pack into the reduce budget, and no level could have packed tighter.
    counter = TokenCounter(REPO / "data" / "tiny-chat" / "tokenizer.json")
    budget = Budget(counter, 512, FAST["max_output_tokens"], QUESTION)
    levels = result.reduce_levels
    assert levels[0] == result.chunks and levels[-1] == 1
    assert levels[1] == len(_groups(counter.count(result.partial_results), budget.reduce_tokens))
    widest = budget.reduce_tokens // TOKENS_PER_PARTIAL  # answers of zero tokens
    for upper, lower in itertools.pairwise(levels):
        assert -(-upper // widest) <= lower < upper
    assert result.reduce_depth >= 2
    assert result.answer
    assert result.timings.fetch_s > 0 and result.timings.map_s > 0
    # What a deployment sends back is JSON: the result survives the trip.
    assert ChainResult.model_validate_json(result.model_dump_json()) == result


def test_deterministic_at_temperature_zero(server: Server, model_base: str) -> None:
    request = ChainRequest(text=make_document(160 * 1024, seed=3),
                           options=ChainOptions(**FAST))
    first = run_local(request, model_base)
    second = run_local(request, model_base)
    assert first.reduce_depth >= 2
    assert (first.answer, first.partial_results, first.reduce_levels) == \
        (second.answer, second.partial_results, second.reduce_levels)


def test_streamed_answer_is_the_answer(server: Server, model_base: str) -> None:
    request = ChainRequest(text=make_document(48 * 1024, seed=4), question=QUESTION,
                           options=ChainOptions(max_output_tokens=16, map_concurrency=32))
    result = run_local(request, model_base)
    pieces = run_local_streamed(request, model_base)
    assert result.reduce_depth >= 1 and len(pieces) > 1
    assert "".join(pieces) == result.answer
    # One chunk: its map answer is the answer, streamed in one piece.
    single = ChainRequest(text="A short deployment note.", options=ChainOptions(**FAST))
    assert run_local_streamed(single, model_base) == [run_local(single, model_base).answer]


def test_request_and_result_survive_json() -> None:
    request = ChainRequest(document_url="https://bucket.s3.amazonaws.com/a.txt?X-Amz-Sig=%2Fx",
                           question="why?", options=ChainOptions(chunk_tokens=300,
                                                                 failure_policy="fail",
                                                                 invocation="async"))
    wire = request.model_dump_json()
    assert ChainRequest.model_validate_json(wire) == request
    # A pre-signed URL comes back byte for byte: its signature covers the exact query.
    assert json.loads(wire)["document_url"].endswith("X-Amz-Sig=%2Fx")


# -- bad input: a clear 4xx ------------------------------------------------------------------


def expect_http_error(request: ChainRequest, model_base: str, status: int) -> str:
    with pytest.raises(HTTPException) as caught:
        run_local(request, model_base)
    assert caught.value.status_code == status, caught.value.detail
    return str(caught.value.detail)


def test_default_policy_refuses_a_loopback_url(server: Server, s3: Any, model_base: str) -> None:
    assert not any(os.environ.get(name) for name in LOOPBACK_MEDIA)
    url = presign(s3, "chain/small.txt", make_document(4096).encode())
    before = engine_requests(server)
    detail = expect_http_error(ChainRequest(document_url=url, options=ChainOptions(**FAST)),
                               model_base, 400)
    assert "refused" in detail and "X-Amz" not in detail
    assert engine_requests(server) == before


class ExpiringStore:
    """127.0.0.1 relay to moto that enforces a pre-signed URL's expiry as S3 does (moto
    does not): past X-Amz-Date + X-Amz-Expires, 403 AccessDenied "Request has expired"."""

    EXPIRED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
               b"<Message>Request has expired</Message></Error>")

    def __init__(self, upstream: str) -> None:
        store = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = store.get(self.path)
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.upstream = httpx.Client(base_url=upstream, timeout=30)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def get(self, path: str) -> tuple[int, bytes]:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query))
        signed = datetime.datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.UTC)
        if time.time() > signed.timestamp() + int(query["X-Amz-Expires"]):
            return 403, self.EXPIRED
        response = self.upstream.get(path)
        return response.status_code, response.content

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.upstream.close()


def test_expired_url(s3: Any, s3_endpoint: str, loopback_media: None, model_base: str) -> None:
    store = ExpiringStore(s3_endpoint)
    try:
        # X-Amz-Date has whole seconds: a 1 s URL may be expired as soon as it is made.
        url = presign(s3, "chain/expiring.txt", make_document(4096).encode(), expires_s=3)
        url = url.replace(s3_endpoint, store.origin)
        assert httpx.get(url).status_code == 200  # before it expires, the relay serves it
        time.sleep(4.5)
        detail = expect_http_error(ChainRequest(document_url=url), model_base, 422)
    finally:
        store.close()
    assert "403 (AccessDenied)" in detail and "X-Amz" not in detail


@pytest.mark.parametrize(("body", "words"), [(b"", "empty"), (b" \n\n\t", "whitespace"),
                                             (b"\x89PNG\r\n\x1a\n\x00\x00", "binary"),
                                             (b"caf\xe9 au lait", "UTF-8")])
def test_unusable_document(s3: Any, loopback_media: None, model_base: str, body: bytes,
                           words: str) -> None:
    url = presign(s3, f"chain/unusable-{words}.bin", body)
    assert words in expect_http_error(ChainRequest(document_url=url), model_base, 400)


def test_options_out_of_range(model_base: str) -> None:
    for options in ({"chunk_tokens": 5}, {"map_concurrency": 0}, {"map_concurrency": 1000},
                    {"max_output_tokens": 0}, {"failure_policy": "maybe"},
                    {"deadline_s": 7200}, {"temperature": 3}):
        with pytest.raises(pydantic.ValidationError):
            ChainRequest.model_validate({"text": "hello", "options": options})
    with pytest.raises(pydantic.ValidationError, match="exactly one"):
        ChainRequest.model_validate({"question": "no document"})
    with pytest.raises(pydantic.ValidationError):
        ChainRequest.model_validate({"document_url": "file:///etc/passwd"})
    # In range for the schema, too big for this model's 512-token context: known only to
    # the splitter, still a 400 that says why.
    detail = expect_http_error(ChainRequest(text="hello", options=ChainOptions(
        chunk_tokens=1000)), model_base, 400)
    assert "chunk_tokens 1000 does not fit" in detail


# -- failures during the run -----------------------------------------------------------------


def test_a_chunk_that_keeps_failing(flaky: FlakyModel) -> None:
    text = make_document(24 * 1024, seed=5, marker_at={10: MARKER_500})
    base = f"{flaky.url}/environments/production"
    result = run_local(ChainRequest(text=text, options=ChainOptions(
        **FAST, max_attempts=3, failure_policy="partial")), base)
    assert len(result.missing_chunks) == 1
    missing = result.missing_chunks[0]
    assert "http 500" in missing.reason
    assert flaky.failures[MARKER_500] == 3  # retried, up to max_attempts
    assert len(result.partial_results) == result.chunks - 1 and result.answer

    detail = expect_http_error(ChainRequest(text=text, options=ChainOptions(
        **FAST, max_attempts=2, failure_policy="fail")), base, 502)
    assert f"{missing.index} (http 500" in detail


def test_a_4xx_from_the_model_is_not_retried(flaky: FlakyModel) -> None:
    text = make_document(24 * 1024, seed=5, marker_at={3: MARKER_400})
    result = run_local(ChainRequest(text=text, options=ChainOptions(**FAST, max_attempts=5)),
                       f"{flaky.url}/environments/production")
    assert [m.reason.split(":")[0] for m in result.missing_chunks] == ["http 400"]
    assert flaky.failures[MARKER_400] == 1


def test_deadline_passing_mid_map(server: Server, model_base: str) -> None:
    deadline_s = 4.0
    # Far more map work than 4 s holds, even on a quiet machine (~670 chunks, 2 at a time).
    request = ChainRequest(text=make_document(2 * 1024 * 1024, seed=11), options=ChainOptions(
        max_output_tokens=8, map_concurrency=2, deadline_s=deadline_s, failure_policy="fail"))
    started = time.monotonic()
    detail = expect_http_error(request, model_base, 504)
    elapsed = time.monotonic() - started
    assert "deadline" in detail
    assert elapsed < deadline_s + 1.5, elapsed
    # Cancelled, not abandoned: the engine holds none of the run's requests afterwards.
    end = time.monotonic() + 10
    while server.unfinished_requests() and time.monotonic() < end:
        time.sleep(0.2)
    assert server.unfinished_requests() == 0


# -- the deploy path -------------------------------------------------------------------------

LOAD_SCRIPT = """
import importlib.util, json, sys, pathlib, yaml
from truss.templates.shared import dynamic_config_resolver, secrets_resolver
chainlet, dynamic = pathlib.Path(sys.argv[1]), sys.argv[2]
dynamic_config_resolver.DYNAMIC_CONFIG_MOUNT_DIR = dynamic
sys.path[:0] = [str(chainlet / "packages"), *sys.argv[3:]]
config = yaml.safe_load((chainlet / "config.yaml").read_text())
spec = importlib.util.spec_from_file_location("model", chainlet / "model" / "model.py")
module = importlib.util.module_from_spec(spec)
sys.modules["model"] = module  # pydantic resolves the module's types through sys.modules
spec.loader.exec_module(module)
class Downloaded:  # the truss server's lazy-data resolver, with nothing to download
    def block_until_download_complete(self): pass
model = module.TrussChainletModel(config=config, data_dir=chainlet / "data",
                                  secrets=secrets_resolver.Secrets(config["secrets"]),
                                  lazy_data_resolver=Downloaded())
model.load()
print("LOADED", type(model._chainlet).__name__)
"""


def push_dryrun(tmp_path: Path, extra_env: dict[str, str] | None = None,
                entry: str = "chain/doc_chain.py", chain: str = "doc-map-reduce") -> Path:
    env = {**os.environ, "TMPDIR": str(tmp_path), "TRUSS_NO_UPDATE_CHECK": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           **(extra_env or {})}
    done = subprocess.run(["truss", "chains", "push", "--dryrun", entry],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp_path / ".chains_generated" / chain


def test_push_dryrun_generates_chainlets_that_load(tmp_path: Path) -> None:
    generated = push_dryrun(tmp_path)
    names = sorted(p.name for p in generated.iterdir())
    assert names == ["chainlet_ChatModel", "chainlet_DocumentQA", "chainlet_Mapper",
                     "chainlet_Reducer", "chainlet_Splitter"]
    # The model is this repository's truss, unchanged but for its name.
    model_dir = generated / "chainlet_ChatModel"
    assert (model_dir / "model" / "model.py").read_text() == \
        (REPO / "model" / "model.py").read_text()
    # It imports from its own bundle; its load() starts vLLM, which the session's runner
    # already shows working, so it is not started a second time here.
    imports = subprocess.run(
        [sys.executable, "-c", "import importlib.util, sys; sys.path.insert(0, sys.argv[1]); "
         "spec = importlib.util.spec_from_file_location('model', sys.argv[2]); "
         "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
         "print('IMPORTED', module.Model.__name__)",
         str(model_dir / "packages"), str(model_dir / "model" / "model.py")],
        env={**os.environ, "PYTHONPATH": ""}, capture_output=True, text=True, timeout=120,
        cwd=tmp_path)
    assert "IMPORTED Model" in imports.stdout, imports.stderr[-3000:]
    dynamic = tmp_path / "dynamic"
    dynamic.mkdir()
    services = {name: {"predict_url": f"https://chain-x.api.baseten.co/{name}/run_remote"}
                for name in ("ChatModel", "Splitter", "Mapper", "Reducer")}
    (dynamic / "dynamic_chainlet_config").write_text(json.dumps(services))
    # Only the chainlet's own bundle and the packages `external_package_dirs` names are on
    # the path (not this checkout's chain/); the tokenizer stands in for the weights mount.
    env = {**os.environ, "TRUSS_SECRET_baseten_chain_api_key": "dummy-key",
           "TRUSS_LLM_CHAIN_TOKENIZER": str(REPO / "data" / "tiny-chat"), "PYTHONPATH": ""}
    for chainlet in ("DocumentQA", "Splitter", "Mapper", "Reducer"):
        directory = generated / f"chainlet_{chainlet}"
        config = (directory / "config.yaml").read_text()
        assert f"- {REPO / 'packages'}" in config
        requirements = (directory / "pip_requirements.txt").read_text()
        assert "tokenizers" in requirements and "truss==" in requirements
        done = subprocess.run(
            [sys.executable, "-c", LOAD_SCRIPT, str(directory), str(dynamic),
             str(REPO / "packages")], env=env, capture_output=True, text=True, timeout=120,
            cwd=tmp_path)
        assert done.returncode == 0 and f"LOADED {chainlet}" in done.stdout, \
            done.stdout + done.stderr[-3000:]


def test_push_dryrun_of_the_streaming_chain(tmp_path: Path) -> None:
    generated = push_dryrun(tmp_path, entry="chain/doc_chain_stream.py",
                            chain="doc-map-reduce-stream")
    names = sorted(p.name for p in generated.iterdir())
    assert names == ["chainlet_ChatModel", "chainlet_DocumentQAStream", "chainlet_Mapper",
                     "chainlet_Reducer", "chainlet_Splitter"]
    model_py = (generated / "chainlet_DocumentQAStream" / "model" / "model.py").read_text()
    assert "async for chunk in result" in model_py  # truss streams what run_remote yields
    config = (generated / "chainlet_DocumentQAStream" / "config.yaml").read_text()
    assert "streaming_read_timeout: 1200" in config  # silent until the map and reduce end


def test_push_dryrun_against_an_existing_deployment(tmp_path: Path) -> None:
    url = "https://model-abc123.api.baseten.co/environments/production/sync/v1"
    generated = push_dryrun(tmp_path, {"TRUSS_LLM_CHAIN_MODEL_URL": url})
    names = sorted(p.name for p in generated.iterdir())
    assert "chainlet_ChatModel" not in names and "chainlet_Mapper" in names
    for chainlet in ("Mapper", "Reducer"):
        config = (generated / f"chainlet_{chainlet}" / "config.yaml").read_text()
        assert f"TRUSS_LLM_CHAIN_MODEL_URL: {url}" in config
