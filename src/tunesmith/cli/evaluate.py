"""`tunesmith compare`, `eval`, `generate`, `runs` and `watch`: look at what a run learned and how it is doing."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from tunesmith import trust
from tunesmith.cli.common import add_code_option, config_default, err, grant_code, out, print_json
from tunesmith.errors import TunesmithError
from tunesmith.rundir import RunDir

if TYPE_CHECKING:
    from tunesmith.evaluate.compare import CompareSummary


def _versus_table(title: str, label: str, metrics: dict[str, dict[str, Any]]) -> Table:
    table = Table(title=title)
    for column in ("metric", label, "tuned", "diff", "95% CI", "p", "test"):
        table.add_column(column, justify="left" if column in ("metric", "test") else "right")
    for name, r in metrics.items():
        if "ci_low" not in r:
            table.add_row(name, f"{r['base']:.3f}", f"{r['tuned']:.3f}", f"{r['diff']:+.3f}", "", "", "")
            continue
        mark = "*" if r["significant"] else ""
        p = r["p_text"] + (f" (Holm {r['p_holm']:.3g})" if "p_holm" in r else "")
        table.add_row(
            name, f"{r['base']:.3f}", f"{r['tuned']:.3f}", f"{r['diff']:+.3f}{mark}",
            f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]", p, r["test"],
        )  # fmt: skip
    return table


def print_comparison(summary: CompareSummary) -> None:
    """The tuned model against each prompting baseline, then preference accuracy, timings and the verdict."""
    from tunesmith.evaluate.compare import PER_TOKEN

    where = f"{summary.items} held-out examples ({summary.run_dir})"
    against = [(f"Base model {v.label}", v) for v in summary.baselines.values()]
    if summary.start is not None:
        against.append((f"Starting run {summary.start.label.removeprefix('start ')}", summary.start))
    for title, versus in against:
        label = versus.label
        out.print(_versus_table(f"{title} vs tuned on {where}", label, versus.metrics))
        out.print(
            f"Per item by {versus.decided_by}: {versus.wins} wins, {versus.ties} ties, "
            f"{versus.losses} losses; {len(versus.flipped['fixed'])} fixed, "
            f"{len(versus.flipped['broken'])} broken against {label}."
        )
        for kind in ("fixed", "broken"):
            for row in versus.flipped[kind][:2]:
                out.print(f"[bold]{kind}[/] (line {row['line']}): {row['prompt'][:200]}", highlight=False)
                out.print(f"  reference: {row['reference'][:200]}", highlight=False)
                out.print(f"  {label + ':':10} {row[versus.against][:200]}", highlight=False)
                out.print(f"  tuned:     {row['tuned'][:200]}", highlight=False)
    if summary.preference:
        models = [name for name in ("base", "start", "tuned") if name in summary.preference]
        shares = ", ".join(f"{name} {summary.preference[name]:.3f}" for name in models)
        against = summary.preference["tuned_vs_base"]
        measure = summary.preference.get("measure", PER_TOKEN)
        out.print(
            f"Preference accuracy on {summary.preference['items']} held-out pairs (the chosen answer gets {measure}): "
            f"{shares}; tuned vs "
            f"base {against['diff']:+.3f}, 95% CI [{against['ci_low']:+.3f}, {against['ci_high']:+.3f}], "
            f"{against['p_text']}",
            highlight=False,
        )
    if summary.rewards:
        _print_rewards(summary.rewards, summary.items, summary.split)
    if summary.baselines:  # a reward model's comparison has none: it is scored, never generated from
        out.print(f"(* = {summary.primary}'s CI excludes 0; the others: Holm-adjusted p < 0.05)")
        seconds = ", ".join(f"{name} {value:.1f} s" for name, value in summary.seconds.items())
        out.print(f"Generation time: {seconds}.", highlight=False)
    out.print(f"[bold]Verdict:[/] {summary.verdict}", highlight=False)


def _print_rewards(rewards: dict[str, Any], items: int, split: str) -> None:
    """A grpo run: its rewards on every contestant's answers, and the rewards skipped."""
    names = rewards["rewards"]
    table = Table(title=f"Reward on the {split} split ({items} items; rl.rewards as in training, then combined)")
    for column in ("contestant", "combined", *names, "skipped"):
        table.add_column(column, justify="left" if column == "contestant" else "right")
    for contestant, values in rewards["contestants"].items():
        shown = [values.get(key) for key in ("reward", *(f"reward_{name}" for name in names))]
        table.add_row(contestant, *("-" if v is None else f"{v:.3f}" for v in shown), str(values["skipped"]))
    out.print(table)
    for skipped in rewards["skipped_rewards"]:
        said = f"reward {skipped['reward']} ({skipped['code']}) skipped: {skipped['why']}"
        out.print(said, markup=False, highlight=False)


def _allow_code(args: argparse.Namespace, skipped: tuple[str, ...] = ()) -> None:
    """A run folder's config runs no code unless this command line says --allow-code (`skipped`: fields whose
    code the command skips itself when not allowed)."""
    grant_code(args)
    trust.require_all(RunDir(Path(args.run)).read_config_fields(), skipped)


def cmd_compare(args: argparse.Namespace) -> int:
    from tunesmith.evaluate.report import compare_and_report

    _allow_code(args, skipped=("rl.rewards",))  # a code reward not allowed is skipped, and the comparison says so
    if args.engine == "llamacpp":
        return _compare_export(args)
    summary, report = compare_and_report(args.run, limit=args.limit, split=args.split, console=err)
    if args.json:
        print_json(asdict(summary))
    else:
        print_comparison(summary)
        out.print(f"Report: {report}")
    return 0


def _compare_export(args: argparse.Namespace) -> int:
    from tunesmith.evaluate.parity import parity_run

    summary = parity_run(args.run, args.gguf_type, args.gguf, limit=args.limit, split=args.split, console=err)
    if args.json:
        print_json(asdict(summary))
        return 0
    table = Table(title=f"{summary.gguf} (llama.cpp) against the tuned model on {summary.items} {summary.split} items")
    for column in ("metric", "torch", "export", "diff (95% CI)", "p"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, row in summary.metrics.items():
        interval = f"{row['diff']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
        table.add_row(name, f"{row['torch']:.3f}", f"{row['export']:.3f}", interval, row.get("p_text", ""))
    out.print(table)
    out.print(f"Identical greedy answers: {summary.identical} of {summary.items}")
    out.print(f"Generation: torch {summary.seconds['torch']:.1f} s, llama.cpp {summary.seconds['export']:.1f} s")
    out.print(f"[bold]{summary.verdict}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tunesmith.evaluate.compare import eval_run

    _allow_code(args)
    summary = eval_run(args.run, split=args.split, base=args.base, limit=args.limit, console=err)
    if args.json:
        print_json(asdict(summary))
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
    from tunesmith.watch import describe, find_runs, resolve_run

    if args.action == "show":
        if not args.name:
            raise TunesmithError("tunesmith runs show NAME: give the run's name or directory.")
        run = describe(resolve_run(args.name, Path(args.dir)))
        if args.json:
            print_json(run)
            return 0
        for key in ("name", "dir", "model", "method", "status", "steps", "loss", "best", "started", "checkpoints"):
            out.print(f"[bold]{key:12}[/] {run[key]}", highlight=False)
        for key in ("seed", "git_rev", "finished", "resumed"):
            if key in run["manifest"]:
                out.print(f"[bold]{key:12}[/] {run['manifest'][key]}", highlight=False)
        plot = RunDir(Path(run["dir"])).loss_plot
        if plot.is_file():
            out.print(f"[bold]{'loss curves':12}[/] {plot}", highlight=False)
        return 0
    found = find_runs(Path(args.dir))
    if args.json:
        print_json([{k: v for k, v in r.items() if k != "manifest"} for r in found])
    elif not found:
        out.print(f"No runs in {args.dir}. Start one with: tunesmith train CONFIG")
    else:
        out.print(_runs_table(found, args.dir))
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from tunesmith.watch import follow, resolve_run, run_status

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
    status = run_status(RunDir(run_dir).read_manifest())  # "crashed" when its process is gone
    out.print(f"Run {run_dir} is {status}.")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tunesmith.data.formats import Message
    from tunesmith.evaluate.generate import answer_prompts, read_prompts

    if bool(args.prompt) == bool(args.prompts):
        raise TunesmithError("Give exactly one of --prompt TEXT or --prompts FILE.")
    prompts = [(Message("user", args.prompt),)] if args.prompt else read_prompts(Path(args.prompts))
    answers = answer_prompts(
        args.run, prompts, base=args.base, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )
    if args.json:
        print_json([{"prompt": p[-1].content, "answer": a} for p, a in zip(prompts, answers, strict=True)])
    else:
        for messages, answer in zip(prompts, answers, strict=True):
            if len(prompts) > 1:
                out.print(f"[bold]> {messages[-1].content}[/]")
            out.print(answer, highlight=False)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_compare(sub)
    _add_eval(sub)
    _add_runs(sub)
    _add_watch(sub)
    _add_generate(sub)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    from tunesmith.deploy.gguf_writer import TYPES as GGUF_TYPES

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
    compare.add_argument(
        "--engine",
        choices=["native", "llamacpp"],
        default="native",
        help="native: base versus tuned (the comparison above); llamacpp: the run's GGUF export, run by llama.cpp, "
        "scored beside the tuned model on the same items (identical answers, each metric's difference with its "
        "CI, a verdict that says when the export is worse); writes eval/parity-TYPE.json [default: native].",
    )
    compare.add_argument(
        "--gguf-type",
        default="f16",
        choices=GGUF_TYPES,
        help="With --engine llamacpp: the export's tensor type, exported first if the run has none [default: f16].",
    )
    compare.add_argument("--gguf", default=None, help="With --engine llamacpp: this GGUF file instead of an export.")
    add_code_option(compare)
    compare.set_defaults(func=cmd_compare)


def _add_eval(sub: argparse._SubParsersAction) -> None:
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
    add_code_option(evaluate)
    evaluate.set_defaults(func=cmd_eval)


def _add_runs(sub: argparse._SubParsersAction) -> None:
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


def _add_watch(sub: argparse._SubParsersAction) -> None:
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


def _add_generate(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser(
        "generate",
        help="Generate with a run's tuned (or base) model.",
        description="Generate answers with the same chat rendering as training.",
    )
    gen.add_argument("run", help="Run directory, e.g. runs/quickstart.")
    gen.add_argument("--prompt", help="One user message to answer.")
    gen.add_argument("--prompts", help="File of prompts: JSONL with prompt or messages, or one prompt per .txt line.")
    gen.add_argument("--base", action="store_true", help="Answer with the base model instead of the tuned one.")
    tokens, batch = config_default("eval.max_new_tokens"), config_default("eval.batch_size")
    gen.add_argument("--max-new-tokens", type=int, default=tokens, help=f"Most tokens per answer [default: {tokens}].")
    gen.add_argument("--batch-size", type=int, default=batch, help=f"Prompts generated together [default: {batch}].")
    gen.add_argument("--json", action="store_true", help="Print prompts and answers as JSON on stdout.")
    gen.set_defaults(func=cmd_generate)
