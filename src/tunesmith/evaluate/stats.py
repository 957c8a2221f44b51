"""Paired statistics for base versus tuned on the same items: BCa bootstrap CIs, exact and resampling tests.

Every comparison is paired: both models answer the same items. scipy does the statistics: `binomtest`
for McNemar's exact test on the discordant pairs of a binary metric, `permutation_test` (sign flips,
exact while 2**n <= resamples) for a continuous per-item metric, and a paired BCa `bootstrap` for every
95% CI. Corpus BLEU and chrF take sacrebleu's paired approximate-randomization test; other corpus
metrics (macro-F1) a p-value from the paired bootstrap distribution. A resampling p-value is never 0:
at best it is 1/(resamples + 1), and it is printed as below that. Our own code is only what no library
here does: that bootstrap p-value and Holm's correction.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

ALPHA = 0.05


@dataclass
class Comparison:
    base: float
    tuned: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    test: str
    resamples: int | None = None  # None: an exact test, whose p-value has no resampling floor

    @property
    def significant(self) -> bool:
        """The CI excludes 0 and the test agrees (a bootstrap CI of a few items can collapse to a point)."""
        return (self.ci_low > 0 or self.ci_high < 0) and self.p_value < ALPHA

    @property
    def p_text(self) -> str:
        return p_text(self.p_value, self.resamples)

    def to_dict(self) -> dict[str, Any]:
        values = {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}
        values["p_value"] = float(f"{self.p_value:.3g}")  # significant digits: 1.8e-12 must not print as 0
        return values | {"p_text": self.p_text, "significant": self.significant}


def p_text(p_value: float, resamples: int | None) -> str:
    """'p=0.012', or 'p < 1/2001' when no resample of 2000 was as extreme as the observed difference."""
    if resamples and p_value <= (1 + 1e-9) / (resamples + 1):
        return f"p < 1/{resamples + 1}"
    return f"p={p_value:.3g}"


def mcnemar_exact(base: list[float], tuned: list[float]) -> float:
    """Two-sided exact McNemar p-value: scipy's binomial test of the discordant pairs at p = 1/2."""
    fixed = sum(1 for b, t in zip(base, tuned, strict=True) if b < 0.5 <= t)
    broken = sum(1 for b, t in zip(base, tuned, strict=True) if t < 0.5 <= b)
    if fixed + broken == 0:
        return 1.0
    return float(scipy_stats.binomtest(fixed, fixed + broken, 0.5).pvalue)


def _mean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(values, axis=axis)


EXACT_UP_TO = 16  # items: 2**16 sign patterns enumerate in well under a second


def permutation_p(diffs: np.ndarray, rounds: int, seed: int) -> tuple[float, int | None]:
    """Two-sided sign-flip permutation test of a mean paired difference of zero: (p-value, resamples).

    Up to EXACT_UP_TO items (or 2**n <= rounds) scipy enumerates every sign pattern and its p-value is exact
    (resamples None). Beyond, scipy draws `rounds` patterns; the p-value is then (extreme + 1)/(rounds + 1) with
    extreme counted on |mean| (the sign-flip null is symmetric), so its floor is 1/(rounds + 1), where scipy's
    doubled smaller tail would floor at 2/(rounds + 1).
    """
    if not np.any(diffs):
        return 1.0, None
    exact = diffs.size <= EXACT_UP_TO or 2**diffs.size <= rounds
    result = scipy_stats.permutation_test(
        (diffs,),
        _mean,
        permutation_type="samples",
        n_resamples=2**diffs.size if exact else rounds,
        vectorized=True,
        rng=seed,
    )
    if exact:
        return float(result.pvalue), None
    extreme = int(np.sum(np.abs(result.null_distribution) >= abs(result.statistic) - 1e-12))
    return (extreme + 1) / (rounds + 1), rounds


def _interval(result: Any, observed: float) -> tuple[float, float]:
    """The BCa interval, or the percentile one where BCa is undefined (every resample equal, say)."""
    low, high = result.confidence_interval
    if np.isfinite(low) and np.isfinite(high):
        return float(low), float(high)
    distribution = result.bootstrap_distribution
    if not np.ptp(distribution):
        return observed, observed
    low, high = np.percentile(distribution, [2.5, 97.5])
    return float(low), float(high)


def _bootstrap(data: tuple[np.ndarray, ...], statistic: Callable[..., Any], rounds: int, seed: int, **kw: Any) -> Any:
    with warnings.catch_warnings():  # a degenerate sample (all differences equal) is handled by _interval
        warnings.simplefilter("ignore", scipy_stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return scipy_stats.bootstrap(data, statistic, n_resamples=rounds, paired=True, method="BCa", rng=seed, **kw)


def _mean_difference(base: np.ndarray, tuned: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(tuned - base, axis=axis)


def compare_per_item(
    name: str, base: list[float], tuned: list[float], binary: bool, rounds: int = 2000, seed: int = 0
) -> Comparison:
    """Means, paired BCa bootstrap 95% CI of the difference, and McNemar (binary) or permutation p-value."""
    b, t = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    diff = float((t - b).mean())
    low, high = _interval(_bootstrap((b, t), _mean_difference, rounds, seed, vectorized=True), diff)
    if binary:
        p_value, resamples, test = mcnemar_exact(base, tuned), None, "mcnemar_exact"
    else:
        p_value, resamples = permutation_p(t - b, rounds, seed)
        test = "paired_permutation" if resamples else "paired_permutation_exact"
    return Comparison(float(b.mean()), float(t.mean()), diff, low, high, p_value, test, resamples)


def bootstrap_p(distribution: np.ndarray, observed: float) -> float:
    """Two-sided p-value of a zero difference from a paired bootstrap distribution of the difference.

    The distribution is shifted to mean 0 (the null) and the observed difference compared with it
    (Koehn 2004; sacrebleu's paired bootstrap does the same): (extreme + 1)/(resamples + 1), never 0.
    """
    if observed == 0:
        return 1.0
    centred = distribution - distribution.mean()
    extreme = int(np.sum(np.abs(centred) >= abs(observed) - 1e-12))
    return (extreme + 1) / (distribution.size + 1)


def sacrebleu_paired_ar(metric: Any, base: list[str], tuned: list[str], references: list[str], trials: int) -> float:
    """sacrebleu's paired approximate-randomization p-value of tuned against base (a `sacrebleu.metrics` object)."""
    from sacrebleu.significance import PairedTest

    test = PairedTest([("base", base), ("tuned", tuned)], {"metric": metric}, [references], "ar", trials)
    _, results = test()
    (scores,) = [column for name, column in results.items() if name != "System"]
    return float(scores[1].p_value)


def compare_corpus(
    function: Callable[[list[str], list[str]], float],
    base: list[str],
    tuned: list[str],
    references: list[str],
    rounds: int = 1000,
    seed: int = 0,
    sacrebleu_metric: Any = None,
) -> Comparison:
    """A corpus metric on both output lists; a paired BCa bootstrap CI of the difference from resampling items.

    The p-value is sacrebleu's paired approximate-randomization test where `sacrebleu_metric` is given (BLEU,
    chrF), else one from the paired bootstrap distribution (macro-F1).
    """
    base_value, tuned_value = function(base, references), function(tuned, references)
    observed = tuned_value - base_value

    def difference(index: np.ndarray) -> float:
        draw = index.astype(int)
        refs = [references[i] for i in draw]
        return function([tuned[i] for i in draw], refs) - function([base[i] for i in draw], refs)

    result = _bootstrap((np.arange(len(references)),), difference, rounds, seed, vectorized=False)
    low, high = _interval(result, observed)
    if sacrebleu_metric is None:
        p_value, test = bootstrap_p(np.asarray(result.bootstrap_distribution), observed), "paired_bootstrap"
    elif observed == 0:
        # sacrebleu counts only strictly larger shuffled differences, so a zero difference would come out p=1/(n+1).
        p_value, test = 1.0, "sacrebleu_paired_ar"
    else:
        p_value, test = sacrebleu_paired_ar(sacrebleu_metric, base, tuned, references, rounds), "sacrebleu_paired_ar"
    return Comparison(base_value, tuned_value, observed, low, high, p_value, test, rounds)


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values: step-down, monotone, valid whatever the dependence between metrics."""
    adjusted, running = {}, 0.0
    ordered = sorted(p_values, key=lambda name: p_values[name])
    for rank, name in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - rank) * p_values[name]))
        adjusted[name] = running
    return adjusted


def wins_ties_losses(base: list[float], tuned: list[float]) -> tuple[int, int, int]:
    wins = sum(1 for b, t in zip(base, tuned, strict=True) if t > b + 1e-12)
    losses = sum(1 for b, t in zip(base, tuned, strict=True) if b > t + 1e-12)
    return wins, len(base) - wins - losses, losses


def describe(metric: str, result: Comparison) -> str:
    """The numbers of one comparison: both scores, the difference with its CI, the p-value and the test."""
    return (
        f"{metric} {result.base:.3f} -> {result.tuned:.3f} (diff {result.diff:+.3f}, 95% CI "
        f"[{result.ci_low:+.3f}, {result.ci_high:+.3f}], {result.p_text}, {result.test})"
    )


def verdict(metric: str, result: Comparison, higher_is_better: bool = True) -> str:
    """One sentence: better, worse, or not significant, with the numbers."""
    diff = result.diff if higher_is_better else -result.diff
    detail = describe(metric, result)
    if not result.significant:
        return f"No significant difference: {detail}; the interval includes 0."
    return f"{'Fine-tuning helped' if diff > 0 else 'Fine-tuning hurt'}: {detail}."
