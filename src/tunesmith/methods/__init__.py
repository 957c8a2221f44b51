"""Fine-tuning techniques. Each turns a loaded base model into the model to train by composition.

Every technique returns the model and its trainable-parameter count; none copies a model class. This
module also knows, per technique, how the base is loaded (QLoRA quantizes it), how the trained part is
saved and loaded back, and how it merges into the base where merging is defined.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.methods import adapter as bottleneck
from tunesmith.methods.full import apply_full
from tunesmith.methods.lora import apply_lora


def training_dtype(config: RunConfig, run_dtype: torch.dtype) -> torch.dtype:
    """The dtype the base is loaded in for training: the run's for adapter methods (frozen weights, no fp32
    copy), fp32 for full fine-tuning (master weights; autocast computes in the run's dtype)."""
    return torch.float32 if config.method == "full" else run_dtype


def load_base(config: RunConfig, source: str, dtype: torch.dtype = torch.float32) -> Any:
    """The base model as the method needs it: 4-bit for QLoRA (other weights in `dtype`), `dtype` otherwise."""
    from tunesmith.models import load_model
    from tunesmith.train.speed import attention_implementation

    attention = attention_implementation(config.train.attention)
    if config.method == "qlora":
        from tunesmith.methods.qlora import compute_dtype, quantization_config, use_portable_kernels

        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TunesmithError("method qlora needs bitsandbytes: pip install bitsandbytes.") from None
        dtype = compute_dtype(config.qlora, dtype)
        model = load_model(source, dtype, quantization_config(config.qlora, dtype), attention)
        use_portable_kernels(model)  # same numbers and correct gradients on every CPU (see its docstring)
        return model
    return load_model(source, dtype, attention=attention)


def apply_method(model: Any, config: RunConfig) -> tuple[Any, int]:
    """The model to train; trainable weights are fp32 whatever the frozen ones are (small updates survive)."""
    from tunesmith.train.precision import keep_trainable_fp32

    if config.method in ("lora", "qlora", "dora"):
        model, trainable = apply_lora(model, config.lora, dora=config.method == "dora")
    elif config.method == "adapter":
        model, trainable = bottleneck.apply_adapters(model, config.adapter)
    else:
        model, trainable = apply_full(model, config.full)
    keep_trainable_fp32(model)
    return model, trainable


def weights_dir(config: RunConfig, run_dir: Path) -> Path:
    return run_dir / ("model" if config.method == "full" else "adapter")


def save_trained(model: Any, config: RunConfig, path: Path, trained: dict[str, Any] | None = None) -> None:
    """PEFT format for LoRA/QLoRA/DoRA, bottleneck weights for adapters, a full checkpoint for full.

    `trained` holds the trained weights by parameter name when the model's own are shards (FSDP).
    """
    if config.method == "adapter":
        bottleneck.save_adapters(model, config.adapter, path, trained)
    elif trained is not None:
        model.save_pretrained(path, state_dict=trained)
    else:
        model.save_pretrained(path)


def load_trained(config: RunConfig, source: str, path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The trained model of a run, its base in `dtype`: base plus its saved adapter, or the saved full model."""
    from tunesmith.models import load_model

    if config.method == "full":
        return load_model(str(path), dtype)
    model = load_base(config, source, dtype)
    if config.method == "adapter":
        return bottleneck.load_adapters(model, path)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(path))


def merged_model(config: RunConfig, source: str, path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The base with a saved LoRA/DoRA/QLoRA update folded into its weights (QLoRA: the dequantized base).

    The base is loaded as training saw it (`dtype`, or 4-bit), the update is added in fp32, and the merged
    model is returned in `dtype`.
    """
    if not config.uses_peft:
        raise TunesmithError(f"method {config.method}: merging is only defined for lora, qlora and dora.")
    from peft import PeftModel

    base = load_base(config, source, dtype)
    if config.method == "qlora":
        from tunesmith.methods.qlora import dequantize_linears

        # The update was learned against the 4-bit weights, so it is merged into exactly those, dequantized.
        dequantize_linears(base, torch.float32)
    # nn.Module's own casts: transformers refuses .float()/.to() on a model it loaded quantized, even dequantized.
    merged = PeftModel.from_pretrained(torch.nn.Module.float(base), str(path)).merge_and_unload()
    return torch.nn.Module.to(merged, dtype)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their logical number of values."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += math.prod(shape) if shape is not None else p.numel()
    return trainable, total
