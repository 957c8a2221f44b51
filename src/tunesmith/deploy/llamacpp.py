"""GGUF files run by llama.cpp (llama-cpp-python), generating for the same requests as tunesmith's engine: export
parity (evaluate/parity.py) and `tunesmith serve --engine llamacpp` (GgufEngine).

Requests are `generation.Request`s fed with the run's own prompt token ids (the export carries the run's vocabulary,
so the ids mean the same tokens) and ended by the same rule (`generation.take`): stop ids, stop texts through
`on_token`, max_tokens, cancellation. Greedy at temperature 0 (llama.cpp's greedy sampler); above it, top_p over
the whole vocabulary with the request's seed, and no repetition penalty, as the engine samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from tunesmith.deploy.engine import Engine, Served
from tunesmith.deploy.export import export_run, run_tokenizer
from tunesmith.errors import TunesmithError
from tunesmith.generation import Request, take
from tunesmith.models import resolve_model_path
from tunesmith.rundir import RunDir
from tunesmith.train.precision import cpu_flags

INSTALL = "pip install 'tunesmith[llamacpp]' (llama-cpp-python)"


def find_gguf(run_dir: Path, gguf_type: str) -> Path | None:
    """The run's GGUF export of that type, wherever `tunesmith export` (or parity_run) put it."""
    layout = RunDir(run_dir)
    for folder in (layout.export("gguf"), layout.export(f"gguf-{gguf_type}")):
        found = sorted(folder.glob(f"*-{gguf_type}.gguf")) if folder.is_dir() else []
        if found:
            return found[0]
    return None


def gguf_export(run_dir: Path, gguf_type: str, say: Callable[[str], None] | None = None) -> Path:
    """The run's GGUF export of that type (find_gguf), written to export/gguf-TYPE/ first if it has none."""
    found = find_gguf(run_dir, gguf_type)
    if found is not None:
        return found
    if say is not None:
        say(f"No {gguf_type} GGUF export yet: exporting one (tunesmith export --format gguf)...")
    folder = export_run(run_dir, "gguf", out=RunDir(run_dir).export(f"gguf-{gguf_type}"), gguf_type=gguf_type)
    return next(folder.glob("*.gguf"))


def amx_cpu() -> bool:
    """Whether this CPU has Intel AMX (its flags in /proc/cpuinfo)."""
    return "amx_int8" in cpu_flags()


def load_llama(path: Path, context: int, threads: int | None = None) -> Any:
    """llama.cpp's model for one GGUF file. On a CPU with AMX, without llama.cpp's extra weight buffers: in
    llama-cpp-python 0.3.36 its AMX repacking of Q8_0 weights crashes the process (SIGSEGV in the first decode) on
    such a CPU (2 cores, avx512_bf16 and amx_bf16, quickstart's q8_0 export); without it the same file answers at
    ~35 tokens/s there. llama-cpp-python's Llama takes no such argument, so its default model parameters are
    amended for the one constructor call."""
    import llama_cpp
    import llama_cpp.llama as binding

    def parameters() -> Any:
        made = default()
        made.use_extra_bufts = False
        return made

    default = llama_cpp.llama_model_default_params
    if amx_cpu():
        binding.llama_cpp.llama_model_default_params = parameters
    try:
        return binding.Llama(
            model_path=str(path), n_ctx=context, n_threads=threads or torch.get_num_threads(), verbose=False
        )
    finally:
        binding.llama_cpp.llama_model_default_params = default


class GgufModel:
    """One GGUF file loaded once; `generate` runs one request to its end (llama.cpp keeps one sequence here)."""

    def __init__(self, path: Path, context: int, threads: int | None = None) -> None:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise TunesmithError(f"Running a GGUF export needs llama.cpp's Python binding: {INSTALL}.") from None
        if not path.is_file():
            raise TunesmithError(f"GGUF file {path} not found; export one with: tunesmith export RUN --format gguf")
        self.path = path
        self.llm: Any = load_llama(path, context, threads)

    def stream(self, request: Request) -> Iterator[int]:
        """The request's tokens as llama.cpp samples them, without end: the caller stops (generation.take)."""
        if request.seed is not None:
            self.llm.set_seed(request.seed)
        tokens = self.llm.generate(
            request.prompt_ids,
            temp=request.temperature,
            top_p=request.top_p,
            top_k=0,  # the whole vocabulary, as the engine's sampling
            min_p=0.0,
            repeat_penalty=1.0,
            reset=True,
        )
        return (int(token) for token in tokens)

    def generate(self, request: Request) -> Request:
        """One request to its end."""
        stepper = Stepper({request.adapter: self})
        stepper.submit(request)
        while stepper.busy:
            stepper.step()
        return request


class Stepper:
    """GGUF models behind the generation engine's interface (`submit`, `step`, `busy`), one token per step: the
    server's worker drives it as it drives tunesmith's engine. llama.cpp keeps one sequence here, so requests run one
    after another (the worker admits one at a time); `Request.adapter` names the model of the request."""

    def __init__(self, models: dict[str | None, GgufModel]) -> None:
        self.models = models
        self.waiting: list[Request] = []
        self.current: Request | None = None
        self.tokens: Iterator[int] | None = None

    def submit(self, request: Request) -> None:
        if request.adapter not in self.models:
            raise ValueError(f"no GGUF model is loaded for {request.adapter!r}")
        if len(request.prompt_ids) + request.max_tokens > self.models[request.adapter].llm.n_ctx():
            raise ValueError(f"a prompt of {len(request.prompt_ids)} tokens and max_tokens {request.max_tokens} exceed "
                             f"the {self.models[request.adapter].llm.n_ctx()}-token context")  # fmt: skip
        self.waiting.append(request)

    @property
    def busy(self) -> bool:
        return self.current is not None or bool(self.waiting)

    def step(self) -> list[Request]:
        """One token of the current request (starting the next if none runs); the request if it ended."""
        if self.current is None:
            if not self.waiting:
                return []
            self.current = self.waiting.pop(0)
            self.tokens = self.models[self.current.adapter].stream(self.current)
        request, tokens = self.current, self.tokens
        assert tokens is not None
        if request.cancelled is not None and request.cancelled():
            request.finish_reason = "cancelled"
        else:
            request.finish_reason = take(request, next(tokens))
        if request.finish_reason is None:
            return []
        self.current = self.tokens = None
        return [request]


class GgufEngine(Engine):
    """The server's worker over the runs' GGUF exports run by llama.cpp: the same routes, auth, limits, request log,
    metrics, feedback and monitor as the native engine, with each run's own chat template and stops (the prompt is
    rendered by the run's tokenizer; its ids are the export's). Each run is one model (its export merges its
    adapter); there is no `base`. A run without an export of `gguf_type` is exported first."""

    def __init__(self, run_dirs: list[Path], gguf: Path | None = None, gguf_type: str = "f16", **limits: Any) -> None:
        if gguf is not None and len(run_dirs) != 1:
            raise TunesmithError("--gguf names one file: serve one run with it, or leave --gguf out.")
        self.gguf, self.gguf_type = gguf, gguf_type
        self.files: dict[str, Path] = {}
        # One sequence at a time: the others wait their turn on the list.
        super().__init__(run_dirs, **(limits | {"max_batch": 1}))

    def _load(self, run_dirs: list[Path], configs: list[Any]) -> None:
        """Find (or export) each run's GGUF file; llama.cpp loads them in the worker, at the cache's length."""
        for path in run_dirs:
            self.files[path.name] = self.gguf or gguf_export(path, self.gguf_type)
            self._register(path.name, path, run_tokenizer(path), path.name)
        self.configs = configs

    def _trained_context(self) -> int:
        return min(_model_context(resolve_model_path(config.model)) for config in self.configs)

    def _view(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def _warm_up(self) -> None:
        """Nothing to pack: llama.cpp reads each export when the worker makes its generator."""

    def _adapter(self, served: Served) -> str | None:
        return served.name

    def _generator(self) -> Stepper:
        threads = torch.get_num_threads()
        return Stepper({name: GgufModel(path, self.max_length, threads) for name, path in self.files.items()})


def _model_context(source: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(config, "max_position_embeddings", None) or 4096)
