"""Get the document's text (fetched by URL or given inline) and cut it into chunks.

The fetch is `truss_llm.media`'s bounded fetcher with the model's own policy
(`TRUSS_LLM_MEDIA_*`, the same variables the model reads): object-store hosts only, no
private or loopback addresses, the size cap, the deadline, retries on 5xx and timeouts,
the query string never logged. The chain adds one cap of its own, below Baseten's 100 MB
request limit: the chunks travel to the mapper in one call.

Chunks are cut where the text has seams: paragraphs (blank lines) first, sentences within
a paragraph too long for one chunk, and only a sentence longer than a chunk is cut between
tokens. Consecutive pieces are packed up to the chunk size, counted with the model's
tokenizer.
"""

import asyncio
import re
import time
from dataclasses import dataclass
from http import HTTPStatus

from doc_llm import monotonic_deadline
from doc_prompts import Budget, TokenCounter
from doc_schemas import (
    CONTEXT_SHARE_FOR_OUTPUT,
    DEFAULT_OUTPUT_TOKENS,
    ChainError,
    SplitRequest,
    SplitResult,
)
from truss_llm.media.fetch import fetch_to_file
from truss_llm.media.policy import FetchError, FetchPolicy

MiB = 1024 * 1024
MAX_DOCUMENT_BYTES = 64 * MiB
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
SENTENCE_END = re.compile(r"(?<=[.!?。])\s+")
PARAGRAPH_JOIN = "\n\n"
SENTENCE_JOIN = " "
BINARY_SAMPLE_BYTES = 8192  # a NUL byte this early means binary (git judges files so)


class DocumentError(Exception):
    """The document cannot be used; `status` is what the caller is answered."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message

    def as_error(self) -> ChainError:
        return ChainError(status=self.status, message=self.message)


async def fetch_text(url: str, policy: FetchPolicy, deadline: float) -> tuple[str, int]:
    """The document at `url` as text, and its size in bytes; `deadline` is monotonic."""
    capped = policy.model_copy(update={"max_bytes": min(policy.max_bytes, MAX_DOCUMENT_BYTES)})
    try:
        fetched = await fetch_to_file(url, capped, deadline=deadline)
    except FetchError as exc:
        raise DocumentError(exc.status, f"could not fetch the document ({exc.reason}): "
                                        f"{exc.message}") from None
    try:
        raw = await asyncio.to_thread(fetched.path.read_bytes)
    finally:
        fetched.path.unlink(missing_ok=True)
    return decode(raw), len(raw)


def decode(raw: bytes) -> str:
    """UTF-8 text with something in it, else a 400 saying what is wrong."""
    if not raw.strip():
        raise DocumentError(HTTPStatus.BAD_REQUEST, "the document is empty"
                            if not raw else "the document holds only whitespace")
    if b"\x00" in raw[:BINARY_SAMPLE_BYTES]:
        raise DocumentError(HTTPStatus.BAD_REQUEST,
                            "the document is binary (it contains NUL bytes); only UTF-8 "
                            "text can be summarised")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(HTTPStatus.BAD_REQUEST,
                            f"the document is not UTF-8 text (invalid byte at offset "
                            f"{exc.start}); only UTF-8 text can be summarised") from None


@dataclass(frozen=True)
class Piece:
    text: str
    tokens: int
    joiner: str  # what follows it inside a chunk: a blank line, a space, or nothing


def _hard_split(text: str, limit: int, counter: TokenCounter, joiner: str) -> list[Piece]:
    """A sentence longer than a chunk: cut between tokens, `limit` tokens at a time."""
    offsets = counter.tokenizer.encode(text, add_special_tokens=False).offsets
    pieces = []
    for start in range(0, len(offsets), limit):
        end = min(start + limit, len(offsets))
        begin_char = offsets[start][0] if start else 0
        end_char = offsets[end][0] if end < len(offsets) else len(text)
        pieces.append(Piece(text[begin_char:end_char], end - start, ""))
    pieces[-1] = Piece(pieces[-1].text, pieces[-1].tokens, joiner)
    return pieces


def _pieces(paragraphs: list[str], limit: int, counter: TokenCounter) -> list[Piece]:
    """Paragraphs as they are when they fit, else their sentences, else token slices."""
    pieces: list[Piece] = []
    for paragraph, tokens in zip(paragraphs, counter.count(paragraphs), strict=True):
        if tokens <= limit:
            pieces.append(Piece(paragraph, tokens, PARAGRAPH_JOIN))
            continue
        sentences = [s for s in SENTENCE_END.split(paragraph) if s]
        counts = counter.count(sentences)
        for n, (sentence, count) in enumerate(zip(sentences, counts, strict=True)):
            joiner = PARAGRAPH_JOIN if n == len(sentences) - 1 else SENTENCE_JOIN
            if count <= limit:
                pieces.append(Piece(sentence, count, joiner))
            else:
                pieces.extend(_hard_split(sentence, limit, counter, joiner))
    return pieces


def _pack(pieces: list[Piece], limit: int, join_tokens: int) -> list[list[Piece]]:
    """Consecutive pieces, greedily, while their tokens (and joiners) fit `limit`."""
    groups: list[list[Piece]] = []
    current: list[Piece] = []
    used = 0
    for piece in pieces:
        cost = piece.tokens + (join_tokens if current else 0)
        if current and used + cost > limit:
            groups.append(current)
            current, used, cost = [], 0, piece.tokens
        current.append(piece)
        used += cost
    if current:
        groups.append(current)
    return groups


def _join(group: list[Piece]) -> str:
    return "".join(piece.text + piece.joiner for piece in group[:-1]) + group[-1].text


def _emit(groups: list[list[Piece]], limit: int, counter: TokenCounter,
          out: list[tuple[str, int]]) -> None:
    """Count each packed chunk exactly; one that grew past `limit` at a seam is halved."""
    texts = [_join(group) for group in groups]
    for group, text, tokens in zip(groups, texts, counter.count(texts), strict=True):
        if tokens <= limit or len(group) == 1:
            out.append((text, tokens))
        else:
            half = len(group) // 2
            _emit([group[:half], group[half:]], limit, counter, out)


def split_text(text: str, chunk_tokens: int, counter: TokenCounter) -> list[tuple[str, int]]:
    """Chunks of at most `chunk_tokens` tokens each, in order, with their token counts."""
    paragraphs = [p.strip() for p in PARAGRAPH_BREAK.split(text) if p.strip()]
    join_tokens = max(counter.count([PARAGRAPH_JOIN, SENTENCE_JOIN]))
    chunks: list[tuple[str, int]] = []
    _emit(_pack(_pieces(paragraphs, chunk_tokens, counter), chunk_tokens, join_tokens),
          chunk_tokens, counter, chunks)
    return chunks


async def split_document(request: SplitRequest, counter: TokenCounter, policy: FetchPolicy,
                         context_tokens: int) -> SplitResult:
    """The splitter's whole job; every problem comes back as `error`, never raised."""
    max_output_tokens = request.max_output_tokens or min(
        DEFAULT_OUTPUT_TOKENS, context_tokens // CONTEXT_SHARE_FOR_OUTPUT)
    budget = Budget(counter, context_tokens, max_output_tokens, request.question)
    if problem := budget.problem(request.chunk_tokens):
        return SplitResult(error=ChainError(status=HTTPStatus.BAD_REQUEST, message=problem))
    started = time.monotonic()
    try:
        if request.document_url is not None:
            text, size = await fetch_text(request.document_url, policy,
                                          monotonic_deadline(request.deadline_unix))
        else:
            raw = (request.text or "").encode()
            text, size = decode(raw), len(raw)
    except DocumentError as exc:
        return SplitResult(error=exc.as_error())
    fetched = time.monotonic()
    chunk_tokens = request.chunk_tokens or budget.map_tokens
    # Tokenizing megabytes takes seconds of CPU: off the event loop.
    chunks = await asyncio.to_thread(split_text, text, chunk_tokens, counter)
    return SplitResult(
        chunks=[text for text, _ in chunks], chunk_tokens=[tokens for _, tokens in chunks],
        document_bytes=size, document_tokens=sum(tokens for _, tokens in chunks),
        max_output_tokens=max_output_tokens, reduce_budget_tokens=budget.reduce_tokens,
        fetch_s=fetched - started, split_s=time.monotonic() - fetched)
