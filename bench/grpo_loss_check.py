"""tunesmith's GRPO loss formulas against TRL's GRPOTrainer loss code on the same tensors (issue 26).

    .venv/bin/python bench/grpo_loss_check.py                                # this checkout's src/
    .venv/bin/python bench/grpo_loss_check.py --src /work/wt/grpo/src        # another checkout's formulas

For each loss_type (grpo, dr_grpo, dapo), with and without the k3 KL term (beta), on the first iteration (ratio 1,
old log-probs = the current ones detached) and on a later one (old log-probs differing, so the clip binds), both
sides get identical per-token log-probs, old and reference log-probs, advantages and completion masks of
completions of different lengths. TRL's side is GRPOTrainer._compute_loss itself, called on a minimal stand-in
object whose log-prob function returns the given tensor (no model, no generation); tunesmith's side is
objectives/losses.py: clipped_token_losses, k3_kl and sequence_token_weights, combined as objectives/rl.py's GRPO
does. Printed: the two losses, the max abs difference of the losses and of their gradients with respect to the
log-probs (and the norm of TRL's, to show it is not 0); it exits 1 when a difference exceeds --tolerance.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
EPSILON_LOW, EPSILON_HIGH = 0.2, 0.28


class Accelerator:
    """What _compute_loss asks of TRL's accelerator in one process."""

    num_processes = 1
    sync_gradients = True

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def trl_loss(case: dict[str, torch.Tensor], loss_type: str, beta: float, max_completion: int) -> torch.Tensor:
    """GRPOTrainer._compute_loss on a stand-in trainer whose per-token log-probs are case['logps']."""
    from trl import GRPOTrainer

    logps = case["logps"]
    stand_in = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *_, **__: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=EPSILON_LOW,
        epsilon_high=EPSILON_HIGH,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_completion,
        accelerator=Accelerator(),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    mask = case["mask"]
    inputs: dict[str, Any] = {
        "prompt_ids": torch.zeros((mask.shape[0], 3), dtype=torch.long),
        "prompt_mask": torch.ones((mask.shape[0], 3), dtype=torch.long),
        "completion_ids": torch.zeros_like(mask, dtype=torch.long),
        "completion_mask": mask,
        "advantages": case["advantages"],
        "num_items_in_batch": mask.sum(),
    }
    if "old_logps" in case:
        inputs["old_per_token_logps"] = case["old_logps"]
    if beta:
        inputs["ref_per_token_logps"] = case["ref_logps"]
    return GRPOTrainer._compute_loss(stand_in, None, inputs)


def tunesmith_loss(case: dict[str, torch.Tensor], loss_type: str, beta: float, max_completion: int) -> torch.Tensor:
    """objectives/rl.py's GRPO.loss_sum on the flat completion tokens: clipped loss (+ beta k3), weighted."""
    import tunesmith.objectives.losses as formulas

    keep = case["mask"].bool()
    rows = torch.arange(keep.shape[0])[:, None].expand_as(keep)[keep]
    logps = case["logps"][keep]
    old = case["old_logps"][keep] if "old_logps" in case else logps.detach()
    losses, _ = formulas.clipped_token_losses(logps, old, case["advantages"][rows], EPSILON_LOW, EPSILON_HIGH)
    if beta:
        losses = losses + beta * formulas.k3_kl(logps, case["ref_logps"][keep])
    weights = formulas.sequence_token_weights(keep.sum(dim=1), loss_type, max_completion)
    return (losses * weights[rows]).sum()


def make_case(seed: int, later_iteration: bool, completions: int = 8, width: int = 12) -> dict[str, torch.Tensor]:
    """Completions of lengths 1..width (right-padded), log-probs near those of a sampled LM, mixed-sign advantages."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (completions,), generator=generator)
    lengths[0] = width  # one completion at the limit
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    logps = -torch.rand((completions, width), generator=generator, dtype=torch.float64).float() * 3
    case = {
        "logps": logps,
        "mask": mask,
        "advantages": torch.randn(completions, generator=generator),
        "ref_logps": logps - 0.3 * torch.randn((completions, width), generator=generator),
    }
    if later_iteration:  # the policy moved since sampling: ratios up to e^±0.5, so both clip bounds bind
        case["old_logps"] = logps - 0.5 * (2 * torch.rand((completions, width), generator=generator) - 1)
    return case


def compare(case: dict[str, torch.Tensor], loss_type: str, beta: float, max_completion: int) -> tuple[float, ...]:
    """Both losses, |their difference|, the max |difference| of their gradients, the norm of TRL's gradient."""
    values, grads = [], []
    for side in (trl_loss, tunesmith_loss):
        leaf = {k: v.clone() for k, v in case.items()}
        leaf["logps"].requires_grad_(True)
        loss = side(leaf, loss_type, beta, max_completion)
        loss.backward()
        values.append(loss.detach())
        grads.append(leaf["logps"].grad * case["mask"])  # padding positions carry no gradient on either side
    loss_gap, grad_gap = (values[0] - values[1]).abs(), (grads[0] - grads[1]).abs().max()
    return float(values[0]), float(values[1]), float(loss_gap), float(grad_gap), float(grads[0].norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=str(ROOT / "src"), help="The tunesmith source tree to check [default: src/].")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="Largest difference accepted [default: 1e-6].")
    args = parser.parse_args()
    sys.path.insert(0, args.src)
    import trl

    print(f"trl {trl.__version__}; tunesmith from {args.src}; epsilon low {EPSILON_LOW} high {EPSILON_HIGH}")
    header = (
        f"{'loss_type':9} {'beta':>5} {'iteration':>9} {'TRL loss':>12} {'tunesmith':>12} {'|loss diff|':>11} "
        f"{'max |grad diff|':>15} {'|grad|':>8}"
    )
    print(header)
    print("-" * len(header))
    worst = 0.0
    max_completion = 16  # above the longest completion (12): dr_grpo divides by it, not by the longest
    for loss_type in LOSS_TYPES:
        for beta in (0.0, 0.04):
            for later in (False, True):
                case = make_case(seed=len(loss_type) * 10 + int(later) + int(beta > 0) * 2, later_iteration=later)
                theirs, ours, loss_gap, grad_gap, norm = compare(case, loss_type, beta, max_completion)
                worst = max(worst, loss_gap, grad_gap)
                print(
                    f"{loss_type:9} {beta:5.2f} {'later' if later else 'first':>9} {theirs:12.6f} {ours:12.6f} "
                    f"{loss_gap:11.2e} {grad_gap:15.2e} {norm:8.4f}"
                )
    verdict = "agree" if worst <= args.tolerance else "DIFFER"
    print(f"largest difference {worst:.2e}: the losses {verdict} (tolerance {args.tolerance:g})")
    sys.exit(0 if worst <= args.tolerance else 1)


if __name__ == "__main__":
    main()
