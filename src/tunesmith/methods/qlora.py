"""QLoRA: the base model's linear weights in 4-bit (NF4) through bitsandbytes, LoRA on top.

Saves memory, not time, on CPU. Merging dequantizes the 4-bit weights to the compute dtype first, so
the merged model reproduces the trained (quantized-base) model rather than the original weights.
"""

from __future__ import annotations

from typing import Any

import torch

from tunesmith.config import QloraConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quantization_config(settings: QloraConfig) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=DTYPES[settings.compute_dtype],
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
