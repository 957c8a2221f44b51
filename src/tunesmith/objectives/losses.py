"""Preference-tuning losses (DPO, IPO, ORPO, SimPO, KTO) as pure functions of summed answer log-probabilities.

Inputs are per-sequence sums of answer-token log-probabilities (from `tunesmith.train.loss.model_logps`) and answer
token counts; outputs are per-pair (KTO: per-row) losses and the implied rewards, which are detached and for logging
only. Nothing here runs a model or reduces over the batch: the caller takes the mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# ORPO needs log(1 - p) of an average token probability p = exp(a); an answer the model is certain of (a = 0) would
# give log 0. Average log-probs are capped at -1e-6 (p <= 0.999999), which moves no realistic value.
_MAX_AVG_LOGP = -1e-6


def _average(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token average log-probability; an empty answer (0 tokens) counts as one token, as TRL does."""
    return logps.float() / tokens.float().clamp(min=1)


def dpo(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
    Secretly a Reward Model", Eq. 7), with conservative label smoothing (cDPO, Mitchell 2023):

        h = (log πθ(y_w|x) - log πθ(y_l|x)) - (log π_ref(y_w|x) - log π_ref(y_l|x))
        loss = -(1 - ε) · log σ(β·h) - ε · log σ(-β·h)

    ε is the assumed probability that a preference label is flipped; ε = 0 is the paper's loss. Rewards are the
    implicit rewards β·(log πθ - log π_ref) of the chosen and the rejected answer. All three tensors have one entry
    per pair.
    """
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    h = chosen_ratio - rejected_ratio
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def ipo(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Identity Preference Optimisation (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
    Human Preferences", Eq. 17, with τ = beta):

        h = (ā_θ(y_w) - ā_θ(y_l)) - (ā_ref(y_w) - ā_ref(y_l))
        loss = (h - 1 / (2τ))²

    where ā is the per-token AVERAGE log-probability of the answer, as TRL's loss_type="ipo" computes it (the
    squared loss on summed log-probs would grow with answer length). Rewards are β·(ā_θ - ā_ref); one entry per pair.
    """
    chosen_ratio = _average(policy_chosen, chosen_tokens) - _average(ref_chosen, chosen_tokens)
    rejected_ratio = _average(policy_rejected, rejected_tokens) - _average(ref_rejected, rejected_tokens)
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0 without cancellation: expm1 near 0, log1p further out (Mächler 2012)."""
    a = a.clamp(max=_MAX_AVG_LOGP)
    return torch.where(a < -0.6931471805599453, torch.log1p(-torch.exp(a)), torch.log(-torch.expm1(a)))


def orpo(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Odds Ratio Preference Optimization (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without
    Reference Model", Eqs. 2-7, with λ = beta):

        a = log P(y|x) / |y|                      (per-token average log-probability)
        log odds(y|x) = a - log(1 - exp(a))
        loss = -a_w + λ · (-log σ(log odds(y_w|x) - log odds(y_l|x)))

    The first term is the chosen answer's per-token NLL (L_SFT), the second the odds-ratio loss (L_OR). Rewards are
    β·a_w and β·a_l, as TRL's ORPO logs them; one entry per pair. Average log-probs are capped just below 0 so that
    log(1 - exp(a)) stays finite.
    """
    chosen_avg = _average(policy_chosen, chosen_tokens)
    rejected_avg = _average(policy_rejected, rejected_tokens)
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    losses = -chosen_avg - beta * F.logsigmoid(log_odds)
    return losses, (beta * chosen_avg).detach(), (beta * rejected_avg).detach()


def simpo(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Simple Preference Optimization (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", Eq. 6):

        loss = -log σ(β/|y_w| · log πθ(y_w|x) - β/|y_l| · log πθ(y_l|x) - γ)

    γ is the target reward margin. Rewards are the length-normalised β·a_w and β·a_l; one entry per pair.
    """
    chosen_reward = beta * _average(policy_chosen, chosen_tokens)
    rejected_reward = beta * _average(policy_rejected, rejected_tokens)
    losses = -F.logsigmoid(chosen_reward - rejected_reward - gamma)
    return losses, chosen_reward.detach(), rejected_reward.detach()


def kto_kl(
    policy_mismatched: torch.Tensor,
    reference_mismatched: torch.Tensor,
    sum_over: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """KTO's reference point z_ref (Ethayarajh et al. 2024, Eq. 7 and §4.1): the batch mean of log πθ(y'|x) -
    log π_ref(y'|x) over mismatched pairs (a prompt with another row's completion), detached and clamped at 0.
    `sum_over` sums a tensor over the data-parallel processes, so the mean is over the whole micro-batch of the
    step rather than over this process's share of it (at batch size 1 per process, one sample)."""
    gap = (policy_mismatched.float() - reference_mismatched.float()).detach()
    totals = torch.stack([gap.sum(), gap.new_tensor(float(gap.numel()))])
    if sum_over is not None:
        totals = sum_over(totals)
    return (totals[0] / totals[1]).clamp(min=0)


def kto(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization", Eq. 7):

        r = log πθ(y|x) - log π_ref(y|x),   z = kl (from kto_kl)
        desirable y:   loss = λ_D · (1 - σ(β·(r - z)))
        undesirable y: loss = λ_U · (1 - σ(β·(z - r)))

    `policy`, `reference` and `desirable` (bool) have one entry per row. Returns the losses per row, shape (rows,),
    in batch order; the rewards β·r of the desirable rows, shape (desirable.sum(),); and those of the undesirable
    rows, shape ((~desirable).sum(),). The reward tensors are unpaired and either may be empty.
    """
    ratio = policy.float() - reference.float()
    z = torch.as_tensor(kl, dtype=torch.float32, device=ratio.device).detach().clamp(min=0)
    desirable = desirable.to(device=ratio.device, dtype=torch.bool)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio))),
    )
    rewards = (beta * ratio).detach()
    return losses, rewards[desirable], rewards[~desirable]


def reward_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, paired: bool = True) -> dict[str, float]:
    """Logged reward statistics: accuracy (share of pairs with chosen > rejected), margin (mean of chosen - rejected),
    and the mean chosen and rejected reward.

    paired=False is for KTO's unpaired rewards (any lengths): accuracy then compares every chosen with every rejected
    reward and the margin is the difference of the means. A statistic over an empty side is nan.
    """
    chosen = chosen_rewards.detach().float().flatten()
    rejected = rejected_rewards.detach().float().flatten()
    if paired and chosen.shape != rejected.shape:
        raise ValueError(f"paired rewards differ in count: {chosen.numel()} chosen, {rejected.numel()} rejected")
    if chosen.numel() == 0 or rejected.numel() == 0:
        accuracy = margin = float("nan")
    elif paired:
        accuracy = (chosen > rejected).float().mean().item()
        margin = (chosen - rejected).mean().item()
    else:
        accuracy = (chosen[:, None] > rejected[None, :]).float().mean().item()
        margin = _mean(chosen) - _mean(rejected)
    return {"accuracy": accuracy, "margin": margin, "chosen": _mean(chosen), "rejected": _mean(rejected)}


def _mean(values: torch.Tensor) -> float:
    return values.mean().item() if values.numel() else float("nan")


# --- Online RL (objective grpo): advantages from a group's rewards, the clipped policy loss, the k3 KL -------------

STD_FLOOR = 1e-4  # added to a std before dividing by it (TRL's value): a tiny spread gives large, finite advantages


def group_advantages(rewards: torch.Tensor, scale: str = "group", rloo: bool = False) -> torch.Tensor:
    """Advantages of completions from their rewards, shape [groups, group_size] with nan for a skipped
    completion (its advantage stays nan; the caller leaves it out):

        baseline_i = mean of the group's rewards             (GRPO, Shao et al. 2024, Eq. 3)
                   = mean of the group's OTHER rewards       (rloo: RLOO, Ahmadian et al. 2024)
        A_i = (r_i - baseline_i) / (std + 1e-4)              std: of the group (scale "group"), of every reward of
                                                             the step ("batch"), or A_i = r_i - baseline_i ("none",
                                                             Dr. GRPO, Liu et al. 2025)

    Stds are the unbiased sample std (n - 1), as TRL's; a group of one valid completion has advantage 0.
    """
    valid = ~torch.isnan(rewards)
    values = torch.where(valid, rewards, torch.zeros_like(rewards)).double()
    count = valid.sum(dim=1, keepdim=True).double()
    total = values.sum(dim=1, keepdim=True)
    if rloo:
        baseline = (total - values) / (count - 1).clamp(min=1)
    else:
        baseline = total / count.clamp(min=1)
    advantages = values - baseline
    if scale == "group":
        mean = total / count.clamp(min=1)
        spread = (((values - mean) ** 2) * valid).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
        advantages = advantages / (spread.sqrt() + STD_FLOOR)
    elif scale == "batch":
        kept = values[valid]
        std = kept.std() if kept.numel() > 1 else kept.new_zeros(())
        advantages = advantages / (std + STD_FLOOR)
    advantages = torch.where(count > 1, advantages, torch.zeros_like(advantages))
    return torch.where(valid, advantages, torch.full_like(advantages, float("nan"))).float()


def clipped_token_losses(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017, Eq. 7; DAPO's asymmetric clip, Yu et al. 2025):

        ratio = exp(log πθ(o_t) - log π_old(o_t))
        loss_t = -min(ratio · A, clip(ratio, 1 - ε_low, 1 + ε_high) · A)

    All three tensors have one entry per completion token (A: its completion's advantage). Also returns where
    the clip bound (the ratio left the range in the direction the advantage pushes it), for the clip ratio."""
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantages
    bound = ((ratio < 1 - epsilon_low) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    return -torch.min(unclipped, clipped), bound


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(πθ || π_ref) per token (unbiased, never negative; GRPO's Eq. 4):

    exp(log π_ref - log πθ) - (log π_ref - log πθ) - 1."""
    gap = ref_logps - logps
    return torch.exp(gap) - gap - 1


def sequence_token_weights(lengths: torch.Tensor, loss_type: str, max_completion_tokens: int) -> torch.Tensor:
    """The weight of each token of each completion in the step's loss, one per completion (`lengths`: the tokens
    of every completion the step trains on, across all its micro-batches), so that loss = Σ weight · loss_t is:

        grpo:    (1/G) Σ_i (1/|o_i|) Σ_t loss_i,t               each completion's token mean, then their mean
        dr_grpo: (1/(G · max_completion_tokens)) Σ_i Σ_t loss_i,t   a constant normaliser (Liu et al. 2025)
        dapo:    (1/Σ_i |o_i|) Σ_i Σ_t loss_i,t                 the mean over every token (Yu et al. 2025)
    """
    lengths = lengths.double()
    rows = max(1, lengths.numel())
    if loss_type == "grpo":
        weights = 1.0 / (rows * lengths.clamp(min=1))
    elif loss_type == "dr_grpo":
        weights = torch.full_like(lengths, 1.0 / (rows * max_completion_tokens))
    elif loss_type == "dapo":
        weights = torch.full_like(lengths, 1.0 / max(1.0, float(lengths.sum())))
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return weights.float()
