"""Experiment trackers fed from the same records as metrics.jsonl: TensorBoard, MLflow, Weights & Biases.

Each is optional: named in `tracking.trackers`, it must be installed (the error gives the pip
command). A resumed run continues the same tracker run (ids kept in `<run>/trackers.json`), and
steps after the checkpoint are simply logged again, as metrics.jsonl is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.config import RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.files import write_json
from tunesmith.rundir import RunDir

INSTALL = {
    "tensorboard": "pip install tensorboard",
    "mlflow": "pip install mlflow-skinny sqlalchemy alembic",
    "wandb": "pip install wandb",
}


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers, named train/<key> or val/<key> (booleans and text are left out)."""
    prefix = "val" if record.get("type") == "val" else "train"
    return {
        f"{prefix}/{key}": float(value)
        for key, value in record.items()
        if key not in ("step", "type") and isinstance(value, int | float) and not isinstance(value, bool)
    }


def flat_config(config: RunConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)

    walk(config.model_dump(), "")
    return flat


class Trackers:
    def __init__(self, config: RunConfig, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.ids_path = RunDir(self.run_dir).trackers
        ids = json.loads(self.ids_path.read_text()) if self.ids_path.is_file() else {}
        self._writers: list[Any] = []
        for name in config.tracking.trackers:
            try:
                opener = getattr(self, f"_open_{name}")
                ids[name] = opener(config, ids.get(name))
            except ImportError as exc:
                raise TunesmithError(
                    f"tracking.trackers has {name}, which is not installed ({exc}). Run: {INSTALL[name]}, "
                    f"or remove {name} from tracking.trackers."
                ) from None
        if ids:
            write_json(self.ids_path, ids)

    def _open_tensorboard(self, config: RunConfig, known: Any) -> str:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = RunDir(self.run_dir).tensorboard
        writer = SummaryWriter(log_dir=str(log_dir))
        self._writers.append(("tensorboard", writer))
        return str(log_dir)

    def _open_mlflow(self, config: RunConfig, known: Any) -> str:
        import mlflow

        uri = config.tracking.mlflow_uri or f"sqlite:///{RunDir(self.run_dir).mlflow_store.resolve()}"
        mlflow.set_tracking_uri(uri)
        if known:
            run = mlflow.start_run(run_id=known)
        else:
            mlflow.set_experiment("tunesmith")
            run = mlflow.start_run(run_name=config.name)
            mlflow.log_params({k: str(v)[:500] for k, v in flat_config(config).items()})
        self._writers.append(("mlflow", mlflow))
        return run.info.run_id

    def _open_wandb(self, config: RunConfig, known: Any) -> str:
        import wandb

        run = wandb.init(
            project=config.tracking.wandb_project,
            name=config.name,
            dir=str(RunDir(self.run_dir).path),
            mode=config.tracking.wandb_mode,
            config=flat_config(config),
            id=known,
            resume="allow" if known else None,
            reinit="finish_previous",
        )
        self._writers.append(("wandb", run))
        return run.id

    def log(self, record: dict[str, Any]) -> None:
        values = numeric(record)
        step = int(record["step"])
        if not values:
            return
        for name, writer in self._writers:
            if name == "tensorboard":
                for key, value in values.items():
                    writer.add_scalar(key, value, step)
                writer.flush()
            elif name == "mlflow":
                writer.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)
            else:
                writer.log(values, step=step)

    def close(self, status: str = "completed") -> None:
        for name, writer in self._writers:
            if name == "tensorboard":
                writer.close()
            elif name == "mlflow":
                writer.end_run(status="FINISHED" if status == "completed" else "KILLED")
            else:
                writer.finish(exit_code=0 if status == "completed" else 1)
        self._writers.clear()
