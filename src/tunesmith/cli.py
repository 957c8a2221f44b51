"""The `tunesmith` command: parse arguments, call one stage function, print its result.

No work happens here. Config flags are generated from the typed config, so each option's help is the
field's own description. User errors print without a traceback unless --debug is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tunesmith.config import (
    RunConfig,
    apply_overrides,
    build_config,
    choices,
    flag_names,
    leaf_fields,
    parse_value,
    read_config_file,
    set_dotted,
    unique_leaf_names,
)
from tunesmith.data.review import KEYS_HELP as KEYS_DOC
from tunesmith.errors import TunesmithError

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML run config (optional: every field is also a flag below).")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override one config field by its dotted key, e.g. --set train.lr=1e-4 (repeatable).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing run directory.")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON on stdout.")
    parallel = parser.add_argument_group("data-parallel training (see README: Multi-GPU and multi-node)")
    parallel.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="Train on N processes of this machine: one per GPU (accelerate launch), or N CPU processes (gloo). "
        "train.batch_size stays the examples per step over all of them [default: 1].",
    )
    parallel.add_argument(
        "--strategy",
        choices=["ddp", "fsdp"],
        default="ddp",
        help="With several processes: ddp replicates the model on each; fsdp shards weights, gradients and "
        "optimizer state across them (PyTorch FSDP2), for models that do not fit one device [default: ddp].",
    )
    group = parser.add_argument_group("config fields (override the config file)")
    unique = unique_leaf_names()
    group.add_argument(
        "--resume",
        dest="field:resume",
        nargs="?",
        const="true",
        default=argparse.SUPPRESS,
        metavar="auto",
        help="Continue the run in --out from its last complete checkpoint (after a crash, kill or Ctrl-C), "
        "skipping data already seen; '--resume auto' resumes when there is a checkpoint and starts fresh otherwise.",
    )
    group.add_argument(
        "--quiet", action="store_true", help="Plain log lines instead of the live progress bar (also when not a TTY)."
    )
    for dotted, info in leaf_fields():
        if dotted == "resume":
            continue
        default = info.get_default(call_default_factory=True)
        allowed = choices(info)
        one_of = f" One of: {', '.join(allowed)}." if allowed else ""
        group.add_argument(
            *flag_names(dotted, unique),
            dest=f"field:{dotted}",
            default=argparse.SUPPRESS,
            metavar=dotted.rsplit(".", 1)[-1].upper(),
            help=f"{info.description}{one_of} [default: {default}]",
        )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Config file, then flags, then --set overrides, validated once."""
    tree = read_config_file(args.config) if args.config else {}
    fields = dict(leaf_fields())
    for key, value in vars(args).items():
        if key.startswith("field:"):
            dotted = key.removeprefix("field:")
            set_dotted(tree, dotted, parse_value(value, fields[dotted]))
    apply_overrides(tree, args.overrides)
    return build_config(tree, source=args.config or "command line")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def resume_command(argv: list[str]) -> list[str]:
    """The command line without --overwrite and any --resume [auto|true|false], ready for ' --resume'."""
    words: list[str] = []
    skip_value = False
    for word in argv:
        if skip_value and word in ("auto", "true", "false"):
            skip_value = False
            continue
        skip_value = word == "--resume"
        if word not in ("--overwrite", "--resume") and not word.startswith("--resume="):
            words.append(word)
    return words


def _train(args: argparse.Namespace) -> Any:
    """train_run from the command line; an interrupt exits 130/143 with the command that resumes."""
    import os

    from tunesmith.errors import TrainingInterrupted
    from tunesmith.run import train_run
    from tunesmith.train import distributed

    if args.nproc > 1 and not distributed.launched():
        return _train_workers(args)
    try:
        return train_run(
            config_from_args(args), overwrite=args.overwrite, console=err, live=not args.quiet, strategy=args.strategy
        )
    except TrainingInterrupted as stop:
        words = resume_command(args.argv)
        saved = f"Checkpoint: {stop.checkpoint}. " if stop.checkpoint else ""
        if not os.environ.get("TUNESMITH_LAUNCHER") and os.environ.get("RANK", "0") == "0":
            err.print(
                f"[yellow]Stopped after step {stop.step}.[/] {saved}Resume with:\n  "
                f"tunesmith {' '.join(words)} --resume",
                highlight=False,
            )
        raise SystemExit(stop.exit_code) from None


def _train_workers(args: argparse.Namespace) -> Any:
    """Start --nproc training processes, pass Ctrl-C/SIGTERM on to them once, and read back what they wrote."""
    import json
    import os
    import signal
    import subprocess

    from tunesmith.run import read_summary
    from tunesmith.train.distributed import launch_command

    config = config_from_args(args)
    argv = list(args.argv)
    if argv and argv[0] == "run":
        argv[0] = "train"  # the workers train; this process compares afterwards
    command, env = launch_command(argv, args.nproc)
    err.print(f"Launching {args.nproc} training processes: {' '.join(command)}", highlight=False)
    # A session of their own: Ctrl-C reaches this process only, which passes it on exactly once.
    workers = subprocess.Popen(command, env=os.environ | env | {"TUNESMITH_LAUNCHER": "1"}, start_new_session=True)
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        if not received:
            received.append(signum)
            workers.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = workers.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    run_dir = config.run_dir
    if code == 0 and (run_dir / "train_summary.json").is_file():
        return read_summary(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    if manifest.get("status") == "interrupted" or received:
        words = resume_command(argv)
        err.print(f"[yellow]Stopped.[/] Resume with:\n  tunesmith {' '.join(words)} --resume", highlight=False)
        raise SystemExit(128 + (received[0] if received else signal.SIGTERM))
    raise TunesmithError(f"The training processes failed (exit status {code}); their messages are above.")


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from tunesmith.train import distributed

    summary = _train(args)
    if distributed.launched() and (os.environ.get("RANK", "0") != "0" or os.environ.get("TUNESMITH_LAUNCHER")):
        return 0  # a worker: the main worker (or the launching tunesmith) reports
    if args.json:
        _print_json(asdict(summary))
    else:
        out.print(
            f"[green]Trained[/] {summary.steps} steps in {summary.seconds:.0f}s "
            f"({summary.tokens_per_second:.0f} tokens/s); loss {summary.first_loss:.3f} -> {summary.final_loss:.3f}. "
            f"Run: {summary.run_dir}\nNext: tunesmith compare {summary.run_dir}   or   "
            f"tunesmith generate {summary.run_dir} --prompt '...'"
        )
    return 0


def print_comparison(summary: Any) -> None:
    table = Table(title=f"Base vs tuned on {summary.items} held-out examples ({summary.run_dir})")
    for column in ("metric", "base", "tuned", "diff", "95% CI", "p", "test"):
        table.add_column(column, justify="left" if column in ("metric", "test") else "right")
    for name, r in summary.metrics.items():
        if "ci_low" not in r:
            table.add_row(name, f"{r['base']:.3f}", f"{r['tuned']:.3f}", f"{r['diff']:+.3f}", "", "", "")
            continue
        mark = "*" if r["significant"] else ""
        table.add_row(
            name, f"{r['base']:.3f}", f"{r['tuned']:.3f}", f"{r['diff']:+.3f}{mark}",
            f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]", f"{r['p_value']:.3g}", r["test"],
        )  # fmt: skip
    out.print(table)
    out.print(
        f"On {summary.primary}: {summary.wins} wins, {summary.ties} ties, {summary.losses} losses; "
        f"{len(summary.flipped['fixed'])} fixed, {len(summary.flipped['broken'])} broken. (* = CI excludes 0)"
    )
    out.print(f"[bold]Verdict:[/] {summary.verdict}", highlight=False)
    for kind in ("fixed", "broken"):
        for row in summary.flipped[kind][:2]:
            out.print(f"[bold]{kind}[/] (line {row['line']}): {row['prompt'][:200]}", highlight=False)
            out.print(f"  reference: {row['reference'][:200]}", highlight=False)
            out.print(f"  base:      {row['base'][:200]}", highlight=False)
            out.print(f"  tuned:     {row['tuned'][:200]}", highlight=False)


def cmd_compare(args: argparse.Namespace) -> int:
    from tunesmith.evaluate.compare import compare_run
    from tunesmith.evaluate.report import write_report

    summary = compare_run(args.run, limit=args.limit, console=err, split=args.split)
    report = write_report(args.run)
    if args.json:
        _print_json(asdict(summary))
    else:
        print_comparison(summary)
        out.print(f"Report: {report}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tunesmith.evaluate.compare import eval_run

    summary = eval_run(args.run, split=args.split, base=args.base, limit=args.limit, console=err)
    if args.json:
        _print_json(asdict(summary))
        return 0
    table = Table(title=f"{summary.model} model on {summary.items} {summary.split} examples ({summary.run_dir})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in summary.metrics.items():
        table.add_row(name, f"{value:.4f}")
    if summary.loss is not None:
        table.add_row("loss", f"{summary.loss:.4f}")
        table.add_row("perplexity", f"{summary.perplexity:.3f}")
    out.print(table)
    if summary.field_accuracy:
        out.print("Per-field accuracy: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.field_accuracy.items()))
    if summary.confusion:
        out.print("Confusion (reference -> predicted): " + json.dumps(summary.confusion))
    out.print(f"Predictions: {summary.predictions}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from tunesmith.evaluate.compare import compare_run
    from tunesmith.evaluate.report import write_report

    trained = _train(args)
    err.print(
        f"Trained {trained.steps} steps in {trained.seconds:.0f}s; "
        f"loss {trained.first_loss:.3f} -> {trained.final_loss:.3f}"
    )
    compared = compare_run(trained.run_dir, console=err)
    report = write_report(trained.run_dir)
    if args.json:
        _print_json({"train": asdict(trained), "compare": asdict(compared), "report": str(report)})
    else:
        print_comparison(compared)
        out.print(f"Report: {report}")
    return 0


def _runs_table(found: list[dict[str, Any]], root: str) -> Table:
    table = Table(title=f"Runs in {root}")
    for column in ("name", "model", "method", "status", "steps", "best val", "started"):
        table.add_column(column, justify="right" if column in ("steps", "best val") else "left")
    for run in found:
        best = run["best"]
        shown = f"{best['metric']} {best['value']:.4f} @{best['step']}" if best and best["value"] is not None else "-"
        table.add_row(
            run["name"],
            str(run["model"]),
            str(run["method"]),
            run["status"],
            str(run["steps"]),
            shown,
            str(run["started"] or "-"),
        )
    return table


def cmd_runs(args: argparse.Namespace) -> int:
    from tunesmith.runs import describe, find_runs, resolve_run

    if args.action == "show":
        if not args.name:
            raise TunesmithError("tunesmith runs show NAME: give the run's name or directory.")
        run = describe(resolve_run(args.name, Path(args.dir)))
        if args.json:
            _print_json(run)
            return 0
        for key in ("name", "dir", "model", "method", "status", "steps", "loss", "best", "started", "checkpoints"):
            out.print(f"[bold]{key:12}[/] {run[key]}", highlight=False)
        for key in ("seed", "git_rev", "finished", "resumed"):
            if key in run["manifest"]:
                out.print(f"[bold]{key:12}[/] {run['manifest'][key]}", highlight=False)
        if (Path(run["dir"]) / "loss.png").is_file():
            out.print(f"[bold]{'loss curves':12}[/] {Path(run['dir']) / 'loss.png'}", highlight=False)
        return 0
    found = find_runs(Path(args.dir))
    if args.json:
        _print_json([{k: v for k, v in r.items() if k != "manifest"} for r in found])
    elif not found:
        out.print(f"No runs in {args.dir}. Start one with: tunesmith train CONFIG")
    else:
        out.print(_runs_table(found, args.dir))
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from tunesmith.runs import follow, resolve_run

    run_dir = resolve_run(args.run, Path(args.dir))
    for record in follow(run_dir, args.interval):
        if args.json:
            print(json.dumps(record), flush=True)
        elif record.get("type") == "val":
            shown = " ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float))
            out.print(f"step {record['step']:>6} [cyan]val[/] {shown}" + (" (best)" if record.get("best") else ""))
        elif record.get("type") == "event":
            out.print(f"step {record['step']:>6} [yellow]{record.get('event')}[/]")
        else:
            out.print(
                f"step {record['step']:>6} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                f"gnorm {record.get('grad_norm') or 0:.3f} {record.get('tokens_per_s', 0):.0f} tok/s",
                highlight=False,
            )
    status = json.loads((run_dir / "manifest.json").read_text()).get("status")
    out.print(f"Run {run_dir} is {status}.")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tunesmith.data.formats import Message
    from tunesmith.evaluate.generate import generate, load_run

    if bool(args.prompt) == bool(args.prompts):
        raise TunesmithError("Give exactly one of --prompt TEXT or --prompts FILE.")
    if args.prompt:
        prompts = [(Message("user", args.prompt),)]
    else:
        prompts = [_prompt_of(c) for c in _read_prompt_file(Path(args.prompts))]
    loaded = load_run(args.run, base=args.base)
    answers = generate(loaded.model, loaded.tokenizer, prompts, args.max_new_tokens, args.batch_size)
    if args.json:
        _print_json([{"prompt": p[-1].content, "answer": a} for p, a in zip(prompts, answers, strict=True)])
    else:
        for messages, answer in zip(prompts, answers, strict=True):
            if len(prompts) > 1:
                out.print(f"[bold]> {messages[-1].content}[/]")
            out.print(answer, highlight=False)
    return 0


def _read_prompt_file(path: Path) -> list[Any]:
    """Prompts as JSONL records: {"prompt": ...}, {"messages": [...]} (answers optional) or plain lines."""
    from tunesmith.data.formats import Conversation, Message

    if path.suffix.lower() in (".txt", ""):
        if not path.is_file():
            raise TunesmithError(f"Prompt file {path} not found.")
        return [
            Conversation(messages=(Message("user", line),)) for line in path.read_text().splitlines() if line.strip()
        ]
    conversations = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise TunesmithError(f"{path}:{number}: invalid JSON ({exc.msg}).") from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            conversations.append(Conversation(messages=(Message("user", record["prompt"]),), line=number))
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            turns = tuple(Message(m["role"], m["content"]) for m in record["messages"])
            conversations.append(Conversation(messages=turns, line=number))
        else:
            raise TunesmithError(f'{path}:{number}: expected {{"prompt": ...}} or {{"messages": [...]}}.')
    return conversations


def _prompt_of(conversation: Any) -> tuple:
    """The part of a conversation that asks: drop a trailing answer if the file included one."""
    messages = conversation.messages
    return messages[:-1] if messages and messages[-1].role == "assistant" else messages


def print_check(report: Any) -> None:
    verdict = "[green]no errors[/]" if report.ok else f"[red]{len(report.errors)} error(s)[/]"
    out.print(
        f"[bold]{report.path}[/]: {report.examples} examples ({report.format}), {verdict}, "
        f"{len(report.warnings)} warning(s)"
    )
    unit = "record" if Path(report.path).suffix.lower() == ".json" else "line"  # a .json file counts records
    for error in report.errors[:50]:
        where = f"{unit} {error['line']}" if error["line"] else "file"
        out.print(f"  [red]error[/] {where}: {escape(error['message'])}", highlight=False)
    for warning in report.warnings:
        out.print(f"  [yellow]{warning['code']}[/]: {escape(warning['message'])}", highlight=False)
    if report.token_lengths:
        t = report.token_lengths
        out.print(
            f"  tokens: min {t['min']}, median {t['median']}, p95 {t['p95']}, max {t['max']}; "
            f"{t['truncated']} over {t['max_length']}"
        )
    if report.class_balance:
        out.print("  classes: " + ", ".join(f"{escape(str(k))}: {v}" for k, v in report.class_balance.items()))
    d = report.diversity
    out.print(
        f"  diversity: distinct-1 {d.get('distinct_1')}, distinct-2 {d.get('distinct_2')}, largest "
        f"near-duplicate cluster {d.get('largest_near_duplicate_cluster_share', 0):.1%} of the data"
    )


def cmd_data_check(args: argparse.Namespace) -> int:
    from tunesmith.data.check import CheckOptions, check_data

    tokenizer = None
    if args.model:
        from tunesmith.data.tokenize import use_chat_template
        from tunesmith.models import load_tokenizer, resolve_model_path

        tokenizer = load_tokenizer(resolve_model_path(args.model))
        use_chat_template(tokenizer, None)
    options = CheckOptions(
        max_length=args.max_length,
        near_threshold=args.near_threshold,
        imbalance_ratio=args.imbalance_ratio,
        label_field=args.label_field,
    )
    report = check_data(args.data, args.format, tokenizer, options, args.against)
    if args.json:
        _print_json(report.to_dict())
    else:
        print_check(report)
    return 0 if report.ok else 1


def cmd_data_split(args: argparse.Namespace) -> int:
    from tunesmith.data.split import split_file

    result = split_file(
        args.data,
        args.out,
        args.val,
        args.test,
        args.seed,
        args.stratify,
        args.format,
        args.near_threshold,
        args.overwrite,
    )
    if args.json:
        _print_json(asdict(result))
    else:
        out.print(
            f"Split into {result.out}: "
            + ", ".join(f"{k} {v}" for k, v in result.counts.items())
            + f"; {result.groups_kept_together} duplicate group(s) kept inside one split; leakage "
            + ", ".join(f"{k}: {v['exact']} exact / {v['near_duplicate']} near" for k, v in result.leakage.items())
        )
    return 0


def cmd_data_review(args: argparse.Namespace) -> int:
    from rich.panel import Panel

    from tunesmith.data import review as rv

    data = Path(args.data)
    if args.apply:
        summary = rv.apply_review(data, Path(args.out) if args.out else None, args.overwrite)
        if args.json:
            _print_json(asdict(summary))
        else:
            out.print(
                f"Wrote {summary.written}: verdicts {summary.verdicts}; acceptance by class "
                f"{summary.acceptance_by_class}. The original {data} is unchanged."
            )
        return 0
    if args.import_sheet:
        count = rv.import_sheet(data, Path(args.import_sheet))
        out.print(f"Imported {count} verdict(s) into {rv.verdict_path(data)}.")
        return 0
    items = rv.sample_items(data, args.sample, args.seed, args.label_field)
    if args.export:
        count = rv.export_sheet(data, items, Path(args.export), args.overwrite)
        out.print(
            f"Exported {count} example(s) to {args.export}: fill verdict (accept/reject/edit), note and "
            f"edited_answer, then run: tunesmith data review {data} --import {args.export}"
        )
        return 0

    def show(item: Any, position: int, total: int) -> None:
        body = f"[bold]prompt[/]\n{escape(rv.prompt_text(item.conversation))}\n\n[bold]answer[/]\n" + escape(
            rv.answer_text(item.conversation)
        )
        label = f"  class {escape(item.label)}" if item.label else ""
        out.print(Panel(body, title=f"{position}/{total}  line {item.conversation.line}{label}"))

    recorded = rv.review(data, items, input, show, lambda text: out.print(text, highlight=False))
    summary = rv.summarise(data, items)
    if args.json:
        _print_json(asdict(summary))
    else:
        out.print(
            f"Recorded {recorded} verdict(s) in {rv.verdict_path(data)}; {summary.remaining} of "
            f"{summary.sampled} sampled left. Run again to resume, or --apply to write the cleaned data."
        )
    return 0


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
        _print_json(report)
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
        _print_json(asdict(advice))
        return 0
    out.print(f"[bold]Recommendation: {advice.recommendation}[/]")
    for reason in advice.reasons:
        out.print(f"  - {reason}", highlight=False)
    return 0


def _add_data_commands(sub: Any) -> None:
    data = sub.add_parser(
        "data",
        help="Check, split and review training data.",
        description="The data quality gate: check, split and review a data file.",
    )
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    fmt_help = "Record format; auto detects it [default: auto]."
    near_help = "Jaccard similarity (word 5-grams) at which two examples count as near duplicates [default: 0.8]."

    check = data_sub.add_parser(
        "check",
        help="Report errors, duplicates, conflicts, lengths, balance, diversity, hygiene, leakage.",
        description="Check a data file before training. Exit status: 0 no errors (warnings allowed), 1 errors, "
        "2 the file cannot be read.",
    )
    check.add_argument("data", help="Data file (JSONL, JSON, CSV or Parquet).")
    check.add_argument("--model", help="Model whose tokenizer and chat template measure token lengths.")
    check.add_argument(
        "--max-length", type=int, default=1024, help="Token limit for truncation counts [default: 1024]."
    )
    check.add_argument("--label-field", help="Record field holding the class label (else detected from answers).")
    check.add_argument("--against", help="Another data file (e.g. the test split) to measure leakage against.")
    check.add_argument("--format", default="auto", help=fmt_help)
    check.add_argument("--near-threshold", type=float, default=0.8, help=near_help)
    check.add_argument(
        "--imbalance-ratio",
        type=float,
        default=3.0,
        help="Largest/smallest class ratio above which to warn [default: 3.0].",
    )
    check.add_argument("--json", action="store_true", help="Print the report as JSON on stdout.")
    check.set_defaults(func=cmd_data_check)

    split = data_sub.add_parser(
        "split",
        help="Split into train/val/test, duplicates kept together, classes stratified.",
        description="Deterministic, group-aware, stratified split. Writes train.jsonl, val.jsonl, test.jsonl "
        "and split.json (row hashes, counts, leakage).",
    )
    split.add_argument("data", help="Data file to split.")
    split.add_argument("--out", required=True, help="Directory for the split files.")
    split.add_argument("--val", type=float, default=0.1, help="Share for validation [default: 0.1].")
    split.add_argument("--test", type=float, default=0.1, help="Share for test [default: 0.1].")
    split.add_argument("--stratify", help="Record field holding the class label (else detected from answers).")
    split.add_argument("--seed", type=int, default=42, help="Seed; the same seed gives the same split [default: 42].")
    split.add_argument("--format", default="auto", help=fmt_help)
    split.add_argument("--near-threshold", type=float, default=0.8, help=near_help)
    split.add_argument("--overwrite", action="store_true", help="Replace split files already in --out.")
    split.add_argument("--json", action="store_true", help="Print the result as JSON on stdout.")
    split.set_defaults(func=cmd_data_split)

    review = data_sub.add_parser(
        "review",
        help="Review a sample by hand: accept, reject or edit; resumable.",
        description="Show a class-stratified sample one example at a time. Verdicts go to <data>.review.jsonl "
        "beside the data (the data file is never changed); run again to resume. " + KEYS_DOC,
    )
    review.add_argument("data", help="Data file to review.")
    review.add_argument("--sample", type=int, default=50, help="Examples to sample for review [default: 50].")
    review.add_argument("--seed", type=int, default=42, help="Seed of the sample [default: 42].")
    review.add_argument("--label-field", help="Record field holding the class label (else detected from answers).")
    review.add_argument(
        "--apply",
        action="store_true",
        help="Write the cleaned data (rejects removed, edits applied) and a summary; no review.",
    )
    review.add_argument("--out", help="With --apply: output file [default: <data>.reviewed.jsonl].")
    review.add_argument(
        "--overwrite", action="store_true", help="With --apply or --export: replace an existing output file."
    )
    review.add_argument("--export", metavar="SHEET.csv", help="Write the sample to a spreadsheet for someone else.")
    review.add_argument(
        "--import",
        dest="import_sheet",
        metavar="SHEET.csv",
        help="Record the verdicts filled in an exported spreadsheet.",
    )
    review.add_argument("--json", action="store_true", help="Print the summary as JSON on stdout.")
    review.set_defaults(func=cmd_data_review)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunesmith",
        description="Fine-tune a language model for your domain, task, style or output format.",
    )
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks for errors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="Train from a config or flags; writes a run directory.",
        description="Train a model. Example: tunesmith train --model M --data D --method lora --max-steps 50 "
        "--out runs/x, or tunesmith train config.yaml --set train.lr=1e-4.",
    )
    _add_config_options(train)
    train.set_defaults(func=cmd_train)

    run = sub.add_parser(
        "run",
        help="Train, then compare base and tuned model on the held-out test split.",
        description="The whole pipeline from one config: train, then generate on the test split with the "
        "base and the tuned model and print the comparison.",
    )
    _add_config_options(run)
    run.set_defaults(func=cmd_run)

    compare = sub.add_parser(
        "compare",
        help="Base versus tuned on a run's test split, with confidence intervals and a verdict; writes the report.",
        description="Generate with the base and the tuned model on the same held-out items and score both with "
        "eval.metrics. Per metric: both values, the paired difference with a bootstrap 95%% CI, a p-value "
        "(McNemar's exact test for right/wrong metrics, a paired permutation test otherwise), win/tie/loss counts, "
        "the items that flipped, and a verdict that says when nothing is significant. Also writes "
        "eval/report.html (self-contained) and eval/report.json.",
    )
    compare.add_argument("run", help="Run directory, e.g. runs/quickstart.")
    compare.add_argument("--split", default="test", choices=["test", "val", "train"], help="Split [default: test].")
    compare.add_argument("--limit", type=int, default=None, help="Examples to use [default: eval.limit].")
    compare.add_argument("--json", action="store_true", help="Print the result as JSON on stdout.")
    compare.set_defaults(func=cmd_compare)

    evaluate = sub.add_parser(
        "eval",
        help="Score one model (tuned, or --base) on a run's split; predictions saved.",
        description="Generate (greedy) on a run's split and score with eval.metrics: exact match, token F1, "
        "ROUGE-L, chrF, BLEU, JSON validity, JSON-schema conformity (eval.schema_path), per-field accuracy, "
        "accuracy / macro-F1 / confusion matrix, custom module:function metrics; plus teacher-forced loss and "
        "perplexity. Writes eval/predictions-SPLIT-MODEL.jsonl and eval/eval-SPLIT-MODEL.json.",
    )
    evaluate.add_argument("run", help="Run directory, e.g. runs/quickstart.")
    evaluate.add_argument("--split", default="test", choices=["test", "val", "train"], help="Split [default: test].")
    evaluate.add_argument("--base", action="store_true", help="Score the base model instead of the tuned one.")
    evaluate.add_argument("--limit", type=int, default=None, help="Examples to use [default: eval.limit].")
    evaluate.add_argument("--json", action="store_true", help="Print the result as JSON on stdout.")
    evaluate.set_defaults(func=cmd_eval)

    runs = sub.add_parser(
        "runs",
        help="List runs, or show one (status, steps, best val metric, checkpoints).",
        description="List the runs under --dir (name, model, method, status, steps, best validation metric, "
        "start time), or `runs show NAME` for one run's details. 'crashed' means the manifest says running but "
        "its process is gone: resume it with `tunesmith train CONFIG --resume`.",
    )
    runs.add_argument("action", nargs="?", choices=["list", "show"], default="list", help="list (default) or show.")
    runs.add_argument("name", nargs="?", help="With show: the run's name or directory.")
    runs.add_argument("--dir", default="runs", help="Directory holding the runs [default: runs].")
    runs.add_argument("--json", action="store_true", help="Print as JSON on stdout.")
    runs.set_defaults(func=cmd_runs)

    watch = sub.add_parser(
        "watch",
        help="Follow a run's metrics live from another terminal.",
        description="Print a run's metrics (train steps, validations, events) as they are written, until the run "
        "completes, fails or is interrupted.",
    )
    watch.add_argument("run", help="Run name (under --dir) or run directory.")
    watch.add_argument("--dir", default="runs", help="Directory holding the runs [default: runs].")
    watch.add_argument("--interval", type=float, default=2.0, help="Seconds between polls [default: 2].")
    watch.add_argument("--json", action="store_true", help="Print each record as a JSON line.")
    watch.set_defaults(func=cmd_watch)

    gen = sub.add_parser(
        "generate",
        help="Generate with a run's tuned (or base) model.",
        description="Generate answers with the same chat rendering as training.",
    )
    gen.add_argument("run", help="Run directory, e.g. runs/quickstart.")
    gen.add_argument("--prompt", help="One user message to answer.")
    gen.add_argument("--prompts", help="File of prompts: JSONL with prompt or messages, or one prompt per .txt line.")
    gen.add_argument("--base", action="store_true", help="Answer with the base model instead of the tuned one.")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="Most tokens per answer [default: 128].")
    gen.add_argument("--batch-size", type=int, default=8, help="Prompts generated together [default: 8].")
    gen.add_argument("--json", action="store_true", help="Print prompts and answers as JSON on stdout.")
    gen.set_defaults(func=cmd_generate)
    _add_data_commands(sub)
    from tunesmith.deploy.commands import add_commands

    add_commands(sub)

    plan = sub.add_parser(
        "plan",
        help="Estimate memory, time and cost before training; recommend a technique.",
        description="Estimate peak memory (weights, gradients, optimizer, activations, loss buffers, CUDA context) "
        "in the dtype the run will use, FLOPs, time and cost per device from the model's config alone, and "
        "recommend a technique for your GPU. "
        "--measure runs a few real steps here to check the estimate.",
    )
    _add_config_options(plan)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except TunesmithError as exc:
        if args.debug:
            raise
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
