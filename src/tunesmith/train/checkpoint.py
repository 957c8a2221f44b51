"""Checkpoints that survive SIGKILL and full disks, and the exact state to resume from.

A checkpoint is a directory `checkpoints/step-000120/` holding the trainable weights
(`trainable.safetensors`: the LoRA/adapter matrices, or every weight for full fine-tuning), the
optimizer and scheduler states, every RNG state, and `state.json` (step, data position, tokens,
best metric, validation history). It is written into a hidden temporary directory, each file
fsynced, and renamed into place only when complete (files.publish_dir): a kill or a full disk mid-write leaves the
previous checkpoints untouched, and the half-written directory is swept away on the next start.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunesmith.errors import TunesmithError
from tunesmith.files import publish_dir
from tunesmith.rundir import PARTIAL_PREFIX, CheckpointDir, RunDir
from tunesmith.train.distributed import shard_like, whole

# Fault injection for the kill-while-writing test: "SECONDS" or "STEP:SECONDS" to pause after the first
# file of a checkpoint (of that step) is written.
PAUSE_ENV = "TUNESMITH_CHECKPOINT_PAUSE"


def _pause_for(step: int) -> float:
    spec = os.environ.get(PAUSE_ENV, "")
    if not spec:
        return 0.0
    at, _, seconds = spec.rpartition(":")
    return float(seconds) if not at or int(at) == step else 0.0


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    micro_batches: int = 0  # data position: micro-batches consumed from the seeded stream
    tokens: int = 0
    elapsed_s: float = 0.0
    smoothed_loss: float | None = None
    skipped_in_row: int = 0
    best_metric: str = "val_loss"
    best_value: float | None = None
    best_step: int | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    # objective grpo with rl.iterations > 1: the rollout the next steps still train on (objectives/rl.py)
    rollouts: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))


def checkpoints_dir(run_dir: Path) -> Path:
    return RunDir(Path(run_dir)).checkpoints


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory counts only once renamed into place)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CheckpointDir(p).is_complete()]
    return sorted(found, key=lambda p: CheckpointDir(p).step)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def sweep_partial(run_dir: Path) -> list[str]:
    """Delete temporary directories left by a checkpoint write that never finished."""
    root = checkpoints_dir(run_dir)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(PARTIAL_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
    return removed


def rng_states() -> dict[str, Any]:
    """Every RNG state as tensors, ints and floats only, so that it loads with torch.load(weights_only=True)."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    python, numpy_state = states["python"], states["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached"],
        )
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _load_state(path: Path) -> Any:
    """torch.load without unpickling arbitrary objects: a crafted checkpoint file cannot run code."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise TunesmithError(
            f"{path} is not a checkpoint file tunesmith can load safely ({str(exc).splitlines()[0][:200]}). "
            "It was not written by this version of tunesmith or was altered: resume from an earlier checkpoint "
            "(delete this one) or start the run again with --overwrite."
        ) from None


def trainable_tensors(model: Any) -> dict[str, torch.Tensor]:
    """Trainable weights as whole CPU tensors (under FSDP a collective: every process must call it)."""
    return {name: whole(p.detach()).cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: Any, path: Path) -> None:
    """Whole saved tensors into the model's trainable parameters, sharded as they are (FSDP) or not."""

    saved = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in saved]
    if missing or any(name not in params for name in saved):
        raise TunesmithError(
            f"{path} does not match this model's trainable parameters (e.g. {(missing or list(saved))[:2]}); "
            "the run's config (method, lora, adapter, full) must equal the one the checkpoint was written with."
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(shard_like(params[name], tensor))


def save_checkpoint(
    run_dir: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: TrainState,
    tensors: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint atomically; on any error the partial directory is removed.

    `tensors` and `optimizer_state` replace the model's and optimizer's own when given (whole tensors
    gathered from a sharded model), so every checkpoint has the single-process layout.
    """
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = RunDir(Path(run_dir)).checkpoint(state.step).path
    if CheckpointDir(final).is_complete():
        return final  # this step is already saved (e.g. a stop signal right after a periodic save)
    files = RunDir(Path(run_dir)).partial_checkpoint(state.step, os.getpid())
    tmp = files.path
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(tensors if tensors is not None else trainable_tensors(model), str(files.trainable))
        pause = _pause_for(state.step)
        if pause:
            print(f"checkpoint-writing {tmp}", file=sys.stderr, flush=True)
            time.sleep(pause)
        torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), files.optimizer)
        torch.save(scheduler.state_dict(), files.scheduler)
        torch.save(rng_states(), files.rng)
        files.state.write_text(state.to_json())  # last: its presence marks a complete checkpoint
        publish_dir(tmp, final)
    except Exception as exc:  # torch.save and safetensors raise their own types on a full disk, not OSError
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(run_dir)
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:200] or type(exc).__name__
        raise TunesmithError(
            f"Writing checkpoint {final.name} failed ({reason}); "
            f"{'the previous checkpoint ' + kept.name + ' is intact' if kept else 'no earlier checkpoint exists'}. "
            "Free disk space, then resume with --resume."
        ) from None
    return final


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, sharded: bool = False) -> TrainState:
    """Restore a checkpoint (written by any number of processes) into this process's model and optimizer."""
    files = CheckpointDir(path)
    load_trainable(model, files.trainable)
    optimizer_state = _load_state(files.optimizer)
    scheduler_state, rng = _load_state(files.scheduler), _load_state(files.rng)
    if sharded:
        from tunesmith.train.distributed import load_optimizer_state

        load_optimizer_state(model, optimizer, optimizer_state)
    else:
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    restore_rng(rng)
    return TrainState.from_json(files.state.read_text())


def prune(run_dir: Path, keep_last: int, best_step: int | None) -> list[str]:
    """Delete all but the newest keep_last checkpoints and the best one."""
    found = complete_checkpoints(run_dir)
    keep = set(found[-keep_last:])
    if best_step is not None:
        keep |= {p for p in found if p == RunDir(Path(run_dir)).checkpoint(best_step).path}
    removed = []
    for path in found:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def load_best(run_dir: Path, model: Any, trained: dict[str, Any] | None, best_step: int) -> tuple[Any, str | None]:
    """The best checkpoint's weights in place of the last step's: loaded into the model, or, when training sharded
    them (FSDP: `trained` holds the whole weights), returned whole. Also the checkpoint's name; None (and `trained`
    unchanged) when that checkpoint is gone."""
    best = RunDir(Path(run_dir)).checkpoint(best_step)
    if not best.is_complete():
        return trained, None
    if trained is None:
        load_trainable(model, best.trainable)
    else:
        from safetensors.torch import load_file

        trained = load_file(str(best.trainable))
    return trained, best.path.name
