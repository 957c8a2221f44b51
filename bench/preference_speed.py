"""tunesmith's DPO training versus TRL's DPOTrainer on the same pairs, model and settings (issue 18).

    .venv/bin/python bench/preference_speed.py --model llama --steps 2 --pairs 16     # smoke run, both sides
    .venv/bin/python bench/preference_speed.py --model gemma --steps 5 --batch 4       # Gemma 3 270M: < 5 min a side
    .venv/bin/python bench/preference_speed.py --model gemma --dtype bf16 --skip-trl   # one side only

Workloads: `--model gemma` is the embedded Gemma 3 270M (tunesmith's converted checkpoint, loaded by both tools
from the same directory); `--model llama` a random Llama (hidden 512, 8 layers, vocab 32k, tunesmith's test
tokenizer) built here and saved to a temporary directory, so both tools load the same weights.

Data: a seeded synthetic preference set, prompts of about 60 tokens and chosen/rejected answers of about 40
tokens each of similar lengths (the chosen answers draw from one word list and the rejected from another, so
there is something to learn), written as {"prompt", "chosen", "rejected"} JSONL for tunesmith and given to TRL
as a datasets.Dataset of the same pairs in conversational form, rendered by both with tunesmith's chat template
(the model's own where it has one): both tokenize the same sequences (the table's tokens/pair says so).

Both sides train DPO (sigmoid, beta 0.1) with LoRA r 16, alpha 32, dropout 0 on all linear layers, the same
batch size, steps, constant lr without warmup, AdamW without weight decay, gradient clipping at 1.0, max length
512, gradient checkpointing (both tools' default) and the same dtype: fp32, or bf16 (tunesmith's train.dtype
bf16: frozen base in bf16, LoRA weights fp32, autocast; TRL: the model loaded in bf16 and bf16=True, PEFT keeping
the adapter in fp32). Each side runs in its own subprocess; its peak RSS is that process's (os.wait4).

- tunesmith: `python -m tunesmith train --objective dpo --method lora ...` (the exact command is printed);
  tokens/s and losses from the run's metrics.jsonl. Its reference log-probs are measured once before training
  (outside the timed steps; counted in the wall time).
- TRL: DPOTrainer with PEFT LoRA, reference by disabling the adapter. precompute_ref_log_probs is TRL's default
  (False: a no-grad reference forward inside every step) unless --trl-precompute.

tokens/s: real (non-padding) tokens of the policy's training forward (prompt + chosen and prompt + rejected per
pair) over the summed optimizer-step times (validation, checkpoints and saving excluded on both sides). wall s: the
whole subprocess (loading, tokenizing, reference, training, held-out scoring, saving). Held-out reward accuracy
(--heldout N pairs, 0 to skip): the share of held-out pairs whose implicit reward margin is positive, i.e. whose
(policy - reference) log-ratio of the chosen answer exceeds the rejected one's, scored after training by each
tool's own evaluation (tunesmith's validation of --val-path, TRL's evaluate()). At step 1 the policy equals the
reference (LoRA B starts at zero), so both first losses should be log 2 = 0.693147. "acc last" is the last training
step's reward accuracy. The two tools draw batches in different orders (tunesmith groups by length, TRL samples
at random), so losses after step 1 are not expected to match.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.conftest builds the random Llama and its tokenizer

PROMPT_WORDS = (
    "patient reports pain fever cough since days weeks takes daily dose tablet record json field value note "
    "the a of and with for in on at by from to is was were has have had what should they do about it now"
).split()
CHOSEN_WORDS = (
    "please rest drink water see your doctor if the fever lasts more than three days and keep a note of each "
    "dose you take so the clinic can check it carefully"
).split()
REJECTED_WORDS = (
    "whatever just ignore it double every dose nobody needs a doctor skip the water stop all notes and never "
    "tell anyone because it surely goes away"
).split()
LORA = {"r": 16, "alpha": 32}
BETA = 0.1
MAX_LENGTH = 512
SEED = 42
LLAMA_SHAPE = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=1024,
)
GIB = 2**30
MIN_PAIRS = 10  # tunesmith's data check wants at least 10 training examples


# ---------------------------------------------------------------------------------------------------- inputs


def make_llama(path: Path) -> None:
    from tests.conftest import build_model, build_tokenizer

    from tunesmith.data.tokenize import DEFAULT_CHAT_TEMPLATE

    build_model(32000, seed=0, **LLAMA_SHAPE).save_pretrained(path)
    build_tokenizer(DEFAULT_CHAT_TEMPLATE).save_pretrained(path)


def model_source(name: str, base: Path) -> str:
    if name == "gemma":
        from tunesmith.models import resolve_model_path

        return resolve_model_path("gemma-3-270m")  # the converted checkpoint in tunesmith's cache
    make_llama(base / "llama")
    return str(base / "llama")


def text_of(rng: random.Random, words: list[str], tokens: int, count) -> str:
    """Words drawn from `words` until the text is `tokens` tokens long (by the model's tokenizer)."""
    picked = [rng.choice(words)]
    while count(" ".join(picked)) < tokens:
        picked.append(rng.choice(words))
    return " ".join(picked)


def make_pairs(tokenizer, n: int, seed: int) -> list[dict[str, str]]:
    """Prompts of ~60 tokens, chosen and rejected answers of ~40 tokens each and of similar lengths."""
    rng = random.Random(seed)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    rows = []
    for _ in range(n):
        answer = rng.randint(32, 48)
        rows.append(
            {
                "prompt": text_of(rng, PROMPT_WORDS, rng.randint(50, 70), count),
                "chosen": text_of(rng, CHOSEN_WORDS, answer + rng.randint(-3, 3), count),
                "rejected": text_of(rng, REJECTED_WORDS, answer + rng.randint(-3, 3), count),
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def measured(command: list[str], log: Path) -> tuple[int, float, int]:
    """Run `command` with its output in `log`: exit code, wall seconds, peak RSS in bytes (its own, via wait4)."""
    start = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = code = os.waitstatus_to_exitcode(status)
    return code, time.perf_counter() - start, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


# ------------------------------------------------------------------------------------------------- tunesmith


def tunesmith_command(args: argparse.Namespace, source: str, base: Path) -> list[str]:
    heldout = (
        ["--val-path", str(base / "heldout.jsonl"), "--validation.every", str(args.steps)]
        if args.heldout
        else ["--val-fraction", "0", "--validation.every", "1000"]
    )
    return [
        sys.executable, "-m", "tunesmith", "train",
        "--model", source, "--data", str(base / "train.jsonl"), "--format", "preference",
        "--out", str(base / "run-tunesmith"), "--overwrite", "--quiet",
        "--objective", "dpo", "--beta", str(BETA), "--method", "lora",
        "--r", str(LORA["r"]), "--alpha", str(LORA["alpha"]), "--set", "lora.dropout=0",
        "--target-modules", "all-linear",
        "--max-steps", str(args.steps), "--train.batch_size", str(args.batch), "--grad-accum", "1",
        "--lr", str(args.lr), "--warmup-ratio", "0", "--schedule", "constant", "--weight-decay", "0",
        "--max-grad-norm", "1.0", "--train.seed", str(SEED), "--dtype", args.dtype,
        "--max-length", str(MAX_LENGTH), "--test-fraction", "0", "--allow-warnings", "true",
        "--checkpoint.every", str(args.steps), *heldout,
    ]  # fmt: skip


def run_tunesmith(args: argparse.Namespace, source: str, base: Path) -> dict:
    from tunesmith.rundir import RunDir

    command = tunesmith_command(args, source, base)
    print("tunesmith: " + shlex.join(command), flush=True)
    log = base / "tunesmith.log"
    code, wall, rss = measured(command, log)
    if code != 0:
        raise RuntimeError(f"tunesmith exited {code}:\n{log.read_text()[-4000:]}")
    run = base / "run-tunesmith"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("type") == "train"]
    val = [r for r in rows if r.get("type") == "val"]
    report = json.loads(RunDir(run).tokenize_report.read_text())
    trainable = re.search(r"trainable parameters: ([\d,]+)", log.read_text())
    return {
        "tokens": sum(r["tokens"] for r in train),
        "step_seconds": sum(r["tokens"] / r["tokens_per_s"] for r in train),
        "steps": len(train),
        "first_loss": train[0]["loss"],
        "last_loss": train[-1]["loss"],
        "last_reward_accuracy": train[-1].get("reward_accuracy"),
        "heldout_accuracy": val[-1]["val_reward_accuracy"] if val else None,
        "tokens_per_pair": report["tokens"] / report["pairs"],
        "trainable": int(trainable.group(1).replace(",", "")) if trainable else None,
        "wall": wall,
        "peak_rss": rss,
    }


# ------------------------------------------------------------------------------------------------------- TRL


def trl_worker(args: argparse.Namespace, source: str, base: Path) -> None:
    """TRL's DPOTrainer on the same pairs (run in its own process); prints one RESULT line."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from tunesmith.data.tokenize import use_chat_template
    from tunesmith.models import load_tokenizer

    torch.manual_seed(SEED)
    tokenizer = load_tokenizer(source)  # pad token as tunesmith sets it
    use_chat_template(tokenizer, None)  # the template tunesmith renders with (Gemma's GGUF tokenizer has none)

    def dataset(name: str) -> Dataset:
        rows = [json.loads(line) for line in (base / name).read_text().splitlines()]
        return Dataset.from_list(
            [
                {
                    "prompt": [{"role": "user", "content": r["prompt"]}],
                    "chosen": [{"role": "assistant", "content": r["chosen"]}],
                    "rejected": [{"role": "assistant", "content": r["rejected"]}],
                }
                for r in rows
            ]
        )

    bf16 = args.dtype == "bf16"
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16 if bf16 else torch.float32)

    class Clock(TrainerCallback):
        """Summed optimizer-step times, as tunesmith's metrics rows time its steps."""

        seconds = 0.0
        started = 0.0

        def on_step_begin(self, *_, **__):
            Clock.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            Clock.seconds += time.perf_counter() - Clock.started

    class Counting(DPOTrainer):
        """Counts the real tokens of the policy's training forward (chosen and rejected rows, each with its prompt)."""

        tokens = 0

        def training_step(self, model, inputs, *rest, **kwargs):
            Counting.tokens += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *rest, **kwargs)

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            per_device_eval_batch_size=args.batch,
            gradient_accumulation_steps=1,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=BETA,
            loss_type=["sigmoid"],
            max_length=MAX_LENGTH,
            precompute_ref_log_probs=args.trl_precompute,
            gradient_checkpointing=True,
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            bf16=bf16,  # TRL's own default is bf16=True: set it explicitly either way
            use_cpu=True,
            seed=SEED,
            dataloader_num_workers=0,
        )
        peft = LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        trainer = Counting(
            model=model,
            args=config,
            train_dataset=dataset("train.jsonl"),
            processing_class=tokenizer,
            peft_config=peft,
            callbacks=[Clock()],
        )
        prepared = trainer.train_dataset
        tokens = sum(
            2 * len(p) + len(c) + len(r)
            for p, c, r in zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"], strict=True)
        )
        trainer.train()
        logs = [row for row in trainer.state.log_history if "loss" in row and "eval_loss" not in row]
        heldout = None
        if args.heldout:
            heldout = trainer.evaluate(eval_dataset=dataset("heldout.jsonl"))["eval_rewards/accuracies"]
    result = {
        "tokens": Counting.tokens,
        "step_seconds": Clock.seconds,
        "steps": trainer.state.global_step,
        "first_loss": logs[0]["loss"],
        "last_loss": logs[-1]["loss"],
        "last_reward_accuracy": logs[-1].get("rewards/accuracies"),
        "heldout_accuracy": heldout,
        "tokens_per_pair": tokens / len(prepared),
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_trl(args: argparse.Namespace, source: str, base: Path) -> dict:
    command = [
        sys.executable, __file__, "--worker", "trl", "--dir", str(base), "--source", source,
        "--steps", str(args.steps), "--batch", str(args.batch), "--lr", str(args.lr), "--dtype", args.dtype,
        "--heldout", str(args.heldout),
    ] + (["--trl-precompute"] if args.trl_precompute else [])  # fmt: skip
    print("trl: " + shlex.join(command), flush=True)
    log = base / "trl.log"
    code, wall, rss = measured(command, log)
    text = log.read_text()
    line = next((x for x in text.splitlines() if x.startswith("RESULT ")), None)
    if code != 0 or line is None:
        raise RuntimeError(f"TRL worker exited {code}:\n{text[-4000:]}")
    return json.loads(line[len("RESULT ") :]) | {"wall": wall, "peak_rss": rss}


# ------------------------------------------------------------------------------------------------------ main


def cpu_line() -> str:
    import torch

    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    seen = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (
        f"cpu: {' '.join(seen) or 'no avx2'}; torch {torch.__version__} capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
    )


def show(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}{spec}}"


def table(args: argparse.Namespace, results: dict[str, dict]) -> None:
    header = (
        f"{'tool':10} {'model':6} {'dtype':5} {'steps':>5} {'batch':>5} {'tok/pair':>8} {'tokens/s':>9} "
        f"{'step s':>7} {'wall s':>7} {'RSS GiB':>8} {'first loss':>10} {'last loss':>10} {'acc last':>8} "
        f"{'held-out':>8} {'trainable':>10}"
    )
    print(header)
    print("-" * len(header))
    for tool, r in results.items():
        rate = r["tokens"] / r["step_seconds"] if r["step_seconds"] else None
        print(
            f"{tool:10} {args.model:6} {args.dtype:5} {r['steps']:5d} {args.batch:5d} {r['tokens_per_pair']:8.1f} "
            f"{show(rate, '.0f', 9)} {r['step_seconds']:7.1f} {r['wall']:7.1f} {r['peak_rss'] / GIB:8.2f} "
            f"{r['first_loss']:10.6f} {r['last_loss']:10.6f} {show(r['last_reward_accuracy'], '.2f', 8)} "
            f"{show(r['heldout_accuracy'], '.3f', 8)} {show(r['trainable'], ',', 10)}"
        )
    print(f"first-step loss vs log 2 = {math.log(2):.6f}: " + ", ".join(
        f"{tool} {r['first_loss'] - math.log(2):+.2e}" for tool, r in results.items()
    ))  # fmt: skip
    ours, theirs = results.get("tunesmith"), results.get("trl")
    if ours and theirs:
        speed = (ours["tokens"] / ours["step_seconds"]) / (theirs["tokens"] / theirs["step_seconds"])
        print(
            f"tunesmith / TRL: tokens/s {speed:.2f}x, peak RSS {ours['peak_rss'] / theirs['peak_rss']:.2f}x, "
            f"wall {ours['wall'] / theirs['wall']:.2f}x, step time {ours['step_seconds'] / theirs['step_seconds']:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("gemma", "llama"), default="gemma", help="Workload [default: gemma].")
    parser.add_argument("--steps", type=int, default=5, help="Optimizer steps per side [default: 5].")
    parser.add_argument("--batch", type=int, default=4, help="Pairs per step [default: 4].")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="Compute dtype [default: fp32].")
    parser.add_argument("--lr", type=float, default=1e-4, help="Constant learning rate [default: 1e-4].")
    parser.add_argument(
        "--pairs",
        type=int,
        help=f"Training pairs [default: steps x batch, one pass without repeats; at least {MIN_PAIRS}].",
    )
    parser.add_argument(
        "--heldout",
        type=int,
        default=16,
        help="Held-out pairs scored after training, rounded up to a multiple of --batch; 0 skips [default: 16].",
    )
    parser.add_argument(
        "--trl-precompute",
        action="store_true",
        help="TRL with precompute_ref_log_probs=True (as tunesmith does) instead of its default False.",
    )
    parser.add_argument("--skip-trl", action="store_true", help="Run tunesmith only.")
    parser.add_argument("--skip-tunesmith", action="store_true", help="Run TRL only.")
    parser.add_argument(
        "--keep", metavar="DIR", help="Work in DIR (kept: data, logs, tunesmith's run) instead of a temp dir."
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        trl_worker(args, args.source, Path(args.dir))
        return
    print("$ " + shlex.join([sys.executable, *sys.argv]))
    print(cpu_line(), flush=True)
    args.heldout = math.ceil(args.heldout / args.batch) * args.batch  # TRL averages eval accuracy per batch
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep or tmp)
        base.mkdir(parents=True, exist_ok=True)
        source = model_source(args.model, base)
        from tunesmith.models import load_tokenizer

        tokenizer = load_tokenizer(source)
        train_pairs = args.pairs or max(args.steps * args.batch, MIN_PAIRS)
        pairs = make_pairs(tokenizer, train_pairs + args.heldout, seed=1)
        write_jsonl(base / "train.jsonl", pairs[args.heldout :])
        write_jsonl(base / "heldout.jsonl", pairs[: args.heldout])
        print(
            f"model {source}; {len(pairs) - args.heldout} training pairs, {args.heldout} held out; LoRA r "
            f"{LORA['r']} alpha {LORA['alpha']} dropout 0 all-linear; DPO beta {BETA}; lr {args.lr} constant; "
            f"TRL precompute_ref_log_probs={args.trl_precompute}" + ("" if args.trl_precompute else " (its default)"),
            flush=True,
        )
        results = {}
        for tool, runner, skip in (("tunesmith", run_tunesmith, args.skip_tunesmith), ("trl", run_trl, args.skip_trl)):
            if skip:
                continue
            try:
                results[tool] = runner(args, source, base)
            except RuntimeError as exc:
                print(f"{tool} failed: {exc}", flush=True)
    if results:
        table(args, results)
    if len(results) < 2 - args.skip_trl - args.skip_tunesmith:
        sys.exit(1)


if __name__ == "__main__":
    main()
