"""Scores of generated answers against references: per item (for paired statistics) and per corpus.

Per-item metrics return one number per example, so base and tuned can be compared item by item
(bootstrap, McNemar). Corpus metrics (BLEU, corpus chrF, macro-F1) are computed on whole lists and
compared by resampling items. Tool metrics read the calls out of both texts (data/tools.py) and compare
them by the Berkeley Function Calling Leaderboard's rules. A custom metric is any `module:function` or
`file.py:function` taking (prediction, reference) and returning a number.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import string
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunesmith import trust
from tunesmith.config import METRIC_NAMES
from tunesmith.data.tools import ParsedTurn, ToolCall, call_matches, calls_match, parse_any, same_json
from tunesmith.errors import TunesmithError

TOOL_METRICS = {"tool_call_parse_rate", "tool_name_accuracy", "tool_args_match", "no_call_accuracy", "tool_call_exact"}
BINARY = {"exact_match", "json_valid", "json_schema", "accuracy"} | TOOL_METRICS
CORPUS = {"bleu", "chrf_corpus", "macro_f1"}


def _json_object(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = set(string.punctuation)


def squad_normalise(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD F1: token overlap after SQuAD's normalisation (two empty answers agree, as in SQuAD 2.0)."""
    return overlap_f1(squad_normalise(prediction).split(), squad_normalise(reference).split())


def overlap_f1(got: list[Any], want: list[Any]) -> float:
    """F1 of the items two lists share (each counted as often as both hold it, in any order); two empty lists
    agree, one empty one does not."""
    if not got or not want:
        return float(not got and not want)
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: longest common subsequence of tokens."""
    a, b = prediction.lower().split(), reference.lower().split()
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def chrf(prediction: str, reference: str) -> float:
    """Sentence chrF (sacrebleu), scaled to 0..1."""
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(prediction, [reference]).score / 100


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


def json_fields_f1(prediction: str, reference: str) -> float:
    """json_fields with partial credit for list fields: a list scores the F1 of its items against the reference's,
    in any order (three of four medications right, none extra: 0.86 on that field, not 0); every other field 1 when
    equal. A reward of this kind keeps an empty list from scoring as well as a nearly right one."""
    expected, got = _json_object(reference), _json_object(prediction)
    if not isinstance(expected, dict) or not expected:
        return exact_match(prediction, reference)
    if not isinstance(got, dict):
        return 0.0
    return sum(_field_f1(got.get(key), value) for key, value in expected.items()) / len(expected)


def _field_f1(got: Any, want: Any) -> float:
    if not (isinstance(got, list) and isinstance(want, list)):
        return float(got == want)
    return overlap_f1(*([json.dumps(item, sort_keys=True) for item in items] for items in (got, want)))


def field_accuracy(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Per-field accuracy over the items whose reference is a JSON object."""
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for prediction, reference in zip(predictions, references, strict=True):
        expected, got = _json_object(reference), _json_object(prediction)
        if not isinstance(expected, dict):
            continue
        for key, value in expected.items():
            totals[key] += 1
            hits[key] += isinstance(got, dict) and got.get(key) == value
    return {key: round(hits[key] / totals[key], 4) for key in sorted(totals)}


def _calls_made(parsed: ParsedTurn) -> bool:
    return bool(parsed.tool_calls or parsed.malformed)


def tool_call_parse_rate(prediction: str, reference: str) -> float:
    """1 when every call the prediction writes decodes into a function name and a JSON object of arguments."""
    return float(not parse_any(prediction).malformed)


def no_call_accuracy(prediction: str, reference: str) -> float:
    """1 when the prediction calls a tool exactly when the reference does: no call when none is needed."""
    return float(_calls_made(parse_any(prediction)) == _calls_made(parse_any(reference)))


def _calls_agree(prediction: str, reference: str, same: Callable[[ToolCall, ToolCall], bool]) -> float:
    """1 when the predicted calls pair off with the reference's under `same`, in any order; no calls on either
    side agree, a botched call block never does."""
    got, want = parse_any(prediction), parse_any(reference)
    return float(not got.malformed and calls_match(got.tool_calls, want.tool_calls, same))


def tool_name_accuracy(prediction: str, reference: str) -> float:
    """1 when the prediction calls the reference's functions (as many of each), whatever the arguments."""
    return _calls_agree(prediction, reference, lambda got, want: got.name == want.name)


def tool_args_match(prediction: str, reference: str) -> float:
    """BFCL's AST match: the same functions, every required argument and no other, values of the right type and
    equal after normalising strings (case, spaces, punctuation), parallel calls in any order."""
    return _calls_agree(prediction, reference, call_matches)


def _exactly(got: ToolCall, want: ToolCall) -> bool:
    return got.name == want.name and same_json(got.arguments, want.arguments)


def tool_call_exact(prediction: str, reference: str) -> float:
    """1 when the calls are the reference's exactly (names, argument names, values and types), in any order."""
    return _calls_agree(prediction, reference, _exactly)


def schema_checker(schema_path: str | None) -> Callable[[str, str], float]:
    if not schema_path:
        raise TunesmithError("Metric json_schema needs eval.schema_path: the path of a JSON Schema file.")
    path = Path(schema_path)
    try:
        schema = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TunesmithError(f"eval.schema_path {path}: cannot read a JSON schema ({exc}).") from None
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema)

    def conforms(prediction: str, reference: str) -> float:
        value = _json_object(prediction)
        return float(value is not None and validator.is_valid(value))

    return conforms


def load_custom(spec: str, field: str = "eval.metrics / validation.metrics") -> Callable[..., Any]:
    """`package.module:function` or `path/to/file.py:function`, named in config field `field` (trust rules)."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise TunesmithError(f"Custom metric {spec!r}: write it as module:function or file.py:function.")
    trust.require(field, spec)
    try:
        if target.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            if module_spec is None or module_spec.loader is None:
                raise ImportError(f"cannot load {target}")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        function = getattr(module, name)
    except (ImportError, FileNotFoundError, AttributeError) as exc:
        raise TunesmithError(f"Custom metric {spec!r}: {exc}. Check the module path and the function name.") from None
    return function


PER_ITEM: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "accuracy": exact_match,  # classification: the label predicted is the label expected
    "token_f1": token_f1,
    "rouge_l": rouge_l,
    "chrf": chrf,
    "json_valid": json_valid,
    "json_fields": json_fields,
    "json_fields_f1": json_fields_f1,
    "tool_call_parse_rate": tool_call_parse_rate,
    "tool_name_accuracy": tool_name_accuracy,
    "tool_args_match": tool_args_match,
    "no_call_accuracy": no_call_accuracy,
    "tool_call_exact": tool_call_exact,
}


def sacrebleu_metric(name: str) -> Any:
    """The sacrebleu metric object behind a corpus metric (bleu, chrf_corpus), for its paired test; else None."""
    from sacrebleu.metrics import BLEU, CHRF

    return {"bleu": BLEU, "chrf_corpus": CHRF}[name]() if name in ("bleu", "chrf_corpus") else None


def bleu(predictions: list[str], references: list[str]) -> float:
    return sacrebleu_metric("bleu").corpus_score(predictions, [references]).score / 100


def chrf_corpus(predictions: list[str], references: list[str]) -> float:
    return sacrebleu_metric("chrf_corpus").corpus_score(predictions, [references]).score / 100


def macro_f1(predictions: list[str], references: list[str]) -> float:
    """F1 averaged over the reference labels; a prediction outside them only costs its item's label a miss.

    The same as scikit-learn's `f1_score(references, predictions, average="macro", labels=<reference labels>)`.
    """
    labels = sorted({normalise(r) for r in references})
    scores = []
    for label in labels:
        tp = sum(normalise(p) == label and normalise(r) == label for p, r in zip(predictions, references, strict=True))
        fp = sum(normalise(p) == label and normalise(r) != label for p, r in zip(predictions, references, strict=True))
        fn = sum(normalise(p) != label and normalise(r) == label for p, r in zip(predictions, references, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


CORPUS_METRICS: dict[str, Callable[[list[str], list[str]], float]] = {
    "bleu": bleu,
    "chrf_corpus": chrf_corpus,
    "macro_f1": macro_f1,
}
KNOWN = sorted(set(PER_ITEM) | set(CORPUS_METRICS) | {"json_schema"})
if tuple(KNOWN) != METRIC_NAMES:  # the config's vocabulary and these functions are one list
    raise ImportError(f"config.METRIC_NAMES {METRIC_NAMES} and the metrics implemented {KNOWN} differ")
# The per-item metric that stands in for a corpus metric when only corpus metrics are listed: sentence chrF
# for BLEU too (sentence BLEU is mostly zeros on short answers), the label being right for macro-F1.
ITEM_COUNTERPART = {"bleu": "chrf", "chrf_corpus": "chrf", "macro_f1": "accuracy"}


def deciding_metric(names: list[str]) -> str:
    """The per-item metric that decides wins, ties, losses and flipped items: the first per-item one of names,
    else the per-item counterpart of the first (corpus) metric. A corpus score has no per-item values to compare."""
    for name in names:
        if name not in CORPUS_METRICS:
            return name
    return ITEM_COUNTERPART[names[0]]


def confusion(predictions: list[str], references: list[str]) -> dict[str, dict[str, int]]:
    """reference label -> predicted label -> count (predictions outside the labels count as 'other')."""
    labels = sorted({normalise(r) for r in references})
    table = {label: dict.fromkeys([*labels, "other"], 0) for label in labels}
    for prediction, reference in zip(predictions, references, strict=True):
        got = normalise(prediction)
        table[normalise(reference)][got if got in table else "other"] += 1
    return table


def per_item_functions(names: list[str], schema: str | None = None) -> dict[str, Callable[[str, str], float]]:
    functions = {}
    for name in names:
        if name in CORPUS_METRICS:
            continue
        if name == "json_schema":
            functions[name] = schema_checker(schema)
        elif name in PER_ITEM:
            functions[name] = PER_ITEM[name]
        elif ":" in name:
            functions[name] = load_custom(name)
        else:
            raise TunesmithError(f"Unknown metric {name!r}. Known: {', '.join(KNOWN)}, or module:function.")
    return functions


def score(
    names: list[str], predictions: list[str], references: list[str], schema: str | None = None
) -> dict[str, list[float]]:
    """Per-item scores for each named per-item metric (corpus metrics are left to `corpus_scores`)."""
    functions = per_item_functions(names, schema)
    result = {}
    for name, function in functions.items():
        values = []
        for prediction, reference in zip(predictions, references, strict=True):
            value = function(prediction, reference)
            if not isinstance(value, int | float):
                raise TunesmithError(f"Metric {name} returned {value!r}; a metric must return a number.")
            values.append(float(value))
        result[name] = values
    return result


def corpus_scores(names: list[str], predictions: list[str], references: list[str]) -> dict[str, float]:
    return {name: CORPUS_METRICS[name](predictions, references) for name in names if name in CORPUS_METRICS}


def summary(
    per_item: dict[str, list[float]], names: list[str], predictions: list[str], references: list[str]
) -> dict[str, float]:
    """One value per metric: the mean of each per-item metric's scores, the corpus metrics on the whole set."""
    means = {name: sum(values) / max(1, len(values)) for name, values in per_item.items()}
    return means | corpus_scores(names, predictions, references)
