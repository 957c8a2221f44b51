"""Fine-tuning techniques. Each turns a loaded base model into the model to train by composition.

Every technique returns the model and its trainable-parameter count; none copies a model class.
"""

from __future__ import annotations

from typing import Any

from tunesmith.config import RunConfig
from tunesmith.methods.full import apply_full
from tunesmith.methods.lora import apply_lora


def apply_method(model: Any, config: RunConfig) -> tuple[Any, int]:
    if config.method == "lora":
        return apply_lora(model, config.lora)
    return apply_full(model)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
