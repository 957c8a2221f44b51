"""The `tunesmith` command: parse arguments, call one stage function, print its result.

No work happens here. Each command group is a module of this package whose `add_commands` registers its
subcommands; this module only dispatches. User errors print without a traceback unless --debug is given.
"""

from __future__ import annotations

import argparse
import sys

from rich.markup import escape

from tunesmith.cli import data, deploy, evaluate, plan, train, ui
from tunesmith.cli.common import err
from tunesmith.errors import TunesmithError

# In the order `tunesmith --help` lists their commands.
GROUPS = (train, evaluate, data, deploy, plan, ui)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunesmith",
        description="Fine-tune a language model for your domain, task, style or output format.",
    )
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks for errors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(sub)
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
