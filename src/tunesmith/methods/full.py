"""Full fine-tuning: every weight trains, optionally with the embeddings frozen or only the top layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunesmith.config import FullConfig, RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.methods.method import MemoryTerms, Method, load_plain_base, save_pretrained
from tunesmith.models import load_model


def apply_full(model: Any, settings: FullConfig | None = None) -> tuple[Any, int]:
    settings = settings or FullConfig()
    train_all = settings.top_k_layers is None
    for parameter in model.parameters():
        parameter.requires_grad_(train_all)
    if not train_all:
        layers = getattr(model.get_decoder(), "layers", None)
        if layers is None or settings.top_k_layers > len(layers):
            count = "no layers list" if layers is None else f"{len(layers)} layers"
            raise TunesmithError(f"full.top_k_layers={settings.top_k_layers}, but the model has {count}.")
        for layer in list(layers)[-settings.top_k_layers :]:
            layer.requires_grad_(True)
        norm = getattr(model.get_decoder(), "norm", None)
        if norm is not None:
            norm.requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
    if settings.freeze_embeddings:
        # With tied weights this also freezes the output layer: they are one tensor.
        model.get_input_embeddings().requires_grad_(False)
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_full(config: RunConfig, source: str, path: Path, dtype: torch.dtype) -> Any:
    return load_model(str(path), dtype)


FULL = Method(
    name="full",
    uses_peft=False,
    exports=("merged", "gguf", "ollama"),
    base_in_fp32=True,
    load_base=load_plain_base,
    apply=lambda model, config: apply_full(model, config.full),
    save=save_pretrained,
    load=load_full,
    merge=None,
    start_from=lambda config, source, path, dtype: apply_full(load_full(config, source, path, dtype), config.full)[0],
    memory=MemoryTerms("weights"),
)
