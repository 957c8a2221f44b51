"""Training objectives: what a method trains toward, beside `tunesmith.methods` (what trains).

An objective owns three things: what a batch holds, how the loss is computed from the model on a batch,
and what it logs per step. `sft` imitates the answers (a batch of token ids with a loss mask over the answer
tokens; the loss is the mean answer-token cross-entropy). The preference objectives (objectives/preference.py,
their formulas in objectives/losses.py) train on a chosen and a rejected answer to one prompt, or on
single answers marked desirable or not (KTO), and log reward accuracy and margins.

`OBJECTIVES` is the registry and `objective_of` finds a run's objective. Every objective works with every
method: the method decides which weights train, the objective what they train toward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.data.tokenize import TokenizedExample


@dataclass(frozen=True)
class Objective:
    """Supervised fine-tuning; the base of every objective (subclasses override the three parts)."""

    name: str = "sft"
    holds: str = "sft"  # the data it trains on: "sft" examples, "pair" (chosen/rejected) or "kto" rows
    needs_reference: bool = False  # measures against the starting model's log-probabilities

    def units(self, example: Any) -> int:
        """What the step's loss is averaged over: answer tokens (the first token of an example never is one)."""
        return sum(example.loss_mask[1:])

    def collate(self, examples: list[Any], pad_id: int, row_tokens: int, packing: bool) -> dict[str, torch.Tensor]:
        from tunesmith.train.batching import collate, pack

        return pack(examples, pad_id, row_tokens) if packing else collate(examples, pad_id)

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor], settings: Any) -> tuple[torch.Tensor, dict]:
        """The loss summed over the batch's units, and step statistics summed likewise (none for SFT)."""
        from tunesmith.train.loss import model_loss_sum

        return model_loss_sum(model, batch), {}


SFT = Objective()


def _registry() -> dict[str, Objective]:
    from tunesmith.objectives.preference import Preference

    preference = {
        Preference("dpo", "pair", True),
        Preference("ipo", "pair", True),
        Preference("orpo", "pair", False),
        Preference("simpo", "pair", False),
        Preference("kto", "kto", True),
    }
    return {"sft": SFT} | {objective.name: objective for objective in sorted(preference, key=lambda o: o.name)}


OBJECTIVES: dict[str, Objective] = _registry()


def objective_of(config: Any) -> Objective:
    return OBJECTIVES[config.objective]


__all__ = ["OBJECTIVES", "SFT", "Objective", "TokenizedExample", "objective_of"]
