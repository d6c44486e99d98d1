"""Build the tiny offline vision-language model in `data/tiny-vlm/`, deterministically.

Why: the image path (a fetched image reaching the engine, every media part shape refused or
routed by our fetcher) must run end to end in the test suite on a CPU, with no model hub.
The architecture is BLIP-2 (`Blip2ForConditionalGeneration`: a ViT vision tower, a Q-Former
that turns an image into a fixed number of query tokens, and an OPT text model), chosen by
what vLLM 0.32's CPU build serves here. LLaVA, PaliGemma, Qwen2-VL/2.5-VL, Gemma 3,
InternVL and LLaVA-NeXT all reach vLLM code that imports torchvision (its shared vision
encoder helper imports the Pixtral encoder), and the only torchvision for torch 2.13 on
these machines is a CUDA build that breaks `import vllm` (see FACTS.md).

Sizes: a 2-layer ViT on 32x32 images in 8x8 patches, a 1-layer Q-Former with 8 queries (so
one image is 8 `<image>` tokens, which vLLM puts at the start of the prompt), and an OPT
text model of tiny-chat's width and depth. The tokenizer is tiny-chat's plus `<image>`;
the chat template is tiny-chat's. Weights are random from a fixed seed; the output is
nonsense by design. The processor config (with the image processor's) is saved beside the
weights, so vLLM and transformers load everything offline.

Run: `.venv/bin/python tools/make_tiny_vlm.py [--out data/tiny-vlm]` (a few seconds; it reads
`data/tiny-chat`, built by tools/make_tiny_model.py).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from make_tiny_model import ARCHITECTURE, SEED

ROOT = Path(__file__).resolve().parent.parent
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
PATCH_SIZE = 8
QUERY_TOKENS = 8  # image tokens in the prompt, whatever the image's size
# Head size 32 everywhere: the smallest every CPU attention path here accepts.
VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
}
QFORMER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "encoder_hidden_size": VISION["hidden_size"],
    "cross_attention_frequency": 1,
}
# CLIP's normalisation constants, as BLIP-2 checkpoints use.
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def build(chat_dir: Path, out: Path) -> None:
    import torch
    from transformers import (
        AutoTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessorPil,
        GenerationConfig,
        OPTConfig,
    )

    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.image_token = IMAGE_TOKEN
    chat_template = (chat_dir / "chat_template.jinja").read_text()
    tokenizer.chat_template = chat_template
    image_processor = BlipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_resize=True,
        do_normalize=True, do_convert_rgb=True, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                               num_query_tokens=QUERY_TOKENS)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image", IMAGE_TOKEN), ("eos", "<|im_end|>"), ("pad", "<|endoftext|>"))}

    torch.manual_seed(SEED)
    hidden = ARCHITECTURE["hidden_size"]
    text = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, word_embed_proj_dim=hidden,
        num_hidden_layers=ARCHITECTURE["num_hidden_layers"],
        num_attention_heads=ARCHITECTURE["num_attention_heads"],
        ffn_dim=ARCHITECTURE["intermediate_size"], max_position_embeddings=2048,
        bos_token_id=ids["eos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
        init_std=0.2)  # peaked random logits, as in tiny-chat
    config = Blip2Config(
        vision_config=Blip2VisionConfig(**VISION).to_dict(),
        qformer_config=Blip2QFormerConfig(**QFORMER).to_dict(),
        text_config=text.to_dict(), num_query_tokens=QUERY_TOKENS,
        image_token_index=ids["image"])
    config.eos_token_id, config.pad_token_id = ids["eos"], ids["pad"]
    model = Blip2ForConditionalGeneration(config).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "chat_template.jinja").write_text(chat_template)
    GenerationConfig(eos_token_id=ids["eos"], pad_token_id=ids["pad"]).save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chat", type=Path, default=ROOT / "data" / "tiny-chat",
                        help="the tiny chat model whose tokenizer and template are reused")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "tiny-vlm")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    build(args.chat, args.out)
    print(f"wrote {args.out} ({QUERY_TOKENS} tokens per image)")


if __name__ == "__main__":
    main()
