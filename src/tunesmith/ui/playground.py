"""The playground's models: the serving engine (deploy.engine.Engine), one per base model, loaded on demand.

Runs over one base share one engine (each LoRA-family run an adapter of it, `base` with the adapters off), as
`tunesmith serve runs/a runs/b` does; a full fine-tune gets an engine of its own. At most `limit` engines stay
loaded, the least recently used is closed first; requests still waiting on an engine that closes are answered with
an error at once (deploy.engine.Engine.close), never left hanging. Models load on a thread of the playground's own,
one at a time, so requests waiting for a load never hold the threads every other page of the UI is served by.
Prompts are rendered with each run's own chat template.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tunesmith.deploy.engine import BASE, Engine, Job, Result, Stopped
from tunesmith.rundir import RunDir


def engine_key(run_dir: Path) -> str:
    """Runs with the same key share an engine: LoRA-family runs by base model, any other run alone."""
    from tunesmith.methods import method_of

    config = RunDir(run_dir).read_config()
    return f"base:{config.model}" if method_of(config).uses_peft else f"run:{run_dir.resolve()}"


class Playground:
    def __init__(self, limit: int = 2) -> None:
        self.limit = max(1, limit)
        self.engines: dict[str, tuple[Engine, list[Path]]] = {}
        self.used: dict[str, float] = {}
        self.lock = threading.Lock()
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunesmith-playground-load")

    def close(self) -> None:
        """Close every engine (their waiting requests are answered) and the loading thread."""
        with self.lock:
            for engine, _ in self.engines.values():
                engine.close()
            self.engines.clear()
        self.loader.shutdown(wait=False, cancel_futures=True)

    def loaded(self) -> list[list[str]]:
        return [[path.name for path in runs] for _, runs in self.engines.values()]

    def engine_for(self, run_dirs: list[Path], model: str) -> Engine:
        """The engine answering `model` ('base' or a run's name) among run_dirs, loaded or widened if needed."""
        chosen = run_dirs[0] if model == BASE else next(p for p in run_dirs if p.name == model)
        key = engine_key(chosen)
        with self.lock:
            engine, runs = self.engines.get(key, (None, []))
            wanted = [p for p in run_dirs if engine_key(p) == key] if key.startswith("base:") else [chosen]
            missing = [p for p in wanted if p.name not in {r.name for r in runs}]
            if engine is None or missing or not engine.alive:
                if engine is not None:
                    engine.close()
                    del self.engines[key]
                while len(self.engines) >= self.limit:  # the least recently used makes room
                    oldest = min(self.engines, key=lambda k: self.used.get(k, 0.0))
                    self.engines.pop(oldest)[0].close()
                runs = runs + missing
                engine = Engine(runs)
                self.engines[key] = (engine, runs)
            self.used[key] = time.monotonic()
            return engine

    async def answer(
        self, run_dirs: list[Path], model: str, messages: list[dict[str, str]], max_tokens: int, temperature: float
    ) -> AsyncIterator[tuple[str, Any]]:
        from tunesmith.data.formats import Message
        from tunesmith.data.tokenize import prompt_ids

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        conversation = tuple(Message(m.get("role", "user"), m.get("content", "")) for m in messages)
        for attempt in range(2):  # an engine another tab closed between loading and submitting: load it again
            engine = await loop.run_in_executor(self.loader, self.engine_for, run_dirs, model)
            served = engine.models[model]
            ids = (await asyncio.to_thread(prompt_ids, served.tokenizer, conversation))[-engine.max_prompt_tokens :]
            budget = max(1, min(max_tokens, engine.context_limit - len(ids)))
            job = Job(served, ids, budget, temperature, 1.0, [], 0, emit)
            try:
                engine.submit(job)
                break
            except Stopped:
                if attempt:
                    raise

        async def stream() -> AsyncIterator[tuple[str, Any]]:
            try:
                while True:
                    kind, value = await events.get()
                    if kind == "delta":
                        yield "delta", {"text": value}
                    elif kind == "done":
                        result: Result = value
                        yield "done", {"tokens": result.completion_tokens, "finish": result.finish_reason}
                        return
                    else:
                        yield "error", {"error": str(value)}
                        return
            finally:
                job.cancelled.set()  # a page that left stops its generation

        return stream()
