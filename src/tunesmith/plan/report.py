"""The plan of a run before it trains: peak memory, time and cost on the device table and on this machine, the
technique that fits the chosen GPU, and optionally a short measured probe set beside the estimate.

`tunesmith plan` only prints what plan_run returns, and a training run records its estimate through the same
estimate_with_cpu; nothing here prints or writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tunesmith.config import RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.plan.estimate import (
    CPU_ROW,
    DEFAULT_GPU,
    DEVICES,
    GIB,
    HERE_UTILIZATION,
    UTILIZATION,
    Estimate,
    Shape,
    Workload,
    estimate,
    memory_breakdown,
    peak_bytes,
    recommend,
    table_precision,
)
from tunesmith.train.precision import Precision, resolve


@dataclass
class PlanOptions:
    """What a plan takes besides the run config."""

    tokens: float | None = None  # training tokens in total, instead of counting the data
    seq_len: int | None = None  # tokens per sequence, instead of the data's p95 (else data.max_length)
    gpu: str | None = None  # the device-table name to recommend for (default DEFAULT_GPU)
    gpu_memory: float | None = None  # recommend for a device of this many GiB instead
    dtype_reason: str | None = None  # why train.dtype is what it is, when the caller set it for this plan
    utilization: float = UTILIZATION
    cpu_tflops: float | None = None  # this machine's matmul TFLOP/s instead of measuring it (plan/probe.py)
    prices: str | None = None  # YAML file of device name -> USD per hour, over the table's
    measure_steps: int | None = None  # run this many real training steps here; None: estimate only


@dataclass
class Plan:
    model: str
    method: str
    precision: Precision  # the dtype on the device table's GPUs
    workload: Workload
    estimate: Estimate
    this_machine: Precision | None  # the dtype of this machine's CPU row; None when there is none (fp16)
    no_cpu_row: str  # why there is no CPU row
    recommendation: dict[str, Any]
    utilization: float
    measured: dict[str, Any] | None = None

    @property
    def rollout(self) -> str | None:
        """objective grpo: what the estimate counts for RL, in a sentence (None for other objectives)."""
        work, memory = self.workload, self.estimate.memory_bytes
        if not work.rollout_rows:
            return None
        merged = memory.get("merged_weights", 0)
        return (
            f"grpo: each step trains {work.step_sequences} sequences (rl.prompts_per_step x rl.group_size) of up to "
            f"{work.rollout_length} tokens (prompt + rl.max_completion_tokens), {work.batch_size} at a time "
            f"(train.batch_size); the rollout's KV cache holds {work.rollout_rows} rows x {work.rollout_length} "
            f"tokens: {memory.get('kv_cache', 0) / GIB:.2f} GiB (layers x rows x kv heads x length x head dim x 2 "
            f"x {work.residual_dtype})"
            + (f", beside the merged LoRA weights it samples with ({merged / GIB:.2f} GiB)" if merged else "")
            + f"; sampling adds {work.rollout_tokens:,.0f} forward-only tokens (more when dynamic sampling redraws)"
        )

    @property
    def speed(self) -> str | None:
        """What this machine's time is estimated from: its measured (or given) matmul speed."""
        return self.estimate.devices.get(CPU_ROW, {}).get("speed")

    def to_dict(self) -> dict[str, Any]:
        result = self.estimate
        report: dict[str, Any] = {
            "model": self.model,
            "method": self.method,
            "precision": self.precision.to_dict(),
            "workload": self.workload.__dict__,
            "estimate": {
                "peak_memory_bytes": result.peak_memory_bytes,
                "peak_phase": result.peak_phase,
                "memory_bytes": result.memory_bytes,
                "params": result.params,
                "trainable_params": result.trainable_params,
                "flops": result.flops,
                "hours": {k: v["hours"] for k, v in result.devices.items()},
                "cost_usd": {k: v["cost_usd"] for k, v in result.devices.items()},
            },
            "fits": {k: v["fits"] for k, v in result.devices.items()},
            "devices": result.devices,
            "this_machine": {"precision": self.this_machine.to_dict(), "speed": self.speed}
            if self.this_machine
            else {"error": self.no_cpu_row},
            "recommendation": self.recommendation,
        }
        if self.rollout:
            report["rollout"] = self.rollout
        if self.measured is not None:
            report["measured"] = self.measured
        return report


def here_row(device: str) -> str:
    """The name of this machine's row: its CPU, or on "cuda" its first GPU."""
    import torch

    return f"this machine ({torch.cuda.get_device_name(0)})" if device == "cuda" else CPU_ROW


def this_machine(dtype: str, device: str = "cpu", tflops: float | None = None) -> dict[str, Any]:
    """This machine's CPU (or first GPU) as a row of the device table: all its memory, its matmul speed in `dtype`
    measured (plan/probe.py) unless `tflops` gives it, the share of that speed training reaches, nothing per hour."""
    import torch

    from tunesmith.plan.probe import matmul_speed

    if device == "cuda":
        memory = torch.cuda.get_device_properties(0).total_memory / GIB
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    if tflops:
        flops, label = tflops * 1e12, f"{tflops:g} TFLOP/s {dtype} matmul, set by --cpu-tflops"
    else:
        speed = matmul_speed(dtype, device)
        flops, label = speed.flops, speed.label
    row = {"memory_gib": memory, "tflops": flops / 1e12, "usd_per_hour": 0.0, "utilization": HERE_UTILIZATION}
    return row | {"speed": label, "gpu": device == "cuda", "name": here_row(device)}


def estimate_with_cpu(
    shape: Shape,
    work: Workload,
    cpu_work: Workload | None,
    utilization: float = UTILIZATION,
    cpu_tflops: float | None = None,
    prices: dict[str, float] | None = None,
    device: str = "cpu",
) -> Estimate:
    """The estimate on the device table plus, given `cpu_work`, a row for this machine in its dtype: its CPU, or
    with `device` "cuda" its first GPU."""
    cpu = this_machine(cpu_work.dtype, device, cpu_tflops) if cpu_work else None
    return estimate(shape, work, utilization, prices, cpu, cpu_work)


def load_prices(path: str | None) -> dict[str, float]:
    if not path:
        return {}
    import yaml

    try:
        prices = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TunesmithError(f"--prices {path}: cannot read it ({exc}).") from None
    if not isinstance(prices, dict) or not all(isinstance(v, (int, float)) for v in prices.values()):
        raise TunesmithError(
            f"--prices {path}: expected a mapping of device name to USD per hour, e.g. 'H100 80GB: 2.1'."
        )
    return {str(k): float(v) for k, v in prices.items()}


def plan_run(config: RunConfig, options: PlanOptions) -> Plan:
    """Estimate a run of `config` from its model's config (and its data, unless options.tokens says how much),
    recommend a technique for the chosen GPU, and with options.measure_steps measure it here."""
    from transformers import AutoConfig

    from tunesmith.models import resolve_model_path

    source = resolve_model_path(config.model)
    model_config = AutoConfig.from_pretrained(source)
    model_type = getattr(model_config, "model_type", None)
    shape = Shape.from_config(model_config)
    examples = _tokenized(config, source) if config.data.path and not options.tokens else None
    table = table_precision(config.train.dtype, model_type)
    here, no_cpu_row = _cpu_precision(config.train.dtype, model_type)
    if options.dtype_reason:
        table = Precision(table.name, options.dtype_reason)
        here = here and Precision(here.name, options.dtype_reason)
    work = Workload.for_run(config, examples, options.seq_len, options.tokens, table.name)
    cpu_work = replace(work, dtype=here.name) if here else None
    prices = load_prices(options.prices)
    result = estimate_with_cpu(shape, work, cpu_work, options.utilization, options.cpu_tflops, prices)
    device, capacity = _target_device(options.gpu, options.gpu_memory)
    plan = Plan(
        model=config.model,
        method=config.method,
        precision=table,
        workload=work,
        estimate=result,
        this_machine=here,
        no_cpu_row=no_cpu_row,
        recommendation=recommend(shape, work, device, capacity),
        utilization=options.utilization,
    )
    if options.measure_steps:
        plan.measured = _measure(config, source, shape, work, options.measure_steps)
    return plan


def _tokenized(config: RunConfig, source: str) -> list[Any]:
    """The run's training data tokenized as training would, for its real lengths and answer share."""
    from tunesmith.data.formats import read_conversations
    from tunesmith.data.tokenize import tokenize_all, use_chat_template
    from tunesmith.models import load_chat_tokenizer
    from tunesmith.objectives import objective_of

    tokenizer = load_chat_tokenizer(source, config.chat_template)
    grpo = config.objective == "grpo"
    conversations = read_conversations(config.data.path, config.data.format, prompt_only=grpo)[0]
    use_chat_template(tokenizer, tokenizer.chat_template, any(c.uses_tools for c in conversations))
    if grpo:  # each prompt with a full-length completion: the longest sequence the update and the engine hold
        from tunesmith.objectives import rl

        return rl.planned_rows(rl.tokenize_prompts(tokenizer, conversations, config.data.max_length, config.rl)[0],
                               config.rl)  # fmt: skip
    holds = objective_of(config).holds
    if holds != "sft":  # preference objectives: both sides of every pair run through the model
        from tunesmith.objectives.preference import sequences, tokenize_preferences

        pairs, _ = tokenize_preferences(tokenizer, conversations, config.data.max_length, holds, config.train.seed)
        return sequences(pairs)
    data = config.data
    examples, _ = tokenize_all(tokenizer, conversations, data.max_length, data.train_on, data.reasoning)
    return examples


def _cpu_precision(setting: str, model_type: str | None) -> tuple[Precision | None, str]:
    """The dtype this machine's CPU would train in, or None and the reason it cannot."""
    try:
        return resolve(setting, device="cpu", model_type=model_type), ""
    except TunesmithError as exc:  # fp16 has no CPU path: no row for this machine
        return None, str(exc)


def _target_device(gpu: str | None, gpu_memory: float | None) -> tuple[str, float]:
    """The device to recommend for and its memory in bytes."""
    if gpu and gpu not in DEVICES:
        raise TunesmithError(f"--gpu {gpu!r} is not in the device table: {', '.join(DEVICES)}; or use --gpu-memory.")
    device = gpu or (f"{gpu_memory:g} GiB device" if gpu_memory else DEFAULT_GPU)
    # GiB, like the device table: a "24GB" card holds 24 GiB.
    return device, (gpu_memory or DEVICES[device]["memory_gib"]) * GIB


def _measure(config: RunConfig, source: str, shape: Shape, work: Workload, steps: int) -> dict[str, Any]:
    """The probe's measurements beside the estimate for what it ran: this machine's dtype, its CUDA context
    if any."""
    from tunesmith.plan.measure import measure

    measured = measure(config, source, work, steps)
    local = memory_breakdown(
        shape, replace(work, dtype=measured["precision"]["dtype"]), gpu="cuda_context_bytes" in measured
    )
    local_peak, local_phase = peak_bytes(local)
    measured["estimate_memory_bytes"] = local
    measured["estimate_peak_memory_bytes"] = local_peak
    measured["estimate_peak_phase"] = local_phase
    measured["estimate_error"] = round(local_peak / measured["peak_memory_bytes"] - 1, 4)
    return measured


def run_estimate(config: RunConfig, model_config: Any, examples: list[Any]) -> dict[str, Any]:
    """The plan's time and cost estimate for this run's real workload, kept to compare with what it took."""
    import torch

    from tunesmith.objectives import objective_of
    from tunesmith.plan.estimate import HERE_UTILIZATION, UTILIZATION

    try:
        shape = Shape.from_config(model_config)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        return {"error": f"no estimate for this model shape: {exc}"}
    if objective_of(config).holds != "sft":  # both sides of every pair run through the model
        from tunesmith.objectives.preference import sequences

        examples = sequences(examples)
    work = Workload.for_run(config, examples)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where this run trains, so what the probe times
    result = estimate_with_cpu(shape, work, cpu_work=work, device=device)
    here = result.devices.pop(here_row(device))
    return {
        "tokens": round(work.tokens),
        "peak_memory_gib": round(result.peak_memory_bytes / GIB, 3),
        "this machine": here,
        "cloud": {name: d["cost_usd"] for name, d in result.devices.items() if d["fits"]},
        "assumptions": f"{UTILIZATION:.0%} utilisation (MFU) of the cloud GPUs' peak; this machine: "
        f"{here['speed']}, {HERE_UTILIZATION:.0%} of it reached by training",
    }
