"""Build the tiny offline chat model in `data/tiny-chat/`, deterministically.

No model hub is reachable from our machines, so the model served on a CPU (and in every
test) is made here: a random-weight Llama-architecture network with a byte-level BPE
tokenizer trained on a corpus this script generates from a fixed seed, and a ChatML chat
template that renders tools, assistant tool calls and tool results (the Hermes format, so
vLLM's `hermes` tool-call parser applies). Its output is nonsense by design; what matters is
that the real engine serves a real model whose greedy output `transformers` can reproduce.

Run: `.venv/bin/python tools/make_tiny_model.py [--out data/tiny-chat]` (about 5 s).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

SEED = 20261126
VOCAB_SIZE = 2048
# Attention head size must be one the CPU attention backend accepts (32 is the smallest).
ARCHITECTURE = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 256,
    "max_position_embeddings": 4096,
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Hermes tool-call markers: vLLM's hermes parser looks them up as single tokens.
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

CHAT_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls | default([], true) %}
{%- set call = tool_call.function if tool_call.function is defined else tool_call %}
{%- set arguments = call.arguments if call.arguments is string else (call.arguments | tojson) %}
{{- '\\n<tool_call>\\n{"name": "' + call.name + '", "arguments": ' + arguments + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

_WORDS = (
    "the a an of to and in is it that for on with as was at by be this from or have not are "
    "but they which you one all were we when there can an your more if will would about "
    "model models engine request response token tokens stream streaming server client chat "
    "message messages user assistant system tool tools function call arguments result json "
    "schema object array string number integer boolean null true false name value type "
    "weather city temperature celsius fahrenheit today tomorrow time date hour minute second "
    "file files upload download url bucket storage deploy deployment replica gpu cpu memory "
    "queue async predict wake status error retry timeout limit budget latency throughput "
    "hello world please thank question answer explain summarize translate write code list "
    "python rust go java data table row column sum mean count first last next previous "
    "red green blue small large fast slow good bad new old open close start stop run test"
).split()


def make_corpus(rng: random.Random, sentences: int = 6000) -> list[str]:
    """Generated text: prose, numbers, JSON and chat markup, so common pieces get merges."""
    lines = []
    for i in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        kind = i % 5
        if kind == 0:
            lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
        elif kind == 1:
            obj = {rng.choice(_WORDS): rng.choice([rng.randint(-999, 9999), rng.choice(_WORDS),
                                                   rng.random() < 0.5, None])
                   for _ in range(rng.randint(1, 4))}
            lines.append(json.dumps(obj))
        elif kind == 2:
            lines.append(f"{rng.randint(0, 10**6)} {' '.join(words)} {rng.random():.4f}")
        elif kind == 3:
            role = rng.choice(["user", "assistant", "system", "tool"])
            lines.append(f"<|im_start|>{role}\n{' '.join(words)}<|im_end|>")
        else:
            args = {w: rng.choice(_WORDS) for w in words[:2]}
            lines.append(f'<tool_call>\n{{"name": "{words[0]}", "arguments": {json.dumps(args)}}}'
                         "\n</tool_call>")
    return lines


def build_tokenizer(out: Path, rng: random.Random) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(TOOL_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(make_corpus(rng), trainer=trainer)
    tokenizer.add_tokens(TOOL_TOKENS)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=ARCHITECTURE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return len(fast)


def build_model(out: Path, vocab_size: int, eos_id: int, pad_id: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=vocab_size,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
        **ARCHITECTURE,
    )
    # A wider init than the default 0.02 makes the random logits peaked, so greedy decoding
    # is stable across float summation orders (engine vs transformers cross-check).
    config.initializer_range = 0.2
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id).save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent.parent / "data" / "tiny-chat")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    rng = random.Random(SEED)
    vocab_size = build_tokenizer(args.out, rng)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.out)
    build_model(args.out, vocab_size, tok.convert_tokens_to_ids("<|im_end|>"),
                tok.convert_tokens_to_ids("<|endoftext|>"))
    print(f"wrote {args.out} (vocab {vocab_size})")


if __name__ == "__main__":
    main()
