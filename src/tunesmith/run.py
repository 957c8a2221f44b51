"""The pipeline from one config: data, split, tokenize, method, train, save; then base-versus-tuned.

Each stage is a function that takes typed arguments and returns a result object; the CLI only
prints them. A run directory is never reused or overwritten unless the caller passes overwrite.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

import tunesmith
from tunesmith.config import RunConfig, dump_config
from tunesmith.data.check import CheckReport
from tunesmith.data.formats import (
    Conversation,
    ParsedFile,
    parse_file,
    position_word,
    read_conversations,
    write_jsonl,
)
from tunesmith.data.tokenize import use_chat_template
from tunesmith.errors import TrainingInterrupted, TunesmithError
from tunesmith.files import check_replaceable, mark, save_atomic, sha256_file, write_json, write_text_atomic
from tunesmith.objectives import objective_of
from tunesmith.rundir import RunDir
from tunesmith.runs import process_identity
from tunesmith.train import distributed
from tunesmith.train.precision import Precision, resolve

if TYPE_CHECKING:  # for annotations only: the loop is imported where a run trains, as methods and models are
    from tunesmith.train.loop import TrainResult


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
    val_examples: int = 0
    stopped: str = "completed"
    best: dict[str, Any] | None = None
    resumed_from: int | None = None


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
        "objective": config.objective,
        # Where the weights started: an earlier run (its own manifest says where it came from), else the base.
        "init_from": config.init_from,
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
                f"Run directory {run_dir} already exists. Choose another --out, pass --resume to continue it from "
                "its last checkpoint, or --overwrite to replace it."
            )
        check_replaceable(run_dir, RunDir(run_dir).made_by_tunesmith(), "a run directory")
        shutil.rmtree(run_dir)
    RunDir(run_dir).data.mkdir(parents=True, exist_ok=True)
    mark(run_dir, "run")  # first, so that a run that dies before its manifest is still known as ours


@dataclass
class CheckedData:
    """The training file read and checked once: the split reuses its records and near-duplicate pairs."""

    report: CheckReport
    parsed: ParsedFile
    near_pairs: list[tuple[int, int]]


def gate_data(config: RunConfig) -> CheckedData:
    """Run the data check; stop on errors always, and on warnings unless data.allow_warnings."""
    from tunesmith.data.check import CheckOptions, check_parsed

    if not config.data.path:
        raise TunesmithError("No training data: set data.path in the config or pass --data FILE.")
    options = CheckOptions(max_length=config.data.max_length, near_threshold=config.data.near_threshold)
    parsed = parse_file(config.data.path, config.data.format)
    report, near_pairs = check_parsed(parsed, None, options, config.data.test_path, config.data.format)
    unit = position_word(config.data.path)
    problems = [f"{unit} {e['line']}: {e['message']}" for e in report.errors]
    if not config.data.allow_warnings:
        problems += [f"{w['code']}: {w['message']}" for w in report.warnings]
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:30])
        hint = "Fix the data (see `tunesmith data check`)"
        if not report.errors:
            hint += ", or set data.allow_warnings: true (--set data.allow_warnings=true) to train anyway"
        raise TunesmithError(f"The data check of {config.data.path} stopped the run:\n{listed}\n{hint}.")
    return CheckedData(report, parsed, near_pairs)


def split_data(config: RunConfig, checked: CheckedData) -> tuple[dict[str, list[Conversation]], str, list[Path]]:
    """Train, val and test conversations: the files given, else a group-aware, stratified split of the checked
    file (its records and near-duplicate pairs as the check found them)."""
    from tunesmith.data.check import CheckOptions, labels_of
    from tunesmith.data.split import split_conversations

    path = Path(str(config.data.path))
    conversations, fmt = checked.parsed.conversations, checked.parsed.format
    files = [path]
    val_share = 0.0 if config.data.val_path else config.data.val_fraction
    test_share = 0.0 if config.data.test_path else config.data.test_fraction
    labels = labels_of(path, conversations, CheckOptions())
    splits, _ = split_conversations(
        conversations,
        val_share,
        test_share,
        config.train.seed,
        labels,
        config.data.near_threshold,
        near_pairs=checked.near_pairs,
    )
    for name, given in (("test", config.data.test_path), ("val", config.data.val_path)):
        if given:
            splits[name], _ = read_conversations(given, config.data.format)
            files.append(Path(given))
    if not splits["train"]:
        raise TunesmithError(f"{path}: no examples left for training after the val/test split.")
    return splits, fmt, files


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def check_resumable(config: RunConfig, run_dir: Path) -> dict[str, Any]:
    """The run's manifest, after checking config and data are those the run started with."""
    saved = RunDir(run_dir).read_config()
    ignore = {"resume"}
    changed = _differences(
        {k: v for k, v in saved.model_dump(mode="json").items() if k not in ignore},
        {k: v for k, v in config.model_dump(mode="json").items() if k not in ignore},
    )
    if changed:
        listed = "\n".join(f"  - {c}" for c in changed)
        raise TunesmithError(
            f"Cannot resume {run_dir}: the config differs from the one the run started with:\n{listed}\n"
            f"Resume with the same config (or the run's own {RunDir(run_dir).config}), "
            "or start a new run with another --out."
        )
    info = RunDir(run_dir).read_manifest()
    for name, digest in info.get("data", {}).items():
        if Path(name).is_file() and sha256_file(Path(name)) != digest:
            raise TunesmithError(
                f"Cannot resume {run_dir}: {name} changed since the run started (sha256 differs). "
                "Restore the file, or start a new run with another --out."
            )
    for split, digest in info.get("splits", {}).items():  # what a resume trains on (runs from before: unchecked)
        path = RunDir(run_dir).split(split)
        if not path.is_file() or sha256_file(path) != digest:
            how = "is missing" if not path.is_file() else "changed since the run started (sha256 differs)"
            raise TunesmithError(
                f"Cannot resume {run_dir}: its saved {split} split {path} {how}, and a resume trains on the splits "
                "the run started with. Restore the file, or start a new run with another --out."
            )
    return info


def split_hashes(run_dir: Path) -> dict[str, str]:
    """The sha256 of each split file the run saved, recorded in its manifest and checked on resume."""
    paths = {name: RunDir(run_dir).split(name) for name in ("train", "val", "test")}
    return {name: sha256_file(path) for name, path in paths.items() if path.is_file()}


def run_precision(config: RunConfig, source: str, recorded: dict[str, Any], console: Console) -> Precision:
    """The dtype this run trains in, printed with its reason; a resumed run keeps the dtype it started with."""
    from transformers import AutoConfig

    model_type = getattr(AutoConfig.from_pretrained(source), "model_type", None)
    here = resolve(config.train.dtype, model_type=model_type)
    started = recorded.get("precision")
    if started and started["dtype"] != here.name:
        # Only `auto` can get here: a changed explicit train.dtype is a config change, refused before.
        try:
            resolve(started["dtype"], model_type=model_type)  # still possible here? (fp16 needs a GPU)
        except TunesmithError as exc:
            raise TunesmithError(
                f"This run started in {started['dtype']} ({started['reason']}), which this machine cannot continue: "
                f"{exc} Resume it on hardware like the one it started on, or start a new run with another --out."
            ) from None
        console.print(
            f"[yellow]train.dtype auto resolves to {here.name} here ({here.reason}), but this run started in "
            f"{started['dtype']}: continuing in {started['dtype']} so that the resumed steps match.[/]"
        )
        return Precision(started["dtype"], f"kept from the run's start ({started['reason']})")
    console.print(f"[bold]dtype[/] {here.name} ({here.reason})")
    return here


def _validator(config: RunConfig, tokenizer: Any, val: list[Conversation], examples: list[Any]) -> Any:
    """Val loss on up to validation.limit examples, plus the configured task metrics on a generated sample."""
    from tunesmith.evaluate.compare import mean_answer_loss
    from tunesmith.evaluate.generate import generate
    from tunesmith.evaluate.metrics import score, summary

    settings = config.validation
    scored = examples[: settings.limit or len(examples)]
    objective = objective_of(config)
    if objective.holds != "sft":
        from tunesmith.objectives.pairs import preference_scores

        def validate_pairs(model: Any) -> dict[str, float]:
            pad, size = tokenizer.pad_token_id, config.train.batch_size
            return preference_scores(model, objective, scored, config.preference, pad, size)

        return validate_pairs
    sample = [c for c in val if c.reference is not None][: settings.generate_limit]

    def validate(model: Any) -> dict[str, float]:
        results = {"val_loss": mean_answer_loss(model, scored, tokenizer.pad_token_id, config.train.batch_size)}
        if settings.metrics and sample:
            outputs = generate(
                model,
                tokenizer,
                [c.prompt_messages for c in sample],
                config.eval.max_new_tokens,
                config.eval.batch_size,
            )
            references = [str(c.reference) for c in sample]
            per_item = score(settings.metrics, outputs, references, config.eval.schema_path)
            results |= summary(per_item, settings.metrics, outputs, references)
        return results

    return validate


def plan_estimate(config: RunConfig, model_config: Any, examples: list[Any]) -> dict[str, Any]:
    """The plan's time and cost estimate for this run's real workload, kept to compare with what it took."""
    import torch

    from tunesmith.plan.estimate import GIB, HERE_UTILIZATION, UTILIZATION, Shape, Workload
    from tunesmith.plan.report import estimate_with_cpu, here_row

    try:
        shape = Shape.from_config(model_config)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        return {"error": f"no estimate for this model shape: {exc}"}
    if objective_of(config).holds != "sft":  # both sides of every pair run through the model
        from tunesmith.objectives.pairs import sequences

        examples = sequences(examples)
    work = Workload.for_run(config, examples)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where this run trains, so what the probe times
    result = estimate_with_cpu(shape, work, cpu_work=work, device=device)
    here = result.devices.pop(here_row(device))
    return {
        "tokens": round(work.tokens),
        "peak_memory_gib": round(result.peak_memory_bytes / GIB, 3),
        "this machine": here,
        "cloud": {name: d["cost_usd"] for name, d in result.devices.items() if d["fits"]},
        "assumptions": f"{UTILIZATION:.0%} utilisation (MFU) of the cloud GPUs' peak; this machine: "
        f"{here['speed']}, {HERE_UTILIZATION:.0%} of it reached by training",
    }


def _saved_splits(run_dir: Path) -> dict[str, list[Conversation]]:
    """The train/val/test splits a run wrote when it started (read on resume and by other processes)."""
    return {n: RunDir(run_dir).read_split(n) for n in ("train", "val", "test")}


def _prepare(
    config: RunConfig, run_dir: Path, resuming: bool, overwrite: bool, console: Console, world: distributed.World
) -> tuple[dict[str, list[Conversation]], str, dict[str, Any], Path | None]:
    """Splits, data format, manifest info and the checkpoint to resume from; the main process writes them.

    Other processes (data-parallel workers) run after it and read what it wrote.
    """
    from tunesmith.train import checkpoint as ckpt

    if not world.main:
        info = RunDir(run_dir).read_manifest()
        splits = _saved_splits(run_dir)
        return splits, info.get("format", "chat"), info, ckpt.latest_checkpoint(run_dir) if resuming else None
    latest = None
    if resuming:
        if overwrite:
            raise TunesmithError("--resume and --overwrite contradict each other: pick one.")
        info = check_resumable(config, run_dir)
        fmt = info.get("format", "chat")
        splits = _saved_splits(run_dir)
        swept = ckpt.sweep_partial(run_dir)
        latest = ckpt.latest_checkpoint(run_dir)
        if swept:
            console.print(f"Removed unfinished checkpoint write(s): {', '.join(swept)}")
        if latest is None:
            console.print(f"{run_dir} has no complete checkpoint yet: training it again from step 0.")
            RunDir(run_dir).metrics.unlink(missing_ok=True)
        info["resumed"] = info.get("resumed", []) + [
            {"from": latest.name if latest else None, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        ]
    else:
        checked = gate_data(config)
        splits, fmt, files = split_data(config, checked)
        prepare_run_dir(run_dir, overwrite)
        layout = RunDir(run_dir)
        write_json(layout.check_report, checked.report.to_dict())
        for name, rows in splits.items():
            write_jsonl(layout.split(name), rows)
        layout.write_config(dump_config(config))
        info = manifest(config, files) | {"format": fmt, "splits": split_hashes(run_dir)}
    info |= process_identity()  # pid, host and the pid's start time: the UI never mistakes another process for it
    return splits, fmt, info, latest


@dataclass
class _Run:
    """A run directory ready to train in, as this process sees it; what the stages of train_run hand along."""

    run_dir: Path
    world: distributed.World
    console: Console
    splits: dict[str, list[Conversation]]
    fmt: str
    info: dict[str, Any]  # the manifest
    latest: Path | None  # the checkpoint to resume from
    resuming: bool

    def write_manifest(self, status: str, **extra: Any) -> None:
        if self.world.main:
            RunDir(self.run_dir).write_manifest(self.info, status, **extra)


@dataclass
class _Tokenized:
    """The run's tokenizer and chat template, its tokenized train and val examples, the tokenize report."""

    tokenizer: Any
    template: str
    examples: list[Any]
    val_examples: list[Any]
    report: dict[str, Any]


def train_run(
    config: RunConfig,
    overwrite: bool = False,
    console: Console | None = None,
    live: bool | None = None,
    strategy: str = "ddp",
) -> TrainSummary:
    """Run every training stage for one config and leave a complete run directory behind.

    With config.resume, an existing run directory continues from its last complete checkpoint.
    """
    from tunesmith.models import resolve_model_path

    run = _open_run(config, overwrite, console or Console(stderr=True))
    from tunesmith.objectives.pairs import kto_batch_warning

    warning = kto_batch_warning(objective_of(config), config.train.batch_size, run.world.size)
    if warning:
        run.console.print(f"[yellow]warning: {warning}[/]")
    run.console.print(f"[bold]Model[/] {config.model}  [bold]method[/] {config.method}  [bold]run[/] {run.run_dir}")
    with _marked_on_failure(run):  # the manifest never says "running" after a stage has failed (_train: its own)
        source = resolve_model_path(config.model)
        precision = run_precision(config, source, run.info if run.resuming else {}, run.console)
        run.info["precision"] = precision.to_dict()
        run.write_manifest("running")
        data = _tokenize(config, run, source)
        model, parameters = _build_model(config, run, source, precision, data.examples)
        _reference(config, run, data, model, precision, source)
    result = _train(config, run, data, model, precision, live, strategy)
    trained = _final_weights(config, run, model, result)
    model.eval()
    if not run.world.main:  # the main process writes the run's weights and summary; wait for it, then leave
        distributed.barrier(run.world)
        return read_summary(run.run_dir)
    _save_model(config, run, data, model, trained)
    summary = _write_summary(config, run, data, parameters, result)
    distributed.barrier(run.world)
    return summary


def _open_run(config: RunConfig, overwrite: bool, console: Console) -> _Run:
    """Create the run directory (or check the one to resume), split and write the data, mark the run running."""
    world = distributed.setup()
    if not world.main:  # one process speaks and writes; the others train alongside it
        console = Console(stderr=True, quiet=True)
    run_dir = config.run_dir
    existing = RunDir(run_dir).is_run()
    if config.resume is True and not existing:
        raise TunesmithError(
            f"--resume: {run_dir} holds no run to resume. Drop --resume (or use --resume auto) to start it."
        )
    resuming = bool(config.resume) and existing
    distributed.barrier(world)  # every process has looked at the run directory before the main one changes it
    with distributed.main_first(world):
        splits, fmt, info, latest = _prepare(config, run_dir, resuming, overwrite, console, world)
        run = _Run(run_dir, world, console, splits, fmt, info, latest, resuming)
        run.write_manifest("running")
    if world.size > 1:
        per = config.train.batch_size / world.size
        console.print(
            f"{world.size} processes x {per:g} examples x {config.train.grad_accum} accumulated = effective batch "
            f"{config.train.batch_size * config.train.grad_accum} examples per step (train.batch_size is per step "
            "over all processes, so results do not depend on their number)"
        )
    return run


def _tokenize(config: RunConfig, run: _Run, source: str) -> _Tokenized:
    """The model's tokenizer and chat template, and the train and val examples tokenized (through the cache)."""
    from tunesmith.data.cache import cached_tokenize
    from tunesmith.files import cache_root
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(source)
    template = use_chat_template(tokenizer, config.chat_template)
    root = cache_root() / "tokenized"
    train, val, test = run.splits["train"], run.splits["val"], run.splits["test"]

    def tokenize(conversations: list[Conversation]) -> tuple[list[Any], Any, bool]:
        return cached_tokenize(tokenizer, conversations, config.data.max_length, config.data.train_on, root)

    objective = objective_of(config)
    if objective.holds != "sft":
        return _tokenize_preferences(config, run, tokenizer, template, objective.holds)
    with distributed.main_first(run.world):  # the main process fills the tokenized cache, the others read it
        examples, stats, hit = tokenize(train)
        val_examples = tokenize(val)[0] if val else []
    report = stats.summary()
    if run.world.main:
        write_json(RunDir(run.run_dir).tokenize_report, report)
    run.console.print(
        f"{run.fmt} data: {len(train)} train / {len(val)} val / {len(test)} test examples, {report['tokens']} "
        f"tokens; {stats.truncated} truncated to {config.data.max_length}, {stats.dropped_no_loss} dropped "
        "(no answer left)" + (" [tokenized cache hit]" if hit else "")
    )
    return _Tokenized(tokenizer, template, examples, val_examples, report)


def _tokenize_preferences(config: RunConfig, run: _Run, tokenizer: Any, template: str, holds: str) -> _Tokenized:
    """Both sides of the train and val pairs (or KTO rows) tokenized; the report counts pairs."""
    from tunesmith.objectives.pairs import tokenize_preferences

    train, val, test = run.splits["train"], run.splits["val"], run.splits["test"]
    length, seed = config.data.max_length, config.train.seed
    examples, report = tokenize_preferences(tokenizer, train, length, holds, seed)
    val_examples = tokenize_preferences(tokenizer, val, length, holds, seed)[0] if val else []
    if run.world.main:
        write_json(RunDir(run.run_dir).tokenize_report, report)
    unit = "pairs" if holds == "pair" else "rows"
    run.console.print(
        f"{run.fmt} data: {len(train)} train / {len(val)} val / {len(test)} test {unit}, {report['tokens']} tokens "
        f"(both sides); {report['truncated'] + report['truncated_second']} sides truncated to {length}, "
        f"{report['dropped']} {unit} dropped (no answer left)"
    )
    return _Tokenized(tokenizer, template, examples, val_examples, report)


@contextlib.contextmanager
def _marked_on_failure(run: _Run) -> Iterator[None]:
    """Mark the manifest interrupted or failed when the stages inside end in an exception, and re-raise it."""
    try:
        yield
    except (TrainingInterrupted, KeyboardInterrupt):
        run.write_manifest("interrupted")
        raise
    except BaseException as exc:
        run.write_manifest("failed", error=str(exc)[:2000])
        raise


def starting_weights(config: RunConfig, source: str) -> list[Path]:
    """The weight files a run starts from: the base model's, then init_from's trained weights when it has one."""
    suffixes = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
    base = Path(source)
    files = sorted(p for p in base.iterdir() if p.suffix in suffixes) if base.is_dir() else [base]
    if config.init_from:
        start = RunDir(Path(str(config.init_from)))
        trained = start.trained_weights(start.read_config())
        files += sorted(p for p in trained.rglob("*") if p.is_file())
    return [p for p in files if p.is_file()]


def _reference(config: RunConfig, run: _Run, data: _Tokenized, model: Any, precision: Precision, source: str) -> None:
    """For dpo, ipo and kto: the starting model's log-probs of every train and val pair, measured once before
    training (no second copy of any weights) and kept in the run directory for a resume. Dropout is turned off
    for these objectives (as TRL does): the policy must equal the reference at the start, not a noisy copy."""
    import torch

    from tunesmith.objectives.pairs import attach_reference, weights_digest

    if not objective_of(config).needs_reference:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model.to("cuda")
    device = next(model.parameters()).device.type
    weights = weights_digest(starting_weights(config, source))  # the same names can hold other weights
    start = f"{config.model}|{config.method}|{config.init_from or ''}|{precision.name}|{weights}"

    def autocast() -> Any:
        return torch.autocast(device, dtype=precision.dtype, enabled=precision.name != "fp32")

    from rich.progress import Progress

    splits = {"train": data.examples, "val": data.val_examples}
    # The main process measures and writes the cache; data-parallel workers then read it.
    with (
        distributed.main_first(run.world),
        Progress(console=run.console, transient=True, disable=not run.console.is_terminal) as bar,
    ):
        task = bar.add_task("reference log-probs", total=sum(map(len, splits.values())))
        cached = attach_reference(
            model, splits, data.tokenizer.pad_token_id, config.train.batch_size, RunDir(run.run_dir).reference,
            start, autocast, lambda done: bar.advance(task, done),
        )  # fmt: skip
    where = "reused from the run directory" if cached else "measured"
    run.console.print(f"reference log-probs of {sum(map(len, splits.values()))} pairs {where}")


def _build_model(
    config: RunConfig, run: _Run, source: str, precision: Precision, examples: list[Any]
) -> tuple[Any, tuple[int, int]]:
    """The base model with the method applied, its (trainable, total) parameters; a new run's plan estimate."""
    from accelerate.utils import set_seed

    from tunesmith.methods import apply_method, count_parameters, load_base, start_from_run, training_dtype

    set_seed(config.train.seed)  # the new weights (LoRA A, adapters) start the same in every run of this config
    dtype = training_dtype(config, precision.dtype)
    if config.init_from:
        model, _ = start_from_run(config, source, dtype)
        run.console.print(f"starting from {config.init_from}'s trained weights")
    else:
        model, _ = apply_method(load_base(config, source, dtype), config)
    trainable, total = count_parameters(model)
    run.console.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    if not run.resuming and run.world.main:
        plan = plan_estimate(config, model.config, examples)
        write_json(RunDir(run.run_dir).plan, plan)
    return model, (trainable, total)


def _train(
    config: RunConfig, run: _Run, data: _Tokenized, model: Any, precision: Precision, live: bool | None, strategy: str
) -> TrainResult:
    """The training loop with the run's checkpoints, validation and trackers; the manifest says how it ended."""
    from tunesmith.runs import plot_losses
    from tunesmith.train.loop import Session, fit
    from tunesmith.train.trackers import Trackers

    val = run.splits["val"]
    trackers = Trackers(config, run.run_dir) if run.world.main else None
    session = Session(
        run_dir=run.run_dir,
        checkpoint=config.checkpoint,
        validation=config.validation,
        validate=_validator(config, data.tokenizer, val, data.val_examples) if data.val_examples else None,
        resume_from=run.latest,
        log=trackers.log if trackers else None,
        on_checkpoint=lambda path: plot_losses(run.run_dir),
        live=live,
        strategy=strategy,
        objective=objective_of(config),
        preference=config.preference,
    )
    try:
        result = fit(
            model,
            data.examples,
            config.train,
            data.tokenizer.pad_token_id,
            RunDir(run.run_dir).metrics,
            run.console,
            row_tokens=config.data.max_length,
            session=session,
            precision=precision,
        )
    except TrainingInterrupted:
        if trackers:
            trackers.close("interrupted")
            run.write_manifest("interrupted")
        raise
    except BaseException as exc:
        if trackers:
            trackers.close("failed")
            run.write_manifest("failed", error=str(exc)[:2000])
        raise
    if trackers:
        trackers.close("completed")
    return result


def _final_weights(config: RunConfig, run: _Run, model: Any, result: TrainResult) -> dict[str, Any] | None:
    """Load the best checkpoint's weights when validation.load_best_at_end asks for them.

    Returns the whole trained weights when training sharded them (FSDP); None when the model holds them.
    """
    from tunesmith.train import checkpoint as ckpt

    trained = result.trainable
    if not (config.validation.load_best_at_end and result.best):
        return trained
    best = RunDir(run.run_dir).checkpoint(result.best["step"])
    if not best.is_complete():
        return trained
    if trained is None:
        ckpt.load_trainable(model, best.trainable)
    else:
        from safetensors.torch import load_file

        trained = load_file(str(best.trainable))
    run.console.print(f"Saving the best checkpoint ({best.path.name}) as the run's model.")
    return trained


def _save_model(config: RunConfig, run: _Run, data: _Tokenized, model: Any, trained: dict[str, Any] | None) -> None:
    """The trained weights with their tokenizer, the tokenizer and chat template alone, and the loss plot."""
    from tunesmith.methods import save_trained
    from tunesmith.runs import plot_losses

    def write_weights(path: Path) -> None:
        save_trained(model, config, path, trained)
        data.tokenizer.save_pretrained(path)

    # A resumed run that had finished once: the old weights go only once the new ones are complete.
    save_atomic(RunDir(run.run_dir).weights(config), write_weights, replace=True)
    data.tokenizer.save_pretrained(RunDir(run.run_dir).tokenizer)
    write_text_atomic(RunDir(run.run_dir).chat_template, data.template)
    plot_losses(run.run_dir)


def _write_summary(
    config: RunConfig, run: _Run, data: _Tokenized, parameters: tuple[int, int], result: TrainResult
) -> TrainSummary:
    """The training summary written, and the manifest marked completed."""
    history = result.history
    summary = TrainSummary(
        run_dir=str(run.run_dir),
        method=config.method,
        format=run.fmt,
        train_examples=len(run.splits["train"]),
        test_examples=len(run.splits["test"]),
        trainable_params=parameters[0],
        total_params=parameters[1],
        steps=result.steps,
        epochs=result.epochs,
        final_loss=result.final_loss,
        first_loss=history[0]["loss"] if history else float("nan"),
        tokens=result.tokens,
        seconds=round(result.seconds, 2),
        tokens_per_second=round(result.tokens_per_second, 2),
        tokenize=data.report,
        val_examples=len(run.splits["val"]),
        stopped=result.stopped,
        best=result.best,
        resumed_from=result.resumed_from,
    )
    write_json(RunDir(run.run_dir).summary, asdict(summary))
    run.write_manifest("completed", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return summary


def read_summary(run_dir: Path) -> TrainSummary:
    """The training summary of a finished run."""
    return TrainSummary(**json.loads(RunDir(run_dir).summary.read_text()))
