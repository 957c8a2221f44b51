"""`tunesmith data check`, `split` and `review`: the data quality gate before training."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.text import Text

from tunesmith.cli.common import config_default, out, print_json
from tunesmith.data.check import CheckOptions, check_data, shown_masks
from tunesmith.data.formats import position_word
from tunesmith.data.review import KEYS_HELP
from tunesmith.errors import TunesmithError

FORMAT = config_default("data.format")
FORMAT_HELP = f"Record format; auto detects it [default: {FORMAT}]."
NEAR = config_default("data.near_threshold")
NEAR_HELP = (
    "How alike two examples must be to count as near duplicates: Jaccard similarity of character 5-grams for "
    "examples of ~30+ words, a budget of (1 - value) x 160 differing 5-grams for shorter ones (one changed word at "
    f"0.8); their answers must agree too [default: {NEAR}]."
)


def print_check(report: Any) -> None:
    verdict = "[green]no errors[/]" if report.ok else f"[red]{len(report.errors)} error(s)[/]"
    noun = {"pair": "preference pairs", "kto": "KTO rows"}.get(report.kind, "examples")
    out.print(
        f"[bold]{report.path}[/]: {report.examples} {noun} (format {report.format}), {verdict}, "
        f"{len(report.warnings)} warning(s)"
    )
    unit = position_word(report.path)
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
    if report.tools:
        t = report.tools
        out.print(
            f"  tools: {t['rows_with_tools']} rows with tools ({t['rows_without_tools']} without), {t['tool_calls']} "
            f"calls in {t['tool_turns']} turns ({t['parallel_turns']} parallel), {t['tool_results']} results, "
            f"{t['no_call_answers']} last answers without a call, {t['reasoning_turns']} turns with reasoning"
        )
    if report.rewards:
        r = report.rewards
        needs = f"{', '.join(r['need_reference'])} need" if r["need_reference"] else "none needs"
        out.print(f"  rewards: {needs} a reference answer; {r['rows_without_reference']} rows have none")
    p = report.preference
    if p and report.kind == "pair":
        out.print(
            f"  pairs: chosen longer than rejected in {p['chosen_longer_share']:.0%} (warn above "
            f"{p['length_bias_share']:.0%}), mean length ratio chosen/rejected {p['mean_length_ratio']:.2f}; "
            f"{p['identical']} identical, {p['near_identical']} near-identical, {len(p['contradicting'])} contradicting"
        )
    if p and report.kind == "kto":
        out.print(
            f"  labels: {p['desirable']} desirable, {p['undesirable']} undesirable "
            f"({p['desirable_share']:.0%} desirable; warn when a side is under {p['kto_min_share']:.0%})"
        )
    if report.class_balance:
        out.print("  classes: " + ", ".join(f"{escape(str(k))}: {v}" for k, v in report.class_balance.items()))
    d = report.diversity
    out.print(
        f"  diversity: distinct-1 {d.get('distinct_1')}, distinct-2 {d.get('distinct_2')}, largest "
        f"near-duplicate cluster {d.get('largest_near_duplicate_cluster_share', 0):.1%} of the data"
    )


def print_masks(examples: list[dict[str, Any]], unit: str) -> None:
    """Rendered examples with the learned tokens in green and between « »."""
    out.print("[bold]What is learned[/] (tokens that carry loss in [green]green «between guillemets»[/]):")
    for example in examples:
        text = Text(f"{unit} {example['line']}:\n", style="bold")
        for piece, learned in example["pieces"]:
            text.append(f"«{piece}»" if learned else piece, style="green" if learned else "dim")
        out.print(text)


def _reference_rewards(text: str) -> list[str]:
    """The rewards of a --rewards list that score against the reference (validated as rl.rewards is)."""
    from tunesmith.config import RlConfig, parse_value
    from tunesmith.rewards import reference_rewards

    try:
        rl = RlConfig.model_validate({"rewards": parse_value(text)})
    except ValueError as exc:
        raise TunesmithError(f"--rewards {text!r}: not an rl.rewards list ({exc}).") from None
    return reference_rewards(rl.rewards)


def cmd_data_check(args: argparse.Namespace) -> int:
    from tunesmith.models import load_chat_tokenizer

    if args.show_masks and not args.model:
        raise TunesmithError("--show-masks needs --model: the masks come from that model's tokenizer and template.")
    tokenizer = load_chat_tokenizer(args.model) if args.model else None
    options = CheckOptions(
        max_length=args.max_length,
        near_threshold=args.near_threshold,
        imbalance_ratio=args.imbalance_ratio,
        label_field=args.label_field,
        length_bias_share=args.length_bias_share,
        reasoning=args.reasoning,
    )
    if args.rewards:
        options.reference_rewards = _reference_rewards(args.rewards)
    report = check_data(args.data, args.format, tokenizer, options, args.against)
    masks = shown_masks(args.data, args.format, tokenizer, args.show_masks, options) if args.show_masks else []
    if args.json:
        print_json(report.to_dict() | ({"masks": masks} if args.show_masks else {}))
    else:
        print_check(report)
        if masks:
            print_masks(masks, position_word(report.path))
    return 0 if report.ok else 1


def cmd_data_split(args: argparse.Namespace) -> int:
    from tunesmith.data.split import split_file

    result = split_file(
        args.data,
        args.out,
        val=args.val,
        test=args.test,
        seed=args.seed,
        stratify=args.stratify,
        fmt=args.format,
        threshold=args.near_threshold,
        overwrite=args.overwrite,
    )
    if args.json:
        print_json(asdict(result))
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
            print_json(asdict(summary))
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
        print_json(asdict(summary))
    else:
        out.print(
            f"Recorded {recorded} verdict(s) in {rv.verdict_path(data)}; {summary.remaining} of "
            f"{summary.sampled} sampled left. Run again to resume, or --apply to write the cleaned data."
        )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser(
        "data",
        help="Check, split and review training data.",
        description="The data quality gate: check, split and review a data file.",
    )
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    _add_check(data_sub)
    _add_split(data_sub)
    _add_review(data_sub)


def _add_check(data_sub: argparse._SubParsersAction) -> None:
    check = data_sub.add_parser(
        "check",
        help="Report errors, duplicates, conflicts, lengths, balance, diversity, hygiene, leakage.",
        description="Check a data file before training. Exit status: 0 no errors (warnings allowed), 1 errors, "
        "2 the file cannot be read.",
    )
    check.add_argument("data", help="Data file (JSONL, JSON, CSV or Parquet).")
    check.add_argument("--model", help="Model whose tokenizer and chat template measure token lengths.")
    max_length = config_default("data.max_length")
    check.add_argument(
        "--max-length", type=int, default=max_length, help=f"Token limit for truncation counts [default: {max_length}]."
    )
    check.add_argument("--label-field", help="Record field holding the class label (else detected from answers).")
    check.add_argument("--against", help="Another data file (e.g. the test split) to measure leakage against.")
    check.add_argument("--format", default=FORMAT, help=FORMAT_HELP)
    check.add_argument("--near-threshold", type=float, default=NEAR, help=NEAR_HELP)
    check.add_argument(
        "--imbalance-ratio",
        type=float,
        default=CheckOptions.imbalance_ratio,
        help=f"Largest/smallest class ratio above which to warn [default: {CheckOptions.imbalance_ratio}].",
    )
    check.add_argument(
        "--length-bias-share",
        type=float,
        default=CheckOptions.length_bias_share,
        help="Preference pairs: warn when the chosen answer is the longer one in more than this share of pairs "
        f"(DPO learns length when it separates the answers) [default: {CheckOptions.length_bias_share}].",
    )
    check.add_argument(
        "--rewards",
        help="objective grpo: the rl.rewards list (YAML, e.g. '[{metric: json_fields}, {regex: ...}]'); the check "
        "says which need a reference answer and whether every row has one.",
    )
    check.add_argument(
        "--show-masks",
        type=int,
        default=0,
        metavar="N",
        help="Print the first N examples as --model's template renders them, the tokens that carry loss marked.",
    )
    reasoning = config_default("data.reasoning")
    check.add_argument(
        "--reasoning",
        choices=["learn", "context"],
        default=reasoning,
        help=f"Assistant turns' reasoning: learned, or context without loss [default: {reasoning}].",
    )
    check.add_argument("--json", action="store_true", help="Print the report as JSON on stdout.")
    check.set_defaults(func=cmd_data_check)


def _add_split(data_sub: argparse._SubParsersAction) -> None:
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
    split.add_argument("--format", default=FORMAT, help=FORMAT_HELP)
    split.add_argument("--near-threshold", type=float, default=NEAR, help=NEAR_HELP)
    split.add_argument("--overwrite", action="store_true", help="Replace split files already in --out.")
    split.add_argument("--json", action="store_true", help="Print the result as JSON on stdout.")
    split.set_defaults(func=cmd_data_split)


def _add_review(data_sub: argparse._SubParsersAction) -> None:
    review = data_sub.add_parser(
        "review",
        help="Review a sample by hand: accept, reject or edit; resumable.",
        description="Show a class-stratified sample one example at a time. Verdicts go to <data>.review.jsonl "
        "beside the data (the data file is never changed); run again to resume. " + KEYS_HELP,
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
