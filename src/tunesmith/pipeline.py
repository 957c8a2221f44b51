"""The pipeline `tunesmith run` is: one config in, a trained, compared and reported run directory out.

Read it top to bottom; each stage is a function below, and each policy it applies lives in its own package:

    train_run(config)                            the training half (`tunesmith train`)
      open_run          new: data gate and split (data/gate.py), the run folder (rundir.py), the manifest
                        resume: config, data and split checks, the checkpoint to continue (train/resume.py)
      run_precision     the dtype, from the hardware or the run's start (train/precision.py)
      tokenize          the chat template and tokens, through the cache (data/tokenize.py, data/cache.py)
      build_model       the method on the base or on init_from, the plan's estimate (methods/, plan/report.py)
      measure_reference the starting model's log-probs for dpo/ipo/kto (objectives/preference.py)
      (grpo)            the rollouts that make each step's batch: prompts, rewards (objectives/rl.py, rewards.py)
      fit               the training loop, validation, checkpoints, trackers (train/loop.py, evaluate/validation.py)
      load_best         the best checkpoint's weights when asked (train/checkpoint.py)
      save, summarise   weights, tokenizer, chat template, loss plot, train_summary.json, manifest completed
    compare(summary)                             the tuned model against prompting, and the report (evaluate/)
    run(config)                                  train_run, then compare

A run directory is never reused or overwritten unless the caller passes overwrite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from rich.console import Console

from tunesmith.config import RunConfig, dump_config
from tunesmith.data.cache import cached_tokenize
from tunesmith.data.formats import Conversation, write_jsonl
from tunesmith.data.gate import gate_data, split_data
from tunesmith.data.tokenize import use_chat_template
from tunesmith.errors import TrainingInterrupted, TunesmithError
from tunesmith.evaluate.report import compare_and_report
from tunesmith.evaluate.validation import validator
from tunesmith.files import cache_root, save_atomic, write_json, write_text_atomic
from tunesmith.methods import (
    apply_method,
    count_parameters,
    load_base,
    method_of,
    save_trained,
    start_from_run,
    training_dtype,
)
from tunesmith.models import load_tokenizer, resolve_model_path
from tunesmith.objectives import objective_of, rl
from tunesmith.objectives.preference import kto_batch_warning, measure_reference, tokenize_preferences
from tunesmith.plan.report import run_estimate
from tunesmith.rundir import RunDir
from tunesmith.train import distributed
from tunesmith.train.checkpoint import latest_checkpoint, load_best
from tunesmith.train.loop import Session, TrainResult, fit
from tunesmith.train.precision import Precision, run_precision
from tunesmith.train.resume import manifest, reopen, saved_splits, split_hashes
from tunesmith.train.trackers import Trackers
from tunesmith.watch import plot_losses, process_identity


@dataclass
class TrainSummary:
    """train_summary.json: what the run is (its data, parameters, tokens) and what training did (TrainResult's
    fields, the same names, copied by `summarise` from the result itself)."""

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


def run(config: RunConfig, overwrite: bool = False, console: Console | None = None, **training: Any) -> Any:
    """`tunesmith run`: train_run, then compare. Returns (train summary, compare summary, report path)."""
    console = console or Console(stderr=True)
    trained = train_run(config, overwrite, console, **training)
    return (trained, *compare(trained, console))


def compare(trained: TrainSummary, console: Console) -> tuple[Any, Path]:
    """The tuned model against the base model zero-shot and few-shot on the test split, and the run's report."""
    console.print(
        f"Trained {trained.steps} steps in {trained.seconds:.0f}s; "
        f"loss {trained.first_loss:.3f} -> {trained.final_loss:.3f}"
    )
    return compare_and_report(trained.run_dir, console=console)


def train_run(
    config: RunConfig,
    overwrite: bool = False,
    console: Console | None = None,
    live: bool | None = None,
    strategy: str = "ddp",
) -> TrainSummary:
    """Every training stage for one config, leaving a complete run directory behind.

    With config.resume, an existing run directory continues from its last complete checkpoint.
    """
    run = open_run(config, overwrite, console or Console(stderr=True))
    if warning := kto_batch_warning(objective_of(config), config.train.batch_size, run.world.size):
        run.console.print(f"[yellow]warning: {warning}[/]")
    run.console.print(f"[bold]Model[/] {config.model}  [bold]method[/] {config.method}  [bold]run[/] {run.run_dir}")
    with _marked_on_failure(run):  # the manifest never says "running" after a stage has failed (train: its own)
        source = resolve_model_path(config.model)
        precision = run_precision(config, source, run.info if run.resuming else {}, run.console)
        run.info["precision"] = precision.to_dict()
        run.write_manifest("running")
        data = tokenize(config, run, source)
        model, parameters = build_model(config, run, source, precision, data.examples)
        splits = {"train": data.examples, "val": data.val_examples}
        pad = data.tokenizer.pad_token_id
        measure_reference(config, model, splits, pad, run.run_dir, run.world, run.console, precision, source)
    result = train(config, run, data, model, precision, live, strategy)
    trained = result.trainable
    if config.validation.load_best_at_end and result.best:
        trained, loaded = load_best(run.run_dir, model, trained, result.best["step"])
        if loaded:
            run.console.print(f"Saving the best checkpoint ({loaded}) as the run's model.")
    model.eval()
    if not run.world.main:  # the main process writes the run's weights and summary; wait for it, then leave
        distributed.barrier(run.world)
        return read_summary(run.run_dir)
    save(config, run, data, model, trained)
    summary = summarise(config, run, data, parameters, result)
    distributed.barrier(run.world)
    return summary


# --- The stages --------------------------------------------------------------------------------------------------


@dataclass
class OpenRun:
    """A run directory ready to train in, as this process sees it; what the stages hand along."""

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


def open_run(config: RunConfig, overwrite: bool, console: Console) -> OpenRun:
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
    if resuming and overwrite:
        raise TunesmithError("--resume and --overwrite contradict each other: pick one.")
    distributed.barrier(world)  # every process has looked at the run directory before the main one changes it
    with distributed.main_first(world):
        if not world.main:  # data-parallel workers read what the main process wrote
            splits, fmt, info, latest = _written_by_main(run_dir, resuming)
        elif resuming:
            splits, fmt, info, latest = reopen(config, run_dir, console)
        else:
            splits, fmt, info, latest = _start(config, run_dir, overwrite)
        info |= process_identity()  # pid, host and the pid's start time: the UI never mistakes another process
        run = OpenRun(run_dir, world, console, splits, fmt, info, latest, resuming)
        run.write_manifest("running")
    if world.size > 1:
        per = config.train.batch_size / world.size
        console.print(
            f"{world.size} processes x {per:g} examples x {config.train.grad_accum} accumulated = effective batch "
            f"{config.train.batch_size * config.train.grad_accum} examples per step (train.batch_size is per step "
            "over all processes, so results do not depend on their number)"
        )
    return run


def _start(config: RunConfig, run_dir: Path, overwrite: bool) -> tuple[dict, str, dict, None]:
    """A new run: the data through the gate and split, then the folder with its splits, check report and config."""
    checked = gate_data(config)
    splits, fmt, files = split_data(config, checked)
    layout = RunDir(run_dir)
    layout.create(overwrite)
    write_json(layout.check_report, checked.report.to_dict())
    for name, rows in splits.items():
        write_jsonl(layout.split(name), rows)
    layout.write_config(dump_config(config))
    return splits, fmt, manifest(config, files) | {"format": fmt, "splits": split_hashes(run_dir)}, None


def _written_by_main(run_dir: Path, resuming: bool) -> tuple[dict, str, dict, Path | None]:
    info = RunDir(run_dir).read_manifest()
    return saved_splits(run_dir), info.get("format", "chat"), info, latest_checkpoint(run_dir) if resuming else None


@dataclass
class Tokenized:
    """The run's tokenizer and chat template, its tokenized train and val examples, the tokenize report."""

    tokenizer: Any
    template: str
    examples: list[Any]
    val_examples: list[Any]
    report: dict[str, Any]


def tokenize(config: RunConfig, run: OpenRun, source: str) -> Tokenized:
    """The model's tokenizer and chat template, and the train and val examples tokenized (SFT: through the cache;
    preference objectives: both sides of every pair)."""
    tokenizer = load_tokenizer(source)
    train, val, test = run.splits["train"], run.splits["val"], run.splits["test"]
    tools = any(c.uses_tools for c in (*train, *val, *test))
    template = use_chat_template(tokenizer, config.chat_template, tools)
    length, holds = config.data.max_length, objective_of(config).holds
    examples: list[Any]
    val_examples: list[Any]
    if config.objective == "grpo":  # prompts only: the model writes the answers
        examples, report = rl.tokenize_prompts(tokenizer, train, length, config.rl)
        val_examples = rl.tokenize_prompts(tokenizer, val, length, config.rl)[0] if val else []
        said = (
            f"{len(train)} train / {len(val)} val / {len(test)} test prompts, {report['tokens']} prompt tokens, "
            f"{report['with_reference']} with a reference answer; {report['dropped']} dropped (no room for "
            f"rl.max_completion_tokens {config.rl.max_completion_tokens} within {length})"
        )
    elif holds != "sft":
        examples, report = tokenize_preferences(tokenizer, train, length, holds, config.train.seed)
        val_examples = tokenize_preferences(tokenizer, val, length, holds, config.train.seed)[0] if val else []
        unit = "pairs" if holds == "pair" else "rows"
        said = (
            f"{len(train)} train / {len(val)} val / {len(test)} test {unit}, {report['tokens']} tokens (both sides); "
            f"{report['truncated'] + report['truncated_second']} sides truncated to {length}, {report['dropped']} "
            f"{unit} dropped (no answer left)"
        )
    else:

        def cached(conversations: list[Conversation]) -> tuple[list[Any], Any, bool]:
            root = cache_root() / "tokenized"
            return cached_tokenize(tokenizer, conversations, length, config.data.train_on, root, config.data.reasoning)

        with distributed.main_first(run.world):  # the main process fills the tokenized cache, the others read it
            examples, stats, hit = cached(train)
            val_examples = cached(val)[0] if val else []
        report = stats.summary()
        said = (
            f"{len(train)} train / {len(val)} val / {len(test)} test examples, {report['tokens']} tokens; "
            f"{stats.truncated} truncated to {length}, {stats.dropped_no_loss} dropped (no answer left)"
            + (" [tokenized cache hit]" if hit else "")
        )
    if run.world.main:
        write_json(RunDir(run.run_dir).tokenize_report, report)
    run.console.print(f"{run.fmt} data: {said}")
    return Tokenized(tokenizer, template, examples, val_examples, report)


def build_model(
    config: RunConfig, run: OpenRun, source: str, precision: Precision, examples: list[Any]
) -> tuple[Any, tuple[int, int]]:
    """The base model with the method applied, its (trainable, total) parameters; a new run's plan estimate."""
    set_seed(config.train.seed)  # the new weights (LoRA A, adapters) start the same in every run of this config
    dtype = training_dtype(config, precision.dtype)
    if config.init_from:
        model, _ = start_from_run(config, source, dtype)
        run.console.print(f"starting from {config.init_from}'s trained weights")
    else:
        model, _ = apply_method(load_base(config, source, dtype), config)
    model = objective_of(config).attach(model, config.train.seed)
    trainable, total = count_parameters(model)
    run.console.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    if not run.resuming and run.world.main:
        planned = rl.planned_rows(examples, config.rl) if config.objective == "grpo" else examples
        write_json(RunDir(run.run_dir).plan, run_estimate(config, model.config, planned))
    return model, (trainable, total)


def train(
    config: RunConfig, run: OpenRun, data: Tokenized, model: Any, precision: Precision, live: bool | None,
    strategy: str,
) -> TrainResult:  # fmt: skip
    """The training loop with the run's checkpoints, validation and trackers; the manifest says how it ended."""
    trackers = Trackers(config, run.run_dir) if run.world.main else None
    # grpo makes its own batches (rollouts); built before fit, so that it sees the starting weights
    rollouts = (
        rl.Rollouts(config, data.tokenizer, data.examples, model, method_of(config).uses_peft)
        if config.objective == "grpo"
        else None
    )
    session = Session(
        run_dir=run.run_dir,
        checkpoint=config.checkpoint,
        validation=config.validation,
        validate=validator(config, data.tokenizer, run.splits["val"], data.val_examples) if data.val_examples else None,
        resume_from=run.latest,
        log=trackers.log if trackers else None,
        on_checkpoint=lambda path: plot_losses(run.run_dir),
        live=live,
        strategy=strategy,
        objective=rollouts.objective if rollouts else objective_of(config),
        preference=config.preference,
        source=rollouts,
    )
    metrics, pad = RunDir(run.run_dir).metrics, data.tokenizer.pad_token_id
    try:
        result = fit(
            model, data.examples, config.train, pad, metrics, run.console, row_tokens=config.data.max_length,
            session=session, precision=precision,
        )  # fmt: skip
    except BaseException as exc:
        if trackers:
            status = "interrupted" if isinstance(exc, TrainingInterrupted) else "failed"
            trackers.close(status)
            run.write_manifest(status, **({} if status == "interrupted" else {"error": str(exc)[:2000]}))
        raise
    if trackers:
        trackers.close("completed")
    return result


def save(config: RunConfig, run: OpenRun, data: Tokenized, model: Any, trained: dict[str, Any] | None) -> None:
    """The objective's own part (a reward head), the trained weights with their tokenizer, the tokenizer and chat
    template alone, and the loss plot."""
    trained = objective_of(config).save_own(model, run.run_dir, trained)

    def write_weights(path: Path) -> None:
        save_trained(model, config, path, trained)
        data.tokenizer.save_pretrained(path)

    # A resumed run that had finished once: the old weights go only once the new ones are complete.
    save_atomic(RunDir(run.run_dir).weights(config), write_weights, replace=True)
    data.tokenizer.save_pretrained(RunDir(run.run_dir).tokenizer)
    write_text_atomic(RunDir(run.run_dir).chat_template, data.template)
    plot_losses(run.run_dir)


def summarise(
    config: RunConfig, run: OpenRun, data: Tokenized, parameters: tuple[int, int], result: TrainResult
) -> TrainSummary:
    """The training summary written, and the manifest marked completed."""
    shared = {f.name for f in dataclasses.fields(TrainSummary)} & {f.name for f in dataclasses.fields(TrainResult)}
    shared -= {"seconds"}  # rounded below
    summary = TrainSummary(
        **{name: getattr(result, name) for name in shared},
        run_dir=str(run.run_dir),
        method=config.method,
        format=run.fmt,
        train_examples=len(run.splits["train"]),
        test_examples=len(run.splits["test"]),
        val_examples=len(run.splits["val"]),
        trainable_params=parameters[0],
        total_params=parameters[1],
        first_loss=result.history[0]["loss"] if result.history else float("nan"),
        seconds=round(result.seconds, 2),
        tokens_per_second=round(result.tokens_per_second, 2),
        tokenize=data.report,
    )
    write_json(RunDir(run.run_dir).summary, asdict(summary))
    run.write_manifest("completed", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return summary


def read_summary(run_dir: Path) -> TrainSummary:
    """The training summary of a finished run."""
    return TrainSummary(**json.loads(RunDir(run_dir).summary.read_text()))


@contextlib.contextmanager
def _marked_on_failure(run: OpenRun) -> Iterator[None]:
    """Mark the manifest interrupted or failed when the stages inside end in an exception, and re-raise it."""
    try:
        yield
    except (TrainingInterrupted, KeyboardInterrupt):
        run.write_manifest("interrupted")
        raise
    except BaseException as exc:
        run.write_manifest("failed", error=str(exc)[:2000])
        raise
