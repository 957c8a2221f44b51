"""`tunesmith export`: a finished run as files other tools load.

- merged: the base with the update folded in, Hugging Face safetensors + tokenizer + chat template.
- adapter: the PEFT adapter (adapter_config.json + adapter_model.safetensors) for PEFT and vLLM.
- gguf: one GGUF file (f16, q8_0 or f32) for llama.cpp and friends.
- ollama: the GGUF plus a Modelfile whose TEMPLATE, stop tokens and parameters match training (with the tools
  block in Ollama's terms when the run's template has tunesmith's).

Every export carries the run's chat template and end-of-turn token and is refused if the template it
carries would render a conversation differently from training. Nothing is overwritten without
`overwrite=True`; each export is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunesmith.data.tools import TOOLS_PREAMBLE
from tunesmith.deploy.template import TurnFormat, check_equal, go_template, stop_tokens, turn_format
from tunesmith.errors import TunesmithError
from tunesmith.files import check_replaceable, is_marked, mark, save_atomic
from tunesmith.rundir import RunDir

FORMATS = ("merged", "adapter", "gguf", "ollama")


def run_tokenizer(run_dir: Path) -> Any:
    """The run's tokenizer with the chat template it was trained with."""
    from tunesmith.models import load_tokenizer

    layout = RunDir(run_dir)
    tokenizer = load_tokenizer(str(layout.tokenizer))
    if layout.chat_template.is_file():
        tokenizer.chat_template = layout.chat_template.read_text()
    if not tokenizer.chat_template:
        raise TunesmithError(
            f"{run_dir} has no chat template ({layout.chat_template.name}); was it trained by tunesmith?"
        )
    return tokenizer


def has_tools_block(tokenizer: Any) -> bool:
    """Whether the run's template is tunesmith's tools block in front of a plain one (trained on tool data): its
    Ollama template then renders tools, calls and results the same way (template.ToolTurns)."""
    return tokenizer.chat_template.startswith(TOOLS_PREAMBLE)


def _merged(run_dir: Path) -> Any:
    """The run's model as one set of weights: its saved whole model, or the base with its update merged in (the
    merge itself is methods.merged_model's)."""
    from tunesmith.methods import merged_model, method_of
    from tunesmith.models import load_model, resolve_model_path
    from tunesmith.train.precision import run_inference_dtype

    layout = RunDir(run_dir)
    config = layout.read_config()
    weights = layout.trained_weights(config, ", nothing to export.")
    dtype = run_inference_dtype(run_dir)  # merged exports are written in the run's dtype
    method = method_of(config)
    if "merged" not in method.exports:
        raise TunesmithError(
            "Bottleneck adapters add layers that standard runtimes do not have, so they cannot be merged or "
            "converted; serve this run with `tunesmith serve`, or train with method lora to export."
        )
    if method.merge is None:  # a method that exports merged without merging saves a whole model
        return load_model(str(weights), dtype)  # not load_trained: that would resolve the base, unused here
    return merged_model(config, resolve_model_path(config.model), weights, dtype)


def _write_merged(model: Any, tokenizer: Any, path: Path) -> None:
    model.generation_config.eos_token_id = stop_tokens(tokenizer)[0]
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _write_adapter(run_dir: Path, tokenizer: Any, path: Path) -> None:
    from tunesmith.methods import method_of
    from tunesmith.models import resolve_model_path

    layout = RunDir(run_dir)
    config = layout.read_config()
    if "adapter" not in method_of(config).exports:
        raise TunesmithError(
            f"--format adapter exports PEFT adapters (methods lora, qlora, dora); this run used {config.method}. "
            "Use --format merged."
        )
    shutil.copytree(layout.weights(config), path)
    settings = json.loads((path / "adapter_config.json").read_text())
    # PEFT and vLLM find the base through this field; point it at the real base, not a temp path.
    settings["base_model_name_or_path"] = resolve_model_path(config.model)
    (path / "adapter_config.json").write_text(json.dumps(settings, indent=2))
    tokenizer.save_pretrained(path)


def _ollama_unquote(text: str) -> str | None:
    """A Modelfile value as Ollama's parser unquotes it (parser.go: unquote); None while it is not yet whole."""
    if text.startswith('"""'):
        return text[3:-3] if len(text) >= 6 and text.endswith('"""') else None
    if text.startswith('"'):
        return text[1:-1] if len(text) >= 2 and text.endswith('"') else None
    return text


def _ollama_reads(quoted: str) -> str | None:
    """What Ollama's Modelfile parser reads from `quoted` written at the end of a line (parser.go: ParseFile).

    It drops unprintable characters, and it ends a value at the first line break where the text so far, stripped
    of surrounding whitespace, unquotes: so None when that happens inside `quoted`.
    """
    kept = "".join(c for c in quoted if c.isprintable() or c in " \t\r\n")
    for end in [i for i, c in enumerate(kept) if c in "\r\n"] + [len(kept)]:
        value = _ollama_unquote(kept[:end].strip(" \t\r\n"))
        if value is not None:
            return value if end == len(kept) else None
    return None


def modelfile_string(value: str, what: str) -> str:
    """`value` quoted so that Ollama reads it back exactly: "..." or triple-quoted (first for text of several lines,
    as Modelfiles write a TEMPLATE), whichever Ollama reads whole.

    Ollama's Modelfile strings have no escapes, so a value that neither quoting keeps intact is refused rather
    than written into a Modelfile that Ollama would cut short or misread.
    """
    for quote in ('"""', '"') if any(c in "\r\n" for c in value) else ('"', '"""'):
        if _ollama_reads(quote + value + quote) == value:
            return quote + value + quote
    raise TunesmithError(
        f"The Modelfile's {what} {value!r} cannot be written so that Ollama reads it back unchanged (Modelfile "
        "strings have no escapes and lose unprintable characters). Set chat_template in the config to one without "
        "such text, or export with --format gguf and write the Modelfile yourself."
    )


def modelfile(gguf_name: str, turns: TurnFormat, template: str, config: Any) -> str:
    stops = [turns.stop] if turns.stop else []
    lines = [
        f"FROM ./{gguf_name}",
        f"TEMPLATE {modelfile_string(template, 'TEMPLATE')}",
        *[f"PARAMETER stop {modelfile_string(s, 'stop text')}" for s in stops],
        f"PARAMETER temperature {config.eval.temperature}",
        f"PARAMETER top_p {config.eval.top_p}",
        f"PARAMETER num_ctx {config.data.max_length}",
        f"PARAMETER num_predict {config.eval.max_new_tokens}",
    ]
    return "\n".join(lines) + "\n"


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: str | Path | None = None,
    overwrite: bool = False,
    gguf_type: str = "q8_0",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export a finished run; returns the folder written."""
    from tunesmith.deploy.gguf_writer import pre_tokenizer_name, write_gguf
    from tunesmith.models import source_gguf

    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise TunesmithError(f"--format {fmt}: choose one of {', '.join(FORMATS)}.")
    layout = RunDir(run_dir)
    config = layout.read_config()
    if config.objective == "reward_model":
        raise TunesmithError(
            f"{run_dir} is a reward model (objective: reward_model): its score head is not part of a language model "
            f"export. Use it where it is, as a reward of an RL run (rl.rewards: [{{model: {run_dir}}}])."
        )
    target = Path(out) if out else layout.export(fmt)
    if target.exists():
        if not overwrite:
            raise TunesmithError(f"{target} already exists; pass --overwrite to replace it, or --out another folder.")
        # Exports from before the marker count as ours only where export puts them by default.
        ours = is_marked(target) or target.resolve() == layout.export(fmt).resolve()
        check_replaceable(target, ours, "an export")
    tokenizer = run_tokenizer(run_dir)
    turns = turn_format(tokenizer) if fmt == "ollama" else None
    if turns is not None:
        check_equal(tokenizer, turns.render, "Ollama template")
        modelfile("check.gguf", turns, go_template(turns, tools=has_tools_block(tokenizer)), config)  # before merging
    base_gguf = source_gguf(config.model) if fmt in ("gguf", "ollama") else None
    if fmt in ("gguf", "ollama") and base_gguf is None:
        pre_tokenizer_name(tokenizer)  # refuses a tokenizer llama.cpp would split differently, before the merge

    def write(path: Path) -> None:
        if fmt == "adapter":
            _write_adapter(run_dir, tokenizer, path)  # copies the adapter folder to `path`
            return
        path.mkdir(parents=True)
        model = _merged(run_dir)
        if fmt == "merged":
            _write_merged(model, tokenizer, path)
            return
        name = f"{run_dir.name}-{gguf_type}.gguf"
        ends = stop_tokens(tokenizer)[0]
        adds_bos = write_gguf(
            model,
            tokenizer,
            tokenizer.chat_template,
            ends[1] if len(ends) > 1 else None,
            path / name,
            kind=gguf_type,
            name=run_dir.name,
            source_gguf=base_gguf,
            progress=progress,
        )
        if fmt == "ollama":
            bos = (tokenizer.bos_token or "") if adds_bos else ""
            template = go_template(turns, strip_bos=bos, tools=has_tools_block(tokenizer))
            (path / "Modelfile").write_text(modelfile(name, turns, template, config))

    def write_marked(path: Path) -> None:
        write(path)
        mark(path, f"export-{fmt}")

    save_atomic(target, write_marked, replace=overwrite)  # the old export goes only once the new one is complete
    return target
