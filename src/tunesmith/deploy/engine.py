"""The models a server answers with: one base, any number of a run's adapters over it, one worker.

Runs that share a base model are served from one copy of it: each PEFT adapter is loaded under its
run's name and switched per request, and `base` answers with the adapters off. Generation happens on
one worker thread that takes jobs from a bounded queue, so concurrent requests wait their turn (or get
a clear "busy" answer when the queue is full) and never run two forward passes over shared weights
at once. Tokens are decoded incrementally and handed back as text deltas for streaming.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import TunesmithError

BASE = "base"


@dataclass
class Served:
    """One model name the server answers to."""

    name: str
    run_dir: Path | None
    tokenizer: Any
    adapter: str | None  # PEFT adapter name, None for the base (adapters off) or a non-PEFT model
    stop_ids: list[int]
    stop_texts: list[str]
    format_metrics: list[str]


@dataclass
class Job:
    served: Served
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    emit: Callable[[str, Any], None]  # ("delta", text) ... ("done", Result) | ("error", message)
    queued_at: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    first_token_s: float | None


class Busy(Exception):
    """The queue is full: the caller answers 503 and asks to retry."""


def _stop_texts(tokenizer: Any) -> tuple[list[int], list[str]]:
    from tunesmith.deploy.template import turn_format

    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    texts: list[str] = []
    try:
        stop = turn_format(tokenizer).stop
    except TunesmithError:
        stop = ""
    if stop:
        encoded = tokenizer(stop, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.append(encoded[0])
        else:
            texts.append(stop)
    return ids, texts


class Engine:
    def __init__(self, run_dirs: list[Path], queue_size: int = 64, context_limit: int | None = None) -> None:
        from tunesmith.evaluate.generate import read_run_config

        if not run_dirs:
            raise TunesmithError("Name at least one run to serve.")
        configs = [read_run_config(path) for path in run_dirs]
        names = [path.name for path in run_dirs]
        if len(set(names)) != len(names) or BASE in names:
            raise TunesmithError(f"Served runs need distinct names other than '{BASE}'; got {names}.")
        self.models: dict[str, Served] = {}
        self.model = self._load(run_dirs, configs)
        self.context_limit = context_limit or getattr(self.model.config, "max_position_embeddings", 4096)
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.worker = threading.Thread(target=self._work, name="tunesmith-generate", daemon=True)
        self.worker.start()

    def _load(self, run_dirs: list[Path], configs: list[Any]) -> Any:
        from tunesmith.deploy.export import _tokenizer
        from tunesmith.methods import load_base, load_trained, weights_dir
        from tunesmith.models import resolve_model_path

        for path, config in zip(run_dirs, configs, strict=True):
            if not weights_dir(config, path).is_dir():
                raise TunesmithError(f"{path} has no {weights_dir(config, path).name}/: training has not finished.")
        peft = all(config.uses_peft for config in configs)
        bases = {config.model for config in configs}
        if len(run_dirs) > 1 and (not peft or len(bases) > 1):
            raise TunesmithError(
                "Several runs are served together only as LoRA adapters over one base model; these runs use "
                f"methods {sorted({c.method for c in configs})} and bases {sorted(bases)}. Serve them separately."
            )
        source = resolve_model_path(configs[0].model)
        if not peft:  # one full fine-tune or bottleneck-adapter run, served on its own
            model = load_trained(configs[0], source, weights_dir(configs[0], run_dirs[0]))
            self._register(run_dirs[0].name, run_dirs[0], _tokenizer(run_dirs[0]), None, configs[0])
            return model.eval()
        from peft import PeftModel

        model = load_base(configs[0], source)
        for index, (path, config) in enumerate(zip(run_dirs, configs, strict=True)):
            weights = str(weights_dir(config, path))
            if index == 0:
                model = PeftModel.from_pretrained(model, weights, adapter_name=path.name)
            else:
                model.load_adapter(weights, adapter_name=path.name)
            self._register(path.name, path, _tokenizer(path), path.name, config)
        self._register(BASE, None, self.models[run_dirs[0].name].tokenizer, None, configs[0])
        return model.eval()

    def _register(self, name: str, run_dir: Path | None, tokenizer: Any, adapter: str | None, config: Any) -> None:
        ids, texts = _stop_texts(tokenizer)
        formats = [m for m in config.eval.metrics if m in ("json_valid", "json_schema")]
        self.models[name] = Served(name, run_dir, tokenizer, adapter, ids, texts, formats)

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy from None

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    def close(self) -> None:
        self.jobs.put(None)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            try:
                job.emit("done", self._generate(job))
            except Exception as error:  # a failed request must not take the worker down
                job.emit("error", f"{type(error).__name__}: {error}")

    def _adapter_context(self, served: Served):
        if not hasattr(self.model, "peft_config"):
            return nullcontext()
        if served.adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(served.adapter)
        return nullcontext()

    @torch.inference_mode()
    def _generate(self, job: Job) -> Result:
        served = job.served
        generator = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
        ids = torch.tensor([job.prompt_ids])
        produced: list[int] = []
        sent, text, first, finish = 0, "", None, "length"
        stops = [*served.stop_texts, *job.stop]
        hold = max((len(s) for s in stops), default=1) - 1
        with self._adapter_context(served):
            out = self.model(input_ids=ids, use_cache=True)
            for _ in range(job.max_tokens):
                token = _pick(out.logits[0, -1], job.temperature, job.top_p, generator)
                if token in served.stop_ids:
                    finish = "stop"
                    break
                produced.append(token)
                if first is None:
                    first = time.perf_counter() - job.queued_at  # includes the wait in the queue
                text = served.tokenizer.decode(produced, skip_special_tokens=True)
                cut = min((text.find(s) for s in stops if s in text), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
                ready = len(text) - hold if not text.endswith("\ufffd") else sent
                if ready > sent:
                    job.emit("delta", text[sent:ready])
                    sent = ready
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                # transformers 5 names the KV cache `cache`; 4.x `past_key_values`.
                name = "cache" if "cache" in out else "past_key_values"
                out = self.model(input_ids=torch.tensor([[token]]), use_cache=True, **{name: out[name]})
        if len(text) > sent:
            job.emit("delta", text[sent:])
        return Result(text, len(job.prompt_ids), len(produced), finish, first)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        keep = ordered.cumsum(0) - ordered < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
