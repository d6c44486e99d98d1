"""Build a tiny LoRA adapter for the tiny model in `data/tiny-chat-lora/`, deterministically.

The adapter exists to prove that adapters are served: under their own name, picked by the
request's `model`, and changing what the model says. So its weights are random (from a
fixed seed) rather than trained, and large enough to move the greedy choice: peft's usual
initialisation (B = 0) would leave the model's output unchanged.

Run: `.venv/bin/python tools/make_tiny_lora.py [--base data/tiny-chat] [--out data/tiny-chat-lora]`
(a few seconds; needs `peft`, from requirements/dev.txt).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SEED = 20261130
RANK = 8
ALPHA = 16
# Every projection vLLM can put an adapter on in a Llama layer.
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Standard deviation of the random A and B matrices: the update B @ A * ALPHA / RANK is
# then about as large as the base weights (initializer_range 0.2), enough to change the
# greedy choice at most steps.
WEIGHT_STD = 0.2
REPO = Path(__file__).resolve().parents[1]


def build(base: Path, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGET_MODULES,
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * WEIGHT_STD)
    if out.exists():
        shutil.rmtree(out)
    peft_model.save_pretrained(out)
    # A relative name, not this machine's path: the adapter is mounted beside its base.
    adapter_config = out / "adapter_config.json"
    values = json.loads(adapter_config.read_text())
    values["base_model_name_or_path"] = "tiny-chat"
    values["target_modules"] = sorted(values["target_modules"])  # peft writes a set's order
    adapter_config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    readme = out / "README.md"  # peft's model card template: not ours to ship
    readme.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=REPO / "data" / "tiny-chat")
    parser.add_argument("--out", type=Path, default=REPO / "data" / "tiny-chat-lora")
    args = parser.parse_args()
    build(args.base, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
