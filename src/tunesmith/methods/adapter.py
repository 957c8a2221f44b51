"""Bottleneck adapters: small trainable layers added after the attention and/or MLP block of each layer.

down-projection -> non-linearity -> up-projection, added to the block's output (a residual). The
up-projection starts at zero, so training starts from the base model's exact outputs. Added by
composition (a submodule and a forward hook per block); no model class is copied and base weight
names do not change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.config import AdapterConfig
from tunesmith.errors import TunesmithError
from tunesmith.methods.method import MemoryTerms, Method, load_plain_base

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "bottleneck.safetensors"
MARK = "_bottleneck"


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, width: int, activation: str) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(width, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # The adapter keeps fp32 weights over a bf16/fp16 base: compute in its dtype, hand back the base's.
        update = self.up(self.act(self.down(hidden.to(self.down.weight.dtype))))
        return hidden + update.to(hidden.dtype)


def _on_output(adapter: Bottleneck):
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook


def add_adapters(model: Any, settings: AdapterConfig) -> list[str]:
    """Attach a bottleneck after the chosen blocks of every decoder layer; returns the blocks adapted."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise TunesmithError("method adapter: this model has no decoder `layers` list to insert adapters into.")
    hidden = model.config.hidden_size
    width = max(1, hidden // settings.reduction_factor)
    blocks = {"attention": ["self_attn"], "mlp": ["mlp"], "both": ["self_attn", "mlp"]}[settings.placement]
    adapted = []
    for index, layer in enumerate(layers):
        for block in blocks:
            inner = getattr(layer, block, None)
            if inner is None:
                raise TunesmithError(f"method adapter: layer {index} has no '{block}' block; choose another placement.")
            adapter = Bottleneck(hidden, width, settings.activation).to(next(inner.parameters()).device)
            layer.add_module(block + MARK, adapter)
            inner.register_forward_hook(_on_output(adapter))
            adapted.append(f"layers.{index}.{block}")
    return adapted


def apply_adapters(model: Any, settings: AdapterConfig) -> tuple[Any, int]:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    add_adapters(model, settings)
    trainable = 0
    for name, parameter in model.named_parameters():
        if MARK in name:
            parameter.requires_grad_(True)
            trainable += parameter.numel()
    return model, trainable


def save_adapters(model: Any, settings: AdapterConfig, path: Path, trained: dict[str, Any] | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    source = trained if trained is not None else model.state_dict()
    weights = {k: v.detach().contiguous() for k, v in source.items() if MARK in k}
    save_file(weights, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(settings.model_dump_json(indent=2))


def load_adapters(model: Any, path: Path) -> Any:
    settings = AdapterConfig.model_validate_json((path / CONFIG_FILE).read_text())
    add_adapters(model, settings)
    missing, unexpected = model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=False)
    if unexpected or any(MARK in key for key in missing):
        raise TunesmithError(f"{path}: the adapter weights do not fit this base model.")
    return model


def continue_adapters(model: Any, path: Path) -> Any:
    """The base with saved bottleneck adapters that train further; the rest stays frozen."""
    model = load_adapters(model, path)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(MARK in name)
    return model


ADAPTER = Method(
    name="adapter",
    uses_peft=False,
    exports=(),  # added layers that standard runtimes do not have: served natively only
    base_in_fp32=False,
    load_base=load_plain_base,
    apply=lambda model, config: apply_adapters(model, config.adapter),
    save=lambda model, config, path, trained: save_adapters(model, config.adapter, path, trained),
    load=lambda config, source, path, dtype: load_adapters(load_plain_base(config, source, dtype), path),
    merge=None,
    start_from=lambda config, source, path, dtype: continue_adapters(load_plain_base(config, source, dtype), path),
    memory=MemoryTerms("bottleneck"),
)
