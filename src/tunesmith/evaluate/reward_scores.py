"""The reward of a grpo run on the compared split: its rl.rewards, the same functions as training (rewards.py),
scored on every contestant's answers (the prompting baselines, the starting run, the tuned model).

A code reward runs only when this command line allowed it (trust.allowed: `--allow-code`, or the config file or
flag that named it); a run folder's config never runs code here. A code reward not allowed is skipped and the
summary says so and why; the combined reward is then the weighted sum of the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunesmith import trust
from tunesmith.config import RewardConfig, RunConfig
from tunesmith.data.formats import Conversation
from tunesmith.rewards import Sample, build_rewards, score

NOT_ALLOWED = (
    "a code reward read back from the run folder's config.yaml runs only when this command line allows it: "
    "pass --allow-code to score it"
)


@dataclass
class RewardScores:
    """Per contestant the combined reward of each item (None: a reward skipped it), and what compare.json keeps:
    the rewards used and skipped, and per contestant each reward's mean and the items skipped."""

    combined: dict[str, list[float | None]]
    summary: dict[str, Any]


def allowed_rewards(entries: list[RewardConfig]) -> tuple[list[RewardConfig], list[dict[str, str]]]:
    """The rewards compare may run, and the code rewards it may not (with the reason)."""
    kept, skipped = [], []
    for entry in entries:
        if entry.kind == "code" and not trust.allowed(str(entry.code)):
            skipped.append({"reward": entry.label, "code": str(entry.code), "why": NOT_ALLOWED})
        else:
            kept.append(entry)
    return kept, skipped


def _samples(tokenizer: Any, items: list[Conversation], answers: list[str]) -> list[Sample]:
    """Each answer as a completion to score: its prompt's last user turn, the item's reference and record, and its
    tokens (the length reward counts them); an answer of eval.max_new_tokens is scored as it is (no overlong)."""
    samples = []
    for item, answer in zip(items, answers, strict=True):
        users = [m.content for m in item.prompt_messages if m.role == "user"]
        tokens = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
        samples.append(Sample(users[-1] if users else "", answer, item.reference, item.to_record(), tokens, False))
    return samples


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(sum(kept) / len(kept), 6) if kept else None


def score_answers(
    config: RunConfig, tokenizer: Any, items: list[Conversation], outputs: dict[str, list[str]]
) -> RewardScores | None:
    """The run's rewards on every contestant's answers; None for a run of another objective. When no reward may
    run, the summary says which were skipped and there are no scores."""
    if config.objective != "grpo":
        return None
    entries, skipped = allowed_rewards(config.rl.rewards)
    rewards = build_rewards(entries, config.eval.schema_path, config.rl.max_completion_tokens)
    summary: dict[str, Any] = {"rewards": [r.name for r in rewards], "weights": {r.name: r.weight for r in rewards}}
    summary |= {"skipped_rewards": skipped, "contestants": {}}
    if not rewards:
        return RewardScores({}, summary)
    combined: dict[str, list[float | None]] = {}
    for contestant, answers in outputs.items():
        scored = score(rewards, _samples(tokenizer, items, answers))
        combined[contestant] = scored.combined
        means = {f"reward_{name}": _mean(values) for name, values in scored.values.items()}
        skipped_items = sum(value is None for value in scored.combined)
        summary["contestants"][contestant] = {"reward": _mean(scored.combined), **means, "skipped": skipped_items}
    return RewardScores(combined, summary)


def paired(scores: RewardScores | None, against: str) -> tuple[list[float], list[float]]:
    """The combined rewards of `against` and of the tuned model on the items both were scored on."""
    base: list[float] = []
    tuned: list[float] = []
    if scores is None or against not in scores.combined:
        return base, tuned
    for b, t in zip(scores.combined[against], scores.combined["tuned"], strict=True):
        if b is not None and t is not None:
            base.append(b)
            tuned.append(t)
    return base, tuned
