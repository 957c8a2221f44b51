"""`tunesmith export`, `serve` and `monitor`: a finished run as files, as a server, and in production."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tunesmith.cli.common import err, out, print_json
from tunesmith.deploy import limits
from tunesmith.errors import TunesmithError


def cmd_export(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from tunesmith.deploy.export import export_run

    with Progress(console=err, transient=True, disable=args.quiet) as bar:
        task = bar.add_task(f"Exporting {args.format}", total=None)
        target = export_run(
            args.run,
            args.format,
            args.out,
            overwrite=args.overwrite,
            gguf_type=args.gguf_type,
            progress=lambda name: bar.update(task, description=f"Writing {name}"),
        )
    out.print(f"Exported {args.format} to {target}")
    hints = {
        "merged": f"Load it with AutoModelForCausalLM.from_pretrained('{target}').",
        "adapter": f"Load it with PeftModel.from_pretrained(base, '{target}'), or vllm serve BASE --enable-lora "
        f"--lora-modules {Path(args.run).name}={target}.",
        "gguf": f"Run it with llama.cpp: llama-cli -m {next(target.glob('*.gguf'), target)} --jinja",
        "ollama": f"Create the Ollama model: cd {target} && ollama create {Path(args.run).name} -f Modelfile",
    }
    out.print(hints[args.format], highlight=False)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_export(sub)
    _add_serve(sub)
    _add_monitor(sub)


def _add_export(sub: argparse._SubParsersAction) -> None:
    from tunesmith.deploy.export import FORMATS
    from tunesmith.deploy.gguf_writer import TYPES

    export = sub.add_parser(
        "export",
        help="Export a finished run: merged HF model, PEFT adapter, GGUF or Ollama.",
        description="Export a finished run as files other tools load. Every export carries the run's chat "
        "template and end-of-turn token, checked to render conversations exactly as training did.",
    )
    export.add_argument("run", help="Run directory, e.g. runs/quickstart.")
    export.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="merged: full model in HF safetensors; adapter: PEFT adapter (PEFT, vLLM); gguf: one GGUF file "
        "(llama.cpp); ollama: GGUF plus a Modelfile.",
    )
    export.add_argument("--out", help="Folder to write [default: RUN/export/FORMAT].")
    export.add_argument(
        "--gguf-type",
        default="q8_0",
        choices=TYPES,
        help="Tensor type of GGUF/Ollama exports: q8_0 (about 1 byte per weight), f16 or f32 [default: q8_0].",
    )
    export.add_argument("--overwrite", action="store_true", help="Replace an existing export folder.")
    export.add_argument("--quiet", action="store_true", help="No progress display.")
    export.set_defaults(func=cmd_export)


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import shlex

    from tunesmith.deploy.guard import allowed_hosts, as_origin

    run_dirs = [Path(run) for run in args.runs]
    api_key = args.api_key or os.environ.get("TUNESMITH_API_KEY")
    cors_origins = [as_origin(origin) for origin in args.cors_origin or []]
    if args.engine == "vllm":
        from tunesmith.deploy.vllm import vllm_available, vllm_command, vllm_env

        command = vllm_command(run_dirs, args.host, args.port, args.max_tokens_limit, cors_origins)
        printable = ("VLLM_API_KEY=*** " if api_key else "") + shlex.join(command)
        if args.dry_run:
            out.print(printable, highlight=False)
            return 0
        if not vllm_available():
            raise TunesmithError(
                "--engine vllm needs vLLM: pip install vllm (Linux with a CUDA GPU). "
                f"The command it would run:\n{printable}"
            )
        err.print(f"Starting vLLM: {printable}", highlight=False)
        os.execvpe(command[0], command, vllm_env(api_key))
        return 0  # execvpe replaces this process; reached only where it is stubbed (tests)
    import uvicorn

    from tunesmith.deploy.engine import Engine
    from tunesmith.deploy.requestlog import RequestLog
    from tunesmith.deploy.serve import create_app, default_log_path

    sizes = {"queue_size": args.queue_size, "max_prompt_tokens": args.max_prompt_tokens}
    sizes["max_tokens_limit"] = args.max_tokens_limit
    with err.status("Loading the model..."):
        if args.engine == "llamacpp":
            from tunesmith.deploy.llamacpp import GgufEngine

            gguf = Path(args.gguf) if args.gguf else None
            engine: Engine = GgufEngine(run_dirs, gguf, args.gguf_type, **sizes)
        else:
            engine = Engine(run_dirs, max_batch=args.max_batch, **sizes)
    log_path = Path(args.log_db) if args.log_db else default_log_path(run_dirs[0])
    hosts = allowed_hosts(args.host, args.allow_host or [])
    app = create_app(
        engine,
        RequestLog(log_path),
        api_key,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens,
        max_body_bytes=args.max_body_bytes,
        docs=args.docs,
        hosts=hosts,
        cors_origins=cors_origins,
    )
    err.print(
        f"Serving {', '.join(engine.models)} on http://{args.host}:{args.port}/v1 "
        f"({'API key required' if api_key else 'no API key'}; prompts up to {engine.max_prompt_tokens} tokens); "
        f"requests logged to {log_path}. Answers to Host {', '.join(sorted(hosts))} (--allow-host adds names)"
        + (f"; browser pages from {', '.join(cors_origins)}" if cors_origins else ""),
        highlight=False,
    )
    # Idle connections stay open past the longest Retry-After: a client that waits as told and reuses its
    # connection would otherwise race the server closing it (uvicorn's default is 5 s) and lose the request.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning" if args.quiet else "info",
        timeout_keep_alive=limits.RETRY_AFTER_MAX_S + 5,
    )
    engine.close()
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from tunesmith.deploy.gguf_writer import TYPES

    serve = sub.add_parser(
        "serve",
        help="Serve runs over an OpenAI-compatible HTTP API (with metrics and a request log).",
        description="Serve one or more runs over an OpenAI-compatible API: /v1/chat/completions and "
        "/v1/completions (streaming with stream=true), /v1/models, /v1/feedback, /health, /metrics "
        "(Prometheus). Several LoRA runs over the same base are served from one copy of it; the `model` "
        "field picks a run by its folder name, or `base` for the base model.",
    )
    serve.add_argument("runs", nargs="+", metavar="RUN", help="Run directories, e.g. runs/quickstart.")
    serve.add_argument(
        "--host", default="127.0.0.1", help="Address to listen on [default: 127.0.0.1; 0.0.0.0 for all]."
    )
    serve.add_argument("--port", type=int, default=8000, help="Port [default: 8000].")
    serve.add_argument(
        "--allow-host",
        action="append",
        metavar="NAME",
        help="A further host name or address clients may use to reach the server (e.g. with --host 0.0.0.0, the "
        "machine's name or IP; '*' for any, behind a proxy that checks names); repeatable. Other Host headers "
        "get 421 (DNS rebinding) [default: the --host address, localhost, 127.0.0.1, ::1].",
    )
    serve.add_argument(
        "--cors-origin",
        action="append",
        metavar="URL",
        help="A web page allowed to call the API from a browser, as scheme://name[:port] (e.g. "
        "http://localhost:3000); repeatable. It gets CORS headers; any other page's Origin gets 403 "
        "[default: none; clients that send no Origin, such as curl and the OpenAI SDKs, are not affected].",
    )
    serve.add_argument(
        "--api-key", help="Require 'Authorization: Bearer KEY' on /v1 calls [default: $TUNESMITH_API_KEY, else none]."
    )
    serve.add_argument(
        "--max-tokens-limit",
        type=_positive,
        default=limits.MAX_TOKENS_LIMIT,
        help=f"Largest max_tokens a request may ask for [default: {limits.MAX_TOKENS_LIMIT}].",
    )
    serve.add_argument(
        "--default-max-tokens",
        type=_positive,
        default=limits.DEFAULT_MAX_TOKENS,
        help=f"max_tokens when a request gives none [default: {limits.DEFAULT_MAX_TOKENS}].",
    )
    serve.add_argument(
        "--max-prompt-tokens",
        type=_positive,
        help="Longest prompt accepted, in tokens; prompt plus max_tokens must still fit the model's context "
        "[default: the run's data.max_length, the longest it was trained on].",
    )
    serve.add_argument(
        "--queue-size",
        type=_positive,
        default=limits.QUEUE_SIZE,
        help="Requests that may wait for the model (not counting those generating); more get 503 with "
        f"Retry-After [default: {limits.QUEUE_SIZE}].",
    )
    serve.add_argument(
        "--max-batch",
        type=_positive,
        default=limits.MAX_BATCH,
        help=f"Most requests generated at once; a waiting one joins when a row is free [default: {limits.MAX_BATCH}].",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=_positive,
        default=limits.MAX_BODY_BYTES,
        help="Largest request body in bytes; a larger one gets 413 before it is read "
        f"[default: {limits.MAX_BODY_BYTES} = {limits.MAX_BODY_BYTES // 2**20} MiB].",
    )
    serve.add_argument(
        "--docs", action="store_true", help="Serve the interactive API docs at /docs, /redoc and /openapi.json."
    )
    serve.add_argument("--log-db", help="SQLite file for the request log [default: RUN/serve/requests.sqlite].")
    serve.add_argument(
        "--engine",
        choices=["native", "llamacpp", "vllm"],
        default="native",
        help="native: this process (CPU or GPU); llamacpp: each run's GGUF export run by llama.cpp in this process, "
        "behind the same API (exported first if missing; one request at a time; no `base`); vllm: hand the same "
        "runs to `vllm serve` [default: native].",
    )
    serve.add_argument(
        "--gguf-type",
        default="f16",
        choices=TYPES,
        help="With --engine llamacpp: the exports' tensor type [default: f16].",
    )
    serve.add_argument("--gguf", help="With --engine llamacpp and one run: serve this GGUF file as that run.")
    serve.add_argument("--dry-run", action="store_true", help="With --engine vllm: print the vLLM command only.")
    serve.add_argument("--quiet", action="store_true", help="Log only warnings.")
    serve.set_defaults(func=cmd_serve)


MONITOR_MODES = ("report", "export", "export-preferences")


def cmd_monitor_report(args: argparse.Namespace) -> int:
    import time

    from rich.table import Table

    from tunesmith.deploy.monitor import monitor_report

    since = time.time() - args.hours * 3600 if args.hours else 0.0
    report = monitor_report(args.run, args.db, since)
    if args.json:
        print_json(report)
        return 0
    traffic, drift = report["traffic"], report["drift"]
    table = Table(title=f"Traffic ({report['log']})", show_header=False)
    table.add_row("requests", f"{traffic['requests']} ({traffic['errors']} errors, {traffic['error_rate']:.1%})")
    table.add_row("by model", ", ".join(f"{k}: {v}" for k, v in traffic["by_model"].items()) or "-")
    table.add_row("latency ms p50/p95/p99", " / ".join(str(v) for v in traffic["latency_ms"].values()))
    table.add_row("first token ms p50/p95", " / ".join(str(v) for v in traffic["first_token_ms"].values()))
    table.add_row("tokens prompt / generated", f"{traffic['prompt_tokens']} / {traffic['completion_tokens']}")
    out.print(table)
    if "prompt_tokens" in drift:
        lengths, words = drift["prompt_tokens"], drift["vocabulary"]
        table = Table(
            title=f"Drift against {drift['training_prompts']} training prompts "
            f"({drift['requests_compared']} chat requests)"
        )
        table.add_column("measure")
        table.add_column("training")
        table.add_column("production")
        quantiles = lambda q: " / ".join(str(v) for v in q.values())  # noqa: E731
        table.add_row("prompt tokens p5/p50/p95", quantiles(lengths["training"]), quantiles(lengths["production"]))
        table.add_row("KS statistic (p)", "", f"{lengths['ks_statistic']} (p={lengths['ks_p_value']})")
        table.add_row("longer than any training prompt", "", f"{lengths['longer_than_training']:.1%}")
        table.add_row("vocabulary Jensen-Shannon", "", str(words["js_divergence"]))
        table.add_row("words unseen in training", "", f"{words['unseen_word_share']:.1%}")
        out.print(table)
    for name in report["format"]["checks"]:
        item = report["format"][name]
        out.print(f"Format check {name}: {item['failing']} failing ({item['share']:.1%})")
    if not report["format"]["checks"]:
        out.print("No format check: add json_valid or json_schema to eval.metrics to watch the output format.")
    feedback = report["feedback"]
    out.print(
        f"Feedback: {feedback['count']} (mean rating {feedback['mean_rating']}, {feedback['corrections']} corrections)"
    )
    for alert in report["alerts"]:
        out.print(f"[bold yellow]alert:[/] {alert}", highlight=False)
    if not report["alerts"]:
        out.print("[green]No alerts.[/]")
    return 0


def cmd_monitor_export(args: argparse.Namespace) -> int:
    from tunesmith.deploy.monitor import export_feedback

    count = export_feedback(args.run, args.out, args.db, args.min_rating, args.overwrite)
    out.print(f"Wrote {count} examples to {args.out}. Next: tunesmith data check {args.out}", highlight=False)
    return 0


def cmd_monitor_preferences(args: argparse.Namespace) -> int:
    from tunesmith.deploy.monitor import export_preferences

    result = export_preferences(
        args.run, args.out, args.db, args.good_rating, args.bad_rating, args.kto, args.overwrite
    )
    what = "KTO rows" if result.kind == "kto" else "preference pairs"
    out.print(
        f"Wrote {result.rows} {what} to {result.target} ({result.from_corrections} from corrections, "
        f"{result.from_ratings} from ratings: good >= {result.good_rating:g}, bad <= {result.bad_rating:g}"
        + (f"; {result.dropped_conflicts} answer(s) rated both ways dropped" if result.dropped_conflicts else "")
        + f"). Next: tunesmith data check {result.target}",
        highlight=False,
    )
    return 0


def cmd_monitor_flags(args: argparse.Namespace) -> int:
    """`monitor RUN [--export FILE | --export-preferences FILE]`, the form older than the modes, as it always ran."""
    if args.export and args.export_preferences:
        raise TunesmithError("Pass --export or --export-preferences, not both: they write different datasets.")
    for flag, mode, target, command in (
        ("--export-preferences", "export-preferences", args.export_preferences, cmd_monitor_preferences),
        ("--export", "export", args.export, cmd_monitor_export),
    ):
        if target:
            err.print(
                f"note: `tunesmith monitor RUN {flag} FILE` is now `tunesmith monitor {mode} RUN --out FILE`; "
                "the old form still works.",
                markup=False,
                highlight=False,
            )
            args.out = target
            return command(args)
    return cmd_monitor_report(args)


class _MonitorParser(argparse.ArgumentParser):
    """Reads `monitor MODE RUN ...` with the mode's own parser, and anything not opening with a mode word as before
    the modes existed: `monitor RUN ...` (a report) and the flags `--export FILE`, `--export-preferences FILE`."""

    flags: argparse.ArgumentParser

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if args[:1] and args[0] in (*MONITOR_MODES, "-h", "--help"):
            return super().parse_known_args(args, namespace)
        if not args or "-h" in args or "--help" in args:
            # RUN alone reports: `monitor RUN --help` is the report's help, and a bare `monitor` asks for RUN.
            return super().parse_known_args(["report", *args], namespace)
        return self.flags.parse_known_args(args, namespace)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run", metavar="RUN", help="Run directory, e.g. runs/quickstart (one named like a mode: write ./export)."
    )
    parser.add_argument("--db", metavar="FILE", help="Request log [default: RUN/serve/requests.sqlite].")


def _add_report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hours", type=float, metavar="N", help="Only the last N hours of traffic [default: all].")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")


def _add_export_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--min-rating",
        type=float,
        metavar="R",
        help="Also keep uncorrected answers rated at least R [default: corrected answers only].",
    )


def _add_preference_options(parser: argparse.ArgumentParser) -> None:
    from tunesmith.deploy.monitor import BAD_RATING, GOOD_RATING

    parser.add_argument(
        "--good-rating",
        type=float,
        metavar="R",
        help=f"A rating at least R is a good answer [default: {GOOD_RATING:g}, on 1-5 stars; for thumbs up/down "
        "pass 1].",
    )
    parser.add_argument(
        "--bad-rating",
        type=float,
        metavar="R",
        help=f"A rating at most R is a poor answer [default: {BAD_RATING:g}, on 1-5 stars; for thumbs up/down "
        "pass 0 or -1].",
    )
    parser.add_argument(
        "--kto",
        action="store_true",
        help="Write KTO rows (prompt, completion, label true/false) instead of pairs: corrections and good answers "
        "desirable, corrected and poor answers undesirable.",
    )


def _add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing FILE.")


def _add_out(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--out", required=True, metavar="FILE", help=f"JSONL file to write the {what} to.")


REPORT_TEXT = (
    "Read the request log of `tunesmith serve` and compare production prompts with the run's training data "
    "(prompt-length distribution with a KS test, vocabulary Jensen-Shannon divergence, unseen words), count answers "
    "failing the run's format check, summarise feedback, and raise alerts."
)
PREFERENCES_TEXT = (
    "Write feedback as JSONL preference pairs for dpo, orpo or simpo: each correction (chosen) against the model's "
    "answer (rejected), and for one prompt a well-rated answer against a poorly rated one; every row names the "
    "served model of each side (chosen_model/rejected_model; null for a person's correction). With --kto, KTO rows "
    "for kto instead."
)


def _monitor_flags_parser() -> argparse.ArgumentParser:
    """The parser of the form older than the modes; never shown in --help, kept so old commands run unchanged."""
    flags = argparse.ArgumentParser(prog="tunesmith monitor", description=REPORT_TEXT)
    _add_run_options(flags)
    _add_report_options(flags)
    flags.add_argument("--export", metavar="FILE", help="As `monitor export RUN --out FILE`.")
    _add_export_options(flags)
    flags.add_argument("--export-preferences", metavar="FILE", help="As `monitor export-preferences RUN --out FILE`.")
    _add_preference_options(flags)
    _add_overwrite(flags)
    flags.set_defaults(func=cmd_monitor_flags)
    return flags


def _add_monitor(sub: argparse._SubParsersAction) -> None:
    monitor = sub.add_parser(
        "monitor",
        help="Production traffic, drift against the training data, format failures and feedback.",
        usage="%(prog)s [report] RUN [options]\n"
        "       %(prog)s export RUN --out FILE [options]\n"
        "       %(prog)s export-preferences RUN --out FILE [options]",
        description="Watch a served run and close the loop. `monitor RUN` (the same as `monitor report RUN`) "
        "reports on the request log; `monitor export` and `monitor export-preferences` turn feedback into the "
        "next dataset. A run folder named like a mode is written as a path, e.g. ./export. "
        "`tunesmith monitor MODE --help` lists each mode's options.",
    )
    # argparse has no default subcommand, and a mode word and a run folder share the first position; the class of
    # the parser sub.add_parser built is swapped for one that looks at that first word before parsing.
    monitor.__class__ = _MonitorParser
    monitor.flags = _monitor_flags_parser()
    modes = monitor.add_subparsers(
        dest="mode", metavar="MODE", required=True, prog=monitor.prog, parser_class=argparse.ArgumentParser
    )
    report = modes.add_parser(
        "report",
        help="Traffic, drift, format failures, feedback and alerts (the default: `monitor RUN`).",
        description=REPORT_TEXT,
    )
    _add_run_options(report)
    _add_report_options(report)
    report.set_defaults(func=cmd_monitor_report)
    export = modes.add_parser(
        "export",
        help="Corrected answers as a chat dataset for the next fine-tune.",
        description="Write each corrected answer in the request log (and, with --min-rating, each uncorrected "
        "answer rated at least that) as a chat example in tunesmith's own format, ready for `tunesmith data check` "
        "and the next fine-tune.",
    )
    _add_run_options(export)
    _add_out(export, "chat examples")
    _add_export_options(export)
    _add_overwrite(export)
    export.set_defaults(func=cmd_monitor_export)
    preferences = modes.add_parser(
        "export-preferences",
        help="Feedback as preference pairs (or KTO rows) for dpo, orpo, simpo or kto.",
        description=PREFERENCES_TEXT,
    )
    _add_run_options(preferences)
    _add_out(preferences, "pairs (or KTO rows)")
    _add_preference_options(preferences)
    _add_overwrite(preferences)
    preferences.set_defaults(func=cmd_monitor_preferences)
