"""QLoRA: the base model's linear weights in 4-bit (NF4) through bitsandbytes, LoRA on top.

Saves memory, not time, on CPU. Merging dequantizes the 4-bit weights first, so the merged model
reproduces the trained (quantized-base) model rather than the original weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import BitsAndBytesConfig

from tunesmith.config import QloraConfig, RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.methods.lora import merge_peft, peft_method
from tunesmith.models import load_model
from tunesmith.train.precision import TORCH_DTYPES
from tunesmith.train.speed import attention_implementation, use_portable_kernels


def compute_dtype(settings: QloraConfig, run_dtype: torch.dtype) -> torch.dtype:
    """qlora.compute_dtype when set, else the run's dtype (train.dtype is the one switch)."""
    return TORCH_DTYPES[settings.compute_dtype] if settings.compute_dtype else run_dtype


def quantization_config(settings: QloraConfig, run_dtype: torch.dtype) -> Any:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(settings, run_dtype),
    )


def dequantize_linears(model: Any, dtype: torch.dtype = torch.float32) -> int:
    """Replace every bitsandbytes 4-bit linear layer by an ordinary one holding its dequantized weight."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                weight = bnb_f.dequantize_4bit(child.weight.data, child.weight.quant_state).to(dtype)
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight = torch.nn.Parameter(weight, requires_grad=False)
                if child.bias is not None:
                    linear.bias = torch.nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
                setattr(parent, name, linear)
                replaced += 1
    if replaced and hasattr(model, "config"):
        model.config.quantization_config = None
    return replaced


def load_quantized_base(config: RunConfig, source: str, dtype: torch.dtype) -> Any:
    """The base with its linear weights in 4-bit, its other weights in the compute dtype."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TunesmithError("method qlora needs bitsandbytes: pip install bitsandbytes.") from None
    dtype = compute_dtype(config.qlora, dtype)
    attention = attention_implementation(config.train.attention)
    model = load_model(source, dtype, quantization_config(config.qlora, dtype), attention)
    use_portable_kernels(model)  # same numbers and correct gradients on every CPU (see its docstring)
    return model


def merge_qlora(config: RunConfig, source: str, path: Path, dtype: torch.dtype) -> Any:
    base = load_quantized_base(config, source, dtype)
    # The update was learned against the 4-bit weights, so it is merged into exactly those, dequantized.
    dequantize_linears(base, torch.float32)
    return merge_peft(base, path, dtype)


QLORA = peft_method("qlora", load_quantized_base, merge_qlora, quantized_base=True)
