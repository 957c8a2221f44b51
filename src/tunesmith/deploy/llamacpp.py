"""A GGUF file run by llama.cpp (llama-cpp-python), generating for the same requests as tunesmith's engine.

Requests are `generation.Request`s fed with the run's own prompt token ids (the export carries the run's vocabulary,
so the ids mean the same tokens) and ended by the same rule (`generation.take`): stop ids, stop texts through
`on_token`, max_tokens, cancellation. Greedy at temperature 0 (llama.cpp's greedy sampler); above it, top_p over
the whole vocabulary with the request's seed, and no repetition penalty, as the engine samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import TunesmithError
from tunesmith.generation import Request, take

INSTALL = "pip install 'tunesmith[llamacpp]' (llama-cpp-python)"


class GgufModel:
    """One GGUF file loaded once; `generate` runs one request to its end (llama.cpp keeps one sequence here)."""

    def __init__(self, path: Path, context: int, threads: int | None = None) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise TunesmithError(f"Running a GGUF export needs llama.cpp's Python binding: {INSTALL}.") from None
        if not path.is_file():
            raise TunesmithError(f"GGUF file {path} not found; export one with: tunesmith export RUN --format gguf")
        self.path = path
        self.llm: Any = Llama(
            model_path=str(path), n_ctx=context, n_threads=threads or torch.get_num_threads(), verbose=False
        )

    def generate(self, request: Request) -> Request:
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
        for token in tokens:
            if request.cancelled is not None and request.cancelled():
                request.finish_reason = "cancelled"
                break
            request.finish_reason = take(request, int(token))
            if request.finish_reason:
                break
        return request
