"""`tunesmith plan` and `tunesmith advise`: before training, what it will cost and whether to fine-tune at all."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.table import Table

from tunesmith.cli.common import add_config_options, config_from_args, out, print_json
from tunesmith.errors import TunesmithError


def _load_prices(path: str | None) -> dict[str, float]:
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


def cmd_plan(args: argparse.Namespace) -> int:
    import os
    from dataclasses import replace

    from transformers import AutoConfig

    from tunesmith.models import resolve_model_path
    from tunesmith.plan.estimate import (
        CPU_ROW,
        DEVICES,
        GIB,
        Shape,
        Workload,
        estimate,
        memory_breakdown,
        peak_bytes,
        recommend,
        table_precision,
    )
    from tunesmith.train.precision import Precision, resolve

    if args.weight_dtype:  # the plan, its CPU row and --measure all take it as train.dtype
        args.overrides = [*args.overrides, f"train.dtype={args.weight_dtype}"]
    config = config_from_args(args)
    source = resolve_model_path(config.model)
    model_config = AutoConfig.from_pretrained(source)
    model_type = getattr(model_config, "model_type", None)
    shape = Shape.from_config(model_config)
    examples = None
    if config.data.path and not args.tokens:
        from tunesmith.data.formats import read_conversations
        from tunesmith.data.tokenize import tokenize_all, use_chat_template
        from tunesmith.models import load_tokenizer

        tokenizer = load_tokenizer(source)
        use_chat_template(tokenizer, config.chat_template)
        examples, _ = tokenize_all(
            tokenizer,
            read_conversations(config.data.path, config.data.format)[0],
            config.data.max_length,
            config.data.train_on,
        )
    table = table_precision(config.train.dtype, model_type)
    try:
        here: Precision | None = resolve(config.train.dtype, device="cpu", model_type=model_type)
        no_cpu_row = ""
    except TunesmithError as exc:  # fp16 has no CPU path: no row for this machine
        here, no_cpu_row = None, str(exc)
    if args.weight_dtype:
        table = Precision(table.name, "set by --weight-dtype")
        here = here and Precision(here.name, "set by --weight-dtype")
    work = Workload.for_run(config, examples, args.seq_len, args.tokens, table.name)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    cpu = {"memory_gib": ram, "tflops": args.cpu_tflops, "usd_per_hour": 0.0}
    cpu_work = replace(work, dtype=here.name) if here else None
    result = estimate(shape, work, args.utilization, _load_prices(args.prices), cpu if here else None, cpu_work)
    if args.gpu and args.gpu not in DEVICES:
        raise TunesmithError(
            f"--gpu {args.gpu!r} is not in the device table: {', '.join(DEVICES)}; or use --gpu-memory."
        )
    device = args.gpu or (f"{args.gpu_memory:g} GiB device" if args.gpu_memory else "RTX 4090 24GB")
    # GiB, like the device table: a "24GB" card holds 24 GiB.
    capacity = (args.gpu_memory or DEVICES[device]["memory_gib"]) * GIB
    advice = recommend(shape, work, device, capacity)
    report: dict[str, Any] = {
        "model": config.model,
        "method": config.method,
        "precision": table.to_dict(),
        "workload": work.__dict__,
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
        "this_machine": {"precision": here.to_dict()} if here else {"error": no_cpu_row},
        "recommendation": advice,
    }
    if args.measure:
        from tunesmith.plan.measure import measure

        measured = measure(config, source, work, args.measure_steps)
        # Compared with the estimate for what the probe ran: this machine's dtype, its CUDA context if any.
        local = memory_breakdown(
            shape, replace(work, dtype=measured["precision"]["dtype"]), gpu="cuda_context_bytes" in measured
        )
        local_peak, local_phase = peak_bytes(local)
        measured["estimate_memory_bytes"] = local
        measured["estimate_peak_memory_bytes"] = local_peak
        measured["estimate_peak_phase"] = local_phase
        measured["estimate_error"] = round(local_peak / measured["peak_memory_bytes"] - 1, 4)
        report["measured"] = measured
    if args.json:
        print_json(report)
        return 0
    out.print(
        f"[bold]{config.model}[/]: {result.params / 1e6:,.1f}M parameters, {config.method} trains "
        f"{result.trainable_params / 1e6:,.2f}M; batch {work.batch_size} x {work.seq_len} tokens; "
        f"{work.tokens:,.0f} training tokens; {result.flops:.3g} FLOPs"
    )
    out.print(f"[bold]dtype[/] {table.name} on the GPUs below ({table.reason})")
    memory = Table(title=f"Peak training memory on a GPU, {table.name} (estimate)")
    memory.add_column("part")
    memory.add_column("GiB", justify="right")
    for part, size in result.memory_bytes.items():
        memory.add_row(part, f"{size / GIB:.2f}")
    # Not the sum: the loss buffers, a recomputed layer and the optimizer's temporaries are never alive together.
    memory.add_row(f"[bold]peak ({result.peak_phase})", f"[bold]{result.peak_memory_bytes / GIB:.2f}")
    out.print(memory)
    devices = Table(title=f"Devices (at {args.utilization:.0%} utilisation)")
    for column in ("device", "fits", "devices needed", "hours", "cost USD"):
        devices.add_column(column, justify="left" if column == "device" else "right")
    for name, row in result.devices.items():
        devices.add_row(
            name,
            "yes" if row["fits"] else "no",
            str(row["devices_needed"] or "-"),
            f"{row['hours']:.3g}",
            "-" if row["cost_usd"] is None else f"{row['cost_usd']:.2f}",
        )
    out.print(devices)
    if here:
        out.print(f"{CPU_ROW}: {here.name}, without a CUDA context ({here.reason})")
    else:
        out.print(f"{CPU_ROW}: not listed: {no_cpu_row}")
    out.print(f"[bold]Recommendation for {device}:[/] {advice['method'] or 'none'}")
    for reason in advice["reasons"]:
        out.print(f"  - {reason}")
    if args.measure:
        m = report["measured"]
        out.print(
            f"[bold]Measured[/] ({m['steps']} steps on {m['device']} in {m['precision']['dtype']}, "
            f"{m['precision']['reason']}): peak {m['peak_memory_bytes'] / GIB:.2f} GiB; estimate for it "
            f"{m['estimate_peak_memory_bytes'] / GIB:.2f} GiB ({m['estimate_error']:+.0%}), "
            f"{m['tokens_per_second']:.0f} tokens/s"
        )
    return 0


def _ask(question: str, choices: tuple[str, ...]) -> str:
    while True:
        answer = input(f"{question} [{'/'.join(choices)}] ").strip().lower()
        if answer in choices:
            return answer
        out.print(f"Please answer one of: {', '.join(choices)}")


def cmd_advise(args: argparse.Namespace) -> int:
    from tunesmith.plan.advise import NEEDS, Situation, decide, gather_evidence

    need, changes, fits = args.need, args.knowledge_changes, args.knowledge_in_context
    if need is None and sys.stdin.isatty():
        need = _ask("What must the model learn: a style, an output format, a behaviour, or knowledge?", NEEDS)
        if need == "knowledge":
            changes = _ask("Does that knowledge change often?", ("yes", "no")) == "yes"
            fits = _ask("Could the relevant facts be retrieved and put into the prompt?", ("yes", "no")) == "yes"
    situation = Situation(
        need=need or "format",
        knowledge_changes=changes,
        knowledge_fits_context=fits,
        examples=args.examples or 0,
        latency_critical=args.latency_critical,
        private=args.private,
    )
    evidence = None
    if args.data:
        from tunesmith.data.formats import read_conversations
        from tunesmith.data.tokenize import use_chat_template
        from tunesmith.models import load_model, load_tokenizer, resolve_model_path

        source = resolve_model_path(args.model)
        tokenizer = load_tokenizer(source)
        use_chat_template(tokenizer, None)
        situation.examples = situation.examples or len(read_conversations(args.data)[0])
        evidence = gather_evidence(
            args.data,
            load_model(source).eval(),
            tokenizer,
            args.metric,
            args.k,
            args.sample,
            args.target,
            args.seed,
            args.max_new_tokens,
        )
    advice = decide(situation, evidence)
    if args.json:
        print_json(asdict(advice))
        return 0
    out.print(f"[bold]Recommendation: {advice.recommendation}[/]")
    for reason in advice.reasons:
        out.print(f"  - {reason}", highlight=False)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_plan(sub)
    _add_advise(sub)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser(
        "plan",
        help="Estimate memory, time and cost before training; recommend a technique.",
        description="Estimate peak memory (weights, gradients, optimizer, activations, loss buffers, CUDA context) "
        "in the dtype the run will use, FLOPs, time and cost per device from the model's config alone, and "
        "recommend a technique for your GPU. "
        "--measure runs a few real steps here to check the estimate.",
    )
    add_config_options(plan)
    plan.add_argument("--tokens", type=float, help="Training tokens in total (instead of counting --data).")
    plan.add_argument("--seq-len", type=int, help="Tokens per sequence [default: p95 of the data, else max_length].")
    plan.add_argument("--gpu", help="Device to recommend for, a name from the device table [default: RTX 4090 24GB].")
    plan.add_argument(
        "--gpu-memory", type=float, help="Recommend for a device with this much memory in GiB instead (24 for 24 GB)."
    )
    plan.add_argument(
        "--weight-dtype",
        choices=["fp32", "bf16", "fp16"],
        help="Plan for this dtype instead of train.dtype's [default: train.dtype, where auto is bf16 on the "
        "table's GPUs and what this machine supports for its CPU row and --measure].",
    )
    plan.add_argument(
        "--utilization",
        type=float,
        default=0.4,
        help="Share of peak FLOP/s reached (MFU) for time and cost [default: 0.4].",
    )
    plan.add_argument(
        "--cpu-tflops",
        type=float,
        default=0.16,
        help="This machine's matmul speed in TFLOP/s (2-core AVX-512 fp32: 0.16) [default: 0.16].",
    )
    plan.add_argument("--prices", help="YAML mapping device name -> USD per hour, overriding the table.")
    plan.add_argument("--measure", action="store_true", help="Run a few real training steps here and report them.")
    plan.add_argument("--measure-steps", type=int, default=3, help="Steps of the --measure probe [default: 3].")
    plan.set_defaults(func=cmd_plan)


def _add_advise(sub: argparse._SubParsersAction) -> None:
    advise = sub.add_parser(
        "advise",
        help="Should you fine-tune, use RAG, or prompt? With evidence from your data.",
        description="Recommend fine-tuning, retrieval (RAG), prompting, or collecting more data, with reasons. "
        "Asks when run in a terminal without --need. With --data, runs the base model zero-shot and few-shot "
        "on held-out examples and reports the headroom.",
    )
    advise.add_argument(
        "--need", choices=["style", "format", "behaviour", "knowledge"], help="What the model must learn."
    )
    advise.add_argument("--knowledge-changes", action="store_true", help="The knowledge changes often.")
    advise.add_argument(
        "--knowledge-in-context",
        action="store_true",
        help="The relevant facts can be retrieved and put into the prompt.",
    )
    advise.add_argument("--examples", type=int, help="Labelled examples available [default: counted from --data].")
    advise.add_argument("--latency-critical", action="store_true", help="Latency or per-request cost matters.")
    advise.add_argument("--private", action="store_true", help="Data may not leave your infrastructure.")
    advise.add_argument("--data", help="Examples to measure zero-shot and few-shot performance on.")
    advise.add_argument("--model", default="gemma-3-270m", help="Base model for the evidence [default: gemma-3-270m].")
    advise.add_argument(
        "--metric",
        default="exact_match",
        choices=["exact_match", "json_valid", "json_fields"],
        help="Task metric [default: exact_match].",
    )
    advise.add_argument("--target", type=float, default=0.8, help="Score that counts as solved [default: 0.8].")
    advise.add_argument("--k", type=int, default=3, help="Examples in the few-shot prompt [default: 3].")
    advise.add_argument("--sample", type=int, default=20, help="Held-out examples to score [default: 20].")
    advise.add_argument("--seed", type=int, default=42, help="Seed of the sample [default: 42].")
    advise.add_argument("--max-new-tokens", type=int, default=64, help="Most tokens per answer [default: 64].")
    advise.add_argument("--json", action="store_true", help="Print the advice as JSON on stdout.")
    advise.set_defaults(func=cmd_advise)
