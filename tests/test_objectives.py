"""Preference losses against their papers' formulas written out in plain Python, and per-row answer log-probs
against the full-logits computation."""

import math

import pytest
import torch

from tunesmith.objectives.losses import dpo, ipo, kto, kto_kl, orpo, reward_stats, simpo
from tunesmith.train.loss import IGNORE, answer_logps, model_logps, token_logps

from .conftest import build_model, build_tokenizer

# Two pairs: summed answer log-probs of policy and reference, and answer token counts.
PC, PR = [-12.0, -30.0], [-15.0, -25.0]
RC, RR = [-13.0, -28.0], [-14.0, -26.0]
NC, NR = [4, 10], [5, 8]
BETA = 0.1


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def close(tensor, expected):
    torch.testing.assert_close(tensor, t(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_is_the_papers_sigmoid_loss_with_conservative_label_smoothing(eps):
    losses, chosen, rejected = dpo(t(PC), t(PR), t(RC), t(RR), BETA, label_smoothing=eps)
    expected = []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR, strict=True):
        h = (pc - pr) - (rc - rr)
        expected.append(-(1 - eps) * log_sigmoid(BETA * h) - eps * log_sigmoid(-BETA * h))
    close(losses, expected)
    close(chosen, [BETA * (pc - rc) for pc, rc in zip(PC, RC, strict=True)])
    close(rejected, [BETA * (pr - rr) for pr, rr in zip(PR, RR, strict=True)])


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_at_the_start_is_log_2_with_zero_rewards(eps):
    policy_chosen, policy_rejected = t(PC).requires_grad_(), t(PR).requires_grad_()
    losses, chosen, rejected = dpo(policy_chosen, policy_rejected, t(PC), t(PR), beta=0.5, label_smoothing=eps)
    close(losses, [math.log(2)] * 2)
    close(chosen, [0.0, 0.0])
    close(rejected, [0.0, 0.0])
    assert not chosen.requires_grad and not rejected.requires_grad
    losses.sum().backward()
    # d/dh of the loss at h = 0 is -β(1 - 2ε)/2: toward the chosen answer, weaker the noisier the labels.
    close(policy_chosen.grad, [-0.5 * (1 - 2 * eps) / 2] * 2)
    close(policy_rejected.grad, [0.5 * (1 - 2 * eps) / 2] * 2)


def test_label_smoothing_stops_pushing_at_the_flip_rate():
    """With ε > 0 the loss in h is minimised where σ(βh) = 1 - ε, instead of pushing h to infinity."""
    eps, beta = 0.1, 0.5
    h_star = math.log((1 - eps) / eps) / beta
    margin = torch.tensor([h_star], requires_grad=True)
    losses, _, _ = dpo(margin, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta, label_smoothing=eps)
    losses.sum().backward()
    assert abs(margin.grad.item()) < 1e-6
    unsmoothed = torch.tensor([h_star], requires_grad=True)
    dpo(unsmoothed, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta)[0].sum().backward()
    assert unsmoothed.grad.item() < -1e-3


def test_ipo_is_the_squared_distance_of_the_average_log_ratio_margin_to_one_over_two_tau():
    losses, chosen, rejected = ipo(t(PC), t(PR), t(RC), t(RR), t(NC), t(NR), BETA)
    expected, chosen_expected, rejected_expected = [], [], []
    for pc, pr, rc, rr, nc, nr in zip(PC, PR, RC, RR, NC, NR, strict=True):
        h = (pc / nc - pr / nr) - (rc / nc - rr / nr)
        expected.append((h - 1 / (2 * BETA)) ** 2)
        chosen_expected.append(BETA * (pc / nc - rc / nc))
        rejected_expected.append(BETA * (pr / nr - rr / nr))
    close(losses, expected)
    close(chosen, chosen_expected)
    close(rejected, rejected_expected)


def test_ipo_edges_start_target_and_length_normalisation():
    start, _, _ = ipo(t(PC), t(PR), t(PC), t(PR), t(NC), t(NR), BETA)
    close(start, [1 / (4 * BETA**2)] * 2)
    # A margin of exactly 1/(2τ) in average log-ratio is IPO's fixed point: zero loss.
    target = 1 / (2 * BETA)
    at_target, _, _ = ipo(t([target * 4]), t([0.0]), t([0.0]), t([0.0]), t([4]), t([3]), BETA)
    close(at_target, [0.0])
    # Per-token averages: repeating every answer twice (double log-probs, double tokens) changes nothing.
    doubled, _, _ = ipo(2 * t(PC), 2 * t(PR), 2 * t(RC), 2 * t(RR), 2 * t(NC), 2 * t(NR), BETA)
    close(doubled, ipo(t(PC), t(PR), t(RC), t(RR), t(NC), t(NR), BETA)[0].tolist())


def test_orpo_is_chosen_nll_plus_lambda_times_the_odds_ratio_loss():
    beta = 0.25
    losses, chosen, rejected = orpo(t(PC), t(PR), t(NC), t(NR), beta)
    expected = []
    for pc, pr, nc, nr in zip(PC, PR, NC, NR, strict=True):
        a_w, a_l = pc / nc, pr / nr
        odds_w = math.exp(a_w) / (1 - math.exp(a_w))
        odds_l = math.exp(a_l) / (1 - math.exp(a_l))
        expected.append(-a_w - beta * log_sigmoid(math.log(odds_w / odds_l)))
    close(losses, expected)
    close(chosen, [beta * pc / nc for pc, nc in zip(PC, NC, strict=True)])
    close(rejected, [beta * pr / nr for pr, nr in zip(PR, NR, strict=True)])


def test_orpo_edges_equal_answers_and_certain_answers_stay_finite():
    # Equal odds: the odds-ratio term is λ·log 2 on top of the NLL.
    same, _, _ = orpo(t([-6.0]), t([-6.0]), t([3]), t([3]), beta=0.5)
    close(same, [2.0 + 0.5 * math.log(2)])
    # Average log-probs at and next to 0 (the model is sure of the answer): loss and gradients stay finite.
    policy = torch.tensor([0.0, -2e-9, -2e-4], requires_grad=True)  # summed over 2 tokens
    losses, _, _ = orpo(policy, t([-3.0, -3.0, -3.0]), t([2, 2, 2]), t([2, 2, 2]), beta=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(policy.grad).all()
    # Next to 0 the value is still the formula's.
    a = -1e-4
    exact = -a - 0.1 * log_sigmoid((a - math.log(-math.expm1(a))) - (-1.5 - math.log1p(-math.exp(-1.5))))
    close(losses[2:], [exact])


def test_simpo_is_the_length_normalised_margin_loss_with_target_gamma():
    beta, gamma = 2.0, 0.5
    losses, chosen, rejected = simpo(t(PC), t(PR), t(NC), t(NR), beta, gamma)
    expected = [
        -log_sigmoid(beta / nc * pc - beta / nr * pr - gamma) for pc, pr, nc, nr in zip(PC, PR, NC, NR, strict=True)
    ]
    close(losses, expected)
    close(chosen, [beta * pc / nc for pc, nc in zip(PC, NC, strict=True)])
    close(rejected, [beta * pr / nr for pr, nr in zip(PR, NR, strict=True)])
    # A reward margin of exactly γ is the decision boundary: log 2.
    at_margin, _, _ = simpo(t([-2.0]), t([-3.0]), t([4]), t([2]), beta=2.0, gamma=2.0)
    close(at_margin, [math.log(2)])


def test_kto_weighs_desirable_and_undesirable_rows_around_the_kl_reference_point():
    policy, reference = [-10.0, -20.0, -7.0, -9.0], [-11.0, -19.0, -7.5, -8.0]
    desirable = [True, False, True, False]
    beta, z, w_d, w_u = 0.5, 0.3, 1.0, 1.5
    losses, chosen, rejected = kto(t(policy), t(reference), torch.tensor(desirable), t(z), beta, w_d, w_u)
    expected = []
    for p, r, good in zip(policy, reference, desirable, strict=True):
        ratio = p - r
        expected.append(w_d * (1 - sigmoid(beta * (ratio - z))) if good else w_u * (1 - sigmoid(beta * (z - ratio))))
    close(losses, expected)
    close(chosen, [beta * (-10.0 + 11.0), beta * (-7.0 + 7.5)])
    close(rejected, [beta * (-20.0 + 19.0), beta * (-9.0 + 8.0)])


def test_kto_reference_point_is_a_detached_nonnegative_mean():
    mismatched = torch.tensor([-5.0, -6.0, -7.0], requires_grad=True)
    reference = t([-5.5, -6.5, -6.0])
    assert kto_kl(mismatched, reference).item() == 0.0  # mean -1/3, clamped
    z = kto_kl(mismatched, t([-6.0, -7.0, -7.0]))
    close(z, 2 / 3)
    assert not z.requires_grad
    # A negative estimate passed straight in counts as 0, and at the start (policy = reference, z = 0) every row
    # loses its weight times 1/2.
    losses, chosen, rejected = kto(t([-3.0, -4.0]), t([-3.0, -4.0]), torch.tensor([True, False]), t(-1.0), 1.0, 2.0)
    close(losses, [1.0, 0.5])
    assert chosen.shape == (1,) and rejected.shape == (1,)
    only_good = kto(t([-3.0]), t([-3.0]), torch.tensor([True]), t(0.0), 1.0)
    assert only_good[2].shape == (0,)


def test_reward_stats_paired_and_unpaired():
    stats = reward_stats(t([1.0, 0.0, 2.0, -1.0]), t([0.5, 0.5, 1.0, -2.0]))
    assert stats == pytest.approx({"accuracy": 0.75, "margin": 0.5, "chosen": 0.5, "rejected": 0.0})
    unpaired = reward_stats(t([1.0, 3.0]), t([2.0]), paired=False)
    assert unpaired == pytest.approx({"accuracy": 0.5, "margin": 0.0, "chosen": 2.0, "rejected": 2.0})
    assert math.isnan(reward_stats(t([1.0]), t([]), paired=False)["margin"])
    with pytest.raises(ValueError, match="differ in count"):
        reward_stats(t([1.0, 2.0]), t([1.0]))


# Three rows of seven positions: prompt tokens masked, answers of different lengths, right padding masked.
LABELS = torch.tensor(
    [
        [IGNORE, IGNORE, 3, 4, 5, IGNORE, IGNORE],
        [IGNORE, 7, 8, 9, 10, 1, 2],
        [IGNORE, IGNORE, IGNORE, IGNORE, 6, IGNORE, IGNORE],
    ]
)


def full_logits_logps(logits, labels):
    """The textbook computation: log-softmax over every position of the full logits, gathered, masked, summed."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    per_token = logits[:, :-1].float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (per_token * keep).sum(dim=1), keep.sum(dim=1).float()


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("chunk_size", [1, 2, 5, 64])
@pytest.mark.parametrize("frozen", [False, True])
def test_answer_logps_equal_full_logits_values_and_gradients(chunk_size, softcap, frozen):
    """Both paths: a trained output layer (recomputed chunks) and a frozen one (FrozenHead)."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False).requires_grad_(not frozen)
    weights = t([1.0, -2.0, 0.5])  # any per-row combination, so a row mixed up with another would show

    logits = head(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    expected, expected_tokens = full_logits_logps(logits, LABELS)
    (expected * weights).sum().backward()
    expected_grads = hidden.grad.clone(), None if frozen else head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    sums, tokens = answer_logps(hidden, LABELS, head, softcap=softcap, chunk_size=chunk_size)
    (sums * weights).sum().backward()
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens, t([3, 6, 1]))
    torch.testing.assert_close(tokens, expected_tokens)
    torch.testing.assert_close(hidden.grad, expected_grads[0], rtol=1e-5, atol=1e-6)
    if not frozen:
        torch.testing.assert_close(head.weight.grad, expected_grads[1], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(answer_logps(hidden, LABELS, head, softcap, chunk_size)[0], expected.detach())


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
@pytest.mark.parametrize("autocast", [False, True])
def test_token_logps_through_a_frozen_head_equal_full_logits_values_entropies_and_gradients(
    chunk_size, softcap, autocast
):
    """FrozenHead (the gradient worked out in the forward, no logits kept) gives what the textbook computation
    does: each token's log-prob, the entropy, and the hidden states' gradient; under bf16 autocast both compute
    the products in bf16."""
    torch.manual_seed(0)
    hidden = torch.randn(7, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False).requires_grad_(False)
    targets = torch.tensor([3, 0, 10, 4, 4, 7, 1])
    weights = torch.randn(7)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = head(hidden).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        every = logits.log_softmax(-1)
        expected = every.gather(-1, targets[:, None]).squeeze(-1)
        expected_entropy = -(every.exp() * every).sum(-1)
        (expected * weights).sum().backward()
        expected_grad, hidden.grad = hidden.grad.clone(), None
        logps, entropy = token_logps(hidden, targets, head, softcap, chunk_size)
        (logps * weights).sum().backward()
        with torch.no_grad():
            unrecorded = token_logps(hidden, targets, head, softcap, chunk_size)[0]
    assert logps.dtype == torch.float32 and not entropy.requires_grad
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-5, atol=1e-5)
    # under autocast both round the softmax's gradient to bf16 for the product, but at different points
    bound = 1e-2 * float(expected_grad.abs().max()) if autocast else 1e-5
    torch.testing.assert_close(hidden.grad, expected_grad, rtol=1e-4, atol=bound)
    torch.testing.assert_close(unrecorded, expected.detach())


def test_model_logps_on_a_tiny_llama_equal_the_full_logits_computation():
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer))
    rows = [("colour red item", " the quick brown fox"), ("hello world", " 0123"), ("note", " age sex diagnosis")]
    pad = tokenizer.pad_token_id
    encoded = [(tokenizer(prompt)["input_ids"], tokenizer(answer)["input_ids"]) for prompt, answer in rows]
    width = max(len(p) + len(a) for p, a in encoded)
    input_ids, attention_mask, labels = [], [], []
    for prompt, answer in encoded:
        padding = width - len(prompt) - len(answer)
        input_ids.append(prompt + answer + [pad] * padding)
        attention_mask.append([1] * (len(prompt) + len(answer)) + [0] * padding)
        labels.append([IGNORE] * len(prompt) + answer + [IGNORE] * padding)
    batch = {
        "input_ids": torch.tensor(input_ids),
        "attention_mask": torch.tensor(attention_mask),
        "labels": torch.tensor(labels),
    }
    assert min(map(sum, attention_mask)) < width  # right padding is exercised

    expected, expected_tokens = full_logits_logps(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
    )
    expected.sum().backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    sums, tokens = model_logps(model, batch)
    sums.sum().backward()
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens, expected_tokens)
    torch.testing.assert_close(tokens, t([len(a) for _, a in encoded]))
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
