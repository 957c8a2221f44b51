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
    group = parser.add_argument_group("config fields (override the config file)")
    unique = unique_leaf_names()
    for dotted, info in leaf_fields():
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


def cmd_train(args: argparse.Namespace) -> int:
    from tunesmith.run import train_run

    summary = train_run(config_from_args(args), overwrite=args.overwrite, console=err)
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
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("tuned", justify="right")
    table.add_column("change", justify="right")
    for name, values in summary.metrics.items():
        diff = values["tuned"] - values["base"]
        table.add_row(name, f"{values['base']:.3f}", f"{values['tuned']:.3f}", f"{diff:+.3f}")
    out.print(table)
    if summary.examples:
        first = summary.examples[0]
        out.print(f"[bold]Example prompt:[/] {first['prompt']}")
        out.print(f"[bold]reference:[/] {first['reference']}")
        out.print(f"[bold]base:[/]      {first['base'][:300]}")
        out.print(f"[bold]tuned:[/]     {first['tuned'][:300]}")


def cmd_compare(args: argparse.Namespace) -> int:
    from tunesmith.run import compare_run

    summary = compare_run(args.run, limit=args.limit, console=err)
    if args.json:
        _print_json(asdict(summary))
    else:
        print_comparison(summary)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from tunesmith.run import compare_run, train_run

    trained = train_run(config_from_args(args), overwrite=args.overwrite, console=err)
    err.print(
        f"Trained {trained.steps} steps in {trained.seconds:.0f}s; "
        f"loss {trained.first_loss:.3f} -> {trained.final_loss:.3f}"
    )
    compared = compare_run(trained.run_dir, console=err)
    if args.json:
        _print_json({"train": asdict(trained), "compare": asdict(compared)})
    else:
        print_comparison(compared)
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
        help="Score base and tuned model on a run's test split.",
        description="Generate on a run's test split with base and tuned model and score both.",
    )
    compare.add_argument("run", help="Run directory, e.g. runs/quickstart.")
    compare.add_argument("--limit", type=int, default=None, help="Test examples to use [default: eval.limit].")
    compare.add_argument("--json", action="store_true", help="Print the result as JSON on stdout.")
    compare.set_defaults(func=cmd_compare)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
