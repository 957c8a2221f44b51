"""What every command group of the CLI shares: the consoles, JSON output, and the run-config options.

Config flags are generated from the typed config, so each option's help is the field's own description and
its default the field's own default; nothing here restates one.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console

from tunesmith import trust
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

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def config_default(dotted: str) -> Any:
    """The run config's default for a dotted field, for options of other commands that mean the same thing."""
    return dict(leaf_fields())[dotted].get_default(call_default_factory=True)


def add_config_options(parser: argparse.ArgumentParser) -> None:
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
    parallel = parser.add_argument_group("data-parallel training (see docs/distributed.md and multi-node)")
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
            # argparse %-formats help: a "%" in a description (e.g. "~30% slower") would print the whole option.
            help=f"{info.description}{one_of} [default: {default}]".replace("%", "%%"),
        )


def add_code_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-code",
        action="store_true",
        help="Run code a run folder's config.yaml names (custom metrics file.py:fn or module:fn, "
        "eval.lm_eval_include_path). Without it such entries run only when named in a config file you pass that "
        "is not a run folder's own, or in a flag; a run folder may come from anyone.",
    )


def grant_code(args: argparse.Namespace) -> None:
    """What code this command line allows: everything under --allow-code, else what it named itself."""
    trust.grant(everything=getattr(args, "allow_code", False))


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Config file, then flags, then --set overrides, validated once.

    Code the file names is allowed when the file is one the user wrote (not a run folder's own config.yaml);
    code named by flags and --set always is: both were typed on this command line.
    """
    grant_code(args)
    tree = read_config_file(args.config) if args.config else {}
    typed: dict[str, Any] = {}
    fields = dict(leaf_fields())
    for key, value in vars(args).items():
        if key.startswith("field:"):
            dotted = key.removeprefix("field:")
            set_dotted(tree, dotted, parse_value(value, fields[dotted]))
            set_dotted(typed, dotted, parse_value(value, fields[dotted]))
    apply_overrides(tree, args.overrides)
    apply_overrides(typed, args.overrides)
    named_here = tree if args.config and not trust.in_run_folder(args.config) else typed
    trust.grant(value for _, value in trust.code_entries(named_here))
    return build_config(tree, source=args.config or "command line")
