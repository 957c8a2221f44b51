"""`tunesmith train` and `tunesmith run`, and the --nproc launcher that starts their training processes.

An interrupted run exits 130/143 and prints the command that resumes it; the work itself is pipeline.train_run.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from typing import Any

from tunesmith import trust
from tunesmith.cli.common import add_code_option, add_config_options, config_from_args, err, out, print_json
from tunesmith.cli.evaluate import print_comparison
from tunesmith.errors import TunesmithError
from tunesmith.rundir import RunDir


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
    from tunesmith.errors import TrainingInterrupted
    from tunesmith.pipeline import train_run
    from tunesmith.train import distributed

    config = config_from_args(args)
    trust.require_all(config.model_dump())  # before any work, not at the first validation
    if args.nproc > 1 and not distributed.launched():
        return _train_workers(args)
    try:
        return train_run(config, overwrite=args.overwrite, console=err, live=not args.quiet, strategy=args.strategy)
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
    import signal
    import subprocess

    from tunesmith.pipeline import read_summary
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
    layout = RunDir(run_dir)
    if code == 0 and layout.summary.is_file():
        return read_summary(run_dir)
    manifest = layout.read_manifest() if layout.is_run() else {}
    if manifest.get("status") == "interrupted" or received:
        words = resume_command(argv)
        err.print(f"[yellow]Stopped.[/] Resume with:\n  tunesmith {' '.join(words)} --resume", highlight=False)
        raise SystemExit(128 + (received[0] if received else signal.SIGTERM))
    raise TunesmithError(f"The training processes failed (exit status {code}); their messages are above.")


def cmd_train(args: argparse.Namespace) -> int:
    from tunesmith.train import distributed

    summary = _train(args)
    if distributed.launched() and (os.environ.get("RANK", "0") != "0" or os.environ.get("TUNESMITH_LAUNCHER")):
        return 0  # a worker: the main worker (or the launching tunesmith) reports
    if args.json:
        print_json(asdict(summary))
    else:
        out.print(
            f"[green]Trained[/] {summary.steps} steps in {summary.seconds:.0f}s "
            f"({summary.tokens_per_second:.0f} tokens/s); loss {summary.first_loss:.3f} -> {summary.final_loss:.3f}. "
            f"Run: {summary.run_dir}\nNext: tunesmith compare {summary.run_dir}   or   "
            f"tunesmith generate {summary.run_dir} --prompt '...'"
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from tunesmith.pipeline import compare

    trained = _train(args)
    compared, report = compare(trained, err)
    if args.json:
        print_json({"train": asdict(trained), "compare": asdict(compared), "report": str(report)})
    else:
        print_comparison(compared)
        out.print(f"Report: {report}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="Train from a config or flags; writes a run directory.",
        description="Train a model. Example: tunesmith train --model M --data D --method lora --max-steps 50 "
        "--out runs/x, or tunesmith train config.yaml --set train.lr=1e-4.",
    )
    add_config_options(train)
    add_code_option(train)
    train.set_defaults(func=cmd_train)

    run = sub.add_parser(
        "run",
        help="Train, then compare base and tuned model on the held-out test split.",
        description="The whole pipeline from one config: train, then generate on the test split with the "
        "base and the tuned model and print the comparison.",
    )
    add_config_options(run)
    add_code_option(run)
    run.set_defaults(func=cmd_run)
