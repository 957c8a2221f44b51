"""Per-item scores of a generated answer against its reference, for the base-versus-tuned comparison."""

from __future__ import annotations

import json
from typing import Any


def _json_object(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def exact_match(prediction: str, reference: str) -> float:
    return float(" ".join(prediction.split()) == " ".join(reference.split()))


def json_valid(prediction: str, reference: str) -> float:
    return float(_json_object(prediction) is not None)


def json_fields(prediction: str, reference: str) -> float:
    """Share of the reference object's fields that the prediction reproduces exactly."""
    expected, got = _json_object(reference), _json_object(prediction)
    if not isinstance(expected, dict) or not expected:
        return exact_match(prediction, reference)
    if not isinstance(got, dict):
        return 0.0
    return sum(got.get(key) == value for key, value in expected.items()) / len(expected)


METRICS = {"exact_match": exact_match, "json_valid": json_valid, "json_fields": json_fields}


def score(names: list[str], predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-item scores for each named metric."""
    return {name: [METRICS[name](p, r) for p, r in zip(predictions, references, strict=True)] for name in names}
