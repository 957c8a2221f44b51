"""General-ability (forgetting) check: lm-evaluation-harness tasks on the base and the tuned model.

Optional: runs only when `eval.lm_eval_tasks` names tasks and lm-eval is installed. The models already
loaded for the comparison are handed to lm-eval's HF wrapper (the tuned one with its adapter, the base
one with the adapter switched off), so nothing is downloaded or loaded twice. Local task folders
(`eval.lm_eval_include_path`) let a team keep its own regression suite next to the config.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from tunesmith import trust
from tunesmith.errors import TunesmithError

if TYPE_CHECKING:
    from tunesmith.config import EvalConfig


def _numbers(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """task -> metric -> value, without the stderr entries and the aliases."""
    found: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and "stderr" not in key:
                found.setdefault(task, {})[key.split(",")[0]] = float(value)
    return found


def general_ability(tuned: Any, base: Any, eval_config: EvalConfig) -> dict[str, dict[str, dict[str, float]]]:
    """task -> metric -> {base, tuned, diff} for the tasks in eval.lm_eval_tasks."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise TunesmithError(
            "eval.lm_eval_tasks needs lm-evaluation-harness: pip install lm-eval (or empty eval.lm_eval_tasks)."
        ) from None
    if eval_config.lm_eval_include_path:
        # Its task YAML can run code (`!function`): only when this command line allowed it.
        trust.require("eval.lm_eval_include_path", str(eval_config.lm_eval_include_path))
    manager = (
        TaskManager(include_path=eval_config.lm_eval_include_path)
        if eval_config.lm_eval_include_path
        else TaskManager()
    )
    scores = {}
    for label, loaded in (("base", base), ("tuned", tuned)):
        context = loaded.base_only() if label == "base" and loaded is tuned else nullcontext()
        with context:
            wrapped = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=eval_config.batch_size)
            try:
                output = lm_eval.simple_evaluate(
                    model=wrapped,
                    tasks=list(eval_config.lm_eval_tasks),
                    task_manager=manager,
                    limit=eval_config.lm_eval_limit,
                    log_samples=False,
                )
            except (KeyError, ValueError) as exc:
                raise TunesmithError(
                    f"lm-eval could not run {eval_config.lm_eval_tasks}: {exc}. Check the task names "
                    "(`lm-eval ls tasks`) and eval.lm_eval_include_path."
                ) from None
        scores[label] = _numbers(output["results"])
    table: dict[str, dict[str, dict[str, float]]] = {}
    for task, metrics in scores["tuned"].items():
        for metric, value in metrics.items():
            before = scores["base"].get(task, {}).get(metric)
            if before is not None:
                table.setdefault(task, {})[metric] = {"base": before, "tuned": value, "diff": value - before}
    return table
