"""The chain's parts on their own: splitting, budgets, retries, bounded concurrency, config.

No engine here: the model is a small HTTP server on 127.0.0.1 scripted per test.
"""

import asyncio
import http.server
import json
import re
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import yaml
from conftest import REPO

sys.path.insert(0, str(REPO / "chain"))

import doc_config
import doc_llm
from doc_llm import DEADLINE, CallFailed, ChatEndpoint, chat, run_bounded
from doc_prompts import Budget, TokenCounter
from doc_schemas import CallOptions
from doc_split import DocumentError, decode, split_text

COUNTER = TokenCounter(REPO / "data" / "tiny-chat" / "tokenizer.json")
CALL = CallOptions(question=None, max_output_tokens=4, temperature=0.0, max_attempts=3)


def words(text: str) -> list[str]:
    return text.split()


# -- splitting -----------------------------------------------------------------------------


def test_chunks_fit_keep_order_and_cut_at_paragraphs() -> None:
    paragraphs = [" ".join(f"Sentence {p}.{s} about storage and deployment." for s in range(3))
                  for p in range(60)]
    text = "\n\n".join(paragraphs)
    chunks = split_text(text, 120, COUNTER)
    assert len(chunks) > 5
    assert all(tokens <= 120 for _, tokens in chunks)
    assert [COUNTER.count([c])[0] for c, _ in chunks] == [t for _, t in chunks]
    assert words(" ".join(c for c, _ in chunks)) == words(text)  # nothing lost or reordered
    # Every chunk starts where a paragraph starts: they all fit a chunk whole.
    assert all(chunk.startswith("Sentence ") and chunk.split(".")[1] == "0 about storage and "
               "deployment" for chunk, _ in chunks)


def test_a_paragraph_longer_than_a_chunk_is_cut_between_sentences() -> None:
    sentences = [f"Number {n} is a fine deployment sentence." for n in range(80)]
    chunks = split_text(" ".join(sentences), 60, COUNTER)
    assert len(chunks) > 3 and all(tokens <= 60 for _, tokens in chunks)
    assert all(re.fullmatch(r"(Number \d+ is a fine deployment sentence\. ?)+", chunk)
               for chunk, _ in chunks)


def test_a_sentence_longer_than_a_chunk_is_cut_between_tokens() -> None:
    text = "deployment" * 400  # one "word", no seams at all
    chunks = split_text(text, 50, COUNTER)
    assert len(chunks) > 1 and all(tokens <= 50 for _, tokens in chunks)
    assert "".join(chunk for chunk, _ in chunks) == text


@pytest.mark.parametrize(("raw", "words_in_error"), [(b"", "empty"), (b"\n \n", "whitespace"),
                                                     (b"ab\x00cd", "binary"),
                                                     (b"\xff\xfe", "UTF-8")])
def test_unusable_bytes(raw: bytes, words_in_error: str) -> None:
    with pytest.raises(DocumentError) as caught:
        decode(raw)
    assert caught.value.status == 400 and words_in_error in caught.value.message


def test_budget_names_what_does_not_fit() -> None:
    assert Budget(COUNTER, 512, 8, None).problem(None) is None
    assert "chunk_tokens 600 does not fit" in Budget(COUNTER, 512, 8, None).problem(600)
    assert "no room" in Budget(COUNTER, 512, 500, None).problem(None)
    assert "too large to merge" in Budget(COUNTER, 512, 200, None).problem(None)


# -- the deployed configuration agrees with config.yaml --------------------------------------


def test_deployed_defaults_match_config_yaml() -> None:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    engine = config["model_metadata"]["engine"]
    assert doc_config.DEPLOYED_MODEL_NAME == engine["served_model_name"]
    assert doc_config.DEPLOYED_CONTEXT_TOKENS == engine["max_model_len"]
    assert doc_config.DEPLOYED_WEIGHTS_SOURCE == config["weights"][0]["source"]


def test_settings_profile_and_overrides() -> None:
    local = doc_config.chain_settings({})
    assert (local.model_name, local.context_tokens) == ("tiny-chat", 512)
    assert local.tokenizer_file.is_file()
    tuned = doc_config.chain_settings({"TRUSS_LLM_CHAIN_CONTEXT_TOKENS": "1024"})
    assert tuned.context_tokens == 1024
    with pytest.raises(ValueError, match="no chain setting named 'colour'"):
        doc_config.chain_settings({"TRUSS_LLM_CHAIN_COLOUR": "red"})


# -- retries ---------------------------------------------------------------------------------


class ScriptedModel:
    """Answers each POST with the next (status, headers, delay) of its script, then 200s."""

    def __init__(self, script: list[tuple[int, dict[str, str], float]]) -> None:
        self.script = list(script)
        self.calls = 0
        model = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                model.calls += 1
                status, headers, delay = model.script.pop(0) if model.script else (200, {}, 0)
                time.sleep(delay)
                body = json.dumps({"choices": [{"message": {"content": "ok"}}],
                                   "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
                                  if status == 200 else {"error": {"message": "nope"}}).encode()
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting: what a timeout test wants

            def log_message(self, *_: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = ChatEndpoint(f"http://127.0.0.1:{self.server.server_address[1]}/v1/"
                                     "chat/completions", {}, "tiny-chat")
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted(request: pytest.FixtureRequest) -> Iterator[ScriptedModel]:
    model = ScriptedModel(request.param)
    yield model
    model.close()


def call(model: ScriptedModel, deadline_s: float = 30.0) -> doc_llm.Answer:
    async def go() -> doc_llm.Answer:
        async with httpx.AsyncClient() as client:
            return await chat(client, model.endpoint, [{"role": "user", "content": "hi"}],
                              CALL, time.monotonic() + deadline_s)
    return asyncio.run(go())


@pytest.mark.parametrize("scripted", [[(429, {"retry-after": "0"}, 0), (503, {}, 0)]],
                         indirect=True)
def test_429_and_5xx_are_retried(scripted: ScriptedModel, monkeypatch: pytest.MonkeyPatch
                                 ) -> None:
    monkeypatch.setattr(doc_llm, "BACKOFF_INITIAL_S", 0.01)
    answer = call(scripted)
    assert (answer.text, answer.attempts, scripted.calls) == ("ok", 3, 3)
    assert answer.usage.retries == 2


@pytest.mark.parametrize("scripted", [[(400, {}, 0)], [(404, {}, 0)], [(422, {}, 0)]],
                         indirect=True)
def test_a_4xx_is_final(scripted: ScriptedModel) -> None:
    with pytest.raises(CallFailed) as caught:
        call(scripted)
    assert caught.value.attempts == 1 and scripted.calls == 1
    assert caught.value.reason.startswith("http 4")


@pytest.mark.parametrize("scripted", [[(500, {}, 0)] * 5], indirect=True)
def test_retries_stop_at_max_attempts(scripted: ScriptedModel,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doc_llm, "BACKOFF_INITIAL_S", 0.01)
    with pytest.raises(CallFailed) as caught:
        call(scripted)
    assert caught.value.attempts == 3 == scripted.calls and caught.value.status == 500


@pytest.mark.parametrize("scripted", [[(200, {}, 2.0)]], indirect=True)
def test_a_timeout_is_retried(scripted: ScriptedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doc_llm, "ATTEMPT_TIMEOUT_S", 0.5)
    monkeypatch.setattr(doc_llm, "BACKOFF_INITIAL_S", 0.01)
    answer = call(scripted)
    assert answer.attempts == 2 and scripted.calls == 2


@pytest.mark.parametrize("scripted", [[(200, {}, 5.0)]], indirect=True)
def test_no_call_outlives_the_deadline(scripted: ScriptedModel) -> None:
    started = time.monotonic()
    with pytest.raises(CallFailed) as caught:
        call(scripted, deadline_s=1.0)
    assert time.monotonic() - started < 2.0
    assert "timeout" in caught.value.reason or caught.value.reason == DEADLINE


# -- bounded concurrency ---------------------------------------------------------------------


def test_run_bounded_holds_the_limit_and_stops_at_the_deadline() -> None:
    running, peak, done, cancelled = 0, 0, [], []

    async def work(index: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.05)
            done.append(index)
        except asyncio.CancelledError:
            cancelled.append(index)
            raise
        finally:
            running -= 1

    assert asyncio.run(run_bounded(20, 4, time.monotonic() + 30, work)) is True
    assert peak == 4 and sorted(done) == list(range(20))
    done.clear()
    assert asyncio.run(run_bounded(100, 4, time.monotonic() + 0.12, work)) is False
    assert 4 <= len(done) < 100 and len(cancelled) == 4 and running == 0
