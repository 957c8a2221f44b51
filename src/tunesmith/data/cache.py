"""Tokenize once and keep the result on disk (flat numpy arrays) for every later run on the same data.

The key covers everything that changes the tokens: the conversations, the tokenizer's full
definition, the chat template, max_length, train_on and whether reasoning is learned. A changed
tokenizer or template therefore never reuses a stale cache. Entries are written atomically
(temporary name, then rename).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.data.formats import Conversation
from tunesmith.data.tokenize import TokenizedExample, TokenizeStats, tokenize_all
from tunesmith.errors import TunesmithError
from tunesmith.files import save_atomic

VERSION = "2"  # 2: an answer that ends with EOS and a newline (ChatML) gets no second EOS


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's complete definition (vocabulary, merges, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:
        definition = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    specials = json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id])
    return hashlib.sha256((definition + specials).encode()).hexdigest()


def cache_key(
    conversations: list[Conversation], tokenizer: Any, max_length: int, train_on: str, reasoning: str = "learn"
) -> str:
    digest = hashlib.sha256()
    # reasoning "learn", the only behaviour before it was a choice, adds nothing: earlier entries stay valid
    choice = "" if reasoning == "learn" else f"reasoning={reasoning}"
    for part in (VERSION, tokenizer_fingerprint(tokenizer), tokenizer.chat_template or "", str(max_length), train_on):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(choice.encode())
    for conversation in conversations:
        digest.update(json.dumps(conversation.to_record(), sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]


def cached_tokenize(
    tokenizer: Any,
    conversations: list[Conversation],
    max_length: int,
    train_on: str,
    root: Path,
    reasoning: str = "learn",
) -> tuple[list[TokenizedExample], TokenizeStats, bool]:
    """tokenize_all, served from `root/<key>/` when present; returns (examples, stats, hit)."""
    entry = root / cache_key(conversations, tokenizer, max_length, train_on, reasoning)
    if (entry / "stats.json").is_file():
        # Read whole, not memory-mapped: batching takes examples as lists, so a map would be copied anyway.
        ids = np.load(entry / "ids.npy")
        mask = np.load(entry / "mask.npy")
        offsets = np.load(entry / "offsets.npy")
        lines = np.load(entry / "lines.npy")
        examples = [
            TokenizedExample(ids[a:b].tolist(), mask[a:b].tolist(), int(line))
            for a, b, line in zip(offsets[:-1], offsets[1:], lines, strict=True)
        ]
        stats = TokenizeStats(**json.loads((entry / "stats.json").read_text()))
        return examples, stats, True
    examples, stats = tokenize_all(tokenizer, conversations, max_length, train_on, reasoning)
    offsets = np.cumsum([0] + [len(e) for e in examples], dtype=np.int64)

    def write(folder: Path) -> None:
        folder.mkdir()
        np.save(folder / "ids.npy", np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int32))
        np.save(folder / "mask.npy", np.fromiter((m for e in examples for m in e.loss_mask), dtype=np.uint8))
        np.save(folder / "offsets.npy", offsets)
        np.save(folder / "lines.npy", np.array([e.line for e in examples], dtype=np.int64))
        (folder / "stats.json").write_text(json.dumps(stats.__dict__))

    try:
        save_atomic(entry, write)
    except (TunesmithError, OSError):  # another process wrote the same entry first; theirs is identical
        pass
    return examples, stats, False
