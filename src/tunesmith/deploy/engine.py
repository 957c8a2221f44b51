"""The models a server answers with: one base, any number of a run's adapters over it, one worker.

Runs that share a base model are served from one copy of it: each PEFT adapter is loaded under its
run's name and switched per request, and `base` answers with the adapters off. Generation happens on
one worker thread that takes jobs from one bounded waiting list (everything not yet generating
counts against it; a full list answers "busy") and generates the waiting requests for the same model
together, up to max_batch at a time, as one left-padded batch with one KV cache; requests for another
adapter wait for the next batch. Tokens are decoded incrementally and handed back as text deltas for
streaming. One request must never fail another: an error in one row of a batch answers that row only.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from tunesmith.deploy import limits
from tunesmith.deploy.export import run_tokenizer
from tunesmith.deploy.template import stop_tokens
from tunesmith.errors import TunesmithError
from tunesmith.methods import load_base, load_trained, method_of
from tunesmith.models import resolve_model_path
from tunesmith.rundir import RunDir
from tunesmith.train.precision import run_inference_dtype

BASE = "base"

logger = logging.getLogger("tunesmith.serve")


@dataclass
class Served:
    """One model name the server answers to."""

    name: str
    run_dir: Path | None
    tokenizer: Any
    adapter: str | None  # PEFT adapter name, None for the base (adapters off) or a non-PEFT model
    stop_ids: list[int]
    stop_texts: list[str]


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
    # Text deltas as they are ready; off, only the end is emitted (each delta wakes the server's event loop).
    stream: bool = True
    queued_at: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    answered: bool = False  # "done" or "error" was emitted
    streamed: bool = False  # a delta was emitted: the answer cannot be started over


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    first_token_s: float | None


class Busy(Exception):
    """The waiting list is full: the caller answers 503 and asks to retry after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"busy, retry after {retry_after} s")
        self.retry_after = retry_after


class Stopped(Exception):
    """The worker thread is gone or closing: nothing submitted would ever be answered."""


class Engine:
    def __init__(
        self,
        run_dirs: list[Path],
        queue_size: int = limits.QUEUE_SIZE,
        context_limit: int | None = None,
        max_batch: int = limits.MAX_BATCH,
        max_prompt_tokens: int | None = None,
    ) -> None:
        if not run_dirs:
            raise TunesmithError("Name at least one run to serve.")
        configs = [RunDir(path).read_config() for path in run_dirs]
        names = [path.name for path in run_dirs]
        if len(set(names)) != len(names) or BASE in names:
            raise TunesmithError(f"Served runs need distinct names other than '{BASE}'; got {names}.")
        self.models: dict[str, Served] = {}
        self.model = self._load(run_dirs, configs)
        self.context_limit = context_limit or getattr(self.model.config, "max_position_embeddings", 4096)
        # Prompts longer than the run saw in training are answered poorly and cost the most: by default the
        # prompt alone is held to the training length (one token left to answer within the context).
        if max_prompt_tokens is not None and not 0 < max_prompt_tokens < self.context_limit:
            raise TunesmithError(
                f"--max-prompt-tokens {max_prompt_tokens} must be between 1 and {self.context_limit - 1}: the model's "
                f"context is {self.context_limit} tokens and at least one is needed for the answer."
            )
        trained = min(config.data.max_length for config in configs)
        self.max_prompt_tokens = max_prompt_tokens or min(trained, self.context_limit - 1)
        self.queue_size = queue_size
        self.pending: list[Job] = []  # every job not yet generating, oldest first; at most queue_size
        self.peak_waiting = 0
        self.closed = False
        self.changed = threading.Condition()
        self.batch_seconds = 0.0  # running mean of one batch's wall time, for Retry-After (learnt, not guessed)
        self.batch_started = 0.0
        self.max_batch = max_batch
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=10_000)  # recent batch sizes
        self.on_batch: Callable[[int], None] | None = None
        self.worker = threading.Thread(target=self._work, name="tunesmith-generate", daemon=True)
        self.worker.start()

    def _load(self, run_dirs: list[Path], configs: list[Any]) -> Any:
        weights = [RunDir(path).trained_weights(config) for path, config in zip(run_dirs, configs, strict=True)]
        peft = all(method_of(config).uses_peft for config in configs)
        bases = {config.model for config in configs}
        if len(run_dirs) > 1 and (not peft or len(bases) > 1):
            raise TunesmithError(
                "Several runs are served together only as LoRA adapters over one base model; these runs use "
                f"methods {sorted({c.method for c in configs})} and bases {sorted(bases)}. Serve them separately."
            )
        source = resolve_model_path(configs[0].model)
        dtype = run_inference_dtype(run_dirs[0])  # the dtype the (first) run trained in, where this machine has it
        if not peft:  # one full fine-tune or bottleneck-adapter run, served on its own
            model = load_trained(configs[0], source, weights[0], dtype)
            self._register(run_dirs[0].name, run_dirs[0], run_tokenizer(run_dirs[0]), None)
            return model.eval()

        model = load_base(configs[0], source, dtype)
        for index, (path, folder) in enumerate(zip(run_dirs, weights, strict=True)):
            if index == 0:
                model = PeftModel.from_pretrained(model, str(folder), adapter_name=path.name)
            else:
                model.load_adapter(str(folder), adapter_name=path.name)
            self._register(path.name, path, run_tokenizer(path), path.name)
        self._register(BASE, None, self.models[run_dirs[0].name].tokenizer, None)
        return model.eval()

    def _register(self, name: str, run_dir: Path | None, tokenizer: Any, adapter: str | None) -> None:
        ids, texts = stop_tokens(tokenizer)
        self.models[name] = Served(name, run_dir, tokenizer, adapter, ids, texts)

    def submit(self, job: Job) -> None:
        """Put a job on the waiting list, or raise Busy (list full) or Stopped (no worker to answer it)."""
        with self.changed:
            if self.closed or not self.alive:
                raise Stopped("the model was unloaded")
            # A job whose client left is dropped here too, so it does not hold a place.
            self.pending = [waiting for waiting in self.pending if not waiting.cancelled.is_set()]
            if len(self.pending) >= self.queue_size:
                raise Busy(self.retry_after())
            self.pending.append(job)
            self.peak_waiting = max(self.peak_waiting, len(self.pending))
            self.changed.notify()

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet generating."""
        with self.changed:
            return len(self.pending)

    @property
    def alive(self) -> bool:
        return self.worker.is_alive()

    def retry_after(self) -> int:
        """Seconds until places on the waiting list free up: when the batch generating now ends (at the recent
        pace), the worker takes the next one off the list."""
        left = self.batch_seconds - (time.perf_counter() - self.batch_started)
        return min(limits.RETRY_AFTER_MAX_S, math.ceil(max(1.0, left)))

    def close(self) -> None:
        """Stop taking jobs. Those generating now finish; those still waiting are answered at once with an error
        (an unloaded model never leaves a request hanging)."""
        with self.changed:
            self.closed = True
            waiting, self.pending = self.pending, []
            self.changed.notify()
        for job in waiting:
            if not job.cancelled.is_set():
                _fail(job, Stopped("the model was unloaded before this request's turn; send it again"))

    def _next_batch(self) -> list[Job] | None:
        """The oldest waiting job and up to max_batch - 1 more for the same model, in arrival order."""
        with self.changed:
            while True:
                self.pending = [job for job in self.pending if not job.cancelled.is_set()]
                if self.closed:
                    return None
                if self.pending:
                    break
                self.changed.wait()
            name = self.pending[0].served.name
            batch = [job for job in self.pending if job.served.name == name][: self.max_batch]
            self.pending = [job for job in self.pending if job not in batch]
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self.batch_started = time.perf_counter()
            self.batch_sizes.append(len(batch))
            if self.on_batch:
                self.on_batch(len(batch))
            self._answer(batch)
            self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * (time.perf_counter() - self.batch_started)

    def _answer(self, batch: list[Job]) -> None:
        """Generate a batch; errors in one row stay in that row, and a batch-wide failure (the forward pass)
        is retried row by row for the requests that have no text yet, so only the one that fails alone fails."""
        try:
            self._generate(batch)
        except Exception as error:  # a failed batch must not take the worker down
            logger.exception("Generation failed for a batch of %d", len(batch))
            unanswered = [job for job in batch if not job.answered]
            for job in unanswered:
                if len(batch) > 1 and not job.streamed:
                    self._answer([job])
                else:
                    _fail(job, error)

    def _adapter_context(self, served: Served):
        if not hasattr(self.model, "peft_config"):
            return nullcontext()
        if served.adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(served.adapter)
        return nullcontext()

    @torch.inference_mode()
    def _generate(self, jobs: list[Job]) -> None:
        """Generate for several requests at once: prompts left-padded into one batch, one KV cache.

        Each row stops on its own (stop token, stop text, max_tokens, client gone) and its request is
        answered at once; finished rows ride along on padding until the longest one ends.
        """
        served = jobs[0].served
        width = max(len(job.prompt_ids) for job in jobs)
        pad = served.tokenizer.pad_token_id or 0
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):
            ids[row, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[row, width - len(job.prompt_ids) :] = 1
        device = self.model.device
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = [_Row(job) for job in jobs]
        if all(row.done for row in rows):
            return
        with self._adapter_context(served):
            # Only the last position's logits are needed: with a 262k vocabulary the rest would dominate.
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
            )
            for _ in range(max(job.max_tokens for job in jobs)):
                tokens = [row.step(out.logits[i, -1]) if not row.done else pad for i, row in enumerate(rows)]
                if all(row.done for row in rows):
                    break
                mask = torch.cat([mask, torch.ones((len(jobs), 1), dtype=torch.long, device=device)], dim=1)
                positions = positions[:, -1:] + 1
                # transformers 5 names the KV cache `cache`; 4.x `past_key_values`.
                name = "cache" if "cache" in out else "past_key_values"
                out = self.model(
                    input_ids=torch.tensor(tokens, device=device)[:, None], attention_mask=mask, position_ids=positions,
                    use_cache=True, **{name: out[name]},
                )  # fmt: skip
        for row in rows:
            row.finish()


class _Row:
    """One request inside a batch: its sampling, decoded text, streaming position and stop rules."""

    def __init__(self, job: Job) -> None:
        self.job, self.served = job, job.served
        self.produced: list[int] = []
        self.sent, self.text, self.first, self.reason = 0, "", None, "length"
        self.stops = [*self.served.stop_texts, *job.stop]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.done = False
        self.generator = None
        try:
            self.generator = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
        except Exception as error:  # e.g. a seed out of torch's range: this request fails, not its batch
            self.fail(error)

    def step(self, logits: torch.Tensor) -> int:
        """advance(), with any error ending this row only."""
        try:
            return self.advance(logits)
        except Exception as error:
            return self.fail(error)

    def fail(self, error: Exception) -> int:
        logger.exception("Generation failed for one request", exc_info=error)
        self.done = True
        _fail(self.job, error)
        return 0

    def advance(self, logits: torch.Tensor) -> int:
        """Pick this row's next token; ends the row (and answers its request) when it should stop."""
        job = self.job
        token = _pick(logits, job.temperature, job.top_p, self.generator)
        if token in self.served.stop_ids:
            return self.finish("stop", token)
        self.produced.append(token)
        if self.first is None:
            self.first = time.perf_counter() - job.queued_at  # includes the wait in the queue
        self.text = self.served.tokenizer.decode(self.produced, skip_special_tokens=True)
        cut = min((self.text.find(s) for s in self.stops if s in self.text), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self.finish("stop", token)
        ready = len(self.text) - self.hold if not self.text.endswith("\ufffd") else self.sent
        if job.stream and ready > self.sent:
            job.streamed = True
            job.emit("delta", self.text[self.sent : ready])
            self.sent = ready
        if job.cancelled.is_set():
            return self.finish("cancelled", token)
        if len(self.produced) >= job.max_tokens:
            return self.finish("length", token)
        return token

    def finish(self, reason: str | None = None, token: int = 0) -> int:
        if self.done:
            return token
        self.done = True
        self.reason = reason or self.reason
        if self.job.stream and len(self.text) > self.sent:
            self.job.streamed = True
            self.job.emit("delta", self.text[self.sent :])
        result = Result(self.text, len(self.job.prompt_ids), len(self.produced), self.reason, self.first)
        self.job.answered = True
        self.job.emit("done", result)
        return token


def _fail(job: Job, error: Exception) -> None:
    job.answered = True
    job.emit("error", f"{type(error).__name__}: {error}")


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    # In float64 and shifted so the best logit is 0: any temperature above 0, however small, gives finite
    # scores (in float32 a temperature of 1e-50 is 0, and the scores NaN).
    scores = logits.double().cpu()  # the request's seeded generator lives on the CPU, whatever the model's device
    probs = torch.softmax((scores - scores.max()) / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        keep = ordered.cumsum(0) - ordered < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
