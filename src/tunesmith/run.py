"""The pipeline from one config: data, split, tokenize, method, train, save; then base-versus-tuned.

Each stage is a function that takes typed arguments and returns a result object; the CLI only
prints them. A run directory is never reused or overwritten unless the caller passes overwrite.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

import tunesmith
from tunesmith.config import RunConfig, dump_config
from tunesmith.data.check import CheckReport
from tunesmith.data.formats import Conversation, read_conversations, write_jsonl
from tunesmith.data.tokenize import use_chat_template
from tunesmith.errors import TunesmithError
from tunesmith.files import save_atomic


@dataclass
class TrainSummary:
    run_dir: str
    method: str
    format: str
    train_examples: int
    test_examples: int
    trainable_params: int
    total_params: int
    steps: int
    epochs: float
    final_loss: float
    first_loss: float
    tokens: int
    seconds: float
    tokens_per_second: float
    tokenize: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompareSummary:
    run_dir: str
    items: int
    metrics: dict[str, dict[str, float]]
    examples: list[dict[str, str]]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_rev() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(tunesmith.__file__).parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def manifest(config: RunConfig, data_files: list[Path]) -> dict[str, Any]:
    import accelerate
    import peft
    import torch
    import transformers

    return {
        "tunesmith": tunesmith.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "git_rev": _git_rev(),
        "seed": config.train.seed,
        "data": {str(p): sha256_file(p) for p in data_files},
        "hardware": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise TunesmithError(
                f"Run directory {run_dir} already exists. Choose another --out, or pass --overwrite to replace it."
            )
        shutil.rmtree(run_dir)
    (run_dir / "data").mkdir(parents=True, exist_ok=True)


def gate_data(config: RunConfig) -> CheckReport:
    """Run the data check; stop on errors always, and on warnings unless data.allow_warnings."""
    from tunesmith.data.check import CheckOptions, check_data

    if not config.data.path:
        raise TunesmithError("No training data: set data.path in the config or pass --data FILE.")
    options = CheckOptions(max_length=config.data.max_length, near_threshold=config.data.near_threshold)
    report = check_data(config.data.path, config.data.format, None, options, against=config.data.test_path)
    problems = [f"line {e['line']}: {e['message']}" for e in report.errors]
    if not config.data.allow_warnings:
        problems += [f"{w['code']}: {w['message']}" for w in report.warnings]
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:30])
        hint = "Fix the data (see `tunesmith data check`)"
        if not report.errors:
            hint += ", or set data.allow_warnings: true (--set data.allow_warnings=true) to train anyway"
        raise TunesmithError(f"The data check of {config.data.path} stopped the run:\n{listed}\n{hint}.")
    return report


def split_data(config: RunConfig) -> tuple[list[Conversation], list[Conversation], str, list[Path]]:
    """Training and test conversations: test_path when given, else a group-aware, stratified split."""
    from tunesmith.data.check import CheckOptions, labels_of
    from tunesmith.data.split import split_conversations

    path = Path(str(config.data.path))
    conversations, fmt = read_conversations(path, config.data.format)
    files = [path]
    if config.data.test_path:
        test, _ = read_conversations(config.data.test_path, config.data.format)
        files.append(Path(config.data.test_path))
        return conversations, test, fmt, files
    labels = labels_of(path, conversations, CheckOptions())
    splits, _ = split_conversations(
        conversations, 0.0, config.data.test_fraction, config.train.seed, labels, config.data.near_threshold
    )
    if not splits["train"]:
        raise TunesmithError(f"{path}: no examples left for training after the test split.")
    return splits["train"], splits["test"], fmt, files


def train_run(config: RunConfig, overwrite: bool = False, console: Console | None = None) -> TrainSummary:
    """Run every training stage for one config and leave a complete run directory behind."""
    from tunesmith.data.cache import cached_tokenize
    from tunesmith.methods import apply_method, count_parameters, load_base, save_trained, weights_dir
    from tunesmith.models import cache_root, load_tokenizer, resolve_model_path
    from tunesmith.train.loop import fit

    console = console or Console(stderr=True)
    run_dir = config.run_dir
    report = gate_data(config)
    train, test, fmt, files = split_data(config)
    prepare_run_dir(run_dir, overwrite)
    (run_dir / "data" / "check.json").write_text(json.dumps(report.to_dict(), indent=2))
    write_jsonl(run_dir / "data" / "train.jsonl", train)
    write_jsonl(run_dir / "data" / "test.jsonl", test)
    (run_dir / "config.yaml").write_text(dump_config(config))
    info = manifest(config, files)
    (run_dir / "manifest.json").write_text(json.dumps(info | {"status": "running"}, indent=2))

    console.print(f"[bold]Model[/] {config.model}  [bold]method[/] {config.method}  [bold]run[/] {run_dir}")
    source = resolve_model_path(config.model)
    tokenizer = load_tokenizer(source)
    template = use_chat_template(tokenizer, config.chat_template)
    examples, stats, hit = cached_tokenize(
        tokenizer, train, config.data.max_length, config.data.train_on, cache_root() / "tokenized"
    )
    token_report = stats.summary()
    (run_dir / "data" / "tokenize.json").write_text(json.dumps(token_report, indent=2))
    console.print(
        f"{fmt} data: {len(train)} train / {len(test)} test examples, {token_report['tokens']} tokens; "
        f"{stats.truncated} truncated to {config.data.max_length}, {stats.dropped_no_loss} dropped (no answer left)"
        + (" [tokenized cache hit]" if hit else "")
    )

    model, _ = apply_method(load_base(config, source), config)
    trainable, total = count_parameters(model)
    console.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    result = fit(
        model,
        examples,
        config.train,
        tokenizer.pad_token_id,
        run_dir / "metrics.jsonl",
        console,
        row_tokens=config.data.max_length,
    )

    model.eval()
    weights = weights_dir(config, run_dir)

    def write_weights(path: Path) -> None:
        save_trained(model, config, path)
        tokenizer.save_pretrained(path)

    save_atomic(weights, write_weights)
    tokenizer.save_pretrained(run_dir / "tokenizer")
    (run_dir / "chat_template.jinja").write_text(template)
    summary = TrainSummary(
        run_dir=str(run_dir),
        method=config.method,
        format=fmt,
        train_examples=len(train),
        test_examples=len(test),
        trainable_params=trainable,
        total_params=total,
        steps=result.steps,
        epochs=result.epochs,
        final_loss=result.final_loss,
        first_loss=result.history[0]["loss"],
        tokens=result.tokens,
        seconds=round(result.seconds, 2),
        tokens_per_second=round(result.tokens_per_second, 2),
        tokenize=token_report,
    )
    (run_dir / "train_summary.json").write_text(json.dumps(asdict(summary), indent=2))
    (run_dir / "manifest.json").write_text(
        json.dumps(info | {"status": "completed", "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2)
    )
    return summary


def compare_run(run_dir: str | Path, limit: int | None = None, console: Console | None = None) -> CompareSummary:
    """Generate on the run's test split with the base and the tuned model and score both."""
    from tunesmith.data.formats import read_conversations
    from tunesmith.evaluate.generate import generate, load_run
    from tunesmith.evaluate.metrics import score

    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    loaded = load_run(run_dir)
    base = loaded if loaded.shares_base else load_run(run_dir, base=True)
    settings = loaded.config.eval
    test, _ = read_conversations(run_dir / "data" / "test.jsonl", "chat")
    test = [c for c in test if c.reference is not None][: limit or settings.limit]
    if not test:
        raise TunesmithError(f"{run_dir}: the test split is empty; set data.test_fraction or data.test_path.")
    prompts = [c.prompt_messages for c in test]
    references = [str(c.reference) for c in test]
    outputs: dict[str, list[str]] = {}
    with Progress(console=console, disable=not console.is_terminal) as progress:
        for label in ("base", "tuned"):
            task = progress.add_task(f"generate ({label})", total=len(prompts))
            model = base if label == "base" else loaded
            with model.base_only() if label == "base" else nullcontext():
                outputs[label] = generate(
                    model.model,
                    loaded.tokenizer,
                    prompts,
                    settings.max_new_tokens,
                    settings.batch_size,
                    progress=lambda n, task=task: progress.advance(task, n),
                )
    scores = {label: score(settings.metrics, outputs[label], references) for label in outputs}
    metrics = {
        name: {label: round(sum(scores[label][name]) / len(test), 4) for label in ("base", "tuned")}
        for name in settings.metrics
    }
    eval_dir = run_dir / "eval"
    eval_dir.mkdir(exist_ok=True)
    rows = [
        {"line": c.line, "prompt": c.prompt_messages[-1].content, "reference": ref, "base": b, "tuned": t}
        for c, ref, b, t in zip(test, references, outputs["base"], outputs["tuned"], strict=True)
    ]
    with (eval_dir / "predictions.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = CompareSummary(str(run_dir), len(test), metrics, rows[:3])
    (eval_dir / "compare.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary
