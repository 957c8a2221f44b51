"""Prompting baselines: what the base model does without fine-tuning, asked plainly and shown solved examples.

Fine-tuning pays only when it beats prompting, so the evidence at the end (`compare`, `run`, the report) and
at the start (`advise`) sets the tuned model against two baselines, built here the same way for both:

- zero-shot: the base model given the prompt alone, in the run's chat rendering;
- few-shot: the base model given k solved training examples as earlier turns of the same conversation,
  then the prompt. The shots are seeded (random) or the k whose prompts share the most words with the
  question (`similar`), never the question itself. By default k is as many as fit the model's context with
  room for the answer, at most MAX_AUTO_SHOTS.

A base model shown a pattern continues it into the next turn (writes "### User: ..." after its answer)
unless it is stopped, as anyone prompting it would: every answer ends at the template's turn boundary as
well as at EOS (`turn_stops`), for baselines and tuned model alike, so each is scored on its answer only.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from tunesmith.data.formats import Conversation, Message

MAX_AUTO_SHOTS = 4  # prompt time grows with every shot while the gain of each further one shrinks
WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Baseline:
    """One way of prompting the base model: its name, the shots per prompt, and the prompt of every item."""

    name: str  # "zero_shot" | "few_shot"
    k: int
    prompts: list[tuple[Message, ...]]


def few_shot_prompt(question: Conversation, shots: list[Conversation]) -> tuple[Message, ...]:
    """The question's prompt preceded by solved examples as earlier turns of the same conversation, each shot's
    answer its last assistant turn as it is (tool calls as calls, rendered the way the template renders them)."""
    turns: list[Message] = []
    for shot in shots:
        turns.extend(shot.prompt_messages)
        turns.append(shot.messages[len(shot.prompt_messages)])
    return (*turns, *question.prompt_messages)


def _words(conversation: Conversation) -> frozenset[str]:
    return frozenset(WORD.findall(" ".join(m.content for m in conversation.prompt_messages).lower()))


def pick_shots(
    questions: list[Conversation], pool: list[Conversation], k: int, seed: int, similar: bool = False
) -> list[list[Conversation]]:
    """k shots per question from `pool`: seeded at random, or the k most similar prompts (word-set Jaccard,
    ties in seeded order). A pool example with the question's own prompt is never a shot (it would leak)."""
    rng = random.Random(seed)
    order = list(pool)
    rng.shuffle(order)
    chosen = []
    for question in questions:
        candidates = [c for c in order if c.prompt_messages != question.prompt_messages]
        if similar:
            words = _words(question)

            def overlap(shot: Conversation, words: frozenset[str] = words) -> float:
                other = _words(shot)
                return len(words & other) / max(1, len(words | other))

            chosen.append(sorted(candidates, key=overlap, reverse=True)[:k])
        else:
            chosen.append(rng.sample(candidates, min(k, len(candidates))))
    return chosen


def context_limit(model: Any) -> int:
    """The longest sequence the model takes (its position embeddings), 4096 when its config does not say."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    return int(getattr(config, "max_position_embeddings", None) or 4096)


def few_shot(
    tokenizer: Any,
    questions: list[Conversation],
    pool: list[Conversation],
    *,
    shots: int | None,
    limit: int,
    max_new_tokens: int,
    seed: int,
    similar: bool = False,
) -> Baseline:
    """The few-shot baseline with the most shots (`shots`, or up to MAX_AUTO_SHOTS when None) such that every
    prompt plus `max_new_tokens` fits `limit` tokens; k is 0 when not even one shot fits."""
    from tunesmith.data.tokenize import prompt_ids

    most = MAX_AUTO_SHOTS if shots is None else shots
    picked = pick_shots(questions, pool, most, seed, similar)
    most = min([most, *(len(shots) for shots in picked)])  # a small pool gives fewer shots than asked
    for k in range(most, 0, -1):
        prompts = [few_shot_prompt(q, s[:k]) for q, s in zip(questions, picked, strict=True)]
        longest = max(len(prompt_ids(tokenizer, p, q.tools)) for p, q in zip(prompts, questions, strict=True))
        if longest + max_new_tokens <= limit:
            return Baseline("few_shot", k, prompts)
    return Baseline("few_shot", 0, [q.prompt_messages for q in questions])


def zero_shot(questions: list[Conversation]) -> Baseline:
    return Baseline("zero_shot", 0, [q.prompt_messages for q in questions])


def turn_stops(tokenizer: Any) -> list[str]:
    """Texts at which an answer has ended: the template's end of an assistant turn and the opening of any
    next turn (EOS is a token id and stops generation anyway). Empty when the template cannot be taken apart."""
    from tunesmith.deploy.template import turn_format
    from tunesmith.errors import TunesmithError

    try:
        turns = turn_format(tokenizer)
    except TunesmithError:
        return []
    texts = (turns.suffix["assistant"], turns.prefix["user"], turns.prefix["assistant"], turns.prefix["system"])
    return sorted({text.strip() for text in texts if text.strip()})


def cut_at_stops(text: str, stops: list[str]) -> str:
    """The answer before the first stop text, without surrounding whitespace."""
    end = min((index for index in (text.find(stop) for stop in stops) if index >= 0), default=len(text))
    return text[:end].strip()


def metric_value(name: str, predictions: list[str], references: list[str], schema_path: str | None = None) -> float:
    """One number per metric: the mean of a per-item metric, or a corpus metric (BLEU, chrF, macro-F1) whole."""
    from tunesmith.evaluate import metrics

    per_item = metrics.score([name], predictions, references, schema_path)
    return metrics.summary(per_item, [name], predictions, references)[name]
