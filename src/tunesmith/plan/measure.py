"""A short real training probe: measured tokens/s and peak memory, to set beside the estimate.

Runs a few optimizer steps on synthetic sequences of the planned shape. On CPU the peak is the
process's high-water resident memory during the steps (reset just before them, Linux) minus the
runtime's memory before the model was loaded, which is what the estimate counts.
"""

from __future__ import annotations

import gc
import random
import statistics
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import RunConfig
from tunesmith.data.tokenize import TokenizedExample
from tunesmith.plan.estimate import Workload


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


def synthetic_examples(vocab: int, work: Workload, count: int, seed: int = 0) -> list[TokenizedExample]:
    rng = random.Random(seed)
    answer = max(1, int(work.seq_len * work.answer_share))
    mask = [0] * (work.seq_len - answer) + [1] * answer
    return [TokenizedExample([rng.randrange(vocab) for _ in range(work.seq_len)], mask) for _ in range(count)]


def measure(config: RunConfig, source: str, work: Workload, steps: int = 3) -> dict[str, Any]:
    from tunesmith.methods import apply_method, load_base
    from tunesmith.train.loop import fit

    cuda = torch.cuda.is_available()
    gc.collect()
    runtime_kib = _status_kib("VmRSS")
    model, _ = apply_method(load_base(config, source), config)
    examples = synthetic_examples(model.config.vocab_size, work, work.batch_size * steps)
    settings = config.train.model_copy(
        update={"max_steps": steps, "batch_size": work.batch_size, "grad_accum": 1, "lr": 1e-5}
    )
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset = _reset_peak()
    result = fit(model, examples, settings, pad_id=0)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = (_status_kib("VmHWM") - runtime_kib) * 1024
    rates = [h["tokens_per_s"] for h in result.history[1:]] or [result.history[0]["tokens_per_s"]]
    return {
        "peak_memory_bytes": int(peak),
        "tokens_per_second": round(statistics.median(rates), 2),
        "steps": steps,
        "peak_reset": reset or cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }
