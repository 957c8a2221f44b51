"""LoRA through PEFT: low-rank update matrices on chosen linear layers, the base weights frozen."""

from __future__ import annotations

from typing import Any

from tunesmith.config import LoraConfig


def apply_lora(model: Any, settings: LoraConfig) -> tuple[Any, int]:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_config)
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)
