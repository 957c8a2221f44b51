"""What a run started with, and the checks a resume makes against it.

The manifest records versions, seed, data and split hashes and hardware when a run starts; `reopen` refuses to
resume a run whose config, data or saved splits changed since, sweeps half-written checkpoints, and finds the
checkpoint to continue from.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import accelerate
import peft
import torch
import transformers
from rich.console import Console

import tunesmith
from tunesmith.config import RunConfig
from tunesmith.data.formats import Conversation
from tunesmith.errors import TunesmithError
from tunesmith.files import sha256_file
from tunesmith.rundir import SPLITS, RunDir
from tunesmith.train import checkpoint as ckpt


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
    paths = {name: RunDir(run_dir).split(name) for name in SPLITS}
    return {name: sha256_file(path) for name, path in paths.items() if path.is_file()}


def saved_splits(run_dir: Path) -> dict[str, list[Conversation]]:
    """The train/val/test splits a run wrote when it started (read on resume and by other processes)."""
    return {n: RunDir(run_dir).read_split(n) for n in SPLITS}


def reopen(
    config: RunConfig, run_dir: Path, console: Console
) -> tuple[dict[str, list[Conversation]], str, dict[str, Any], Path | None]:
    """A run to resume: its saved splits, data format, manifest (a resume appended) and the checkpoint to continue
    from (None: no complete checkpoint yet, so it trains again from step 0), after check_resumable."""
    info = check_resumable(config, run_dir)
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
    return saved_splits(run_dir), info.get("format", "chat"), info, latest
