"""Validation during training: the loss on held-out examples and the task's own metrics on a generated sample
(SFT), the preference scores of held-out pairs (preference objectives), or the rewards of greedy answers to
held-out prompts (grpo)."""

from __future__ import annotations

from typing import Any

from tunesmith.config import RunConfig
from tunesmith.data.formats import Conversation
from tunesmith.evaluate.compare import mean_answer_loss
from tunesmith.evaluate.generate import generate
from tunesmith.evaluate.metrics import score, summary
from tunesmith.objectives import objective_of
from tunesmith.objectives.preference import preference_scores
from tunesmith.objectives.rl import reward_validator


def validator(config: RunConfig, tokenizer: Any, val: list[Conversation], examples: list[Any]) -> Any:
    """Val loss on up to validation.limit examples, plus the configured task metrics on a generated sample."""
    validation = config.validation
    scored = examples[: validation.limit or len(examples)]
    objective = objective_of(config)
    if objective.name == "grpo":  # examples: the val prompts
        return reward_validator(config, tokenizer, examples)
    if objective.holds != "sft":

        def validate_pairs(model: Any) -> dict[str, float]:
            pad, size = tokenizer.pad_token_id, config.train.batch_size
            return preference_scores(model, objective, scored, config.preference, pad, size)

        return validate_pairs
    sample = [c for c in val if c.reference is not None][: validation.generate_limit]

    def validate(model: Any) -> dict[str, float]:
        results = {"val_loss": mean_answer_loss(model, scored, tokenizer.pad_token_id, config.train.batch_size)}
        if validation.metrics and sample:
            outputs = generate(
                model,
                tokenizer,
                [c.prompt_messages for c in sample],
                config.eval.max_new_tokens,
                config.eval.batch_size,
                tools=[c.tools for c in sample],
            )
            references = [str(c.reference) for c in sample]
            per_item = score(validation.metrics, outputs, references, config.eval.schema_path)
            results |= summary(per_item, validation.metrics, outputs, references)
        return results

    return validate
