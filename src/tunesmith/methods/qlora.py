"""QLoRA: the base model's linear weights in 4-bit (NF4) through bitsandbytes, LoRA on top.

Saves memory, not time, on CPU. Merging dequantizes the 4-bit weights first, so the merged model
reproduces the trained (quantized-base) model rather than the original weights.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import QloraConfig, RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.methods.lora import merge_peft, peft_method
from tunesmith.train.precision import TORCH_DTYPES


def compute_dtype(settings: QloraConfig, run_dtype: torch.dtype) -> torch.dtype:
    """qlora.compute_dtype when set, else the run's dtype (train.dtype is the one switch)."""
    return TORCH_DTYPES[settings.compute_dtype] if settings.compute_dtype else run_dtype


def quantization_config(settings: QloraConfig, run_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(settings, run_dtype),
    )


def use_portable_kernels(model: Any) -> int:
    """Keep every 4-bit layer on bitsandbytes' dequantize-and-matmul path, whatever the CPU; returns layers changed.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place the first time a layer runs in
    eval mode without grad (our validation pass) and from then on multiplies through `gemv_4bit`, which has
    no autograd kernel: the training steps after a validation get wrong LoRA gradients. The packed kernel
    also computes in bf16 (other numbers than on any other CPU) and cannot serve small layers at all (it
    needs out_features % 32 == 0 and whole quantization blocks per row). So it is never taken, and a weight
    already packed is unpacked.
    """
    if "bitsandbytes" not in sys.modules:  # no 4-bit layer can exist; importing it would only cost time and noise
        return 0
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f

    changed = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = bnb_f._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
            module.quant_state = weight.quant_state
            changed += 1
    return changed


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
    from tunesmith.models import load_model
    from tunesmith.train.speed import attention_implementation

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
