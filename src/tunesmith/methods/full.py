"""Full fine-tuning: every weight of the model is trained."""

from __future__ import annotations

from typing import Any


def apply_full(model: Any) -> tuple[Any, int]:
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model, sum(p.numel() for p in model.parameters())
