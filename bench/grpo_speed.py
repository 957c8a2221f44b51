"""tunesmith's GRPO training versus TRL's GRPOTrainer on the same model, prompts and settings (issue 26).

    .venv/bin/python bench/grpo_speed.py --model llama --steps 2                    # smoke run, both sides
    .venv/bin/python bench/grpo_speed.py --model gemma --steps 5                    # Gemma 3 270M, intake notes
    .venv/bin/python bench/grpo_speed.py --model gemma --steps 5 --init-from runs/quickstart   # from the SFT run
    .venv/bin/python bench/grpo_speed.py --model gemma --steps 5 --dtype fp32       # both sides in fp32
    .venv/bin/python bench/grpo_speed.py --model llama --steps 2 --skip-tunesmith   # one side only
    .venv/bin/python bench/grpo_speed.py --src /work/wt/grpo/src ...                # tunesmith from another checkout

Workloads: `--model gemma` is the embedded Gemma 3 270M (tunesmith's converted checkpoint, loaded by both tools
from the same directory), rewarded by json_fields against the reference record; `--model llama` a random Llama
(hidden 512, 8 layers, vocab 32k, tunesmith's test tokenizer) built here and saved to a temporary directory,
rewarded by letter_share below, the share of ASCII letters in the completion. The test tokenizer knows 300 of the
random model's 32k ids, so most sampled ids decode to nothing and that reward is mostly 0 (and every group ties):
the llama workload measures speed and memory, the gemma one the reward curve too. Both sides call the same
function: TRL as its reward function, tunesmith as evaluate/metrics.py's json_fields metric or as a code reward
(`code: bench/grpo_speed.py:letter_share`), so both score the same way. TRL stops a completion at EOS only,
tunesmith also at the chat template's turn stops ("### User:"); TRL's answers are cut there before scoring, but
their sampled lengths may differ: the table shows each side's mean completion length and completion tokens/s.

`--init-from RUN` starts both sides from a tunesmith LoRA run's adapter (the SFT then RL path: tunesmith's
init_from, TRL's GRPOTrainer on the PeftModel loaded from RUN/adapter, trainable), so the reward is not 0 from step 1.

Prompts: the intake notes of examples/rl/notes.jsonl (the first steps x prompts_per_step of them, at least 10),
as chat messages; both tools render them with tunesmith's chat template (the model's own where it has one).

Both sides: prompts_per_step prompts x group_size completions per optimizer step, completions of at most
--completion-tokens tokens sampled at temperature 1.0, top_p 1; loss_type grpo, group-std advantages, clip 0.2,
one iteration per rollout, beta 0 (no reference model); LoRA r 16, alpha 32, dropout 0 on all linear layers;
constant lr without warmup, AdamW without weight decay, gradient clipping at 1.0, gradient checkpointing, --dtype
(bf16: the frozen base in bf16, LoRA weights and optimizer in fp32, bf16 autocast; or fp32 throughout),
--batch completions per forward (TRL: per_device_train_batch_size --batch with gradient accumulation so that one
optimizer step is one generation batch of prompts_per_step x group_size). tunesmith's dynamic sampling is off and
truncated completions are scored as cut (overlong: none), as TRL does by default, so both train on every group.
Each side runs in its own subprocess; its peak RSS is that process's (os.wait4).

- tunesmith: `python -m tunesmith train CONFIG` (the config is printed); per step the rollout and update
  seconds, mean reward and completion length from the run's metrics.jsonl.
- TRL: GRPOTrainer with its default generation path (transformers generate), PEFT LoRA; whole-step seconds from a
  callback (on_step_begin to on_step_end: the generation happens inside the step), reward and completion length
  from its log history.

completions/s: completions trained on over the summed step seconds (rollout + update; loading, tokenizing and
saving excluded on both sides). wall s: the whole subprocess. The reward curves are per-step means over different
prompts (each tool draws its own order), so they agree only within noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.conftest builds the random Llama and its tokenizer

NOTES = ROOT / "examples" / "rl" / "notes.jsonl"
LORA = {"r": 16, "alpha": 32}
REWARD = {"gemma": "json_fields", "llama": "letter_share"}
EPSILON = 0.2
SEED = 42
MAX_LENGTH = 512
LLAMA_SHAPE = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=1024,
)
GIB = 2**30
MIN_PROMPTS = 10  # tunesmith's data check wants at least 10 training examples


# ---------------------------------------------------------------------------------------------------- inputs


def letter_share(prompt: str, completion: str, example: dict) -> float:
    """The llama workload's reward: the share of the completion's characters that are ASCII letters."""
    return sum(c.isascii() and c.isalpha() for c in completion) / max(1, len(completion))


def reward_entry(model: str) -> dict:
    """The tunesmith rl.rewards entry of the workload's reward."""
    if model == "gemma":
        return {"metric": REWARD[model], "weight": 1.0}
    return {"code": f"{Path(__file__).resolve()}:letter_share", "name": REWARD[model], "weight": 1.0}


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


def write_prompts(path: Path, count: int) -> None:
    """The first `count` intake notes, as chat examples whose answer is the reward's reference."""
    lines = NOTES.read_text().splitlines()[:count]
    path.write_text("".join(line + "\n" for line in lines))


def measured(command: list[str], log: Path, env: dict[str, str]) -> tuple[int, float, int]:
    """Run `command` with its output in `log`: exit code, wall seconds, peak RSS in bytes (its own, via wait4)."""
    start = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = code = os.waitstatus_to_exitcode(status)
    return code, time.perf_counter() - start, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def with_src(src: str) -> dict[str, str]:
    """The environment of a subprocess that imports tunesmith from `src`."""
    return os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}


# ------------------------------------------------------------------------------------------------- tunesmith


def tunesmith_config(args: argparse.Namespace, source: str, base: Path) -> dict:
    return {
        "name": "grpo-bench",
        "model": "gemma-3-270m" if args.model == "gemma" else source,  # the embedded model by name, as init_from needs
        "method": "lora",
        "objective": "grpo",
        **({"init_from": str(Path(args.init_from).resolve())} if args.init_from else {}),
        "out": str(base / "run-tunesmith"),
        "data": {"path": str(base / "prompts.jsonl"), "test_fraction": 0, "val_fraction": 0,
                 "max_length": MAX_LENGTH, "allow_warnings": True},
        "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "dropout": 0.0, "target_modules": "all-linear"},
        "rl": {
            "group_size": args.group, "prompts_per_step": args.prompts, "max_completion_tokens": args.completion_tokens,
            "temperature": 1.0, "top_p": 1.0, "loss_type": "grpo", "epsilon_low": EPSILON, "iterations": 1,
            "scale_advantages": "group", "beta": 0.0, "dynamic_sampling": False, "overlong": "none",
            "rewards": [reward_entry(args.model)],
        },
        "train": {"lr": args.lr, "max_steps": args.steps, "batch_size": args.batch, "warmup_ratio": 0.0,
                  "schedule": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": SEED, "dtype": args.dtype,
                  "gradient_checkpointing": True},
        "validation": {"every": 1000},
        "checkpoint": {"every": 1000},
    }  # fmt: skip


def run_tunesmith(args: argparse.Namespace, source: str, base: Path) -> dict:
    import yaml

    config = base / "tunesmith.yaml"
    config.write_text(yaml.safe_dump(tunesmith_config(args, source, base), sort_keys=False))
    command = [sys.executable, "-m", "tunesmith", "train", str(config), "--overwrite", "--quiet"]
    print(f"tunesmith: {shlex.join(command)}\n{config.read_text()}", flush=True)
    log = base / "tunesmith.log"
    code, wall, rss = measured(command, log, with_src(args.src))
    if code != 0:
        raise RuntimeError(f"tunesmith exited {code}:\n{log.read_text()[-4000:]}")
    rows = (base / "run-tunesmith" / "metrics.jsonl").read_text().splitlines()
    train = [r for r in map(json.loads, rows) if r.get("type") == "train"]
    return {
        "steps": len(train),
        "completions": args.prompts * args.group * len(train),
        "step_seconds": sum(r["rollout_s"] + r["train_s"] for r in train),
        "rollout_seconds": sum(r["rollout_s"] for r in train),
        "rewards": [r["reward"] for r in train],
        "completion_len": sum(r["completion_len_mean"] for r in train) / max(1, len(train)),
        "wall": wall,
        "peak_rss": rss,
    }


# ------------------------------------------------------------------------------------------------------- TRL


def trl_worker(args: argparse.Namespace, source: str, base: Path) -> None:
    """TRL's GRPOTrainer on the same prompts (run in its own process); prints one RESULT line."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tunesmith.data.tokenize import use_chat_template
    from tunesmith.evaluate.baselines import cut_at_stops, turn_stops
    from tunesmith.evaluate.metrics import per_item_functions
    from tunesmith.models import load_tokenizer

    torch.manual_seed(SEED)
    start = Path(args.init_from) if args.init_from else None
    tokenizer = load_tokenizer(str(start / "tokenizer") if start else source)  # pad token as tunesmith sets it
    use_chat_template(tokenizer, None)  # the template tunesmith renders with (Gemma's GGUF tokenizer has none)
    examples = [json.loads(line)["messages"] for line in (base / "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [m[0]], "reference": m[1]["content"]} for m in examples])
    metric = per_item_functions([REWARD["gemma"]], None)[REWARD["gemma"]] if args.model == "gemma" else None
    stops = turn_stops(tokenizer)

    def reward(completions: list, reference: list[str], **_) -> list[float]:
        # TRL stops at EOS only; the answer is scored as tunesmith scores it, cut at the template's turn stops
        texts = [cut_at_stops(c[0]["content"], stops) for c in completions]
        if metric is None:
            return [letter_share("", text, {}) for text in texts]
        return [metric(text, answer) for text, answer in zip(texts, reference, strict=True)]

    reward.__name__ = REWARD[args.model]

    class Clock(TrainerCallback):
        """Whole optimizer-step seconds (the generation runs inside the step)."""

        seconds = 0.0
        started = 0.0

        def on_step_begin(self, *_, **__):
            Clock.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            Clock.seconds += time.perf_counter() - Clock.started

    per_step = args.prompts * args.group
    # bf16: the frozen base in bf16 with the LoRA weights in fp32 (PEFT's default) under bf16 autocast, as tunesmith's
    # train.dtype bf16 holds it; fp32: everything in fp32
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if start:  # continue the SFT run's adapter, as tunesmith's init_from does
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(start / "adapter"), is_trainable=True)
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=per_step // args.batch,  # one optimizer step = one generation batch
            num_generations=args.group,
            max_completion_length=args.completion_tokens,
            temperature=1.0,
            top_p=1.0,
            beta=0.0,
            loss_type="grpo",
            epsilon=EPSILON,
            num_iterations=1,
            scale_rewards="group",
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            gradient_checkpointing=True,
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            bf16=args.dtype == "bf16",  # TRL's own default is bf16=True
            use_cpu=True,
            seed=SEED,
            dataloader_num_workers=0,
        )
        peft = LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=None if start else peft,
            callbacks=[Clock()],
        )
        trainer.train()
    logs = [row for row in trainer.state.log_history if "reward" in row]
    result = {
        "steps": trainer.state.global_step,
        "completions": per_step * trainer.state.global_step,
        "step_seconds": Clock.seconds,
        "rollout_seconds": None,
        "rewards": [row["reward"] for row in logs],
        "completion_len": sum(row["completions/mean_length"] for row in logs) / max(1, len(logs)),
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_trl(args: argparse.Namespace, source: str, base: Path) -> dict:
    command = [
        sys.executable, __file__, "--worker", "trl", "--dir", str(base), "--source", source, "--model", args.model,
        "--steps", str(args.steps), "--prompts", str(args.prompts), "--group", str(args.group),
        "--completion-tokens", str(args.completion_tokens), "--batch", str(args.batch), "--lr", str(args.lr),
        "--dtype", args.dtype, *(["--init-from", args.init_from] if args.init_from else []),
    ]  # fmt: skip
    print("trl: " + shlex.join(command), flush=True)
    log = base / "trl.log"
    code, wall, rss = measured(command, log, with_src(args.src))
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


def rate(r: dict) -> float | None:
    return r["completions"] / r["step_seconds"] if r["step_seconds"] else None


def table(args: argparse.Namespace, results: dict[str, dict]) -> None:
    header = (
        f"{'tool':10} {'model':6} {'steps':>5} {'compl.':>6} {'compl/s':>8} {'tok/s':>6} {'step s':>7} "
        f"{'rollout s':>9} {'wall s':>7} {'RSS GiB':>8} {'mean len':>8} {'reward first':>12} {'reward last':>11}"
    )
    print(header)
    print("-" * len(header))
    for tool, r in results.items():
        rewards = r["rewards"] or [None]
        print(
            f"{tool:10} {args.model:6} {r['steps']:5d} {r['completions']:6d} {show(rate(r), '.2f', 8)} "
            f"{show(rate(r) and rate(r) * r['completion_len'], '.1f', 6)} "
            f"{r['step_seconds']:7.1f} {show(r['rollout_seconds'], '.1f', 9)} {r['wall']:7.1f} "
            f"{r['peak_rss'] / GIB:8.2f} {r['completion_len']:8.1f} {show(rewards[0], '.4f', 12)} "
            f"{show(rewards[-1], '.4f', 11)}"
        )
    print(f"\nreward ({REWARD[args.model]}) per step:")
    print(f"{'step':>4} " + " ".join(f"{tool:>10}" for tool in results))
    for step in range(max(len(r["rewards"]) for r in results.values())):
        values = [r["rewards"][step] if step < len(r["rewards"]) else None for r in results.values()]
        print(f"{step + 1:4d} " + " ".join(show(v, ".4f", 10) for v in values))
    ours, theirs = results.get("tunesmith"), results.get("trl")
    if ours and theirs and rate(ours) and rate(theirs):
        print(
            f"tunesmith / TRL: completions/s {rate(ours) / rate(theirs):.2f}x (target >= 2x), peak RSS "
            f"{ours['peak_rss'] / theirs['peak_rss']:.2f}x (target <= 0.6x), wall {ours['wall'] / theirs['wall']:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("gemma", "llama"), default="gemma", help="Workload [default: gemma].")
    parser.add_argument("--steps", type=int, default=5, help="Optimizer steps per side [default: 5].")
    parser.add_argument("--prompts", type=int, default=4, help="Prompts per step [default: 4].")
    parser.add_argument("--group", type=int, default=6, help="Completions per prompt [default: 6].")
    parser.add_argument("--completion-tokens", type=int, default=64, help="Most tokens a completion [default: 64].")
    parser.add_argument("--batch", type=int, default=8, help="Completions per forward of the update [default: 8].")
    parser.add_argument(
        "--dtype", choices=("bf16", "fp32"), default="bf16",
        help="Both sides' precision: bf16 (the frozen base in bf16, LoRA in fp32, bf16 autocast: each tool's default "
        "on a CPU with AVX512-BF16) or fp32 [default: bf16].",
    )  # fmt: skip
    parser.add_argument(
        "--init-from", metavar="RUN",
        help="Start both sides from this tunesmith LoRA run's adapter (the SFT then RL path; its LoRA settings must "
        "be the bench's: r 16, alpha 32, all-linear), e.g. runs/quickstart, so that rewards are not all 0.",
    )  # fmt: skip
    parser.add_argument("--lr", type=float, default=1e-4, help="Constant learning rate [default: 1e-4].")
    parser.add_argument(
        "--src", default=str(ROOT / "src"), help="The tunesmith source tree both sides import [default: src/]."
    )
    parser.add_argument("--skip-trl", action="store_true", help="Run tunesmith only.")
    parser.add_argument("--skip-tunesmith", action="store_true", help="Run TRL only.")
    parser.add_argument(
        "--keep", metavar="DIR", help="Work in DIR (kept: prompts, logs, tunesmith's run) instead of a temp dir."
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if (args.prompts * args.group) % args.batch:
        parser.error(f"--batch {args.batch} must divide prompts x group = {args.prompts * args.group}")
    if args.worker:
        trl_worker(args, args.source, Path(args.dir))
        return
    sys.path.insert(0, args.src)
    print("$ " + shlex.join([sys.executable, *sys.argv]))
    print(cpu_line(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep or tmp)
        base.mkdir(parents=True, exist_ok=True)
        source = model_source(args.model, base)
        write_prompts(base / "prompts.jsonl", max(args.steps * args.prompts, MIN_PROMPTS))
        print(
            f"model {source}; {args.prompts} prompts x {args.group} completions per step, <= {args.completion_tokens} "
            f"tokens, temperature 1.0; reward {REWARD[args.model]}; loss grpo, beta 0; LoRA r {LORA['r']} alpha "
            f"{LORA['alpha']} all-linear; lr {args.lr} constant; {args.batch} completions per forward",
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
