"""A short real training probe: measured tokens/s and peak memory, to set beside the estimate.

Runs a few optimizer steps on synthetic sequences of the planned shape, loaded and trained in the dtype
train.dtype resolves to here. The peak counts what the estimate counts, the memory of live tensors: on a
GPU the allocator's peak plus the CUDA context found; on CPU the process's high-water resident memory
during the steps (reset just before them, Linux) minus its memory before the model was loaded, with glibc
kept from holding freed memory (see pin_mmap_threshold). That baseline is taken after a warm-up step of a
one-layer copy of the model, so it already holds the runtime (libraries imported on first use, kernels).
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import gc
import random
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import AutoConfig, AutoModelForCausalLM

from tunesmith.config import RunConfig
from tunesmith.data.tokenize import TokenizedExample
from tunesmith.methods import apply_method, load_base, training_dtype
from tunesmith.plan.estimate import Workload
from tunesmith.train.loop import fit
from tunesmith.train.precision import Precision, resolve
from tunesmith.train.speed import MemoryReleaser


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)
GLIBC_MMAP_THRESHOLD = 128 * 1024  # glibc's initial threshold, before it starts raising it


def pin_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at its initial 128 KiB for the rest of the process; False where it cannot.

    glibc raises the threshold to the size of each mapped block freed (up to 32 MiB), after which blocks
    that size come from the heap, whose freed space it keeps resident. The probe's resident peak then held
    memory no tensor used, which the GPU figure (the allocator's peak, not its cache) leaves out: measured
    here with LoRA (fp32) on a 1.5M-parameter Llama, 52 MiB against 20 MiB pinned; 45M parameters, 422
    against 265.
    Pinned, blocks from 128 KiB are mapped and unmapped on free, so resident memory follows live tensors.
    """
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD))


def synthetic_examples(vocab: int, work: Workload, count: int, seed: int = 0) -> list[TokenizedExample]:
    rng = random.Random(seed)
    answer = max(1, int(work.seq_len * work.answer_share))
    mask = [0] * (work.seq_len - answer) + [1] * answer
    return [TokenizedExample([rng.randrange(vocab) for _ in range(work.seq_len)], mask) for _ in range(count)]


def one_layer_copy(model_config: Any) -> Any:
    """The model's config with a single decoder layer (per-layer settings cut to match), same widths."""
    tiny = copy.deepcopy(model_config)
    text = getattr(tiny, "text_config", None) or tiny
    text.num_hidden_layers = 1
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:1]
    return tiny


def _steps(config: RunConfig, work: Workload, steps: int) -> Any:
    return config.train.model_copy(
        update={"max_steps": steps, "batch_size": work.batch_size, "grad_accum": 1, "lr": 1e-5}
    )


def warm_up(config: RunConfig, model_config: Any, work: Workload, precision: Precision) -> None:
    """One step of a one-layer copy of the model, loaded, adapted and trained as the probe will be.

    Measured on a 1.5M-parameter Llama (CPU): the libraries a first step imports (accelerate, PEFT, the
    model's module) add ~190 MiB of resident memory and its first kernels ~20 MiB more, several times the
    model's whole training state (~30 MiB); counted as training memory, they put the estimate 71% below.
    """

    dtype = training_dtype(config, precision.dtype)
    with tempfile.TemporaryDirectory(prefix="tunesmith-probe-") as folder:
        AutoModelForCausalLM.from_config(one_layer_copy(model_config), dtype=dtype).save_pretrained(folder)
        model, _ = apply_method(load_base(config, folder, dtype), config)
        examples = synthetic_examples(model.config.vocab_size, work, work.batch_size)
        fit(model, examples, _steps(config, work, 1), pad_id=0, console=Console(quiet=True), precision=precision)


def measure(config: RunConfig, source: str, work: Workload, steps: int) -> dict[str, Any]:

    model_config = AutoConfig.from_pretrained(source)
    precision = resolve(config.train.dtype, model_type=getattr(model_config, "model_type", None))
    cuda = torch.cuda.is_available()
    pinned = cuda or pin_mmap_threshold()  # before the warm-up, which then runs as the probe will
    warm_up(config, model_config, work, precision)
    text = getattr(model_config, "text_config", None) or model_config
    examples = synthetic_examples(text.vocab_size, work, work.batch_size * steps)  # data, not training state
    gc.collect()  # the warm-up model's reference cycles
    MemoryReleaser().release()  # hand the warm-up's freed heap back, so the baseline is what stays in use
    context = 0
    if cuda:
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        context = total - free - torch.cuda.memory_reserved()  # this process's, on a GPU it does not share
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _status_kib("VmRSS") * 1024
    model, _ = apply_method(load_base(config, source, training_dtype(config, precision.dtype)), config)
    gc.collect()
    reset = _reset_peak()
    result = fit(model, examples, _steps(config, work, steps), pad_id=0, precision=precision)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - baseline + context
    else:
        peak = _status_kib("VmHWM") * 1024 - baseline
    rates = [h["tokens_per_s"] for h in result.history[1:]] or [result.history[0]["tokens_per_s"]]
    measured: dict[str, Any] = {
        "peak_memory_bytes": int(peak),
        "tokens_per_second": round(statistics.median(rates), 2),
        "steps": steps,
        "peak_reset": reset or cuda,
        "live_memory": pinned,  # False: the CPU peak may include freed memory glibc kept
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "precision": precision.to_dict(),
    }
    if cuda:
        measured["cuda_context_bytes"] = int(context)
    return measured
