"""The training loop, written out: AdamW, warmup then decay, gradient accumulation, clipping, logging.

It runs on accelerate so the same loop later spreads over several devices. It never decides what
to train (that is methods/) nor where files go (that is run.py); it only optimises and reports.
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
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tunesmith.config import CheckpointConfig, TrainConfig, ValidationConfig
from tunesmith.data.tokenize import TokenizedExample
from tunesmith.errors import TrainingInterrupted, TunesmithError
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import distributed
from tunesmith.train.batching import batch_order, collate, pack
from tunesmith.train.loss import model_loss_sum
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
        yield indices, pack(chosen, pad_id, row_tokens) if settings.packing else collate(chosen, pad_id), weight


class LossModel(torch.nn.Module):
    """The model with its chunked answer loss as forward, so DDP/FSDP see (and sync) the whole computation."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model_loss_sum(self.model, batch)


def loss_tokens_of(example: TokenizedExample) -> int:
    """Answer tokens that carry loss (the first token of an example never does), as batching labels them."""
    return sum(example.loss_mask[1:])


@dataclass
class Session:
    """What a run adds around the bare loop: checkpoints, resume, validation, trackers, the live view."""

    run_dir: Path | None = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # when to validate, what counts as best
    validate: Callable[[Any], dict[str, float]] | None = None  # the scores of one validation
    resume_from: Path | None = None
    log: Callable[[dict[str, Any]], None] | None = None  # trackers
    on_checkpoint: Callable[[Path], None] | None = None
    live: bool | None = None  # None: a live bar when the console is a terminal
    stop_signals: bool = True
    strategy: str = "ddp"  # with several processes: ddp (replicated) or fsdp (sharded)


def better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric.endswith("loss") else value > best


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
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return [r for r in kept if r.get("type", "train") == "train"]


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
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if not examples:
        raise TunesmithError("No training examples are left after tokenization; check data.max_length.")
    console = console or Console(stderr=True)
    session = session or Session(stop_signals=False)
    world = distributed.setup()
    set_seed(settings.seed)
    precision = precision or resolve(settings.dtype, model_type=getattr(model.config, "model_type", None))
    # Autocast and loss scaling are done here rather than through accelerate's mixed_precision, which is fixed
    # once per process (a second run in another dtype, as in tests or a sweep, would be refused).
    accelerator = Accelerator()
    if settings.batch_size < world.size:
        raise TunesmithError(
            f"train.batch_size {settings.batch_size} is smaller than the {world.size} processes: each process needs "
            f"at least one example per micro-batch. Set train.batch_size to {world.size} or more."
        )
    n_batches = math.ceil(len(examples) / settings.batch_size)
    total_steps = plan_steps(n_batches, settings)
    model = prepare_model(model, settings)
    trainer = LossModel(model)
    sharded = world.size > 1 and session.strategy == "fsdp"
    if sharded and precision.name == "fp16":
        raise TunesmithError("train.dtype fp16 (loss scaling) is not supported with --strategy fsdp: use bf16.")
    if sharded:  # before the optimizer is built: sharding replaces the parameters with DTensors
        trainer = distributed.fully_shard_model(trainer.to(accelerator.device), model.get_decoder().layers)
    parameters = [p for p in trainer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = int(settings.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total_steps, settings.schedule)
    )
    if not sharded:
        # DDP when there are several processes. The scheduler stays unprepared: accelerate would step it
        # once per process, but every process here takes a share of the same step.
        trainer, optimizer = accelerator.prepare(trainer, optimizer)
    trainer.train()
    # fp16: the loss is scaled so small gradients survive; the scaler skips steps whose gradients overflowed.
    scaler = torch.amp.GradScaler(accelerator.device.type) if precision.name == "fp16" else None

    def autocast() -> Any:
        return torch.autocast(accelerator.device.type, dtype=precision.dtype, enabled=precision.name != "fp32")
    validate_every = session.validation.every or max(1, total_steps // 10)
    save_every = session.checkpoint.every or validate_every

    state = ckpt.TrainState(best_metric=session.validation.best_metric)
    history: list[dict[str, Any]] = []
    if session.resume_from is not None:
        state = ckpt.load_checkpoint(session.resume_from, model, optimizer, scheduler, sharded=sharded)
        history = _resume_history(metrics_path if world.main else None, state.step)  # the main process owns the file
        console.print(f"Resuming from {session.resume_from.name}: step {state.step} of {total_steps}")
    resumed_at = state.step if session.resume_from is not None else None

    releaser = memory_releaser(settings, accelerator.device)
    if releaser:
        releaser.attach(model)
    stream = micro_batches(examples, settings, pad_id, row_tokens, skip=state.micro_batches, world=world)
    started = time.perf_counter() - state.elapsed_s
    # Only the main process writes metrics, logs to trackers, prints and checkpoints.
    metrics_file = metrics_path.open("a", encoding="utf-8") if metrics_path and world.main else None
    if not world.main:
        console = Console(stderr=True, quiet=True)
    live = console.is_terminal if session.live is None else session.live and console.is_terminal
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not live,
    )
    task = progress.add_task("train", total=total_steps, completed=state.step, status="")
    stopped = "completed"
    skipped = 0

    def emit(record: dict[str, Any], force: bool = True) -> None:
        if metrics_file and force:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if session.log and force and world.main:
            session.log(record)

    def say(text: str) -> None:
        if live:
            progress.console.print(text, highlight=False)
        else:
            console.print(text, highlight=False)
            sys.stderr.flush()

    def save(step_state: ckpt.TrainState) -> Path | None:
        if session.run_dir is None:
            return None
        tensors = optimizer_state = None
        if sharded:  # every process takes part in gathering the shards; the main one writes
            tensors, optimizer_state = ckpt.trainable_tensors(model), distributed.full_optimizer_state(optimizer)
        if not world.main:
            return None
        path = ckpt.save_checkpoint(session.run_dir, model, optimizer, scheduler, step_state, tensors, optimizer_state)
        best = step_state.best_step if session.checkpoint.keep_best else None
        ckpt.prune(session.run_dir, session.checkpoint.keep_last, best)
        if session.on_checkpoint:
            session.on_checkpoint(path)
        return path

    def run_validation(step: int) -> bool:
        """Validate, track the best, warn on overfitting; True when early stopping should stop the run."""
        trainer.eval()  # the releaser's layer hooks do nothing outside training mode
        if sharded:
            trainer.unshard()  # the root group's weights (embeddings, head) stay gathered while validating
        try:
            # Every process validates (same result), so early stopping agrees everywhere; under the training
            # autocast, so validation computes in the dtype training does.
            with torch.no_grad(), autocast():
                scores = session.validate(model)
        finally:
            if sharded:
                trainer.reshard()
            trainer.train()
        record = {"type": "val", "step": step, **{k: round(v, 6) for k, v in scores.items()}}
        previous = state.evaluations[-1] if state.evaluations else None
        state.evaluations.append({"step": step, "train_loss": state.smoothed_loss, **scores})
        value = scores.get(state.best_metric)
        if value is not None and better(state.best_metric, value, state.best_value):
            state.best_value, state.best_step = value, step
            record["best"] = True
        if (
            previous
            and "val_loss" in scores
            and scores["val_loss"] > previous["val_loss"]
            and (state.smoothed_loss or 0) < (previous["train_loss"] or 0)
        ):
            record["overfitting"] = True
            say(
                f"[yellow]warning: val loss rose {previous['val_loss']:.4f} -> {scores['val_loss']:.4f} while train "
                "loss fell: the model may be overfitting (fewer epochs, lower lr, more data)[/]"
            )
        emit(record)
        shown = " ".join(f"{k} {v:.4f}" for k, v in scores.items())
        say(f"step {step}: {shown}" + (" (best)" if record.get("best") else ""))
        since_best = step - (state.best_step or 0)
        evals_since = sum(1 for e in state.evaluations if e["step"] > (state.best_step or 0))
        patience = session.validation.patience
        return bool(patience and since_best > 0 and evals_since >= patience)

    def end_of_step(step: int, stop: StopRequest | None) -> bool:
        """Validation, checkpoint and stop-signal handling after a step; True when early stopping ends the run."""
        early = False
        if session.validate and (step % validate_every == 0 or step == total_steps):
            early = run_validation(step)
            if early:
                say(
                    f"Early stop at step {step}: {state.best_metric} has not improved for "
                    f"{session.validation.patience} validations "
                    f"(best {state.best_value:.4f} at step {state.best_step})."
                )
        signum = stop.signum if stop is not None and stop.signum is not None else 0
        signum = distributed.reduce_max(signum, world, accelerator.device)  # all stop at the same step
        if step % save_every == 0 or step == total_steps or early or signum:
            saved = save(state)
            if signum:
                raise TrainingInterrupted(signum, step, str(saved) if saved else None)
        return early

    try:
        with progress, StopRequest(console) if session.stop_signals else nullcontext() as stop:
            for step in range(state.step + 1, total_steps + 1):
                step_start = time.perf_counter()
                drawn = [next(stream) for _ in range(settings.grad_accum)]
                # Normalise by the answer tokens of the whole step on all processes, so accumulation and
                # data parallelism both equal one large batch. DDP averages gradients over processes,
                # hence the factor world.size.
                chosen = [examples[i] for indices, _, _ in drawn for i in indices]
                loss_tokens = sum(loss_tokens_of(e) for e in chosen)
                real_tokens = sum(len(e) for e in chosen)
                step_loss = 0.0
                for position, (_, batch, weight) in enumerate(drawn):
                    batch = {k: v.to(accelerator.device) for k, v in batch.items() if k != "real_tokens"}
                    last = position == len(drawn) - 1
                    skip_sync = not last and not sharded
                    with accelerator.no_sync(trainer) if skip_sync else nullcontext(), autocast():
                        loss = trainer(batch) * (weight * world.size / loss_tokens)
                        accelerator.backward(scaler.scale(loss) if scaler else loss)
                    step_loss += loss.item() / world.size
                step_loss = distributed.reduce_sum(step_loss, world, accelerator.device)
                if scaler:  # an inf norm after unscaling means the loss scale was too high, not bad data
                    scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm or math.inf)
                grad_norm = float(distributed.whole(norm))
                lr = scheduler.get_last_lr()[0]
                state.micro_batches += settings.grad_accum
                if scaler and math.isfinite(step_loss) and not math.isfinite(grad_norm):
                    emit({"type": "event", "step": step, "event": "loss_scale_backoff"})
                elif not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                    lines = [e.line for e in chosen]
                    message = _nonfinite_message(step, step_loss, grad_norm, lr, precision.name, lines)
                    optimizer.zero_grad(set_to_none=True)
                    state.skipped_in_row += 1
                    if settings.on_nonfinite == "stop" or state.skipped_in_row >= 5:
                        raise TunesmithError(message)
                    skipped += 1
                    emit({"type": "event", "step": step, "event": "skipped_nonfinite", "loss": str(step_loss)})
                    say(f"[yellow]step {step} skipped: loss {step_loss}, grad norm {grad_norm}[/]")
                    scheduler.step()
                    state.step = step
                    state.elapsed_s = time.perf_counter() - started
                    progress.update(task, advance=1)
                    # A skipped step still validates, saves and honours a stop signal on its schedule: the last
                    # step must leave a checkpoint, and a Ctrl-C must not be lost because its step was skipped.
                    if end_of_step(step, stop):
                        stopped = "early_stopped"
                        break
                    continue
                state.skipped_in_row = 0
                if scaler:
                    scaler.step(optimizer)  # skipped when the gradients overflowed
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if releaser:
                    releaser.release()
                spike = (
                    state.smoothed_loss is not None
                    and step > 10
                    and step_loss > settings.spike_factor * state.smoothed_loss
                )
                state.smoothed_loss = (
                    step_loss if state.smoothed_loss is None else 0.9 * state.smoothed_loss + 0.1 * step_loss
                )
                state.tokens += real_tokens
                state.step = step
                state.elapsed_s = time.perf_counter() - started
                record = {
                    "type": "train",
                    "step": step,
                    "epoch": round(state.micro_batches / n_batches, 4),
                    "loss": round(step_loss, 6),
                    "smoothed_loss": round(state.smoothed_loss, 6),
                    "lr": lr,
                    "grad_norm": round(grad_norm, 6),
                    "tokens": real_tokens,
                    "loss_tokens": loss_tokens,
                    "tokens_per_s": round(real_tokens / (time.perf_counter() - step_start), 2),
                    "elapsed_s": round(state.elapsed_s, 3),
                }
                if spike:
                    record["spike"] = True
                    say(f"[yellow]loss spike at step {step}: {step_loss:.4f} vs smoothed {state.smoothed_loss:.4f}[/]")
                history.append(record)
                emit(record, force=spike or step % settings.log_every == 0 or step == total_steps)
                status = (
                    f"ep {record['epoch']:.2f} loss {state.smoothed_loss:.4f} lr {lr:.2e} gnorm {grad_norm:.3f} "
                    f"{record['tokens_per_s']:.0f} tok/s mem {memory_text(accelerator.device)}"
                )
                progress.update(task, advance=1, status=status)
                if not live and (step == 1 or step == total_steps or step % max(1, total_steps // 20) == 0):
                    say(f"step {step}/{total_steps} {status}")
                if end_of_step(step, stop):
                    stopped = "early_stopped"
                    break
    finally:
        if metrics_file:
            metrics_file.close()
        if releaser:
            releaser.detach()
    seconds = time.perf_counter() - started
    trainable = ckpt.trainable_tensors(model) if sharded else None
    best = None
    if state.best_step is not None:
        best = {"metric": state.best_metric, "value": state.best_value, "step": state.best_step}
    return TrainResult(
        steps=state.step,
        epochs=round(state.micro_batches / n_batches, 4),
        final_loss=history[-1]["loss"] if history else float("nan"),
        tokens=state.tokens,
        seconds=seconds,
        history=history,
        stopped=stopped,
        best=best,
        resumed_from=resumed_at,
        skipped_steps=skipped,
        trainable=trainable,
    )
