"""The base of every objective (`Objective`, which is supervised fine-tuning itself) and the registry by name.

objectives/__init__.py fills the registry with every objective; this module sits below all of them, so that an
objective's own module can name the base class and look up a config's objective without importing the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import PreferenceConfig
from tunesmith.train.batching import collate, pack, shared_batch
from tunesmith.train.loss import model_loss_sum


@dataclass(frozen=True)
class Objective:
    """Supervised fine-tuning; the base of every objective (subclasses override the three parts)."""

    name: str = "sft"
    holds: str = "sft"  # the data it trains on: "sft" examples, "pair" (chosen/rejected) or "kto" rows
    needs_reference: bool = False  # measures against the starting model's log-probabilities

    def units(self, example: Any) -> int:
        """What the step's loss is averaged over: answer tokens (the first token of an example never is one)."""
        return sum(example.loss_mask[1:])

    def collate(
        self, examples: list[Any], pad_id: int, row_tokens: int, packing: bool, share_limit: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The micro-batch's tensors: one shared-prefix row where its examples begin alike enough to pay and the
        model computes that exactly (share_limit: its longest such sequence; None: never), else packed rows or
        length-grouped padding."""
        if share_limit and (shared := shared_batch(examples, share_limit)) is not None:
            return shared
        return pack(examples, pad_id, row_tokens) if packing else collate(examples, pad_id)

    def loss_sum(
        self, model: Any, batch: dict[str, torch.Tensor], preference: PreferenceConfig | None
    ) -> tuple[torch.Tensor, dict]:
        """The loss summed over the batch's units, and step statistics summed likewise (none for SFT)."""
        return model_loss_sum(model, batch), {}

    def attach(self, model: Any, seed: int) -> Any:
        """The model to train: the method's, plus any part the objective trains itself (reward_model: a head)."""
        return model

    def save_own(self, model: Any, run_dir: Path, trained: dict[str, Any] | None) -> dict[str, Any] | None:
        """Write the objective's own trained part to the run folder and take it off the model; `trained` without it."""
        return trained


SFT = Objective()


@dataclass
class StepBatch:
    """What one optimizer step trains on, as the Trainer draws it: for SFT and preference objectives grad_accum
    micro-batches of the examples, for grpo the step's rollouts (objectives/rl.py)."""

    micro_batches: list[tuple[list[int], dict[str, torch.Tensor], float]]  # (indices, tensors, weight)
    units: int  # what the step's summed loss is divided by (answer tokens for SFT; grpo weighs its own tokens: 1)
    tokens: int
    lines: list[int]  # the data lines trained on, for error messages
    advance: int  # how far the data position (TrainState.micro_batches) moves: micro-batches, or grpo's prompts
    logged: dict[str, Any] = field(default_factory=dict)  # step statistics logged as they are (grpo: rewards)


OBJECTIVES: dict[str, Objective] = {}  # filled by objectives/__init__.py


def objective_of(config: Any) -> Objective:
    return OBJECTIVES[config.objective]
