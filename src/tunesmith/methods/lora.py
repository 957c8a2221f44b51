"""LoRA and DoRA through PEFT: low-rank update matrices on chosen linear layers, the base weights frozen.

DoRA (weight-decomposed LoRA) adds a trained magnitude vector per output feature on top of the same
low-rank direction update; QLoRA is LoRA over a 4-bit base (see qlora.py).
"""

from __future__ import annotations

from typing import Any

from tunesmith.config import LoraConfig


def apply_lora(model: Any, settings: LoraConfig, dora: bool = False) -> tuple[Any, int]:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

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
