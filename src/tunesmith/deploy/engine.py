"""The models a server answers with: one base, any number of a run's adapters over it, one worker.

Runs that share a base model are served from one copy of it: each PEFT adapter is loaded under its run's name,
and `base` answers with the adapters off. Generation happens on one worker thread, which owns for its whole life
one `tunesmith.generation.Engine` (the engine `evaluate`, `compare` and validation generate with: continuous
batching over one preallocated KV cache, made at the first request) inside `generation_view` (a single adapter
merged into the weights; several adapters computed per row), whose weights it packs before the server listens.
Jobs wait on one bounded list (everything not yet generating counts against it; a full list answers "busy"); a
waiting job joins the running batch at the next step as soon as a row is free, and a finished row leaves at once.
Rows of one step may belong to different adapters and the base: each row answers with its own (PEFT's per-row
adapters), so no request waits for another model's batch. Tokens are decoded incrementally and handed back as text
deltas for streaming.

One request must never fail another: an error in one request's sampling, seeding or text handling answers that
request only. A step that fails as a whole (the forward pass) fails the requests that already streamed text (their
answer cannot be started over) and generates each of the others again, alone; only one that fails alone fails.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import PeftModel

from tunesmith import generation
from tunesmith.data.tokenize import renders_reasoning, tool_parser
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
    tool_format: str | None = None  # the parser (data/tools.PARSERS) of the template's calls; None: no tools
    reasoning: bool = False  # the template writes reasoning as a <think> block: answers send it apart


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
    alone: bool = False  # generated again after a failed step: in a batch of its own, to see whether it is the cause


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
        max_tokens_limit: int = limits.MAX_TOKENS_LIMIT,
    ) -> None:
        if not run_dirs:
            raise TunesmithError("Name at least one run to serve.")
        configs = [RunDir(path).read_config() for path in run_dirs]
        names = [path.name for path in run_dirs]
        if len(set(names)) != len(names) or BASE in names:
            raise TunesmithError(f"Served runs need distinct names other than '{BASE}'; got {names}.")
        self.models: dict[str, Served] = {}
        self.model = self._load(run_dirs, configs)
        self.context_limit: int = context_limit or self._trained_context()
        # Prompts longer than the run saw in training are answered poorly and cost the most: by default the
        # prompt alone is held to the training length (one token left to answer within the context).
        if max_prompt_tokens is not None and not 0 < max_prompt_tokens < self.context_limit:
            raise TunesmithError(
                f"--max-prompt-tokens {max_prompt_tokens} must be between 1 and {self.context_limit - 1}: the model's "
                f"context is {self.context_limit} tokens and at least one is needed for the answer."
            )
        trained = min(config.data.max_length for config in configs)
        self.max_prompt_tokens = max_prompt_tokens or min(trained, self.context_limit - 1)
        self.max_tokens_limit = max_tokens_limit
        # Every row's slot of the KV cache holds the longest prompt and the longest answer a request may ask for.
        self.max_length = min(self.context_limit, self.max_prompt_tokens + max_tokens_limit)
        self.queue_size = queue_size
        self.pending: list[Job] = []  # every job not yet generating, oldest first; at most queue_size
        self.running: list[_Answer] = []  # the jobs generating now (replaced, never changed in place: read anywhere)
        self.peak_waiting = 0
        self.closed = False
        self.changed = threading.Condition()
        self.step_seconds = 0.0  # running mean of one step's wall time, for Retry-After (learnt, not guessed)
        self.max_batch = max_batch
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=10_000)  # rows in each recent step
        self.on_batch: Callable[[int], None] | None = None  # called with the rows of each step
        self.warm = threading.Event()  # set once the worker has made the model ready (or given up)
        self.worker = threading.Thread(target=self._work, name="tunesmith-generate", daemon=True)
        self.worker.start()
        self.warm.wait()  # the server takes requests with the weights packed, as llama.cpp's with them loaded

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

    def _trained_context(self) -> int:
        """The longest sequence the served model was built for."""
        return int(getattr(self.model.config, "max_position_embeddings", 4096))

    def _register(self, name: str, run_dir: Path | None, tokenizer: Any, adapter: str | None) -> None:
        ids, texts = stop_tokens(tokenizer)
        served = Served(
            name, run_dir, tokenizer, adapter, ids, texts, tool_parser(tokenizer), renders_reasoning(tokenizer)
        )
        self.models[name] = served

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
        """Seconds until places on the waiting list free up, at the recent pace (the learnt mean seconds of one
        step): a step gives each running row one token, so by the time the row with the most tokens left to its
        max_tokens is done, every running row has ended and freed its place for a waiting job. A row that stops
        early (a stop token or text) frees its place sooner; a prompt still being prefilled takes a little longer."""
        left = max((answer.tokens_left for answer in self.running), default=0)
        return min(limits.RETRY_AFTER_MAX_S, math.ceil(max(1.0, self.step_seconds * left)))

    def close(self) -> None:
        """Stop taking jobs. Those generating now finish; those still waiting are answered at once with an error
        (an unloaded model never leaves a request hanging)."""
        with self.changed:
            self.closed = True
            waiting, self.pending = self.pending, []
            self.changed.notify()
        _unloaded(waiting)

    # --- The worker -----------------------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            with self._view():
                try:
                    self._warm_up()
                finally:
                    self.warm.set()
                if self._admit(None) is None:  # closed before the first request
                    return
                engine = self._generator()
                while (joining := self._admit(engine)) is not None:
                    for job in joining:
                        self._start(engine, job)
                    if self.running and not self._run_step(engine):
                        del engine  # a failed step may have left its rows' state half-written: start afresh
                        engine = self._generator()
        except BaseException as error:  # a bug here must not leave requests hanging: answer them, then stop
            self.warm.set()
            logger.exception("The generation worker stopped")
            with self.changed:
                self.closed = True
                stranded, self.pending = self.pending, []
            for job in [answer.job for answer in self.running] + stranded:
                if not job.answered:
                    _fail(job, error if isinstance(error, Exception) else Stopped("the worker stopped"))
            self.running = []
            raise

    def _warm_up(self) -> None:
        """One token for each served model before the server takes requests: the view packs and merges the
        weights it computes with (0.65 s for Gemma 3 270M, which the first requests would otherwise wait for) and
        the kernel is loaded. A small engine of its own: the serving one is made at the first request."""
        warming = generation.Engine(self.model, max_rows=1, max_length=2)
        for served in self.models.values():  # one at a time: each its own weights (merged, or the base's)
            token = served.tokenizer.bos_token_id or 0
            warming.run([generation.Request([token], 1, adapter=self._adapter(served))])

    def _view(self) -> contextlib.AbstractContextManager:
        """The model as the worker generates with it: one adapter (or none) merged into the weights; several share
        the base, each row its own."""
        adapters = {served.adapter for served in self.models.values() if served.adapter}
        return generation.generation_view(self.model, merge=len(adapters) <= 1)

    def _generator(self) -> Any:
        """What generates: anything with generation.Engine's submit, step and busy."""
        return generation.Engine(self.model, max_rows=self.max_batch, max_length=self.max_length)

    def _admit(self, engine: Any) -> list[Job] | None:
        """The waiting jobs that join the running batch now (oldest first, as many as rows are free); waits while
        nothing runs and nothing waits. None once closed with nothing running (jobs still waiting are answered).
        A job generated again alone after a failed step joins only an empty batch, and nothing joins beside it."""
        with self.changed:
            while True:
                self.pending = [job for job in self.pending if not job.cancelled.is_set()]
                if self.closed or self.pending or self.running:
                    break
                self.changed.wait()
            if self.closed:
                stranded, self.pending = self.pending, []
            elif engine is None:
                return []
            else:
                joining: list[Job] = []
                while self.pending and len(self.running) + len(joining) < self.max_batch:
                    alone = self.pending[0].alone
                    if any(answer.job.alone for answer in self.running) or alone and (self.running or joining):
                        break
                    joining.append(self.pending.pop(0))
                    if joining[-1].alone:
                        break
                return joining
        _unloaded(stranded)  # only those generated again after a failed step can be here: close() took the rest
        return [] if self.running else None

    def _start(self, engine: Any, job: Job) -> None:
        """Submit one job to the engine; a job it refuses (a seed torch cannot take, a prompt over the cache)
        fails alone."""
        try:
            if not job.prompt_ids:
                raise ValueError("the prompt has no tokens")
            answer = _Answer(job, self._adapter(job.served))
            engine.submit(answer.request)
        except Exception as error:
            logger.exception("Generation failed for one request", exc_info=error)
            _fail(job, error)
            return
        self.running = [*self.running, answer]

    def _adapter(self, served: Served) -> str | None:
        """The generation engine's adapter for a served model's rows: its adapter, adapters off for `base` of a PEFT
        model, or None (the model as it is) for a model without adapters."""
        if served.adapter is not None:
            return served.adapter
        return generation.BASE if hasattr(self.model, "peft_config") else None

    def _step(self, engine: Any) -> list[generation.Request]:
        """One step of the engine: admit, prefill one chunk, decode one token per row (tests hold or break it here)."""
        return engine.step()

    def _run_step(self, engine: Any) -> bool:
        """Run one step and answer the requests it finished; False when the step failed as a whole."""
        rows = len(self.running)
        self.batch_sizes.append(rows)
        if self.on_batch:
            self.on_batch(rows)
        started = time.perf_counter()
        try:
            finished = self._step(engine)
        except Exception as error:  # a failed step must not take the worker down, nor fail more than it must
            logger.exception("A generation step failed with %d rows", rows)
            self._recover(error)
            return False
        self.step_seconds = 0.8 * self.step_seconds + 0.2 * (time.perf_counter() - started)
        done = [answer for answer in self.running if any(answer.request is request for request in finished)]
        self.running = [answer for answer in self.running if answer not in done]
        for answer in done:
            answer.finish()
        return True

    def _recover(self, error: Exception) -> None:
        """After a failed step: fail the requests that streamed (or were already alone), and put the others back
        at the front of the waiting list, each to be generated again alone."""
        failed, self.running = self.running, []
        again: list[Job] = []
        for answer in failed:
            job = answer.job
            if len(failed) > 1 and not job.streamed and not job.alone and not job.answered:
                job.alone = True
                again.append(job)
            elif not job.answered:
                _fail(job, error)
        with self.changed:
            self.pending[:0] = [job for job in again if not job.cancelled.is_set()]


class _Answer:
    """One job while it generates: its engine Request, decoded text, streaming position and stop rules.
    `on_token` is the Request's callback; `finish` answers the job once the engine is done with it."""

    def __init__(self, job: Job, adapter: str | None) -> None:
        self.job, self.served = job, job.served
        self.produced: list[int] = []
        self.sent, self.text = 0, ""
        self.first: float | None = None
        self.stops = [*self.served.stop_texts, *job.stop]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.error: Exception | None = None
        self.request = generation.Request(
            prompt_ids=list(job.prompt_ids), max_tokens=job.max_tokens, temperature=job.temperature,
            top_p=job.top_p, seed=job.seed, stop_ids=frozenset(self.served.stop_ids), on_token=self.on_token,
            cancelled=job.cancelled.is_set, adapter=adapter,
        )  # fmt: skip

    @property
    def tokens_left(self) -> int:
        return max(0, self.job.max_tokens - len(self.request.tokens))

    def on_token(self, request: generation.Request, token: int) -> bool:
        """advance(), with any error ending this request only (True: stop here)."""
        try:
            return self.advance(token)
        except Exception as error:
            self.error = error
            return True

    def advance(self, token: int) -> bool:
        """Take the next token: decode, cut at a stop text, stream what is ready; True when the answer ends here."""
        job = self.job
        if token in self.request.stop_ids:
            return True
        self.produced.append(token)
        if self.first is None:
            self.first = time.perf_counter() - job.queued_at  # includes the wait in the queue
        self.text = self.served.tokenizer.decode(self.produced, skip_special_tokens=True)
        cut = min((self.text.find(s) for s in self.stops if s in self.text), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return True
        # Held back: what could still become a stop text, and an incomplete UTF-8 character.
        ready = len(self.text) - self.hold if not self.text.endswith("\ufffd") else self.sent
        if job.stream and ready > self.sent:
            job.streamed = True
            job.emit("delta", self.text[self.sent : ready])
            self.sent = ready
        return False

    def finish(self) -> None:
        """Answer the job: the rest of its text and its Result, or its error."""
        job = self.job
        if self.error is None:
            try:
                if job.stream and len(self.text) > self.sent:
                    job.streamed = True
                    job.emit("delta", self.text[self.sent :])
                reason = self.request.finish_reason or "length"
                result = Result(self.text, len(job.prompt_ids), len(self.produced), reason, self.first)
                job.answered = True
                job.emit("done", result)
                return
            except Exception as error:
                self.error = error
        logger.exception("Generation failed for one request", exc_info=self.error)
        _fail(job, self.error)


def _fail(job: Job, error: Exception) -> None:
    job.answered = True
    try:
        job.emit("error", f"{type(error).__name__}: {error}")
    except Exception:  # the one to tell is gone: nothing more to do for this request
        logger.exception("Could not answer a failed request")


def _unloaded(jobs: list[Job]) -> None:
    for job in jobs:
        if not job.cancelled.is_set():
            _fail(job, Stopped("the model was unloaded before this request's turn; send it again"))
