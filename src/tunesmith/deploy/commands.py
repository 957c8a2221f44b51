"""The deploy commands of the CLI: export, serve and monitor (parsers and handlers)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

out = Console()
err = Console(stderr=True)


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
