"""The map and reduce prompts, and how many tokens of the context each leaves free.

Counting is done with the model's own tokenizer (the `tokenizers` library reading the
model's tokenizer.json: no transformers import, a few milliseconds to load). The chat
template adds a few tokens per message that the bare text does not show; they are counted
as a fixed allowance per message plus a safety margin, so a full chunk still fits when
the server renders the template.
"""

from pathlib import Path

from tokenizers import Tokenizer

# ChatML spends `<|im_start|>role\n` and `<|im_end|>\n` on every message (about 5 tokens)
# and `<|im_start|>assistant\n` on the reply; other templates are similar. Rounded up.
TEMPLATE_TOKENS_PER_MESSAGE = 8
TEMPLATE_TOKENS_FIXED = 8
# Slack for tokens merging differently at the seams between a prompt and the text in it.
SAFETY_TOKENS = 16
# What one partial answer costs in a reduce prompt beyond its own tokens ("[12] ", "\n\n").
TOKENS_PER_PARTIAL = 8
REDUCE_MIN_FAN_IN = 2  # a reduce call that cannot merge two partials never finishes

# Short on purpose: every token here is taken from each chunk.
MAP_SYSTEM_SUMMARY = "Summarise this part of a long document, briefly and factually."
MAP_SYSTEM_QUESTION = ("Note briefly what this part of a long document says that answers "
                       "the question, or 'nothing'.\nQuestion: {question}")
REDUCE_SYSTEM_SUMMARY = "Merge these summaries of consecutive parts of a document into one."
REDUCE_SYSTEM_QUESTION = ("Merge these notes on consecutive parts of a document into one "
                          "brief answer.\nQuestion: {question}")
MAP_USER = "Part {number}/{total}:\n{chunk}"
PARTIAL_LINE = "[{number}] {text}"
PARTIAL_SEPARATOR = "\n\n"

Messages = list[dict[str, str]]


def map_messages(chunk: str, number: int, total: int, question: str | None) -> Messages:
    system = MAP_SYSTEM_QUESTION.format(question=question) if question else MAP_SYSTEM_SUMMARY
    return [{"role": "system", "content": system},
            {"role": "user", "content": MAP_USER.format(number=number, total=total,
                                                        chunk=chunk)}]


def reduce_messages(partials: list[str], question: str | None) -> Messages:
    system = (REDUCE_SYSTEM_QUESTION.format(question=question) if question
              else REDUCE_SYSTEM_SUMMARY)
    body = PARTIAL_SEPARATOR.join(PARTIAL_LINE.format(number=n, text=text)
                                  for n, text in enumerate(partials, 1))
    return [{"role": "system", "content": system}, {"role": "user", "content": body}]


class TokenCounter:
    """The model's tokenizer, counting plain text (no special tokens added)."""

    def __init__(self, tokenizer_file: Path) -> None:
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"no tokenizer at {tokenizer_file}: deployed, the splitter and the reducer "
                "read the model's tokenizer.json from the weights mount; elsewhere set "
                "TRUSS_LLM_CHAIN_TOKENIZER")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))

    def count(self, texts: list[str]) -> list[int]:
        """Token counts of many texts at once (the Rust side runs them in parallel)."""
        if not texts:
            return []
        return [len(e.ids) for e in self.tokenizer.encode_batch(texts,
                                                                add_special_tokens=False)]

    def messages_tokens(self, messages: Messages) -> int:
        texts = [m["content"] for m in messages]
        return (sum(self.count(texts)) + TEMPLATE_TOKENS_PER_MESSAGE * len(messages)
                + TEMPLATE_TOKENS_FIXED)


class Budget:
    """Tokens of document (map) and of partial answers (reduce) that one call can take."""

    def __init__(self, counter: TokenCounter, context_tokens: int, max_output_tokens: int,
                 question: str | None) -> None:
        self.context_tokens = context_tokens
        self.max_output_tokens = max_output_tokens
        # The prompts with nothing in them (a 6-digit part number for the longest case).
        map_empty = counter.messages_tokens(map_messages("", 999_999, 999_999, question))
        reduce_empty = counter.messages_tokens(reduce_messages([], question))
        free = context_tokens - max_output_tokens - SAFETY_TOKENS
        self.map_tokens = free - map_empty
        self.reduce_tokens = free - reduce_empty

    def problem(self, chunk_tokens: int | None) -> str | None:
        """Why these options cannot work with this context, or None."""
        limits = (f"the model's context is {self.context_tokens} tokens and "
                  f"max_output_tokens is {self.max_output_tokens}")
        if self.map_tokens < 1:
            return f"no room for any document text: {limits}; lower max_output_tokens"
        if chunk_tokens is not None and chunk_tokens > self.map_tokens:
            return (f"chunk_tokens {chunk_tokens} does not fit: {limits}, which leaves "
                    f"{self.map_tokens} tokens of document per call beside the prompt")
        if self.reduce_tokens < REDUCE_MIN_FAN_IN * (self.max_output_tokens + TOKENS_PER_PARTIAL):
            return (f"max_output_tokens is too large to merge answers: {limits}, and one "
                    f"reduce call must hold at least {REDUCE_MIN_FAN_IN} answers of up to "
                    f"max_output_tokens each")
        return None
