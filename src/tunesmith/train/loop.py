"""The training loop, written out: AdamW, warmup then decay, gradient accumulation, clipping, logging.

It runs on accelerate so the same loop later spreads over several devices. It never decides what
to train (that is methods/) nor where files go (that is rundir.py and pipeline.py); it only optimises and reports.
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tunesmith.config import CheckpointConfig, PreferenceConfig, TrainConfig, ValidationConfig
from tunesmith.data.tokenize import TokenizedExample
from tunesmith.errors import TrainingInterrupted, TunesmithError
from tunesmith.files import json_line, open_append, write_text_atomic
from tunesmith.objectives import SFT, Objective
from tunesmith.objectives.objective import StepBatch
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import distributed
from tunesmith.train.batching import batch_order
from tunesmith.train.loss import share_limit
from tunesmith.train.precision import Precision, resolve
from tunesmith.train.speed import memory_releaser, prepare_model


@dataclass
class TrainResult:
    steps: int
    epochs: float
    final_loss: float
    tokens: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = "completed"  # or "early_stopped"
    best: dict[str, Any] | None = None
    resumed_from: int | None = None
    skipped_steps: int = 0
    # Under FSDP the model's weights are shards: the trained weights, gathered whole, for saving.
    trainable: dict[str, Any] | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Share of the peak lr at a 0-based step: linear warmup that never starts at zero, then decay.

    The first step already learns (1 / (warmup + 1) of the peak), and decay stops just short of
    zero at the last step, so no step is spent with lr 0.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


def plan_steps(n_batches: int, settings: TrainConfig) -> int:
    per_epoch = max(1, math.ceil(n_batches / settings.grad_accum))
    return settings.max_steps or max(1, math.ceil(settings.epochs * per_epoch))


def batch_stream(lengths: list[int], settings: TrainConfig):
    """Endless stream of micro-batch index lists, reshuffled each epoch with the run's seed."""
    for epoch in itertools.count():
        yield from batch_order(lengths, settings.batch_size, settings.seed + epoch)


def micro_batches(
    examples: list[TokenizedExample],
    settings: TrainConfig,
    pad_id: int,
    row_tokens: int,
    skip: int = 0,
    world: distributed.World | None = None,
    objective: Objective = SFT,
    share_limit: int | None = None,
):
    """Endless stream of (indices, batch, weight), starting after `skip` micro-batches (the resume position).

    `indices` is the whole micro-batch (the same on every process); `batch` holds this process's share.
    A process whose share is empty (a micro-batch smaller than the world) gets one example at weight 0,
    so it still joins the gradient all-reduce without changing the result.
    """
    for indices in itertools.islice(batch_stream([len(e) for e in examples], settings), skip, None):
        mine = distributed.shard(indices, world or distributed.World())
        weight = 1.0 if mine else 0.0
        chosen = [examples[i] for i in (mine or indices[:1])]
        yield indices, objective.collate(chosen, pad_id, row_tokens, settings.packing, share_limit), weight


class LossModel(torch.nn.Module):
    """The model with its objective's loss as forward, so DDP/FSDP see (and sync) the whole computation; the
    statistics of the last forward (summed, e.g. reward accuracy of preference pairs) wait in `stats`."""

    def __init__(self, model: Any, objective: Objective = SFT, preference: PreferenceConfig | None = None) -> None:
        super().__init__()
        self.model, self.objective, self.preference = model, objective, preference
        self.stats: dict[str, float] = {}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss, self.stats = self.objective.loss_sum(self.model, batch, self.preference)
        return loss


def loss_tokens_of(example: TokenizedExample) -> int:
    """Answer tokens that carry loss (the first token of an example never does), as batching labels them."""
    return SFT.units(example)


def loss_scale(weight: float, step_loss_tokens: int, world: distributed.World) -> float:
    """The factor on a micro-batch's summed answer loss that makes the step's gradient one large batch's.

    `step_loss_tokens` counts the answer tokens of the whole step, all its micro-batches on all processes, so
    gradient accumulation and data parallelism both give the mean over every answer token of the step. DDP
    averages gradients over the processes, hence the factor world.size; a placeholder share (weight 0) adds nothing.
    """
    return weight * world.size / step_loss_tokens


@dataclass
class Session:
    """What a run adds around the bare loop: checkpoints, resume, validation, trackers, the live view."""

    run_dir: Path | None = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # when to validate, what counts as best
    validate: Callable[[Any], dict[str, Any]] | None = None  # the scores of one validation (and grpo's samples)
    resume_from: Path | None = None
    log: Callable[[dict[str, Any]], None] | None = None  # trackers
    on_checkpoint: Callable[[Path], None] | None = None
    live: bool | None = None  # None: a live bar when the console is a terminal
    stop_signals: bool = True
    strategy: str = "ddp"  # with several processes: ddp (replicated) or fsdp (sharded)
    objective: Objective = SFT  # what the loss trains toward (objectives/)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)  # its settings, for preference ones
    # An objective that makes its own data (grpo: objectives/rl.py: Rollouts): `stream(trainer)` yields one StepBatch
    # per step from the trainer's state; `epoch_size` (data positions per epoch) and `steps_per_epoch`. None: the
    # examples' micro-batches.
    source: Any = None


def better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric.endswith("loss") else value > best


OVERFIT_RISES = 2  # validations in a row with a higher val loss before the overfitting warning


def overfitting(evaluations: list[dict[str, Any]], rises: int = OVERFIT_RISES) -> bool:
    """True when val loss rose at each of the last `rises` validations while the train loss fell across them.

    One rise is as often noise as not (the quickstart's val loss went 0.0122 -> 0.0129 at its last step and
    nothing was wrong); a rise sustained over validations is the overfitting signal.
    """
    recent = [e for e in evaluations if e.get("val_loss") is not None][-(rises + 1) :]
    if len(recent) <= rises:
        return False
    val = [e["val_loss"] for e in recent]
    first_train, last_train = recent[0].get("train_loss"), recent[-1].get("train_loss")
    train_fell = first_train is not None and last_train is not None and last_train < first_train
    return train_fell and all(later > earlier for earlier, later in itertools.pairwise(val))


def memory_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}G"
    try:
        with open("/proc/self/statm") as handle:
            resident = int(handle.read().split()[1]) * 4096
    except OSError:
        return "-"
    return f"{resident / 2**30:.1f}G"


class StopRequest:
    """SIGINT/SIGTERM handlers that ask the loop to stop after the current step (a second Ctrl-C aborts)."""

    def __init__(self, console: Console) -> None:
        self.signum: int | None = None
        self.console = console
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        self.console.print(
            f"[yellow]{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
            "(Ctrl-C again to abort without one)[/]"
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _nonfinite_message(step: int, loss: float, grad_norm: float, lr: float, dtype: str, lines: list[int]) -> str:
    causes = [f"the learning rate is too high (train.lr; this step used {lr:.2e}): lower it or warm up longer"]
    if dtype != "fp32":
        causes.append(f"{dtype} overflow: try train.dtype=fp32")
    causes.append(f"a bad example in this step's batch (data lines {sorted(set(lines))[:16]}): check them")
    return (
        f"Step {step}: loss {loss} / gradient norm {grad_norm} is not finite. Likely causes:\n"
        + "\n".join(f"  - {c}" for c in causes)
        + "\nOr set train.on_nonfinite=skip to skip such steps."
    )


def _resume_history(metrics_path: Path | None, step: int) -> list[dict[str, Any]]:
    """Drop metrics logged after the checkpoint (a killed run logs steps it never saved); return train rows."""
    if not metrics_path or not metrics_path.is_file():
        return []
    kept = []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if record.get("step", 0) <= step:
            kept.append(record)
    write_text_atomic(metrics_path, "".join(json_line(r) for r in kept))
    train = [r for r in kept if r.get("type", "train") == "train"]
    for record in train:  # a non-finite loss was written as null
        record["loss"] = float("nan") if record.get("loss") is None else record["loss"]
    return train


@dataclass
class StepOutcome:
    """What one optimizer step measured, for its metrics row."""

    loss: float  # mean answer loss of the step over all processes
    grad_norm: float
    lr: float
    loss_tokens: int
    tokens: int
    stats: dict[str, float] = field(default_factory=dict)  # the objective's statistics summed over the step
    logged: dict[str, Any] = field(default_factory=dict)  # statistics logged as they are (grpo: rewards, seconds)


class Trainer:
    """One training run, built by `fit`: __init__ sets it up, `train()` steps until done, early stop or a signal.

    Each part of a step is a method to read on its own: `train_step` (one optimizer step), `skip_nonfinite`,
    `report` (the metrics row), `end_of_step` (validation, checkpoint, stop signals), `validate` and `save`.
    """

    def __init__(
        self,
        model: Any,
        examples: list[TokenizedExample],
        settings: TrainConfig,
        session: Session,
        precision: Precision,
        console: Console,
        pad_id: int,
        row_tokens: int,
        metrics_path: Path | None,
    ) -> None:
        self.examples, self.settings, self.session, self.precision = examples, settings, session, precision
        self.world = distributed.setup()
        set_seed(settings.seed)
        # Autocast and loss scaling are done here rather than through accelerate's mixed_precision, which is fixed
        # once per process (a second run in another dtype, as in tests or a sweep, would be refused).
        self.accelerator = Accelerator()
        self.device = self.accelerator.device
        if settings.batch_size < self.world.size:
            raise TunesmithError(
                f"train.batch_size {settings.batch_size} is smaller than the {self.world.size} processes: each "
                "process needs at least one example per micro-batch. "
                f"Set train.batch_size to {self.world.size} or more."
            )
        source = session.source
        self.n_batches = source.epoch_size if source else math.ceil(len(examples) / settings.batch_size)
        if source:
            self.total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * source.steps_per_epoch))
        else:
            self.total_steps = plan_steps(self.n_batches, settings)
        self._setup_model(model)
        self.validate_every = self.session.validation.every or max(1, self.total_steps // 10)
        self.save_every = self.session.checkpoint.every or self.validate_every
        self._resume(metrics_path, console)
        self.releaser = memory_releaser(settings, self.device)
        if self.releaser:
            self.releaser.attach(self.model)
        skip = self.state.micro_batches
        if source:
            self.steps: Any = source.stream(self)
        else:
            # A micro-batch whose examples begin alike (a system prompt, a tools block) computes that once
            shares = share_limit(model) if settings.share_prefixes else None
            stream = micro_batches(examples, settings, pad_id, row_tokens, skip, self.world, session.objective, shares)
            self.steps = self.example_steps(stream)
        self.started = time.perf_counter() - self.state.elapsed_s
        self.skipped = 0
        self._setup_output(metrics_path, console)

    def _setup_model(self, model: Any) -> None:
        """The model with its loss, sharded (FSDP) or replicated (DDP) over the processes; optimizer and schedule."""
        settings = self.settings
        self.model = prepare_model(model, settings)
        self.objective_model = LossModel(self.model, self.session.objective, self.session.preference)
        self.loss_model: Any = self.objective_model
        self.sharded = self.world.size > 1 and self.session.strategy == "fsdp"
        if self.sharded and self.precision.name == "fp16":
            raise TunesmithError("train.dtype fp16 (loss scaling) is not supported with --strategy fsdp: use bf16.")
        if self.sharded:  # before the optimizer is built: sharding replaces the parameters with DTensors
            layers = self.model.get_decoder().layers
            self.loss_model = distributed.fully_shard_model(self.loss_model.to(self.device), layers)
        self.parameters = [p for p in self.loss_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=settings.lr, weight_decay=settings.weight_decay)
        total, warmup = self.total_steps, int(settings.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup, total, settings.schedule)
        )
        if not self.sharded:
            # DDP when there are several processes. The scheduler stays unprepared: accelerate would step it
            # once per process, but every process here takes a share of the same step.
            self.loss_model, self.optimizer = self.accelerator.prepare(self.loss_model, self.optimizer)
        self.loss_model.train()
        # fp16: the loss is scaled so small gradients survive; the scaler skips steps whose gradients overflowed.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.name == "fp16" else None

    def _resume(self, metrics_path: Path | None, console: Console) -> None:
        """Continue from the session's checkpoint, if it names one: weights, optimizer, schedule, data position."""
        self.state = ckpt.TrainState(best_metric=self.session.validation.best_metric)
        self.history: list[dict[str, Any]] = []
        self.resumed_at: int | None = None
        checkpoint = self.session.resume_from
        if checkpoint is None:
            return
        self.state = ckpt.load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler, sharded=self.sharded)
        # The main process owns the metrics file.
        self.history = _resume_history(metrics_path if self.world.main else None, self.state.step)
        console.print(f"Resuming from {checkpoint.name}: step {self.state.step} of {self.total_steps}")
        self.resumed_at = self.state.step

    def _setup_output(self, metrics_path: Path | None, console: Console) -> None:
        """Metrics file, console and progress bar: only the main process writes metrics, logs, prints and saves."""
        self.metrics_file = open_append(metrics_path) if metrics_path and self.world.main else None
        self.console = console if self.world.main else Console(stderr=True, quiet=True)
        live = self.session.live
        self.live = self.console.is_terminal if live is None else live and self.console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.live,
        )
        self.task = self.progress.add_task("train", total=self.total_steps, completed=self.state.step, status="")

    def train(self) -> TrainResult:
        """Step until the planned steps are done, early stopping ends the run or a stop signal arrives."""
        stopped = "completed"
        try:
            with self.progress, StopRequest(self.console) if self.session.stop_signals else nullcontext() as stop:
                for step in range(self.state.step + 1, self.total_steps + 1):
                    step_start = time.perf_counter()
                    outcome = self.train_step(step)
                    self.state.step = step
                    self.state.elapsed_s = time.perf_counter() - self.started
                    if outcome is None:
                        self.progress.update(self.task, advance=1)
                    else:
                        self.report(step, outcome, step_start)
                    # A skipped step still validates, saves and honours a stop signal on its schedule: the last
                    # step must leave a checkpoint, and a Ctrl-C must not be lost because its step was skipped.
                    if self.end_of_step(step, stop):
                        stopped = "early_stopped"
                        break
        finally:
            if self.metrics_file:
                self.metrics_file.close()
            if self.releaser:
                self.releaser.detach()
        return self.result(stopped)

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.precision.dtype, enabled=self.precision.name != "fp32")

    def example_steps(self, stream: Any) -> Any:
        """Endless StepBatches of grad_accum micro-batches each from the examples' micro-batch stream."""
        while True:
            drawn = [next(stream) for _ in range(self.settings.grad_accum)]
            chosen = [self.examples[i] for indices, _, _ in drawn for i in indices]
            units = sum(self.session.objective.units(e) for e in chosen)
            lines = [e.line for e in chosen]
            yield StepBatch(drawn, units, sum(len(e) for e in chosen), lines, self.settings.grad_accum)

    def train_step(self, step: int) -> StepOutcome | None:
        """One optimizer step over the step's micro-batches; None when it was skipped for a non-finite loss."""
        data: StepBatch = next(self.steps)
        drawn_at = time.perf_counter()
        loss_tokens = data.units
        loss, stats = self._backward(data.micro_batches, loss_tokens)
        if self.scaler:  # an inf norm after unscaling means the loss scale was too high, not bad data
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.settings.max_grad_norm or math.inf)
        grad_norm = float(distributed.whole(norm))
        lr = self.scheduler.get_last_lr()[0]
        self.state.micro_batches += data.advance
        if self.scaler and math.isfinite(loss) and not math.isfinite(grad_norm):
            self.emit({"type": "event", "step": step, "event": "loss_scale_backoff"})
        elif not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.skip_nonfinite(step, loss, grad_norm, lr, data.lines)
            return None
        self.state.skipped_in_row = 0
        if self.scaler:
            self.scaler.step(self.optimizer)  # skipped when the gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.releaser:
            self.releaser.release()
        logged = data.logged | ({"train_s": round(time.perf_counter() - drawn_at, 3)} if self.session.source else {})
        return StepOutcome(loss, grad_norm, lr, loss_tokens, data.tokens, stats, logged)

    def _backward(
        self, drawn: list[tuple[list[int], dict[str, torch.Tensor], float]], loss_tokens: int
    ) -> tuple[float, dict[str, float]]:
        """Forward and backward over the step's micro-batches: the step's mean loss over all processes, and the
        objective's statistics summed over all processes."""
        step_loss = 0.0
        stats: dict[str, float] = {}
        for position, (_, batch, weight) in enumerate(drawn):
            batch = {k: v.to(self.device) for k, v in batch.items() if k != "real_tokens"}
            skip_sync = position < len(drawn) - 1 and not self.sharded
            with self.accelerator.no_sync(self.loss_model) if skip_sync else nullcontext(), self.autocast():
                loss = self.loss_model(batch) * loss_scale(weight, loss_tokens, self.world)
                self.accelerator.backward(self.scaler.scale(loss) if self.scaler else loss)
            step_loss += loss.item() / self.world.size
            for name, value in self.objective_model.stats.items():
                stats[name] = stats.get(name, 0.0) + value * weight
        total = {name: distributed.reduce_sum(value, self.world, self.device) for name, value in stats.items()}
        return distributed.reduce_sum(step_loss, self.world, self.device), total

    def skip_nonfinite(self, step: int, loss: float, grad_norm: float, lr: float, lines: list[int]) -> None:
        """Drop a step whose loss or gradients are not finite, or stop (train.on_nonfinite stop, or 5 in a row)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.state.skipped_in_row += 1
        if self.settings.on_nonfinite == "stop" or self.state.skipped_in_row >= 5:
            raise TunesmithError(_nonfinite_message(step, loss, grad_norm, lr, self.precision.name, lines))
        self.skipped += 1
        self.emit({"type": "event", "step": step, "event": "skipped_nonfinite", "loss": str(loss)})
        self.say(f"[yellow]step {step} skipped: loss {loss}, grad norm {grad_norm}[/]")
        self.scheduler.step()

    def report(self, step: int, outcome: StepOutcome, step_start: float) -> None:
        """Smooth the loss, flag spikes, and show the step: metrics row, trackers, progress bar, log line."""
        state, loss = self.state, outcome.loss
        spike = (
            state.smoothed_loss is not None and step > 10 and loss > self.settings.spike_factor * state.smoothed_loss
        )
        state.smoothed_loss = loss if state.smoothed_loss is None else 0.9 * state.smoothed_loss + 0.1 * loss
        state.tokens += outcome.tokens
        record = {
            "type": "train",
            "step": step,
            "epoch": round(state.micro_batches / self.n_batches, 4),
            "loss": round(loss, 6),
            "smoothed_loss": round(state.smoothed_loss, 6),
            "lr": outcome.lr,
            "grad_norm": round(outcome.grad_norm, 6),
            "tokens": outcome.tokens,
            "loss_tokens": outcome.loss_tokens,
            "tokens_per_s": round(outcome.tokens / (time.perf_counter() - step_start), 2),
            "elapsed_s": round(state.elapsed_s, 3),
        }
        # Preference objectives: reward accuracy, margin, log-probs, as means over the step's pairs.
        record |= {name: round(value / outcome.loss_tokens, 6) for name, value in outcome.stats.items()}
        record |= outcome.logged
        if spike:
            record["spike"] = True
            self.say(f"[yellow]loss spike at step {step}: {loss:.4f} vs smoothed {state.smoothed_loss:.4f}[/]")
        self.history.append(record)
        self.emit(record, force=spike or step % self.settings.log_every == 0 or step == self.total_steps)
        rewards = f" reward acc {record['reward_accuracy']:.2f}" if "reward_accuracy" in record else ""
        rewards += f" reward {record['reward']:.3f}" if isinstance(record.get("reward"), float) else ""
        status = (
            f"ep {record['epoch']:.2f} loss {state.smoothed_loss:.4f}{rewards} lr {outcome.lr:.2e} "
            f"gnorm {outcome.grad_norm:.3f} {record['tokens_per_s']:.0f} tok/s mem {memory_text(self.device)}"
        )
        self.progress.update(self.task, advance=1, status=status)
        total = self.total_steps
        if not self.live and (step == 1 or step == total or step % max(1, total // 20) == 0):
            self.say(f"step {step}/{total} {status}")

    def end_of_step(self, step: int, stop: StopRequest | None) -> bool:
        """Validation, checkpoint and stop-signal handling after a step; True when early stopping ends the run."""
        early = False
        if self.session.validate and (step % self.validate_every == 0 or step == self.total_steps):
            early = self.validate(step)
            if early:
                state = self.state
                self.say(
                    f"Early stop at step {step}: {state.best_metric} has not improved for "
                    f"{self.session.validation.patience} validations "
                    f"(best {state.best_value:.4f} at step {state.best_step})."
                )
        signum = stop.signum if stop is not None and stop.signum is not None else 0
        signum = distributed.reduce_max(signum, self.world, self.device)  # all stop at the same step
        if step % self.save_every == 0 or step == self.total_steps or early or signum:
            saved = self.save()
            if signum:
                raise TrainingInterrupted(signum, step, str(saved) if saved else None)
        return early

    def validate(self, step: int) -> bool:
        """Validate, track the best, warn on overfitting; True when early stopping should stop the run."""
        found = self._scores()
        scores = {k: v for k, v in found.items() if isinstance(v, int | float)}
        state = self.state
        samples = {k: v for k, v in found.items() if k not in scores}  # grpo: a few sample completions
        record = {"type": "val", "step": step, **{k: round(v, 6) for k, v in scores.items()}, **samples}
        state.evaluations.append({"step": step, "train_loss": state.smoothed_loss, **scores})
        value = scores.get(state.best_metric)
        if value is not None and better(state.best_metric, value, state.best_value):
            state.best_value, state.best_step = value, step
            record["best"] = True
        if overfitting(state.evaluations):
            rose = " -> ".join(f"{e['val_loss']:.4f}" for e in state.evaluations[-(OVERFIT_RISES + 1) :])
            record["overfitting"] = True
            self.say(
                f"[yellow]warning: val loss rose at {OVERFIT_RISES} validations in a row ({rose}) while train loss "
                "fell: the model may be overfitting (fewer epochs, lower lr, more data)[/]"
            )
        self.emit(record)
        shown = " ".join(f"{k} {v:.4f}" for k, v in scores.items())
        self.say(f"step {step}: {shown}" + (" (best)" if record.get("best") else ""))
        since_best = step - (state.best_step or 0)
        evals_since = sum(1 for e in state.evaluations if e["step"] > (state.best_step or 0))
        patience = self.session.validation.patience
        return bool(patience and since_best > 0 and evals_since >= patience)

    def _scores(self) -> dict[str, Any]:
        """The session's validation scores of the model as it is now."""
        self.loss_model.eval()  # the releaser's layer hooks do nothing outside training mode
        if self.sharded:
            self.loss_model.unshard()  # the root group's weights (embeddings, head) stay gathered while validating
        try:
            # Every process validates (same result), so early stopping agrees everywhere; under the training
            # autocast, so validation computes in the dtype training does.
            with torch.no_grad(), self.autocast():
                return self.session.validate(self.model)
        finally:
            if self.sharded:
                self.loss_model.reshard()
            self.loss_model.train()

    def save(self) -> Path | None:
        """Write a checkpoint of this step and prune older ones; its path on the main process, else None."""
        run_dir = self.session.run_dir
        if run_dir is None:
            return None
        tensors = optimizer_state = None
        if self.sharded:  # every process takes part in gathering the shards; the main one writes
            tensors = ckpt.trainable_tensors(self.model)
            optimizer_state = distributed.full_optimizer_state(self.optimizer)
        if not self.world.main:
            return None
        path = ckpt.save_checkpoint(
            run_dir, self.model, self.optimizer, self.scheduler, self.state, tensors, optimizer_state
        )
        keep = self.session.checkpoint
        ckpt.prune(run_dir, keep.keep_last, self.state.best_step if keep.keep_best else None)
        if self.session.on_checkpoint:
            self.session.on_checkpoint(path)
        return path

    def emit(self, record: dict[str, Any], force: bool = True) -> None:
        """Append a record to metrics.jsonl and hand it to the trackers (force False: neither)."""
        if not force:
            return
        if self.metrics_file:
            self.metrics_file.write(json_line(record))
            self.metrics_file.flush()
        if self.session.log and self.world.main:
            self.session.log(record)

    def say(self, text: str) -> None:
        if self.live:
            self.progress.console.print(text, highlight=False)
        else:
            self.console.print(text, highlight=False)
            sys.stderr.flush()

    def result(self, stopped: str) -> TrainResult:
        seconds = time.perf_counter() - self.started
        trainable = ckpt.trainable_tensors(self.model) if self.sharded else None  # a collective: every process
        state = self.state
        best = None
        if state.best_step is not None:
            best = {"metric": state.best_metric, "value": state.best_value, "step": state.best_step}
        return TrainResult(
            steps=state.step,
            epochs=round(state.micro_batches / self.n_batches, 4),
            final_loss=self.history[-1]["loss"] if self.history else float("nan"),
            tokens=state.tokens,
            seconds=seconds,
            history=self.history,
            stopped=stopped,
            best=best,
            resumed_from=self.resumed_at,
            skipped_steps=self.skipped,
            trainable=trainable,
        )


def fit(
    model: Any,
    examples: list[TokenizedExample],
    settings: TrainConfig,
    pad_id: int,
    metrics_path: Path | None = None,
    console: Console | None = None,
    row_tokens: int = 1024,
    session: Session | None = None,
    precision: Precision | None = None,
) -> TrainResult:
    """Train `model` on `examples`; `precision` defaults to what train.dtype resolves to on this machine."""
    if not examples:
        raise TunesmithError("No training examples are left after tokenization; check data.max_length.")
    precision = precision or resolve(settings.dtype, model_type=getattr(model.config, "model_type", None))
    session = session or Session(stop_signals=False)
    console = console or Console(stderr=True)
    return Trainer(model, examples, settings, session, precision, console, pad_id, row_tokens, metrics_path).train()
