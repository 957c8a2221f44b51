"""What a fine-tuning method is: one object per method, registered in `tunesmith.methods.METHODS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tunesmith.config import RunConfig
from tunesmith.models import load_model
from tunesmith.train.speed import attention_implementation

Apply = Callable[[Any, RunConfig], tuple[Any, int]]
LoadBase = Callable[[RunConfig, str, torch.dtype], Any]
Save = Callable[[Any, RunConfig, Path, "dict[str, Any] | None"], None]
Load = Callable[[RunConfig, str, Path, torch.dtype], Any]


@dataclass(frozen=True)
class MemoryTerms:
    """What `plan` must know of a method to count its training memory and compute (plan/estimate.py)."""

    update: Literal["weights", "low_rank", "bottleneck"]
    """What trains: every weight of the model ("weights": fp32 master weights, weight gradients, 6·N·T FLOPs),
    low-rank matrices beside each linear layer ("low_rank"), or bottleneck layers between blocks."""
    quantized_base: bool = False
    """The frozen base's linear weights are 4-bit NF4 (QLoRA) and compute in `qlora.compute_dtype`."""
    magnitudes: bool = False
    """DoRA: one trained magnitude per output feature, and each adapted layer's output kept twice."""

    @property
    def trains_base(self) -> bool:
        return self.update == "weights"


@dataclass(frozen=True)
class Method:
    name: str
    uses_peft: bool
    """Whether the run saves a PEFT adapter, which PEFT, vLLM and `--format adapter` read."""
    exports: tuple[str, ...]
    """The `tunesmith export` formats this method's runs support."""
    base_in_fp32: bool
    """Whether the base is loaded in fp32 for training (it trains: master weights); otherwise the run's dtype.
    Trainable weights are fp32 either way."""
    load_base: LoadBase
    """The base model as the method trains on it, its weights in the given dtype."""
    apply: Apply
    """The model to train and its trainable-parameter count."""
    save: Save
    """Writes the trained part; the dict holds the trained weights by name when the model's are shards (FSDP)."""
    load: Load
    """The trained model from its saved weights (config, base source, weights folder, dtype)."""
    merge: Load | None
    """The base with the saved update folded into its weights; None where merging is not defined."""
    start_from: Load
    """A run's saved weights loaded to train further (init_from): the same update, trainable again."""
    memory: MemoryTerms
    """How `plan` counts this method's memory and compute."""


def load_plain_base(config: RunConfig, source: str, dtype: torch.dtype) -> Any:
    return load_model(source, dtype, attention=attention_implementation(config.train.attention))


def save_pretrained(model: Any, config: RunConfig, path: Path, trained: dict[str, Any] | None = None) -> None:
    if trained is not None:
        model.save_pretrained(path, state_dict=trained)
    else:
        model.save_pretrained(path)


# Every method by name, filled by methods/__init__.py (which imports each method's module): here, below all of
# them, so that a method's own functions can look up the method a config names without importing the package.
METHODS: dict[str, Method] = {}


def method_of(config: RunConfig) -> Method:
    return METHODS[config.method]
