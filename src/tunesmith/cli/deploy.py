"""`tunesmith export`, `serve` and `monitor`: a finished run as files, as a server, and in production."""

from __future__ import annotations

import argparse
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
    import torch
    import uvicorn

    from tunesmith.deploy.engine import Engine
    from tunesmith.deploy.requestlog import RequestLog
    from tunesmith.deploy.serve import create_app, default_log_path

    if "OMP_NUM_THREADS" not in os.environ:
        # Leave a core to the event loop: sharing one with torch's intra-op threads makes every parallel op wait
        # for whichever thread is descheduled, and under a burst of requests generation ran 30x slower.
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))
    with err.status("Loading the model..."):
        engine = Engine(
            run_dirs, queue_size=args.queue_size, max_batch=args.max_batch, max_prompt_tokens=args.max_prompt_tokens
        )
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
        help=f"Most waiting requests generated together in one batch [default: {limits.MAX_BATCH}].",
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
        choices=["native", "vllm"],
        default="native",
        help="native: this process (CPU or GPU); vllm: hand the same runs to `vllm serve` [default: native].",
    )
    serve.add_argument("--dry-run", action="store_true", help="With --engine vllm: print the vLLM command only.")
    serve.add_argument("--quiet", action="store_true", help="Log only warnings.")
    serve.set_defaults(func=cmd_serve)


def cmd_monitor(args: argparse.Namespace) -> int:
    import time

    from rich.table import Table

    from tunesmith.deploy.monitor import export_feedback, export_preferences, monitor_report

    if args.export and args.export_preferences:
        raise TunesmithError("Pass --export or --export-preferences, not both: they write different datasets.")
    if args.export_preferences:
        result = export_preferences(
            args.run, args.export_preferences, args.db, args.good_rating, args.bad_rating, args.kto, args.overwrite
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
    if args.export:
        count = export_feedback(args.run, args.export, args.db, args.min_rating, args.overwrite)
        out.print(f"Wrote {count} examples to {args.export}. Next: tunesmith data check {args.export}", highlight=False)
        return 0
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


def _add_monitor(sub: argparse._SubParsersAction) -> None:
    from tunesmith.deploy.monitor import BAD_RATING, GOOD_RATING

    monitor = sub.add_parser(
        "monitor",
        help="Production traffic, drift against the training data, format failures and feedback.",
        description="Read the request log of `tunesmith serve` and compare production prompts with the run's "
        "training data (prompt-length distribution with a KS test, vocabulary Jensen-Shannon divergence, unseen "
        "words), count answers failing the run's format check, summarise feedback, and raise alerts. With "
        "--export, turn corrected answers into a dataset for the next fine-tune; with --export-preferences, into "
        "preference pairs (or KTO rows) for dpo, orpo, simpo or kto.",
    )
    monitor.add_argument("run", help="Run directory, e.g. runs/quickstart.")
    monitor.add_argument("--db", help="Request log [default: RUN/serve/requests.sqlite].")
    monitor.add_argument("--hours", type=float, help="Only the last N hours of traffic [default: all].")
    monitor.add_argument("--json", action="store_true", help="Print the report as JSON.")
    monitor.add_argument("--export", metavar="FILE", help="Write corrected answers as a JSONL chat dataset to FILE.")
    monitor.add_argument(
        "--min-rating", type=float, help="With --export: also keep uncorrected answers rated at least this."
    )
    monitor.add_argument(
        "--export-preferences",
        metavar="FILE",
        help="Write feedback as JSONL preference pairs to FILE: each correction (chosen) against the model's answer "
        "(rejected), and for one prompt a well-rated answer against a poorly rated one; every row names the served "
        "model of each side (chosen_model/rejected_model; null for a person's correction).",
    )
    monitor.add_argument(
        "--good-rating",
        type=float,
        help=f"With --export-preferences: a rating at least this is a good answer [default: {GOOD_RATING:g}, "
        "on 1-5 stars; for thumbs up/down pass 1].",
    )
    monitor.add_argument(
        "--bad-rating",
        type=float,
        help=f"With --export-preferences: a rating at most this is a poor answer [default: {BAD_RATING:g}, "
        "on 1-5 stars; for thumbs up/down pass 0 or -1].",
    )
    monitor.add_argument(
        "--kto",
        action="store_true",
        help="With --export-preferences: write KTO rows (prompt, completion, label true/false) instead of pairs: "
        "corrections and good answers desirable, corrected and poor answers undesirable.",
    )
    monitor.add_argument(
        "--overwrite", action="store_true", help="With --export or --export-preferences: replace an existing FILE."
    )
    monitor.set_defaults(func=cmd_monitor)
