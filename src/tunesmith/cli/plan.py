"""`tunesmith plan` and `tunesmith advise`: before training, what it will cost and whether to fine-tune at all."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

from rich.table import Table

from tunesmith.cli.common import add_config_options, config_from_args, out, print_json
from tunesmith.evaluate.baselines import MAX_AUTO_SHOTS
from tunesmith.evaluate.metrics import KNOWN as METRICS
from tunesmith.plan.advise import NEEDS, EvidenceOptions, Situation, advise
from tunesmith.plan.estimate import CPU_ROW, DEFAULT_GPU, GIB, HERE_UTILIZATION, UTILIZATION

if TYPE_CHECKING:  # the plan's module imports torch, which `tunesmith --help` need not wait for
    from tunesmith.plan.report import Plan


def cmd_plan(args: argparse.Namespace) -> int:
    from tunesmith.plan.report import PlanOptions, plan_run

    if args.weight_dtype:  # the plan, its CPU row and --measure all take it as train.dtype
        args.overrides = [*args.overrides, f"train.dtype={args.weight_dtype}"]
    options = PlanOptions(
        tokens=args.tokens,
        seq_len=args.seq_len,
        gpu=args.gpu,
        gpu_memory=args.gpu_memory,
        dtype_reason="set by --weight-dtype" if args.weight_dtype else None,
        utilization=args.utilization,
        cpu_tflops=args.cpu_tflops,
        prices=args.prices,
        measure_steps=args.measure_steps if args.measure else None,
    )
    plan = plan_run(config_from_args(args), options)
    if args.json:
        print_json(plan.to_dict())
    else:
        print_plan(plan)
    return 0


def print_plan(plan: Plan) -> None:
    result, work, table = plan.estimate, plan.workload, plan.precision
    out.print(
        f"[bold]{plan.model}[/]: {result.params / 1e6:,.1f}M parameters, {plan.method} trains "
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
    if plan.rollout:
        out.print(plan.rollout, highlight=False)
    devices = Table(title=f"Devices (at {plan.utilization:.0%} utilisation)")
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
    if plan.this_machine:
        out.print(
            f"{CPU_ROW}: {plan.this_machine.name}, without a CUDA context ({plan.this_machine.reason}); time from the "
            f"{plan.speed}, {HERE_UTILIZATION:.0%} of it reached by training"
        )
    else:
        out.print(f"{CPU_ROW}: not listed: {plan.no_cpu_row}")
    advice = plan.recommendation
    out.print(f"[bold]Recommendation for {advice['device']}:[/] {advice['method'] or 'none'}")
    for reason in advice["reasons"]:
        out.print(f"  - {reason}")
    if plan.measured:
        m = plan.measured
        out.print(
            f"[bold]Measured[/] ({m['steps']} steps on {m['device']} in {m['precision']['dtype']}, "
            f"{m['precision']['reason']}): peak {m['peak_memory_bytes'] / GIB:.2f} GiB; estimate for it "
            f"{m['estimate_peak_memory_bytes'] / GIB:.2f} GiB ({m['estimate_error']:+.0%}), "
            f"{m['tokens_per_second']:.0f} tokens/s"
        )


def _ask(question: str, choices: tuple[str, ...]) -> str:
    while True:
        answer = input(f"{question} [{'/'.join(choices)}] ").strip().lower()
        if answer in choices:
            return answer
        out.print(f"Please answer one of: {', '.join(choices)}")


def cmd_advise(args: argparse.Namespace) -> int:
    need, changes, fits = args.need, args.knowledge_changes, args.knowledge_in_context
    if need is None and sys.stdin.isatty():
        need = _ask("What must the model learn: a style, an output format, a behaviour, or knowledge?", NEEDS)
        if need == "knowledge":
            changes = _ask("Does that knowledge change often?", ("yes", "no")) == "yes"
            fits = _ask("Could the relevant facts be retrieved and put into the prompt?", ("yes", "no")) == "yes"
    situation = Situation(
        need=need or Situation.need,
        knowledge_changes=changes,
        knowledge_fits_context=fits,
        examples=args.examples or Situation.examples,
        latency_critical=args.latency_critical,
        private=args.private,
    )
    options = EvidenceOptions(
        model=args.model,
        metric=args.metric,
        schema_path=args.schema,
        k=args.k,
        similar=args.similar_shots,
        sample=args.sample,
        target=args.target,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
    )
    advice = advise(situation, args.data, options)
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
    plan.add_argument("--gpu", help=f"Device to recommend for, a name from the device table [default: {DEFAULT_GPU}].")
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
        default=UTILIZATION,
        help=f"Share of a table GPU's peak FLOP/s reached (MFU) for time and cost [default: {UTILIZATION}]; this "
        f"machine's row takes {HERE_UTILIZATION:.0%} of its measured matmul speed.",
    )
    plan.add_argument(
        "--cpu-tflops",
        type=float,
        help="This machine's matmul speed in TFLOP/s in the dtype of its row [default: measured here by a short "
        "matmul probe, cached per CPU, torch version and thread count].",
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
    advise.add_argument("--need", choices=NEEDS, help="What the model must learn.")
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
    evidence = EvidenceOptions()
    advise.add_argument(
        "--model", default=evidence.model, help=f"Base model for the evidence [default: {evidence.model}]."
    )
    advise.add_argument(
        "--metric", default=evidence.metric, choices=METRICS, help=f"Task metric [default: {evidence.metric}]."
    )
    advise.add_argument(
        "--target",
        type=float,
        default=evidence.target,
        help=f"Score that counts as solved [default: {evidence.target}].",
    )
    advise.add_argument("--schema", help="JSON Schema file for --metric json_schema.")
    advise.add_argument(
        "--k",
        type=int,
        default=evidence.k,
        help=f"Solved examples in the few-shot prompt [default: as many as fit the context, at most {MAX_AUTO_SHOTS}].",
    )
    advise.add_argument(
        "--similar-shots",
        action="store_true",
        help="Show each question the examples whose prompts share the most words with it [default: seeded random].",
    )
    advise.add_argument(
        "--sample", type=int, default=evidence.sample, help=f"Held-out examples to score [default: {evidence.sample}]."
    )
    advise.add_argument(
        "--seed", type=int, default=evidence.seed, help=f"Seed of the sample [default: {evidence.seed}]."
    )
    advise.add_argument(
        "--max-new-tokens",
        type=int,
        default=evidence.max_new_tokens,
        help=f"Most tokens per answer [default: {evidence.max_new_tokens}].",
    )
    advise.add_argument("--json", action="store_true", help="Print the advice as JSON on stdout.")
    advise.set_defaults(func=cmd_advise)
