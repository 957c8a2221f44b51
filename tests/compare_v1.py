"""A compare.json in version 1's shape, as tunesmith wrote it before `version` (the zero-shot comparison at the top
level, the few-shot one under `few_shot`, the zero-shot contestant named "base"), for the readers' tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.rundir import RunDir


def _result(base: float, tuned: float, role: str) -> dict[str, Any]:
    return {
        "base": base, "tuned": tuned, "diff": round(tuned - base, 6), "ci_low": 0.25, "ci_high": 0.75,
        "p_value": 0.00195, "test": "mcnemar_exact", "resamples": None, "p_text": "p=0.00195", "significant": True,
        "role": role,
    }  # fmt: skip


def _row(line: int, zero: str, few: str, tuned: str) -> dict[str, Any]:
    scores = {"exact_match": {"base": float(zero == "red"), "few_shot": float(few == "red"), "tuned": 1.0}}
    return {"line": line, "prompt": f"colour {line}", "reference": "red", "base": zero, "few_shot": few,
            "tuned": tuned, "scores": scores}  # fmt: skip


def write_version_1_comparison(run_dir: Path) -> dict[str, Any]:
    """Write the run's eval/compare.json as version 1 did, and return what was written."""
    fixed = [_row(3, "old zero-shot answer", "old few-shot answer", "red")]
    loss = {"base": 2.0, "tuned": 1.0, "diff": -1.0, "ci_low": -1.2, "ci_high": -0.8, "p_value": 0.001,
            "test": "paired_permutation", "resamples": 1999, "p_text": "p=0.001", "significant": True,
            "lower_is_better": True, "role": "secondary", "p_holm": 0.001}  # fmt: skip
    written = {
        "run_dir": str(run_dir), "split": "test", "items": 12, "primary": "exact_match", "decided_by": "exact_match",
        "correction": "holm: the others carry Holm-Bonferroni adjusted p-values",
        "metrics": {"exact_match": _result(0.0, 0.75, "primary"), "loss": loss},
        "wins": 9, "ties": 3, "losses": 0, "flipped": {"fixed": fixed, "broken": []},
        "verdict": "Fine-tuning beat the strongest prompting baseline (3-shot): exact_match 0.250 -> tuned 0.750",
        "examples": fixed,
        "field_accuracy": {"base": {}, "few_shot": {}, "tuned": {}},
        "general_ability": {},
        "few_shot": {
            "against": "few_shot", "metrics": {"exact_match": _result(0.25, 0.75, "primary")},
            "decided_by": "exact_match", "wins": 6, "ties": 6, "losses": 0, "flipped": {"fixed": fixed, "broken": []},
            "verdict": "Fine-tuning helped: exact_match 0.250 -> 0.750",
        },
        "shots": 3, "strongest": "few_shot",
        "chosen_on": "exact_match on 4 validation items: zero-shot 0.000, 3-shot 0.250",
        "seconds": {"base": 1.5, "few_shot": 4.5, "tuned": 1.25, "choosing the strongest baseline": 2.0},
        "preference": None,
    }  # fmt: skip
    path = RunDir(run_dir).compare
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(written, indent=2))
    return written
