"""Fine-tuning techniques. Each turns a loaded base model into the model to train by composition.

Every technique returns the model and its trainable-parameter count; none copies a model class. This
module also knows, per technique, how the base is loaded (QLoRA quantizes it), how the trained part is
saved and loaded back, and how it merges into the base where merging is defined.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tunesmith.config import RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.methods import adapter as bottleneck
from tunesmith.methods.full import apply_full
from tunesmith.methods.lora import apply_lora


def load_base(config: RunConfig, source: str) -> Any:
    """The base model as the method needs it: 4-bit for QLoRA, full precision otherwise."""
    from tunesmith.models import load_model
    from tunesmith.train.speed import attention_implementation

    attention = attention_implementation(config.train.attention)
    if config.method == "qlora":
        from tunesmith.methods.qlora import quantization_config, use_portable_kernels

        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TunesmithError("method qlora needs bitsandbytes: pip install bitsandbytes.") from None
        model = load_model(source, quantization=quantization_config(config.qlora), attention=attention)
        use_portable_kernels(model)  # same numbers and correct gradients on every CPU (see its docstring)
        return model
    return load_model(source, attention=attention)


def apply_method(model: Any, config: RunConfig) -> tuple[Any, int]:
    if config.method in ("lora", "qlora", "dora"):
        return apply_lora(model, config.lora, dora=config.method == "dora")
    if config.method == "adapter":
        return bottleneck.apply_adapters(model, config.adapter)
    return apply_full(model, config.full)


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


def load_trained(config: RunConfig, source: str, path: Path) -> Any:
    """The trained model of a run: base plus its saved adapter, or the saved full model."""
    from tunesmith.models import load_model

    if config.method == "full":
        return load_model(str(path))
    model = load_base(config, source)
    if config.method == "adapter":
        return bottleneck.load_adapters(model, path)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(path))


def merged_model(config: RunConfig, source: str, path: Path) -> Any:
    """The base with a saved LoRA/DoRA/QLoRA update folded into its weights (QLoRA: the dequantized base)."""
    if not config.uses_peft:
        raise TunesmithError(f"method {config.method}: merging is only defined for lora, qlora and dora.")
    from peft import PeftModel

    base = load_base(config, source)
    if config.method == "qlora":
        from tunesmith.methods.qlora import DTYPES, dequantize_linears

        # The update was learned against the 4-bit weights, so it is merged into exactly those, dequantized.
        dequantize_linears(base, DTYPES[config.qlora.compute_dtype])
    return PeftModel.from_pretrained(base, str(path)).merge_and_unload()


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their logical number of values."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += math.prod(shape) if shape is not None else p.numel()
    return trainable, total
