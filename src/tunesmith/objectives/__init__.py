"""Training objectives: what a method trains toward, beside `tunesmith.methods` (what trains).

An objective owns three things: what a batch holds, how the loss is computed from the model on a batch,
and what it logs per step. `sft` imitates the answers (a batch of token ids with a loss mask over the answer
tokens; the loss is the mean answer-token cross-entropy). The preference objectives (objectives/preference.py,
their formulas in objectives/losses.py) train on a chosen and a rejected answer to one prompt, or on
single answers marked desirable or not (KTO), and log reward accuracy and margins. `reward_model`
(objectives/reward_model.py) trains a scalar head on the same pairs: a Bradley-Terry scorer for RL. `grpo`
(objectives/rl.py) learns online from rewards of the model's own sampled answers; it makes its own batches
(rl.Rollouts).

`OBJECTIVES` is the registry and `objective_of` finds a run's objective. Every objective works with every
method: the method decides which weights train, the objective what they train toward.
"""

from __future__ import annotations

from tunesmith.data.tokenize import TokenizedExample
from tunesmith.objectives.objective import OBJECTIVES, SFT, Objective, objective_of
from tunesmith.objectives.preference import Preference
from tunesmith.objectives.reward_model import REWARD_MODEL
from tunesmith.objectives.rl import GRPO


def _registry() -> dict[str, Objective]:
    preference = {
        Preference("dpo", "pair", True),
        Preference("ipo", "pair", True),
        Preference("orpo", "pair", False),
        Preference("simpo", "pair", False),
        Preference("kto", "kto", True),
    }
    ordered = {objective.name: objective for objective in sorted(preference, key=lambda o: o.name)}
    return {"sft": SFT} | ordered | {REWARD_MODEL.name: REWARD_MODEL, "grpo": GRPO("grpo")}


OBJECTIVES.update(_registry())


__all__ = ["OBJECTIVES", "SFT", "Objective", "TokenizedExample", "objective_of"]
