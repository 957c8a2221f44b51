"""LoRA and DoRA through PEFT: low-rank update matrices on chosen linear layers, the base weights frozen.

DoRA (weight-decomposed LoRA) adds a trained magnitude vector per output feature on top of the same
low-rank direction update; QLoRA is LoRA over a 4-bit base (see qlora.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from tunesmith.config import LoraConfig, RunConfig
from tunesmith.methods.method import MemoryTerms, Method, load_plain_base, method_of, save_pretrained


def apply_lora(model: Any, settings: LoraConfig, dora: bool = False) -> tuple[Any, int]:
    peft_config = PeftLoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        use_dora=dora,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_config)
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_peft(config: RunConfig, source: str, path: Path, dtype: torch.dtype) -> Any:
    """The base as the method loads it, with the saved PEFT adapter on top."""
    return PeftModel.from_pretrained(method_of(config).load_base(config, source, dtype), str(path))


def continue_peft(config: RunConfig, source: str, path: Path, dtype: torch.dtype) -> Any:
    """The base with a saved PEFT adapter that trains further (its own rank and targets, from the adapter)."""
    base = method_of(config).load_base(config, source, dtype)
    return PeftModel.from_pretrained(base, str(path), is_trainable=True)


def merge_peft(base: Any, path: Path, dtype: torch.dtype) -> Any:
    """`base` with the PEFT update at `path` added in fp32, returned in `dtype`."""
    # nn.Module's own casts: transformers refuses .float()/.to() on a model it loaded quantized, even dequantized.
    merged = PeftModel.from_pretrained(torch.nn.Module.float(base), str(path)).merge_and_unload()
    return torch.nn.Module.to(merged, dtype)


def merge_lora(config: RunConfig, source: str, path: Path, dtype: torch.dtype) -> Any:
    return merge_peft(load_plain_base(config, source, dtype), path, dtype)


PEFT_EXPORTS = ("adapter", "merged", "gguf", "ollama")


def peft_method(name: str, load_base: Any, merge: Any, dora: bool = False, quantized_base: bool = False) -> Method:
    """A LoRA-family method: PEFT adapter saved in adapter/, exportable every way, merged by `merge`."""
    return Method(
        name=name,
        uses_peft=True,
        exports=PEFT_EXPORTS,
        base_in_fp32=False,
        load_base=load_base,
        apply=lambda model, config: apply_lora(model, config.lora, dora=dora),
        save=save_pretrained,
        load=load_peft,
        merge=merge,
        start_from=continue_peft,
        memory=MemoryTerms("low_rank", quantized_base=quantized_base, magnitudes=dora),
    )


LORA = peft_method("lora", load_plain_base, merge_lora)
DORA = peft_method("dora", load_plain_base, merge_lora, dora=True)
