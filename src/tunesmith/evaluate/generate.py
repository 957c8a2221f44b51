"""Load a finished run (tuned or base) and generate answers with the run's own chat rendering.

Prompts are rendered by data/tokenize.py's renderer with the template saved in the run, so the model
sees at inference exactly the prefix it learned to answer in training.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import RunConfig
from tunesmith.data.formats import Message
from tunesmith.data.tokenize import prompt_ids
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.baselines import cut_at_stops
from tunesmith.methods import load_base, load_trained, method_of
from tunesmith.models import load_tokenizer, resolve_model_path
from tunesmith.rundir import RunDir
from tunesmith.train.precision import run_inference_dtype


@dataclass
class LoadedRun:
    config: RunConfig
    model: Any
    tokenizer: Any
    tuned: bool

    @property
    def shares_base(self) -> bool:
        """A PEFT model can answer as its base by switching the adapter off, without a second copy."""
        return method_of(self.config).uses_peft

    def base_only(self):
        """Context in which this model answers as the base model."""
        if method_of(self.config).uses_peft and self.tuned:
            return self.model.disable_adapter()
        return nullcontext()


def load_run(run_dir: str | Path, base: bool = False) -> LoadedRun:
    """The run's tuned model (or its base model with base=True) and the run's tokenizer."""
    run_dir = Path(run_dir)
    layout = RunDir(run_dir)
    config = layout.read_config()
    weights = layout.weights(config) if base else layout.trained_weights(config, ". Use --base or train first.")
    tokenizer = load_tokenizer(str(layout.tokenizer))
    source = resolve_model_path(config.model)
    dtype = run_inference_dtype(run_dir)
    model = load_base(config, source, dtype) if base else load_trained(config, source, weights, dtype)
    model.eval()
    return LoadedRun(config, model, tokenizer, tuned=not base)


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[tuple[Message, ...]],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    progress: Any = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stops: list[str] | None = None,
) -> list[str]:
    """Answers to each conversation prefix, generated in left-padded batches: greedy at temperature 0.

    Generation ends at EOS and, with `stops`, at the first of those texts, which is cut from the answer
    (evaluate/baselines.py: turn_stops gives the template's turn boundaries)."""
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    special = set(tokenizer.all_special_tokens)
    texts = [stop for stop in stops or [] if stop not in special]
    # A stop that is one special token (an end-of-turn such as Gemma's) ends generation as an EOS id.
    eos = [tokenizer.eos_token_id, *(tokenizer.convert_tokens_to_ids(stop) for stop in stops or [] if stop in special)]
    if texts:
        sampling |= {"stop_strings": texts, "tokenizer": tokenizer}
    encoded = [prompt_ids(tokenizer, messages) for messages in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, index in enumerate(chunk):
            ids = encoded[index]
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention.to(model.device),
            max_new_tokens=max_new_tokens,
            **sampling,
            pad_token_id=pad,
            eos_token_id=sorted({token for token in eos if token is not None}) or None,
        )
        for row, index in enumerate(chunk):
            answers[index] = cut_at_stops(tokenizer.decode(output[row, width:], skip_special_tokens=True), texts)
        if progress is not None:
            progress(len(chunk))
    return answers


def read_prompts(path: Path) -> list[tuple[Message, ...]]:
    """Prompts from a file: JSONL records {"prompt": ...} or {"messages": [...]}, or one per line of a .txt."""
    if path.suffix.lower() in (".txt", ""):
        if not path.is_file():
            raise TunesmithError(f"Prompt file {path} not found.")
        return [(Message("user", line),) for line in path.read_text().splitlines() if line.strip()]
    prompts: list[tuple[Message, ...]] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise TunesmithError(f"{path}:{number}: invalid JSON ({exc.msg}).") from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append((Message("user", record["prompt"]),))
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            turns = tuple(Message(m["role"], m["content"]) for m in record["messages"])
            # A file of examples may include their answers: the prompt is what comes before.
            prompts.append(turns[:-1] if turns and turns[-1].role == "assistant" else turns)
        else:
            raise TunesmithError(f'{path}:{number}: expected {{"prompt": ...}} or {{"messages": [...]}}.')
    return prompts


def answer_prompts(
    run_dir: str | Path, prompts: list[tuple[Message, ...]], base: bool, max_new_tokens: int, batch_size: int
) -> list[str]:
    """The answers of a run's tuned model (or its base model) to each prompt, greedy."""
    loaded = load_run(run_dir, base=base)
    return generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens, batch_size)
