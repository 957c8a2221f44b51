"""tunesmith's native CPU kernels for generation (linear_bf16.cpp): a bf16 matrix product over weights packed once, and
the RMSNorm of the model families in one pass.

A decode step reads every weight once for a few rows; over this layout the read runs near the memory's speed where
oneDNN's bf16 product reaches about half of it. The source is compiled on first use with the system's C++ compiler
(torch's extension builder, ninja) into tunesmith's cache, one build per CPU, since it is built for the CPU it runs
on. It is used only where it pays (`pays`: a CPU with AVX512-BF16); where it cannot be built, generation goes on with
oneDNN and says why once. `TUNESMITH_KERNELS=0` switches it off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.files import cache_root
from tunesmith.train.precision import cpu_flags

SOURCE = Path(__file__).with_name("linear_bf16.cpp")
logger = logging.getLogger("tunesmith.kernels")


def pays() -> bool:
    """Whether this machine should generate through the kernel: AVX512-BF16 and not switched off."""
    return os.environ.get("TUNESMITH_KERNELS", "1") != "0" and "avx512_bf16" in cpu_flags()


def takes(weight: torch.Tensor) -> bool:
    """Whether generation computes with this weight through the kernel: bf16 in CPU memory (a CUDA model's
    weights never: the kernel is a CPU one, even where the host CPU has AVX512-BF16), where the kernel pays and
    is built."""
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and pays() and available()


@functools.cache
def available() -> bool:
    """Build (once per CPU and source) and load the kernel; False, with the reason logged once, where it cannot be."""
    from torch.utils import cpp_extension

    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(sorted(cpu_flags())).encode() + torch.__version__.encode()).hexdigest()
    folder = cache_root() / "kernels" / key[:16]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not any(folder.glob("*.so")):
            print("Compiling tunesmith's bf16 generation kernel for this CPU (once, about 10 s)...", file=sys.stderr)
        cpp_extension.load(
            name="tunesmith_linear_bf16",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],  # torch's own libgomp is loaded already: the kernel shares its threads
            build_directory=str(folder),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a sandbox without /tmp: generate with oneDNN instead
        logger.warning("tunesmith's bf16 kernel could not be built (%s); generating with oneDNN's product.", exc)
        return False
    return True


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] bf16 weight in the kernel's layout ([out/16, in/2, 16, 2], zero-padded)."""
    return torch.ops.tunesmith_kernels.pack_bf16(weight.detach().contiguous())


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias over the packed weight, in bf16 (accumulated in float32, rounded once)."""
    return torch.ops.tunesmith_kernels.linear_bf16(x, packed, out_features, bias)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float, weight_after: bool) -> torch.Tensor:
    """RMSNorm of bf16 rows in float32: Gemma's bf16(x * r * scale) with scale = 1 + weight (float32), or with
    `weight_after` Llama's bf16(weight * bf16(x * r)); r = 1 / sqrt(mean(x^2) + eps)."""
    return torch.ops.tunesmith_kernels.rms_norm_bf16(x, scale, eps, weight_after)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest value in a [rows, vocabulary] bf16 tensor, as torch.argmax gives it (the
    first of ties, a NaN's where there is one) without its float32 copy of the logits."""
    return torch.ops.tunesmith_kernels.argmax_bf16(logits)


def gated(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """A gated MLP's bf16(bf16(act(gate)) * up), act GELU (tanh form) or else SiLU, in one pass."""
    return torch.ops.tunesmith_kernels.gated_bf16(gate, up, gelu)


def decode_layer(hidden: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 layer: LayerWeights) -> torch.Tensor:  # fmt: skip
    """One decoder layer over a step's tokens (hidden [tokens, width] bf16): token i of the row in cache slot
    slots[i] at positions[i]; a row's tokens in one call (a chunk of its prompt) attend to each other causally.
    Writes each token's key and value into the cache; see `decode_layer` in linear_bf16.cpp."""
    return torch.ops.tunesmith_kernels.decode_layer(
        hidden, positions, slots, cos, sin, keys, values, layer.weights, layer.features, layer.biases, layer.norms,
        layer.eps, layer.weight_after, layer.heads, layer.kv_heads, layer.head_dim, layer.scaling, layer.window,
        layer.gelu,
    )  # fmt: skip


@dataclass(frozen=True)
class LayerWeights:
    """What `decode_layer` needs of one layer: the packed q, k, v, o, gate, up and down weights (with their output
    widths and biases) and the float32 norm scales (input, after attention, before the MLP, after the MLP, q, k;
    None where the family has none)."""

    weights: list[torch.Tensor]
    features: list[int]
    biases: list[torch.Tensor | None]
    norms: list[torch.Tensor | None]
    eps: float
    weight_after: bool  # Llama's norms (weight applied after rounding); else Gemma's (1 + weight)
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    window: int  # 0: every earlier position; else the last `window`
    gelu: bool  # GELU (tanh) on the gate; else SiLU


@dataclass
class Screen:
    """An output layer's int8 copy for greedy picks (`greedy`): per entry j the rounded weight q_j (packed), its
    scale, a bound on |w_j - scale_j q_j| (with a margin for float32 sums), |scale_j q_j|, and sum(q_j)."""

    q: torch.Tensor
    scale: torch.Tensor
    error: torch.Tensor
    norm: torch.Tensor
    sums: torch.Tensor


def screen(weight: torch.Tensor) -> Screen:
    """The screen of a [vocabulary, width] bf16 output layer: half its bytes, made once per generation view."""
    return Screen(*torch.ops.tunesmith_kernels.screen_pack(weight.detach()))


def greedy(x: torch.Tensor, weight: torch.Tensor, made: Screen) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's greedy pick of x @ weight.T without computing every logit: the int8 screen bounds each logit, and
    the few that can still be the largest are computed exactly (a row it cannot narrow, whole). Equal to
    torch.argmax over the bf16 logits that `linear` gives for that row alone (the first of ties); -1 for a row of x
    with a value that is not finite, whose logits the caller computes. Also returns how many entries of each row
    were computed exactly (the vocabulary's size for a row computed whole)."""
    picks, computed = torch.ops.tunesmith_kernels.greedy_bf16(
        x, weight.detach(), made.q, made.scale, made.error, made.norm, made.sums
    )
    return picks, computed
