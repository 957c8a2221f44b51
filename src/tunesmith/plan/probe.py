"""This machine's matmul speed, measured: what the plan divides a run's FLOPs by for "this machine".

A fraction of a second of matmuls in one dtype, of a small model's training shapes, on the device a run here
trains on (the GPU when there is one). Kept in the user cache under everything the speed depends on (the CPU's
flags, torch's version, the thread count, the device) and never reused for a machine that differs in any of them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.files import cache_root, write_json
from tunesmith.train import precision

CACHE_FILE = "matmul_speed.json"
# (tokens, in, out): a micro-batch of tokens through a 2048-wide linear layer, as a small model trains; on a GPU
# 4096 tokens (8 x 512), since 512 would time the kernel launch more than the matmul.
SHAPES = {"cpu": (512, 2048, 2048), "cuda": (4096, 2048, 2048)}
SECONDS = 0.15  # timed per dtype, after one warm-up matmul
BF16_SETS = ("amx_bf16", "avx512_bf16")  # a label names these, and the widest of VECTOR_SETS the CPU has
VECTOR_SETS = ("avx512f", "avx2")


@dataclass(frozen=True)
class MatmulSpeed:
    """Achieved matmul FLOP/s in one dtype on this machine's training device, and what it was measured on."""

    flops: float
    dtype: str  # fp32 | bf16 | fp16
    device: str  # "cpu", or the GPU's name
    threads: int
    flags: tuple[str, ...]  # the CPU's matmul instruction sets: its BF16_SETS and widest VECTOR_SETS
    cached: bool = False  # read from the user cache rather than measured by this call

    @property
    def label(self) -> str:
        if self.device == "cpu":
            sets = ", ".join(self.flags) or "no AVX2, AVX-512 or AMX"
            where = f"this CPU ({sets}), {self.threads} thread{'s' if self.threads != 1 else ''}"
        else:
            where = self.device
        return f"measured {self.flops / 1e9:,.0f} GFLOP/s {self.dtype} matmul on {where}"


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def machine_key(device: str) -> str:
    """What the speed depends on, as one cache key: every CPU flag (hashed), torch, threads, the device."""
    flags = hashlib.sha256(" ".join(sorted(precision.cpu_flags())).encode()).hexdigest()[:16]
    return (
        f"cpu_flags={flags} torch={torch.__version__} threads={torch.get_num_threads()} device={_device_name(device)}"
    )


def time_matmul(dtype: str, device: str) -> float:
    """FLOP/s of the fastest of the SHAPES[device] matmuls in `dtype` run over about SECONDS after one warm-up:
    the fastest, since another process on a shared machine slows some of them, and the cache keeps the figure."""
    tokens, inputs, outputs = SHAPES[device]
    kind = precision.TORCH_DTYPES[dtype]
    left = torch.randn(tokens, inputs, dtype=kind, device=device)
    right = torch.randn(inputs, outputs, dtype=kind, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    left @ right
    sync()
    fastest, start = math.inf, time.perf_counter()
    for count in itertools.count():
        began = time.perf_counter()
        left @ right
        sync()
        fastest = min(fastest, time.perf_counter() - began)
        if count >= 2 and began - start >= SECONDS:
            break
    return 2 * tokens * inputs * outputs / fastest


def _read_cache() -> dict[str, Any]:
    try:
        cached = json.loads((cache_root() / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def matmul_speed(dtype: str, device: str | None = None) -> MatmulSpeed:
    """This machine's matmul speed in `dtype` on `device` (default: where a run here trains), from the user cache
    when it holds one for this exact machine, else measured (a fraction of a second) and cached."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    key = machine_key(device)
    cache = _read_cache()
    entry = cache.get(key) if isinstance(cache.get(key), dict) else {}
    flops, cached = entry.get(dtype), True
    if not isinstance(flops, int | float) or not flops > 0:
        flops, cached = time_matmul(dtype, device), False
        cache[key] = entry | {dtype: flops}
        try:
            cache_root().mkdir(parents=True, exist_ok=True)
            write_json(cache_root() / CACHE_FILE, cache)
        except OSError:
            pass  # a read-only cache only costs the next plan another fraction of a second
    flags = precision.cpu_flags()
    named = tuple(flag for flag in BF16_SETS if flag in flags) + tuple(f for f in VECTOR_SETS if f in flags)[:1]
    return MatmulSpeed(float(flops), dtype, _device_name(device), torch.get_num_threads(), named, cached)
