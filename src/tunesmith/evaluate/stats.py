"""Paired statistics for base versus tuned on the same items: bootstrap CIs, McNemar, permutation tests.

Every comparison is paired: both models answer the same items, so the resampling draws item indices
once and scores both models on the same draw. Binary per-item metrics (right/wrong) get McNemar's
exact test on the discordant pairs; continuous per-item metrics a sign-flip permutation test of the
mean difference; corpus metrics (BLEU, macro-F1) a p-value from the bootstrap distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Comparison:
    base: float
    tuned: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    test: str

    @property
    def significant(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0

    def to_dict(self) -> dict[str, float | str | bool]:
        values = {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}
        values["p_value"] = float(f"{self.p_value:.3g}")  # significant digits: 1.8e-12 must not print as 0
        return values | {"significant": self.significant}


def mcnemar_exact(base: list[float], tuned: list[float]) -> float:
    """Two-sided exact McNemar p-value: binomial test of the discordant pairs at p = 1/2."""
    fixed = sum(1 for b, t in zip(base, tuned, strict=True) if b < 0.5 <= t)
    broken = sum(1 for b, t in zip(base, tuned, strict=True) if t < 0.5 <= b)
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(fixed, broken) + 1)) / 2**n
    return min(1.0, 2 * tail)


def permutation_p(diffs: np.ndarray, rounds: int, rng: np.random.Generator) -> float:
    """Two-sided sign-flip permutation test of a mean paired difference of zero."""
    observed = abs(diffs.mean())
    if not np.any(diffs):
        return 1.0
    signs = rng.choice([-1.0, 1.0], size=(rounds, diffs.size))
    extreme = np.sum(np.abs((signs * diffs).mean(axis=1)) >= observed - 1e-12)
    return float((extreme + 1) / (rounds + 1))


def bootstrap_indices(n: int, rounds: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, n, size=(rounds, n))


def compare_per_item(
    name: str, base: list[float], tuned: list[float], binary: bool, rounds: int = 2000, seed: int = 0
) -> Comparison:
    """Means, paired-bootstrap 95% CI of the difference, and McNemar (binary) or permutation p-value."""
    rng = np.random.default_rng(seed)
    b, t = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    diffs = t - b
    draws = bootstrap_indices(len(diffs), rounds, rng)
    boot = diffs[draws].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    if binary:
        p_value, test = mcnemar_exact(base, tuned), "mcnemar_exact"
    else:
        p_value, test = permutation_p(diffs, rounds, rng), "paired_permutation"
    return Comparison(float(b.mean()), float(t.mean()), float(diffs.mean()), float(low), float(high), p_value, test)


def compare_corpus(
    function: Callable[[list[str], list[str]], float],
    base: list[str],
    tuned: list[str],
    references: list[str],
    rounds: int = 1000,
    seed: int = 0,
) -> Comparison:
    """A corpus metric on both output lists; CI and p-value from resampling items for both at once."""
    rng = np.random.default_rng(seed)
    base_value, tuned_value = function(base, references), function(tuned, references)
    diffs = []
    for draw in bootstrap_indices(len(references), rounds, rng):
        refs = [references[i] for i in draw]
        diffs.append(function([tuned[i] for i in draw], refs) - function([base[i] for i in draw], refs))
    boot = np.asarray(diffs)
    low, high = np.percentile(boot, [2.5, 97.5])
    p_value = min(1.0, 2 * min(np.mean(boot <= 0), np.mean(boot >= 0)))
    return Comparison(
        base_value, tuned_value, tuned_value - base_value, float(low), float(high), float(p_value), "bootstrap"
    )


def wins_ties_losses(base: list[float], tuned: list[float]) -> tuple[int, int, int]:
    wins = sum(1 for b, t in zip(base, tuned, strict=True) if t > b + 1e-12)
    losses = sum(1 for b, t in zip(base, tuned, strict=True) if b > t + 1e-12)
    return wins, len(base) - wins - losses, losses


def verdict(metric: str, result: Comparison, higher_is_better: bool = True) -> str:
    """One sentence: better, worse, or not significant, with the numbers."""
    diff = result.diff if higher_is_better else -result.diff
    detail = (
        f"{metric} {result.base:.3f} -> {result.tuned:.3f} (diff {result.diff:+.3f}, 95% CI "
        f"[{result.ci_low:+.3f}, {result.ci_high:+.3f}], p={result.p_value:.3g}, {result.test})"
    )
    if not result.significant:
        return f"No significant difference: {detail}; the interval includes 0."
    return f"{'Fine-tuning helped' if diff > 0 else 'Fine-tuning hurt'}: {detail}."
