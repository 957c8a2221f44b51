"""The generation engine on a GPU: tokens/s at batch 1 and 8 beside transformers' generate, and the bandwidth bound.

    python bench/gpu_generate.py --size 1b                      # called by bench/gpu_check.sh (CUDA)
    python bench/gpu_generate.py --size tiny --device cpu       # checks the script itself

A random Llama of bench/gpu_train.py's shapes in bf16 (~1.1B for `1b`) with a random rank-16 all-linear LoRA
(merged for generation by generation_view, as compare and serve generate), 16 prompts of 128 random tokens, greedy,
64 new tokens each (no stop token: every row runs to the limit, so both paths produce the same token count).
Printed: the engine's tokens/s at batch 1 (4 prompts) and batch 8 (all 16), transformers' generate at batch 8 on
the same prompts, whether their greedy answers agree, and the weight-read bound at batch 1 (weight bytes over a
measured device-to-device copy bandwidth).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    import torch
    from gpu_train import SIZES
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.generation import Engine, Request, generation_view

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=1024, **SIZES[args.size])
    base = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    prompts = [torch.randint(0, 32000, (128,)).tolist() for _ in range(16)]

    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    block = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=device)
    sync()
    start = time.perf_counter()
    for _ in range(5):
        block.clone()
    sync()
    bandwidth = 2 * 5 * block.numel() / (time.perf_counter() - start)  # a copy reads and writes
    del block
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; weights {weights / 1e9:.2f} GB")
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s -> batch-1 bound {bandwidth / weights:.0f} tokens/s")

    answers = {}
    with generation_view(model):
        for rows, count in ((1, 4), (8, 16)):
            engine = Engine(model, max_rows=rows, max_length=128 + args.new_tokens + 1)
            engine.run([Request(prompts[0], 4)])  # warm-up
            requests = [Request(ids, args.new_tokens) for ids in prompts[:count]]
            sync()
            start = time.perf_counter()
            engine.run(requests)
            sync()
            seconds = time.perf_counter() - start
            answers[rows] = [r.tokens for r in requests]
            print(f"engine batch {rows}: {sum(map(len, answers[rows])) / seconds:8.1f} tokens/s ({seconds:.1f} s)")
    with torch.inference_mode():
        ids = torch.tensor(prompts, device=device)
        sync()
        start = time.perf_counter()
        hf = []
        for first in range(0, 16, 8):
            out = model.generate(
                input_ids=ids[first : first + 8], attention_mask=torch.ones_like(ids[first : first + 8]),
                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
            )  # fmt: skip
            hf += out[:, 128:].tolist()
        sync()
        seconds = time.perf_counter() - start
    print(f"transformers generate batch 8: {16 * args.new_tokens / seconds:8.1f} tokens/s ({seconds:.1f} s)")
    same = sum(a == b for a, b in zip(answers[8], hf, strict=True))
    print(f"greedy answers identical, engine (merged adapter) vs generate (unmerged): {same} of 16")


if __name__ == "__main__":
    main()
