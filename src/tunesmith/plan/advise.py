"""Should this task be fine-tuned, solved with retrieval (RAG), or with prompting? With evidence where possible.

The criteria follow the guide: fine-tune for a style, format or behaviour (or knowledge) that prompting
cannot give; if the knowledge can be supplied as context, fine-tuning is probably not needed. With data
and a model, the base model is run zero-shot and few-shot on held-out examples, and the measured
headroom decides between "prompting is enough" and "fine-tune".
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config import DEFAULT_MODEL
from tunesmith.data.formats import read_conversations

NEEDS = ("style", "format", "behaviour", "knowledge")


@dataclass
class Situation:
    need: str = "format"  # what the model must learn
    knowledge_changes: bool = False  # the knowledge changes often (prices, docs, tickets)
    knowledge_fits_context: bool = False  # the needed facts can be retrieved and put in the prompt
    examples: int = 0  # labelled examples available
    latency_critical: bool = False
    private: bool = False  # data may not leave the organisation


@dataclass
class Evidence:
    metric: str
    items: int
    zero_shot: float
    few_shot: float
    k: int
    target: float
    predictions: list[dict[str, str]] = field(default_factory=list)

    @property
    def at_floor(self) -> bool:
        """Both prompting baselines score 0 (every built-in metric's floor): prompting does not work at all."""
        return max(self.zero_shot, self.few_shot) <= 0

    @property
    def prompting_enough(self) -> bool:
        return not self.at_floor and max(self.zero_shot, self.few_shot) >= self.target


@dataclass
class EvidenceOptions:
    """How the base model is measured on the user's examples."""

    model: str = DEFAULT_MODEL  # the base model, as a `model:` setting
    metric: str = "exact_match"  # any metric `eval` knows (evaluate/metrics.py)
    schema_path: str | None = None  # JSON Schema file of the json_schema metric
    k: int | None = None  # solved examples in the few-shot prompt; None: as many as fit, up to MAX_AUTO_SHOTS
    similar: bool = False  # shots most similar to each question instead of seeded random ones
    sample: int = 20  # held-out examples scored
    target: float = 0.8  # the score that counts as solved
    seed: int = 42  # seed of the sample and of the shots
    max_new_tokens: int = 64  # most tokens per answer


@dataclass
class Advice:
    recommendation: str  # fine-tune | rag | prompting | collect-data
    reasons: list[str]
    evidence: dict[str, Any] | None = None


def advise(situation: Situation, data: str | Path | None = None, options: EvidenceOptions | None = None) -> Advice:
    """The advice for `situation`; with `data`, measured evidence too, and the examples counted from it when
    the situation does not say how many there are."""
    if data is None:
        return decide(situation)
    from tunesmith.models import load_chat_tokenizer, load_model, resolve_model_path

    options = options or EvidenceOptions()
    source = resolve_model_path(options.model)
    tokenizer = load_chat_tokenizer(source)
    situation.examples = situation.examples or len(read_conversations(data)[0])
    evidence = gather_evidence(data, load_model(source).eval(), tokenizer, options)
    return decide(situation, evidence)


def decide(situation: Situation, evidence: Evidence | None = None) -> Advice:
    reasons: list[str] = []
    if situation.need == "knowledge" and (situation.knowledge_changes or situation.knowledge_fits_context):
        why = "changes often" if situation.knowledge_changes else "can be supplied as context"
        reasons.append(
            f"the knowledge {why}: retrieval (RAG) keeps answers current without retraining, "
            "so fine-tuning is probably not needed"
        )
        if evidence is not None:
            reasons.append(_evidence_line(evidence))
        return Advice("rag", reasons, _as_dict(evidence))
    if evidence is not None and evidence.prompting_enough:
        reasons.append(_evidence_line(evidence))
        reasons.append(
            "few-shot prompting already meets the target: fine-tuning is probably unnecessary; "
            "fine-tune later only to cut prompt length (latency, cost) or to go further"
        )
        return Advice("prompting", reasons, _as_dict(evidence))
    if situation.need in ("style", "format", "behaviour"):
        reasons.append(f"a {situation.need} is learned from examples better than it is described in a prompt")
    else:
        reasons.append(
            "stable knowledge the base model lacks and that cannot be put in the prompt is a case for fine-tuning"
        )
    if evidence is not None:
        reasons.append(_evidence_line(evidence))
        if evidence.at_floor:
            reasons.append(_floor_line(evidence))
    if situation.latency_critical:
        reasons.append("a tuned model needs no few-shot examples in the prompt: shorter prompts, lower latency")
    if situation.private:
        reasons.append("a fine-tuned open model runs on your own hardware, so data never leaves it")
    if situation.examples and situation.examples < 100:
        reasons.append(
            f"only {situation.examples} examples: start with few-shot prompting and collect 500-1000+ "
            "examples; significant gains from fine-tuning usually need that many"
        )
        return Advice("collect-data", reasons, _as_dict(evidence))
    if situation.examples and situation.examples < 500:
        reasons.append(
            f"{situation.examples} examples is enough to start with LoRA; 500-1000+ usually give significant gains"
        )
    return Advice("fine-tune", reasons, _as_dict(evidence))


def _as_dict(evidence: Evidence | None) -> dict[str, Any] | None:
    return None if evidence is None else asdict(evidence) | {"prompting_enough": evidence.prompting_enough}


def _evidence_line(evidence: Evidence) -> str:
    best = max(evidence.zero_shot, evidence.few_shot)
    return (
        f"measured on {evidence.items} held-out examples: {evidence.metric} zero-shot {evidence.zero_shot:.2f}, "
        f"{evidence.k}-shot {evidence.few_shot:.2f}; target {evidence.target:.2f}, headroom "
        f"{evidence.target - best:+.2f} to the target and {1 - best:.2f} to perfect"
    )


def _floor_line(evidence: Evidence) -> str:
    return (
        f"the base model scores 0 on {evidence.metric} even with {evidence.k} solved examples: first check the data "
        "and the metric (read the predictions in the evidence: are the answers near the references, does "
        f"{evidence.metric} measure what you want?); if they are right, fine-tuning has to teach the task from "
        "nothing, so plan for more steps or a higher learning rate, and try a larger model if it stays at 0"
    )


def gather_evidence(data: str | Path, model: Any, tokenizer: Any, options: EvidenceOptions) -> Evidence:
    """Score the base model zero-shot and few-shot on a seeded sample, as `compare` prompts it
    (evaluate/baselines.py); the shots come from outside the sample."""
    from tunesmith.evaluate import baselines
    from tunesmith.evaluate.generate import generate

    conversations = [c for c in read_conversations(data)[0] if c.reference is not None]
    random.Random(options.seed).shuffle(conversations)
    held_out, pool = conversations[: options.sample], conversations[options.sample :] or conversations
    references = [str(c.reference) for c in held_out]
    few = baselines.few_shot(
        tokenizer,
        held_out,
        pool,
        shots=options.k,
        limit=baselines.context_limit(model),
        max_new_tokens=options.max_new_tokens,
        seed=options.seed,
        similar=options.similar,
    )
    stops = baselines.turn_stops(tokenizer)
    answers = {
        baseline.name: generate(model, tokenizer, baseline.prompts, options.max_new_tokens, stops=stops)
        for baseline in (baselines.zero_shot(held_out), few)
    }
    value = {
        name: baselines.metric_value(options.metric, predictions, references, options.schema_path)
        for name, predictions in answers.items()
    }
    rows = [
        {"reference": r, "zero_shot": z, "few_shot": f}
        for r, z, f in zip(references, answers["zero_shot"], answers["few_shot"], strict=True)
    ]
    return Evidence(
        options.metric,
        len(held_out),
        round(value["zero_shot"], 4),
        round(value["few_shot"], 4),
        few.k,
        options.target,
        rows[:5],
    )
