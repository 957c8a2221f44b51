"""The rewards of objective grpo: what a sampled completion is worth, from the task's own metrics and rules.

Each `rl.rewards` entry becomes a `Reward` that scores a batch of `Sample`s: a per-item metric of
evaluate/metrics.py against the example's reference answer, a `regex` format reward, a `length` penalty, your own
`file.py:fn(prompt, completion, example)` (run only under trust.require: a run folder's config never runs code), or
a reward model run (`model:`, built by objectives/reward_model.py). A reward that raises, times out or returns None
skips that completion: `score` counts it and leaves the completion out of the advantages and the loss.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunesmith.config import RewardConfig
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.metrics import load_custom, per_item_functions

# the metrics that score a completion on its own
NO_REFERENCE_METRICS = {"json_valid", "json_schema", "tool_call_parse_rate"}


@dataclass(frozen=True)
class Sample:
    """One completion to score: its prompt (the last user turn), its text, the example's reference answer (None
    when the data has none), the example's record, its tokens and whether it hit the length limit."""

    prompt: str
    completion: str
    reference: str | None
    example: dict[str, Any]
    tokens: int
    truncated: bool


# A batch scorer: one value per sample, None to skip that sample.
Scorer = Callable[[list[Sample]], list[float | None]]


@dataclass(frozen=True)
class Reward:
    name: str
    weight: float
    needs_reference: bool
    score: Scorer


def _per_sample(function: Callable[[Sample], Any]) -> Scorer:
    """A batch scorer from a per-sample one; a sample it raises on (or times out on) is skipped (None)."""

    def each(sample: Sample) -> float | None:
        try:
            return _number(function(sample))
        except Exception:
            return None

    return lambda samples: [each(sample) for sample in samples]


def _metric(entry: RewardConfig, schema_path: str | None) -> Scorer:
    metric = per_item_functions([str(entry.metric)], schema_path)[str(entry.metric)]

    def score(sample: Sample) -> float | None:
        if sample.reference is None and entry.metric not in NO_REFERENCE_METRICS:
            return None
        return metric(sample.completion, sample.reference or "")

    return _per_sample(score)


def _regex(entry: RewardConfig) -> Scorer:
    try:
        pattern = re.compile(str(entry.regex), re.DOTALL)
    except re.error as exc:
        raise TunesmithError(f"rl.rewards regex {entry.regex!r} is not a valid regular expression: {exc}.") from None
    matches = pattern.fullmatch if entry.fullmatch else pattern.search
    return _per_sample(lambda sample: float(matches(sample.completion.strip()) is not None))


def _length(entry: RewardConfig, max_completion_tokens: int) -> Scorer:
    free = int(entry.length or 0)
    span = max(1, max_completion_tokens - free)
    return _per_sample(lambda sample: -min(1.0, max(0, sample.tokens - free) / span))


def call_with_timeout(function: Callable[[], Any], seconds: float) -> Any:
    """function() in a daemon thread, or TimeoutError after `seconds` (the thread is left to finish on its own:
    Python cannot stop it, but it no longer holds anything up)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:  # handed to the caller, which skips the completion
            outcome["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"took longer than {seconds:g}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _code(entry: RewardConfig) -> Scorer:
    function = load_custom(str(entry.code), "rl.rewards")
    return _per_sample(
        lambda sample: call_with_timeout(
            lambda: function(sample.prompt, sample.completion, sample.example), entry.timeout_s
        )
    )


def _model(entry: RewardConfig) -> Scorer:
    """A reward model run's score of each (prompt, completion), batched (objectives/reward_model.py). Loading it
    reads safetensors, JSON and YAML only."""
    from tunesmith.objectives.reward_model import load_reward_model

    scorer = load_reward_model(str(entry.model))

    def scores(samples: list[Sample]) -> list[float | None]:
        return list(scorer.score([s.prompt for s in samples], [s.completion for s in samples]))

    return scores


def reference_rewards(entries: list[RewardConfig]) -> list[str]:
    """The names of the rewards that score against the example's reference answer (what the data must hold)."""
    return [e.label for e in entries if e.kind == "metric" and e.metric not in NO_REFERENCE_METRICS]


def build_rewards(entries: list[RewardConfig], schema_path: str | None, max_completion_tokens: int) -> list[Reward]:
    """One Reward per rl.rewards entry; names are made unique (a second exact_match is exact_match_2)."""
    rewards: list[Reward] = []
    for entry in entries:
        kind = entry.kind
        if kind == "metric":
            scorer = _metric(entry, schema_path)
        elif kind == "regex":
            scorer = _regex(entry)
        elif kind == "length":
            scorer = _length(entry, max_completion_tokens)
        elif kind == "code":
            scorer = _code(entry)
        else:
            scorer = _model(entry)
        name, taken = entry.label, {r.name for r in rewards}
        if name in taken:
            name = next(f"{entry.label}_{n}" for n in range(2, len(rewards) + 3) if f"{entry.label}_{n}" not in taken)
        rewards.append(Reward(name, entry.weight, bool(reference_rewards([entry])), scorer))
    return rewards


@dataclass
class Scored:
    """The rewards of a batch of samples: per reward the values (None: skipped), the combined weighted sum (None
    when any reward skipped the sample), and per reward how many it skipped and why (the first error)."""

    values: dict[str, list[float | None]]
    combined: list[float | None]
    skipped: dict[str, int]
    errors: dict[str, str]


def score(rewards: list[Reward], samples: list[Sample]) -> Scored:
    """Every reward on every sample, and their weighted sum."""
    values: dict[str, list[float | None]] = {}
    skipped: dict[str, int] = {}
    errors: dict[str, str] = {}
    for reward in rewards:
        found: list[float | None]
        try:
            found = reward.score(samples)
        except Exception as exc:  # a batch scorer that fails skips the whole batch for this reward
            found, errors[reward.name] = [None] * len(samples), f"{type(exc).__name__}: {exc}"
        column: list[float | None] = [None] * len(samples)
        if len(found) == len(samples):
            column = [_number(value) for value in found]
        values[reward.name], skipped[reward.name] = column, sum(v is None for v in column)
    combined: list[float | None] = []
    for index in range(len(samples)):
        parts = [(reward.weight, values[reward.name][index]) for reward in rewards]
        total = sum(weight * value for weight, value in parts if value is not None)
        combined.append(None if any(value is None for _, value in parts) else total)
    return Scored(values, combined, skipped, errors)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)
