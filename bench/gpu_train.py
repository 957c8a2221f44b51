"""LoRA on a 1-3B Llama-shaped model (random weights, built from a config) on one GPU, through tunesmith's loop.

    python bench/gpu_train.py --size 1b --steps 30          # called by bench/gpu_check.sh

The base is built in bf16 on the GPU (train.dtype auto), attention SDPA (FlashAttention 2 when installed),
packing on, each decoder layer compiled. Printed: tokens/s over the steps after warm-up (compile), MFU =
4·N·T / (time · 989e12) (4·N·T: adapter methods skip the weight gradients; 989 TFLOP/s: H100/H200 dense bf16),
peak allocated memory next to plan's estimate for the same workload, and the loss at start and end.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

SIZES = {  # Llama shapes: ~1.1B (TinyLlama) and ~2.7B; "tiny" only checks the script itself (--device cpu)
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4
    ),
    "3b": dict(
        hidden_size=2560, intermediate_size=6912, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
    ),
}
PEAK_BF16_FLOPS = 989e12


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.config import RunConfig
    from tunesmith.data.tokenize import TokenizedExample
    from tunesmith.methods import apply_method, count_parameters
    from tunesmith.plan.estimate import Shape, Workload, estimate
    from tunesmith.train.loop import fit
    from tunesmith.train.precision import resolve
    from tunesmith.train.speed import attention_implementation

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", help="Also write the numbers to this file.")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to check the script on a tiny model.")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu_train.py needs a CUDA GPU (or --device cpu --size tiny to check the script).")
    cuda = args.device == "cuda"

    config = RunConfig.model_validate(
        {
            "method": "lora",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "data": {"max_length": args.seq_len},
            "train": {
                "dtype": "auto",
                "packing": True,
                "compile": not args.no_compile,
                "max_steps": args.steps,
                "batch_size": args.batch_size,
                "lr": 1e-4,
                "warmup_ratio": 0.0,
                "schedule": "constant",
                "log_every": 1,
            },
        }
    )
    precision = resolve(config.train.dtype, device=args.device)
    attention = attention_implementation(config.train.attention)
    shape = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **SIZES[args.size])
    shape._attn_implementation = attention
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device(args.device):
        model = LlamaForCausalLM(shape).to(precision.dtype)  # built on the GPU in the run's dtype
    model, _ = apply_method(model, config)
    trainable, total = count_parameters(model)
    built = time.perf_counter() - started
    print(
        f"model: Llama {args.size} {total / 1e9:.2f}B params, {trainable / 1e6:.1f}M trainable (LoRA r=16), "
        f"dtype {precision.name} ({precision.reason}), attention {attention}, built in {built:.1f}s",
        flush=True,
    )

    rng = random.Random(0)
    examples = []
    for _ in range(args.batch_size * args.steps):
        n = rng.randint(args.seq_len // 4, args.seq_len)
        answer = n // 3
        examples.append(TokenizedExample([rng.randrange(32000) for _ in range(n)], [0] * (n - answer) + [1] * answer))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = fit(model, examples, config.train, pad_id=0, row_tokens=args.seq_len, precision=precision)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    warm = result.history[3:] or result.history  # compile and autotuning happen in the first steps
    tokens = sum(r["tokens"] for r in warm)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in warm)
    rate = tokens / seconds
    mfu = 4 * total * rate / PEAK_BF16_FLOPS
    lengths = [len(e) for e in examples]
    work = Workload.for_run(config, examples, seq_len=args.seq_len, dtype=precision.name)
    planned = estimate(Shape.from_config(shape), work)
    # max_memory_allocated counts tensors only: the CUDA context term of the estimate is outside it.
    estimated = planned.peak_memory_bytes - planned.memory_bytes.get("cuda_context", 0)
    numbers = {
        "size": args.size,
        "params": total,
        "dtype": precision.name,
        "attention": attention,
        "compile": not args.no_compile,
        "tokens_per_s": round(rate, 1),
        "mfu": round(mfu, 4),
        "peak_allocated_gib": round(peak / 2**30, 2),
        "plan_estimate_gib": round(estimated / 2**30, 2),  # without the CUDA context
        "plan_dtype": work.dtype,
        "estimate_over_measured": round(estimated / peak, 3),
        "loss_first": result.history[0]["loss"],
        "loss_last": result.history[-1]["loss"],
        "mean_example_tokens": round(statistics.mean(lengths)),
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
    }
    print("RESULT " + json.dumps(numbers), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
