"""Watching runs on disk (`tunesmith runs`, `show`, `watch`, the UI): list them, describe one, follow one live from
another terminal, tell whether its process still lives, and plot its loss curves.

Everything here reads a run directory (its manifest, config, metrics and checkpoints; see rundir.py), so it works
while training writes, after a crash, and on a copied directory; the one file it writes is the loss plot.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.files import finite, replace_file
from tunesmith.rundir import RunDir
from tunesmith.train.checkpoint import complete_checkpoints


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics records; a NaN or infinity an older tunesmith wrote reads as None (valid JSON again)."""
    path = RunDir(Path(run_dir)).metrics
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(finite(json.loads(line)))
        except json.JSONDecodeError:
            continue  # the line being written right now
    return records


# --- Which process a run is --------------------------------------------------------------------------------------
# A pid alone does not name a process: once the run is gone the system hands its number to the next one. A run
# records its pid, its host and the pid's start time; a process is the run's only if all three match.

START_TIME_SLACK_S = 1.0  # start times are read back rounded (to clock ticks); anything closer is the same process


def this_host() -> str:
    return platform.node()


def process_started(pid: int) -> float | None:
    """When process `pid` of this machine started (seconds since the epoch), or None when there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # exists, another user's: its start time may still be unreadable
        return -1.0


def process_identity(pid: int | None = None) -> dict[str, Any]:
    """What names a process for as long as it lives: pid, host and start time (this process by default)."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "host": this_host(), "pid_started": process_started(pid)}


def is_process(record: dict[str, Any]) -> bool:
    """Whether the process `record` names (pid, pid_started; see process_identity) is alive on this machine.

    A record of another host is never judged here. Without a start time (a manifest written before they were
    recorded) a live pid is taken at its word.
    """
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not on_this_host(record):
        return False
    started = process_started(pid)
    if started is None:
        return False
    expected = record.get("pid_started")
    if not isinstance(expected, int | float) or started < 0:
        return True
    return abs(started - expected) <= START_TIME_SLACK_S


def on_this_host(record: dict[str, Any]) -> bool:
    return record.get("host") in (None, this_host())


def run_status(manifest: dict[str, Any]) -> str:
    """The manifest's status, with 'running' corrected to 'crashed' when its process is gone.

    A run running on another host (a folder copied or shared mid-training) stays 'running': this machine cannot
    know; `running_here` tells the two apart."""
    status = manifest.get("status", "unknown")
    if status == "running" and manifest.get("host") == this_host() and not is_process(manifest):
        return "crashed"  # only a manifest that says where it runs is judged: without a host, its word stands
    return status


def running_here(manifest: dict[str, Any]) -> bool:
    """Whether the run trains on this machine now: counted against a limit of trainings, signalled by Stop."""
    return manifest.get("status") == "running" and on_this_host(manifest) and is_process(manifest)


def describe(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    manifest = RunDir(run_dir).read_manifest()
    config = RunDir(run_dir).read_config_fields()
    metrics = read_metrics(run_dir)
    train = [r for r in metrics if r.get("type", "train") == "train"]
    val = [r for r in metrics if r.get("type") == "val"]
    best_metric = (config.get("validation") or {}).get("best_metric", "val_loss")
    best = [r for r in val if r.get("best")]
    return {
        "name": config.get("name", run_dir.name),
        "dir": str(run_dir),
        "model": config.get("model"),
        "method": config.get("method"),
        "status": run_status(manifest),
        "host": None if on_this_host(manifest) else manifest.get("host"),  # where it runs, when not here
        "steps": train[-1]["step"] if train else 0,
        "loss": train[-1]["loss"] if train else None,
        "best": {"metric": best_metric, "value": best[-1].get(best_metric), "step": best[-1]["step"]} if best else None,
        "started": manifest.get("started"),
        "checkpoints": [p.name for p in complete_checkpoints(run_dir)],
        "manifest": manifest,
    }


def find_runs(root: Path) -> list[dict[str, Any]]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [describe(p) for p in sorted(root.iterdir()) if RunDir(p).is_run()]
    return sorted(found, key=lambda r: r.get("started") or "", reverse=True)


def resolve_run(name: str, root: Path) -> Path:
    """A run directory from a path or a name under root."""
    for candidate in (Path(name), Path(root) / name):
        if RunDir(candidate).is_run():
            return candidate
    known = ", ".join(r["name"] for r in find_runs(root)) or "none"
    raise TunesmithError(
        f"No run '{name}' (looked for {RunDir(Path(name)).manifest} and {root}/{name}). Runs in {root}: {known}."
    )


def follow(run_dir: Path, interval: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> Iterator[dict]:
    """Yield metrics records as they are written, until the run is no longer running."""
    path = RunDir(Path(run_dir)).metrics
    position = 0
    pending = ""
    while True:
        if path.is_file():
            with path.open(encoding="utf-8") as handle:
                if path.stat().st_size < position:  # rewritten by a resume: start over
                    position = 0
                handle.seek(position)
                pending += handle.read()
                position = handle.tell()
            *complete, pending = pending.split("\n")
            for line in complete:
                if line.strip():
                    yield finite(json.loads(line))
        manifest = RunDir(Path(run_dir)).read_manifest()
        if run_status(manifest) != "running":
            return
        sleep(interval)


def plot_losses(run_dir: Path) -> Path | None:
    """Write loss.png: train loss (raw and smoothed) and val loss per step; None without data."""
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("type", "train") == "train" and "loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    axis.plot([r["step"] for r in train], [r["loss"] for r in train], alpha=0.35, label="train loss")
    if all("smoothed_loss" in r for r in train):
        axis.plot([r["step"] for r in train], [r["smoothed_loss"] for r in train], label="train loss (smoothed)")
    val = [r for r in records if r.get("type") == "val" and "val_loss" in r]
    if val:
        axis.plot([r["step"] for r in val], [r["val_loss"] for r in val], marker="o", label="val loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(Path(run_dir).name)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    target = RunDir(Path(run_dir)).loss_plot
    replace_file(target, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
    return target
