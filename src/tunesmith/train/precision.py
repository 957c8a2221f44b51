"""Which dtype a run computes in, decided once from the hardware, with the reason a user can read.

`train.dtype: auto` takes bf16 where the hardware runs it natively (GPUs with bf16; CPUs with AMX or
AVX512-BF16), fp16 with loss scaling on GPUs without bf16, and fp32 on CPUs without bf16 instructions,
where bf16 is emulated and hundreds of times slower. This module only decides; it never casts a model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import AutoConfig

from tunesmith.config import RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.rundir import RunDir

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Overrides the CPU's bf16 detection ("0" or "1"): for reproducible numbers across machines (the tests set
# it to 0), or where /proc/cpuinfo is not readable.
CPU_BF16_ENV = "TUNESMITH_CPU_BF16"


@dataclass(frozen=True)
class Precision:
    """The resolved compute dtype of a run and why it was chosen."""

    name: str  # fp32 | bf16 | fp16
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.name]

    def to_dict(self) -> dict[str, str]:
        return {"dtype": self.name, "reason": self.reason}


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (Linux); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_instructions() -> list[str]:
    """The bf16 instruction sets this CPU has (amx_bf16, avx512_bf16), whatever CPU_BF16_ENV says."""
    return sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def cpu_bf16() -> tuple[bool, str]:
    """Whether `auto` should treat this CPU as computing bf16 natively, and the evidence."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1", f"{CPU_BF16_ENV}={forced}"
    found = cpu_bf16_instructions()
    if found:
        return True, f"CPU has {' and '.join(found)}"
    return False, "CPU has no AMX or AVX512-BF16 (bf16 would be emulated, hundreds of times slower)"


def resolve(setting: str, device: str | None = None, model_type: str | None = None) -> Precision:
    """The dtype for train.dtype `setting` on `device` ("cuda" or "cpu"; default: this machine's)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "auto":
        if device == "cuda":
            if torch.cuda.is_bf16_supported():
                precision = Precision("bf16", f"auto: {torch.cuda.get_device_name(0)} supports bf16")
            else:
                precision = Precision("fp16", "auto: this GPU has no bf16; fp16 with loss scaling")
        else:
            has_bf16, evidence = cpu_bf16()
            precision = Precision("bf16" if has_bf16 else "fp32", f"auto: {evidence}")
    else:
        precision = Precision(setting, "set by train.dtype")
    if precision.name == "fp16":
        if device != "cuda":
            raise TunesmithError(
                "train.dtype fp16 needs a CUDA GPU: CPUs have no fast fp16 matmul and no loss scaling here. "
                "Use bf16 (CPUs with AMX/AVX512-BF16) or fp32."
            )
        if model_type and model_type.startswith("gemma"):
            raise TunesmithError(
                f"train.dtype fp16: {model_type} models overflow in fp16 (activations beyond 65,504). "
                "Use bf16 (any GPU from Ampere on) or fp32."
            )
    return precision


def inference_dtype(trained: str, device: str | None = None) -> torch.dtype:
    """The dtype to load a trained run in: its own, unless this machine would only emulate it (then fp32)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if trained == "fp32":
        return torch.float32
    if device == "cuda":
        return TORCH_DTYPES[trained] if trained != "bf16" or torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if trained == "bf16" and cpu_bf16()[0] else torch.float32


def keep_trainable_fp32(model: Any) -> int:
    """Cast trainable parameters to fp32 (frozen ones keep the compute dtype); returns how many were cast.

    Adapter weights and their optimizer states stay fp32 so that small updates are not rounded away.
    """
    cast = 0
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
            cast += 1
    return cast


def trained_dtype(run_dir: Path) -> str:
    """The dtype a run trained in, from its manifest (runs from before the record: fp32)."""
    try:
        recorded = RunDir(Path(run_dir)).read_manifest().get("precision")
    except (OSError, ValueError, AttributeError):
        recorded = None
    return recorded["dtype"] if isinstance(recorded, dict) and recorded.get("dtype") in TORCH_DTYPES else "fp32"


def run_inference_dtype(run_dir: Path) -> torch.dtype:
    """What generation, evaluation, serving and export load a run in (see inference_dtype)."""
    return inference_dtype(trained_dtype(run_dir))


def run_precision(config: RunConfig, source: str, recorded: dict[str, Any], console: Console) -> Precision:
    """The dtype this run trains in, printed with its reason; a resumed run keeps the dtype it started with."""
    model_type = getattr(AutoConfig.from_pretrained(source), "model_type", None)
    here = resolve(config.train.dtype, model_type=model_type)
    started = recorded.get("precision")
    if started and started["dtype"] != here.name:
        # Only `auto` can get here: a changed explicit train.dtype is a config change, refused before.
        try:
            resolve(started["dtype"], model_type=model_type)  # still possible here? (fp16 needs a GPU)
        except TunesmithError as exc:
            raise TunesmithError(
                f"This run started in {started['dtype']} ({started['reason']}), which this machine cannot continue: "
                f"{exc} Resume it on hardware like the one it started on, or start a new run with another --out."
            ) from None
        console.print(
            f"[yellow]train.dtype auto resolves to {here.name} here ({here.reason}), but this run started in "
            f"{started['dtype']}: continuing in {started['dtype']} so that the resumed steps match.[/]"
        )
        return Precision(started["dtype"], f"kept from the run's start ({started['reason']})")
    console.print(f"[bold]dtype[/] {here.name} ({here.reason})")
    return here
