"""Fine-tuning techniques. Each turns a loaded base model into the model to train by composition.

Each method is one `Method` object in its own file (full.py, lora.py with DoRA, qlora.py, adapter.py): how
its base is loaded (QLoRA quantizes it), how it is applied, how the trained part is saved and loaded back,
and how it merges into the base where merging is defined. `METHODS` is the registry; `method_of` finds a
run's method. Every technique returns the model and its trainable-parameter count; none copies a model class.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.methods.adapter import ADAPTER
from tunesmith.methods.full import FULL
from tunesmith.methods.lora import DORA, LORA
from tunesmith.methods.method import METHODS, method_of
from tunesmith.methods.qlora import QLORA
from tunesmith.rundir import RunDir
from tunesmith.train.precision import keep_trainable_fp32

METHODS.update({method.name: method for method in (LORA, QLORA, DORA, ADAPTER, FULL)})


def training_dtype(config: RunConfig, run_dtype: torch.dtype) -> torch.dtype:
    """The dtype the base is loaded in for training: the run's for adapter methods (frozen weights, no fp32
    copy), fp32 for full fine-tuning (master weights; autocast computes in the run's dtype)."""
    return torch.float32 if method_of(config).base_in_fp32 else run_dtype


def load_base(config: RunConfig, source: str, dtype: torch.dtype = torch.float32) -> Any:
    """The base model as the method needs it: 4-bit for QLoRA (other weights in `dtype`), `dtype` otherwise."""
    return method_of(config).load_base(config, source, dtype)


def apply_method(model: Any, config: RunConfig) -> tuple[Any, int]:
    """The model to train; trainable weights are fp32 whatever the frozen ones are (small updates survive)."""
    model, trainable = method_of(config).apply(model, config)
    keep_trainable_fp32(model)
    return model, trainable


def start_from_run(config: RunConfig, source: str, dtype: torch.dtype = torch.float32) -> tuple[Any, int]:
    """The model to train when config.init_from names an earlier run: its saved weights, trainable again.

    The earlier run must be finished and of the same base model and method, so that what this run saves is
    again a whole update over the base (served and exported like any run of the method)."""
    start = RunDir(Path(str(config.init_from)))
    if not start.is_run():
        raise TunesmithError(f"init_from: {start.path} is not a tunesmith run directory.")
    earlier = start.read_config()
    if (earlier.model, earlier.method) != (config.model, config.method):
        raise TunesmithError(
            f"init_from: {start.path} trained {earlier.method} on {earlier.model}, this run {config.method} on "
            f"{config.model}. Set model: {earlier.model} and method: {earlier.method} to continue it."
        )
    weights = start.trained_weights(earlier, ". init_from needs a finished run: train it first.")
    model = method_of(config).start_from(earlier, source, weights, dtype)
    keep_trainable_fp32(model)
    return model, count_parameters(model)[0]


def save_trained(model: Any, config: RunConfig, path: Path, trained: dict[str, Any] | None = None) -> None:
    """PEFT format for LoRA/QLoRA/DoRA, bottleneck weights for adapters, a full checkpoint for full.

    `trained` holds the trained weights by parameter name when the model's own are shards (FSDP).
    """
    method_of(config).save(model, config, path, trained)


def load_trained(config: RunConfig, source: str, path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The trained model of a run, its base in `dtype`: base plus its saved adapter, or the saved full model."""
    return method_of(config).load(config, source, path, dtype)


def merged_model(config: RunConfig, source: str, path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The base with a saved LoRA/DoRA/QLoRA update folded into its weights (QLoRA: the dequantized base).

    The base is loaded as training saw it (`dtype`, or 4-bit), the update is added in fp32, and the merged
    model is returned in `dtype`.
    """
    merge = method_of(config).merge
    if merge is None:
        raise TunesmithError(f"method {config.method}: merging is only defined for lora, qlora and dora.")
    return merge(config, source, path, dtype)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their logical number of values."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += math.prod(shape) if shape is not None else p.numel()
    return trainable, total
