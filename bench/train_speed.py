"""tunesmith versus TRL's SFTTrainer + PEFT LoRA on the same model, data and hyper-parameters.

    pip install -c constraints.txt -e ".[bench]"
    python bench/train_speed.py --steps 20                 # small random Llama (~20M params, 32k vocab)
    python bench/train_speed.py --model gemma-3-270m --steps 4 --only tunesmith trl   # the quickstart model

Each contender runs in its own subprocess (so peak RSS is its own) on the same chat dataset of varied
lengths: LoRA r=16 on all linear layers, 8 examples per step, max length 512, constant lr, fp32 (or
--bf16 for all). Under --bf16, tunesmith trains as train.dtype bf16 does (frozen base in bf16, LoRA
weights and optimizer state fp32, autocast); trl is TRL's bf16=True over an fp32 model (autocast) and
trl-bf16 its best bf16 setting (model loaded in bf16 as well); tunesmith-fp32 stays fp32 whatever the
flag, for tunesmith's own bf16/fp32 ratio. Each runs its own defaults otherwise: TRL with gradient
checkpointing (its default), tunesmith with its defaults (gradient checkpointing, memory released
after each step); tunesmith-lean also releases memory after every layer (train.release_memory: layer).
Printed per contender: real (non-padding) tokens/s, peak RSS, held-out answer loss after training
(measured the same way for all), and the ratios tunesmith / contender.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = (
    "patient reports pain fever cough since days weeks takes daily dose tablet record json field value note "
    "the a of and with for in on at by from to is was were has have had"
).split()
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
BF16 = {"on": False}  # set in each worker from --bf16


def make_data(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(n):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(10, 160)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(5, 80)))
            handle.write(
                json.dumps(
                    {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
                )
                + "\n"
            )


def make_model(path: Path) -> None:
    from tests.conftest import build_model, build_tokenizer

    from tunesmith.data.tokenize import DEFAULT_CHAT_TEMPLATE

    shape = dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
    )
    build_model(32000, seed=0, **shape).save_pretrained(path)
    build_tokenizer(DEFAULT_CHAT_TEMPLATE).save_pretrained(path)


def held_out_loss(model, tokenizer, data: Path) -> float:
    from tunesmith.data.formats import read_conversations
    from tunesmith.data.tokenize import tokenize_all
    from tunesmith.evaluate.compare import mean_answer_loss

    examples, _ = tokenize_all(tokenizer, read_conversations(data)[0], 512)
    model.eval()
    return mean_answer_loss(model, examples, tokenizer.pad_token_id, batch_size=8)


def run_tunesmith(
    model_dir: Path, train: Path, test: Path, steps: int, packing: bool, release: str = "auto", fp32: bool = False
) -> dict:
    import torch
    from rich.console import Console

    from tunesmith.config import LoraConfig, TrainConfig
    from tunesmith.data.formats import read_conversations
    from tunesmith.data.tokenize import tokenize_all, use_chat_template
    from tunesmith.methods.lora import apply_lora
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.train.loop import fit
    from tunesmith.train.precision import keep_trainable_fp32

    tokenizer = load_tokenizer(str(model_dir))
    use_chat_template(tokenizer, None)
    examples, _ = tokenize_all(tokenizer, read_conversations(train)[0], 512)
    bf16 = BF16["on"] and not fp32
    model, _ = apply_lora(load_model(str(model_dir), torch.bfloat16 if bf16 else torch.float32), LoraConfig(**LORA))
    keep_trainable_fp32(model)  # as methods.apply_method does
    settings = TrainConfig(
        max_steps=steps,
        batch_size=8,
        lr=1e-3,
        warmup_ratio=0.0,
        schedule="constant",
        packing=packing,
        dtype="bf16" if bf16 else "fp32",
        release_memory=release,
    )
    result = fit(model, examples, settings, tokenizer.pad_token_id, console=Console(quiet=True), row_tokens=512)
    return {"tokens": result.tokens, "seconds": result.seconds, "loss": held_out_loss(model, tokenizer, test)}


def run_trl(model_dir: Path, train: Path, test: Path, steps: int, packing: bool, bf16_weights: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunesmith.data.tokenize import use_chat_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    use_chat_template(tokenizer, None)  # the same rendering as tunesmith (Gemma's GGUF tokenizer has none)
    rows = [json.loads(line)["messages"] for line in train.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": m[:1], "completion": m[1:]} for m in rows])
    weights = torch.bfloat16 if BF16["on"] and bf16_weights else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights)
    counted = {"tokens": 0}

    def count(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        if module.training and ids is not None:
            counted["tokens"] += int(mask.sum()) if mask is not None else int(ids.numel())

    model.register_forward_pre_hook(count, with_kwargs=True)
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            lr_scheduler_type="constant",
            warmup_steps=0,
            logging_steps=steps,
            save_strategy="no",
            report_to="none",
            max_length=512,
            packing=packing,
            padding_free=packing,
            bf16=BF16["on"],
            use_cpu=True,
            seed=42,
            dataloader_num_workers=0,
        )
        peft = LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {"tokens": counted["tokens"], "seconds": seconds, "loss": held_out_loss(trainer.model, tokenizer, test)}


CONTENDERS = {
    "tunesmith": lambda *a: run_tunesmith(*a, packing=False),
    "tunesmith-packed": lambda *a: run_tunesmith(*a, packing=True),
    "tunesmith-lean": lambda *a: run_tunesmith(*a, packing=False, release="layer"),
    "tunesmith-fp32": lambda *a: run_tunesmith(*a, packing=False, fp32=True),
    "trl": lambda *a: run_trl(*a, packing=False),
    "trl-bf16": lambda *a: run_trl(*a, packing=False, bf16_weights=True),
    "trl-packed": lambda *a: run_trl(*a, packing=True),
}


def worker(name: str, model_dir: Path, train: Path, test: Path, steps: int) -> None:
    import torch

    torch.manual_seed(0)
    result = CONTENDERS[name](model_dir, train, test, steps)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps per contender [default: 20].")
    parser.add_argument("--examples", type=int, default=400, help="Training examples [default: 400].")
    parser.add_argument("--only", nargs="*", choices=sorted(CONTENDERS), help="Run only these contenders.")
    parser.add_argument("--model", help="Use this model (e.g. gemma-3-270m) instead of the small random Llama.")
    parser.add_argument("--bf16", action="store_true", help="bf16 compute for every contender (TRL's bf16=True).")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    BF16["on"] = args.bf16
    if args.worker:
        base = Path(args.dir)
        model_dir = Path(args.model) if args.model else base / "model"
        worker(args.worker, model_dir, base / "train.jsonl", base / "test.jsonl", args.steps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        extra = []
        if args.model:
            from tunesmith.models import resolve_model_path

            extra = ["--model", resolve_model_path(args.model)]
        else:
            make_model(base / "model")
        make_data(base / "train.jsonl", args.examples, seed=1)
        make_data(base / "test.jsonl", 64, seed=2)
        results = {}
        for name in args.only or list(CONTENDERS):
            done = subprocess.run(
                [sys.executable, __file__, "--worker", name, "--dir", tmp, "--steps", str(args.steps), *extra]
                + (["--bf16"] if args.bf16 else []),
                capture_output=True,
                text=True,
            )
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{name} failed:\n{done.stderr[-3000:]}")
                continue
            results[name] = json.loads(line[len("RESULT ") :])
    ours = results.get("tunesmith")
    print(
        f"{'contender':18} {'tokens/s':>10} {'peak RSS MiB':>13} {'held-out loss':>14} {'ours/it tok/s':>14} "
        f"{'ours/it RSS':>12} {'loss diff':>10}"
    )
    for name, r in results.items():
        rate = r["tokens"] / r["seconds"]
        row = f"{name:18} {rate:10.0f} {r['peak_rss_bytes'] / 2**20:13.0f} {r['loss']:14.4f}"
        if ours:
            our_rate = ours["tokens"] / ours["seconds"]
            row += (
                f" {our_rate / rate:14.2f} {ours['peak_rss_bytes'] / r['peak_rss_bytes']:12.2f}"
                f" {ours['loss'] / r['loss'] - 1:+10.2%}"
            )
        print(row)


if __name__ == "__main__":
    main()
