"""Objective grpo: the loss against its formulas written out by hand, advantages, dynamic sampling, truncation,
every method trains, a metric reward rises on a tiny task, resume is exact, run-folder code rewards are refused."""

import json
import math
import os
import signal

import pytest
import torch

from tunesmith import trust
from tunesmith.cli import main
from tunesmith.config import CheckpointConfig, RewardConfig, RlConfig, RunConfig, TrainConfig
from tunesmith.data.formats import read_conversations
from tunesmith.data.tokenize import use_chat_template
from tunesmith.errors import TrainingInterrupted, TunesmithError
from tunesmith.methods import METHODS
from tunesmith.objectives import losses
from tunesmith.objectives.rl import GRPO, Group, Row, Rollouts, combined_rewards, tokenize_prompts
from tunesmith.rewards import Sample, build_rewards, score
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.loop import Session, fit

from .conftest import build_model, build_tokenizer, chat_records, write_jsonl
from .test_cli import train_args

RL_FLAGS = [
    "--max-steps", "2", "--train.batch_size", "4", "--lr", "1e-2", "--test-fraction", "0.2", "--quiet",
    "--rl.group_size", "2", "--rl.prompts_per_step", "2", "--rl.max_completion_tokens", "6",
    "--validation.generate_limit", "2", "--set", "eval.max_new_tokens=4", "--set", "eval.limit=2",
]  # fmt: skip


def _rows(run_dir, kind):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == kind]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_with_grpo_and_logs_rewards(method, tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / method
    # Rewards that differ between random completions, so that the loss and its gradient are not zero.
    rewards = "[{regex: '[aeiou]'}, {metric: token_f1}, {length: 4, weight: 0.1}]"
    flags = ["--method", method, "--objective", "grpo", "--rl.rewards", rewards, "--rl.dynamic_sampling", "false"]
    flags += ["--rl.overlong", "none", "--rl.group_size", "4"]
    assert main(train_args(tiny_model_dir, chat_file, out, *flags, *RL_FLAGS)) == 0
    rows = _rows(out, "train")
    assert len(rows) == 2
    for row in rows:
        assert math.isfinite(row["loss"]) and row["rollout_s"] > 0 and row["train_s"] > 0
        assert {"reward", "reward_std", "reward_token_f1", "reward_length", "zero_spread", "truncated"} <= set(row)
        assert {"completion_len_mean", "completion_len_max", "clip_ratio", "entropy"} <= set(row)
    assert any(row["grad_norm"] > 0 for row in rows)
    val = _rows(out, "val")[-1]
    assert "val_reward" in val and "val_reward_token_f1" in val and val["val_samples"]


# --- The loss against its formulas, written out by hand --------------------------------------------------------


class FakeTrainer:
    """What Rollouts reads of the Trainer: the model, its state, the process world and the autocast."""

    def __init__(self, model):
        from tunesmith.train.distributed import World

        self.model, self.state, self.world = model, ckpt.TrainState(), World()

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


def _setup(tmp_path, n=12, **rl):
    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None)
    model = build_model(len(tokenizer))
    conversations, _ = read_conversations(write_jsonl(tmp_path / "chat.jsonl", chat_records(n)))
    settings = {"rewards": [RewardConfig(regex="[aeiou]")], "group_size": 4, "prompts_per_step": 2} | rl
    config = RunConfig(objective="grpo", rl=RlConfig(**settings), train=TrainConfig(batch_size=2, seed=3))
    prompts, _ = tokenize_prompts(tokenizer, conversations, 256, config.rl)
    return tokenizer, model, config, prompts


def _hand_logps(model, row):
    """Per completion token, log p(token | everything before it) from the model's full logits."""
    ids = torch.tensor([row.prompt + row.tokens])
    logps = model(input_ids=ids).logits[0].float().log_softmax(-1)
    positions = range(len(row.prompt) - 1, len(row.prompt) + len(row.tokens) - 1)
    return torch.stack([logps[p, t] for p, t in zip(positions, row.tokens, strict=True)])


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_the_loss_equals_its_formula_for_every_loss_type(loss_type, beta, tmp_path):
    tokenizer, model, config, prompts = _setup(tmp_path, loss_type=loss_type, beta=beta, epsilon_high=0.28)
    rollouts = Rollouts(config, tokenizer, prompts, model, uses_peft=False)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i, length in enumerate([3, 5, 1, 4, 2]):  # 5 completions in micro-batches of 2: one left over
        tokens = torch.randint(3, len(tokenizer), (length,), generator=generator).tolist()
        sampled = (torch.randn(length, generator=generator) * 0.5 - 5).tolist()  # far from the policy: clipping
        reference = (torch.randn(length, generator=generator) * 0.3 - 5.5).tolist()
        rows.append(Row(prompts[i].ids, tokens, sampled, float(torch.randn(1, generator=generator)), i, reference))
    model.eval()
    with torch.no_grad():
        objective = rollouts.objective
        for sampled in (False, True):
            step = rollouts.step_batch(rows, {}, 0, sampled=sampled)
            assert len(step.micro_batches) == 3 and step.units == 1
            total = sum(float(objective.loss_sum(model, batch, None)[0]) for _, batch, _ in step.micro_batches)
            per_row = []
            for row in rows:
                logp = _hand_logps(model, row)
                old = torch.tensor(row.logprobs) if sampled else logp
                ratio = torch.exp(logp - old)
                a = row.advantage
                surrogate = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - 0.2, 1 + 0.28) * a)
                ref = torch.tensor(row.reference)
                kl = torch.exp(ref - logp) - (ref - logp) - 1
                per_row.append(surrogate + beta * kl)
            if loss_type == "grpo":
                expected = sum(t.mean() for t in per_row) / len(rows)
            elif loss_type == "dr_grpo":
                expected = sum(t.sum() for t in per_row) / (len(rows) * config.rl.max_completion_tokens)
            else:
                expected = sum(t.sum() for t in per_row) / sum(len(t) for t in per_row)
            assert total == pytest.approx(float(expected), rel=1e-4, abs=1e-6)


def test_advantages_follow_group_batch_and_no_scaling_and_rloo():
    nan = float("nan")
    rewards = torch.tensor([[1.0, 0.0, 0.0, nan], [2.0, 2.0, 4.0, 0.0]])
    valid = [[1.0, 0.0, 0.0], [2.0, 2.0, 4.0, 0.0]]

    def std(values):
        return torch.tensor(values, dtype=torch.float64).std().item()

    group = losses.group_advantages(rewards, "group")
    for g, values in enumerate(valid):
        mean = sum(values) / len(values)
        for k, value in enumerate(values):
            assert group[g, k].item() == pytest.approx((value - mean) / (std(values) + 1e-4), rel=1e-5)
    assert math.isnan(group[0, 3].item())  # a skipped completion has no advantage
    everything = [v for values in valid for v in values]
    batch = losses.group_advantages(rewards, "batch")
    assert batch[1, 2].item() == pytest.approx((4.0 - 2.0) / (std(everything) + 1e-4), rel=1e-5)
    none = losses.group_advantages(rewards, "none")
    assert none[0, 0].item() == pytest.approx(1.0 - 1 / 3)
    rloo = losses.group_advantages(rewards, "none", rloo=True)
    assert rloo[0, 0].item() == pytest.approx(1.0 - 0.0)  # the mean of the OTHER two
    assert rloo[1, 3].item() == pytest.approx(0.0 - 8 / 3)
    equal = losses.group_advantages(torch.tensor([[3.0, 3.0, 3.0]]), "group")
    assert torch.equal(equal, torch.zeros(1, 3))  # no spread: no signal, and no division by zero


def test_token_weights_are_each_loss_types_normaliser():
    lengths = torch.tensor([2.0, 4.0])
    assert losses.sequence_token_weights(lengths, "grpo", 8).tolist() == pytest.approx([1 / 4, 1 / 8])
    assert losses.sequence_token_weights(lengths, "dr_grpo", 8).tolist() == pytest.approx([1 / 16, 1 / 16])
    assert losses.sequence_token_weights(lengths, "dapo", 8).tolist() == pytest.approx([1 / 6, 1 / 6])
