"""The chain's contract: what a caller sends, what it gets back, what chainlets pass on.

Deployed, these travel as JSON (truss validates the entrypoint's input with them and
answers a 400 naming the field when it does not fit); under `run_local` they pass as
objects. Ranges are validated here, so an option out of range never reaches a chainlet.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MIN_CHUNK_TOKENS = 32
MAX_CHUNK_TOKENS = 131_072
MAX_MAP_CONCURRENCY = 64
DEFAULT_MAP_CONCURRENCY = 8
MAX_OUTPUT_TOKENS = 4096
DEFAULT_OUTPUT_TOKENS = 256
CONTEXT_SHARE_FOR_OUTPUT = 8  # default output: at most 1/8 of the context
MAX_QUESTION_CHARS = 4000
MAX_URL_CHARS = 8192
MAX_INLINE_TEXT_BYTES = 90 * 1024 * 1024  # under Baseten's 100 MB body cap
MAX_MODEL_ATTEMPTS = 10
DEFAULT_MODEL_ATTEMPTS = 3
MAX_DEADLINE_S = 3600.0

FailurePolicy = Literal["partial", "fail"]
Invocation = Literal["sync", "async"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChainOptions(_Strict):
    """How to cut the document and how hard to try."""

    chunk_tokens: int | None = Field(
        default=None, ge=MIN_CHUNK_TOKENS, le=MAX_CHUNK_TOKENS,
        description="Tokens of document per map call; default: what the context holds "
        "beside the prompt and the output.")
    map_concurrency: int = Field(default=DEFAULT_MAP_CONCURRENCY, ge=1,
                                 le=MAX_MAP_CONCURRENCY)
    max_output_tokens: int | None = Field(
        default=None, ge=1, le=MAX_OUTPUT_TOKENS, description="Longest answer of one model "
        f"call; default {DEFAULT_OUTPUT_TOKENS}, or an eighth of a smaller context.")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    failure_policy: FailurePolicy = Field(
        default="partial", description="A chunk that still fails after its retries: "
        "'partial' answers from the rest and names it, 'fail' fails the run.")
    max_attempts: int = Field(default=DEFAULT_MODEL_ATTEMPTS, ge=1, le=MAX_MODEL_ATTEMPTS,
                              description="Tries per model call (429, 5xx, timeouts).")
    invocation: Invocation = Field(
        default="sync", description="'async' when sent through async_predict: the run may "
        "then take Baseten's async limit (3600 s) instead of the sync one (1200 s).")
    deadline_s: float | None = Field(
        default=None, gt=0, le=MAX_DEADLINE_S,
        description="A tighter budget for the whole run, in seconds.")


class ChainRequest(_Strict):
    """A document by URL (pre-signed, fetched by the chain) or inline, and a question."""

    # A plain string, not pydantic's HttpUrl: that re-encodes the query, and a pre-signed
    # URL's signature covers its exact bytes. The fetcher's policy judges it.
    document_url: str | None = Field(default=None, max_length=MAX_URL_CHARS,
                                     pattern=r"^[hH][tT][tT][pP][sS]?://")
    text: str | None = Field(default=None, max_length=MAX_INLINE_TEXT_BYTES)
    question: str | None = Field(default=None, min_length=1, max_length=MAX_QUESTION_CHARS)
    options: ChainOptions = Field(default_factory=ChainOptions)

    @model_validator(mode="after")
    def _one_source(self) -> "ChainRequest":
        if (self.document_url is None) == (self.text is None):
            raise ValueError("give exactly one of 'document_url' and 'text'")
        return self


class Usage(_Strict):
    model_calls: int = 0  # HTTP calls to the model, retries included
    map_calls: int = 0
    reduce_calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: "Usage") -> None:
        self.model_calls += other.model_calls
        self.map_calls += other.map_calls
        self.reduce_calls += other.reduce_calls
        self.retries += other.retries
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens


class Timings(_Strict):
    """Seconds spent in each stage of the run."""

    fetch_s: float = 0.0
    split_s: float = 0.0
    map_s: float = 0.0
    reduce_s: float = 0.0
    total_s: float = 0.0


class ChunkResult(_Strict):
    """One chunk's map outcome: its partial answer, or why there is none."""

    index: int
    attempts: int = 0
    text: str | None = None
    error: str | None = None  # "deadline", "http 500: ...", "timeout", "http 400: ..."


class MissingChunk(_Strict):
    index: int
    reason: str


class ChainResult(_Strict):
    answer: str
    partial_results: list[str] = Field(description="Map outputs, in document order.")
    missing_chunks: list[MissingChunk] = Field(default_factory=list)
    chunks: int = Field(description="How many chunks the document was cut into.")
    document_bytes: int
    document_tokens: int
    reduce_levels: list[int] = Field(
        description="Inputs at each reduce level, from the map's outputs down to 1.")
    usage: Usage
    timings: Timings

    @property
    def reduce_depth(self) -> int:
        return max(0, len(self.reduce_levels) - 1)


# -- between chainlets -------------------------------------------------------------------


class ChainError(_Strict):
    """A failure a chainlet reports as data, for the entrypoint to answer as a 4xx/5xx."""

    status: int
    message: str


class SplitRequest(_Strict):
    document_url: str | None = None
    text: str | None = None
    question: str | None = None
    chunk_tokens: int | None = None
    max_output_tokens: int | None = None
    deadline_unix: float


class SplitResult(_Strict):
    chunks: list[str] = Field(default_factory=list)
    chunk_tokens: list[int] = Field(default_factory=list)
    document_bytes: int = 0
    document_tokens: int = 0
    max_output_tokens: int = 0  # as asked, or the default for this model's context
    reduce_budget_tokens: int = 0  # tokens of partial answers one reduce call can take
    fetch_s: float = 0.0
    split_s: float = 0.0
    error: ChainError | None = None


class CallOptions(_Strict):
    """What every model call of one run shares."""

    question: str | None
    max_output_tokens: int
    temperature: float
    max_attempts: int


class MapRequest(_Strict):
    chunks: list[str]
    first_index: int = 0  # of chunks[0] in the document
    total_chunks: int
    concurrency: int
    call: CallOptions
    deadline_unix: float


class MapResult(_Strict):
    results: list[ChunkResult]
    usage: Usage


class ReduceRequest(_Strict):
    partials: list[str]
    budget_tokens: int
    call: CallOptions
    deadline_unix: float
    concurrency: int
    # Stop before the last call and hand back its messages (a streaming entrypoint makes
    # that call itself, streamed).
    stop_before_final: bool = False


class ReduceResult(_Strict):
    answer: str | None = None
    final_messages: list[dict[str, str]] | None = None
    levels: list[int] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    error: ChainError | None = None
