"""Export parity: the run's GGUF export, run by llama.cpp, scored against the tuned torch model on the same items.

An export can lose what training gained (rounding to q8_0, a template or a vocabulary that llama.cpp reads
otherwise) and no fine-tuning tool checks it. Here both answer the run's held-out prompts, rendered once by the
run's own template, greedy, under the same stop rules (evaluate.generate.Asked); both are scored with eval.metrics,
and each metric's paired difference (export minus torch) gets its CI and test as in compare. The verdict says
plainly when the export is worse. Written to eval/parity-TYPE.json.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from tunesmith.deploy.llamacpp import GgufModel, gguf_export
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import baselines, stats
from tunesmith.evaluate import metrics as m
from tunesmith.evaluate.compare import compare_metrics, split_items
from tunesmith.evaluate.generate import Asked, generate, load_run
from tunesmith.files import own_dir, write_json
from tunesmith.rundir import RunDir

PAIR = ("base", "tuned")  # compare's names for the two sides: here torch and the export


@dataclass
class ParitySummary:
    run_dir: str
    split: str
    items: int
    gguf: str
    gguf_type: str
    identical: int  # items whose greedy answers are the same text in both
    metrics: dict[str, dict[str, Any]]  # name -> torch, export, diff (export - torch), ci_low, ci_high, p, test
    verdict: str
    differing: list[dict[str, Any]]  # the first items answered differently: prompt, reference, torch, export
    seconds: dict[str, float]  # generation time of each


def parity_run(
    run_dir: str | Path,
    gguf_type: str = "f16",
    gguf: str | Path | None = None,
    limit: int | None = None,
    split: str = "test",
    console: Console | None = None,
) -> ParitySummary:
    """Score the run's GGUF export (`gguf`, else the run's export of `gguf_type`, made if missing) beside the tuned
    torch model on the same items."""
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    path = Path(gguf) if gguf else gguf_export(run_dir, gguf_type, lambda text: console.print(f"[bold]{text}"))
    loaded = load_run(run_dir)
    eval_config = loaded.config.eval
    items = split_items(run_dir, split, limit or eval_config.limit)
    prompts, tools = [c.prompt_messages for c in items], [c.tools for c in items]
    references = [str(c.reference) for c in items]
    stops = baselines.turn_stops(loaded.tokenizer)
    start = time.perf_counter()
    torch_answers = generate(
        loaded.model,
        loaded.tokenizer,
        prompts,
        eval_config.max_new_tokens,
        eval_config.batch_size,
        stops=stops,
        tools=tools,
    )
    seconds = {"torch": round(time.perf_counter() - start, 2)}
    asked = Asked(loaded.tokenizer, prompts, eval_config.max_new_tokens, stops=stops, tools=tools)
    longest = max(len(r.prompt_ids) for r in asked.requests) + eval_config.max_new_tokens
    model = GgufModel(path, context=longest + 8)
    start = time.perf_counter()
    with Progress(console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task(f"generate ({path.name})", total=len(asked.requests))
        for request in asked.requests:
            model.generate(request)
            progress.advance(task)
    seconds["export"] = round(time.perf_counter() - start, 2)
    export_answers = asked.answers()
    summary = _summary(run_dir, split, path, gguf_type, eval_config, references, torch_answers, export_answers)
    summary.seconds = seconds
    summary.differing = [
        {"line": c.line, "prompt": c.prompt_messages[-1].content, "reference": r, "torch": a, "export": b}
        for c, r, a, b in zip(items, references, torch_answers, export_answers, strict=True)
        if a != b
    ][:5]
    own_dir(RunDir(run_dir).eval)
    write_json(RunDir(run_dir).parity(gguf_type if not gguf else path.stem), asdict(summary))
    return summary


def _summary(
    run_dir: Path,
    split: str,
    path: Path,
    gguf_type: str,
    eval_config: Any,
    references: list[str],
    torch_answers: list[str],
    export_answers: list[str],
) -> ParitySummary:
    if not references:
        raise TunesmithError(f"{run_dir}: no {split} items to compare the export on.")
    scores = {
        "base": m.score(eval_config.metrics, torch_answers, references, eval_config.schema_path),
        "tuned": m.score(eval_config.metrics, export_answers, references, eval_config.schema_path),
    }
    answers = {"base": torch_answers, "tuned": export_answers}
    compared = compare_metrics(eval_config, scores, answers, references)
    metrics = {
        name: {"torch": c.base, "export": c.tuned}
        | {k: v for k, v in c.to_dict().items() if k not in ("base", "tuned")}
        for name, c in compared.items()
    }
    identical = sum(a == b for a, b in zip(torch_answers, export_answers, strict=True))
    primary = eval_config.metrics[0]
    verdict = _verdict(primary, compared.get(primary), identical, len(references), path.name)
    return ParitySummary(
        str(run_dir), split, len(references), str(path), gguf_type, identical, metrics, verdict, [], {}
    )


def _verdict(primary: str, result: stats.Comparison | None, identical: int, items: int, name: str) -> str:
    if identical == items:
        return f"The export ({name}) answers exactly as the tuned model on all {items} items."
    differ = f"{items - identical} of {items} answers differ"
    if result is None:
        return f"{differ}; {primary} could not be compared."
    detail = stats.describe(primary, result).replace(" -> ", " (torch) -> ", 1)
    if result.significant and result.diff < 0:
        return f"The export is WORSE than the tuned model: {detail}; {differ}."
    if result.significant:
        return f"The export scores higher than the tuned model: {detail}; {differ}."
    return f"No significant difference between the export and the tuned model: {detail}; {differ}."
