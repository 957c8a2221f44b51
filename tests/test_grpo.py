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
from tunesmith.data.tokenize import TokenizedExample, use_chat_template
from tunesmith.errors import TrainingInterrupted, TunesmithError
from tunesmith.methods import METHODS
from tunesmith.objectives import losses
from tunesmith.objectives.rl import Group, Rollouts, Row, combined_rewards, tokenize_prompts
from tunesmith.rewards import Sample, build_rewards, score
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.loop import Session, fit

from .conftest import build_model, build_tokenizer, chat_prompt, chat_records, write_jsonl
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
    # RL_FLAGS first: its group size of 2 gives too few random completions for the rewards to differ reliably.
    assert main(train_args(tiny_model_dir, chat_file, out, *RL_FLAGS, *flags)) == 0
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
@pytest.mark.parametrize("share", [True, False])
def test_the_loss_equals_its_formula_for_every_loss_type(loss_type, beta, share, tmp_path):
    tokenizer, model, config, prompts = _setup(
        tmp_path, loss_type=loss_type, beta=beta, epsilon_high=0.28, share_prompts=share
    )
    rollouts = Rollouts(config, tokenizer, prompts, model, uses_peft=False)
    assert rollouts.shared is share
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i, length in enumerate([3, 5, 1, 4, 2]):  # 5 completions in micro-batches of 2: one left over
        tokens = torch.randint(3, len(tokenizer), (length,), generator=generator).tolist()
        sampled = (torch.randn(length, generator=generator) * 0.5 - 5).tolist()  # far from the policy: clipping
        reference = (torch.randn(length, generator=generator) * 0.3 - 5.5).tolist()
        prompt = prompts[i // 3].ids  # a group of 3 and one of 2: micro-batches share a prompt, and one does not
        rows.append(Row(prompt, tokens, sampled, float(torch.randn(1, generator=generator)), i, reference))
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


def _gemma(vocab_size, window):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=window, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return Gemma3ForCausalLM(config)


@pytest.mark.parametrize("family", ["llama-sdpa", "llama-eager", "gemma3-sdpa", "gemma3-eager"])
def test_shared_prompts_give_each_completions_own_log_probs_and_gradients(family):
    """One copy of a prompt for several completions (share_prefixes) computes what padded rows with their own
    copies do: every token's log-prob and the LoRA gradients, for Llama and Gemma 3 (sliding and full layers)."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.train.batching import collate, share_prefixes
    from tunesmith.train.loss import model_token_logps, shares_prefixes

    name, attention = family.split("-")
    model = build_model(64) if name == "llama" else _gemma(64, window=24)
    model.config._attn_implementation = attention
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 64, (n,), generator=generator).tolist() for n in (7, 4)]
    sequences = [(prompts[0], [5, 9, 11]), (prompts[0], [6]), (prompts[0], [7, 8, 12, 13]), (prompts[1], [9, 4])]
    assert shares_prefixes(model, 11) and (name == "llama" or not shares_prefixes(model, 25))
    results = []
    for batch in (
        share_prefixes(sequences),
        collate([TokenizedExample(p + c, [0] * len(p) + [1] * len(c)) for p, c in sequences], 0),
    ):
        model.zero_grad()
        logps, entropy = model_token_logps(model, batch)
        (logps * torch.linspace(-1, 1, len(logps))).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((logps.detach(), entropy, grads))
    (shared, shared_entropy, shared_grads), (padded, padded_entropy, padded_grads) = results
    assert len(shared) == sum(len(c) for _, c in sequences)
    torch.testing.assert_close(shared, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared_entropy, padded_entropy, rtol=1e-5, atol=1e-5)
    for a, b in zip(shared_grads, padded_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the layout itself: the prompt once per run of equal prompts, positions continuing from it
    batch = share_prefixes(sequences)
    assert batch["input_ids"].shape[1] == 7 + 3 + 1 + 4 + 4 + 2
    assert batch["position_ids"][0, 7:10].tolist() == [7, 8, 9] and batch["position_ids"][0, 10] == 7
    assert batch["sources"][:4].tolist() == [6, 7, 8, 6]
    assert batch["token_rows"].tolist() == [0] * 3 + [1] + [2] * 4 + [3] * 2
    mask = batch["attention_mask"][0, 0]
    assert mask[10, :7].all() and not mask[10, 7:10].any() and not mask[19, :15].any()


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


# --- Rollouts: dynamic sampling, truncation, skipped completions ------------------------------------------------


def _reward(name, function):
    from tunesmith.rewards import Reward, _per_sample

    return Reward(name, 1.0, False, _per_sample(function))


def test_zero_spread_groups_are_dropped_counted_and_replaced(tmp_path):
    tokenizer, model, config, prompts = _setup(tmp_path, max_completion_tokens=4, overlong="none", max_draws=3)
    rollouts = Rollouts(config, tokenizer, prompts, model, uses_peft=False)
    # Prompts about red or blue get a reward that differs between completions; every other prompt a constant.
    rollouts.rewards = [_reward("r", lambda s: len(s.completion) % 3 if ("red" in s.prompt or "blue" in s.prompt)
                                else 1.0)]  # fmt: skip
    rows, logged, drawn = rollouts.rollout(FakeTrainer(model), step=1, position=0)
    kept_lines = {row.line for row in rows}
    spread = {p.line for p in prompts if "red" in p.conversation.prompt_messages[-1].content
              or "blue" in p.conversation.prompt_messages[-1].content}  # fmt: skip
    assert kept_lines <= spread
    assert logged["groups_dropped"] == drawn - len({r.line for r in rows}) and logged["draws"] <= 3
    assert logged["groups_dropped"] > 0 and logged["zero_spread"] > 0 and logged["prompts_drawn"] == drawn > 2
    # Without dynamic sampling the zero-spread groups stay (advantage 0) and are still counted.
    config.rl.dynamic_sampling = False
    rows, logged, drawn = rollouts.rollout(FakeTrainer(model), step=1, position=0)
    assert drawn == 2 and logged["draws"] == 1 and logged["groups_dropped"] == 0
    assert len(rows) == 2 * config.rl.group_size


def _fake_generation(lengths, limit):
    """generate_groups as the engine would answer: completion k of each prompt has lengths[k] tokens, and one of
    `limit` tokens was cut there (finish_reason length)."""
    from tunesmith.generation import Request

    def generate(model, tokenizer, prompts, group_size, rl, temperature, seed, logprobs):
        groups = []
        for prompt in prompts:
            requests = []
            for k in range(group_size):
                request = Request(prompt.ids, limit, tokens=[5] * lengths[k], token_logprobs=[-1.0] * lengths[k])
                request.finish_reason = "length" if lengths[k] == limit else "stop"
                requests.append(request)
            groups.append(requests)
        return groups, [["x" * n for n in lengths[:group_size]] for _ in prompts]

    return generate


def test_truncated_completions_are_masked_or_penalised_never_scored_zero_silently(tmp_path, monkeypatch):
    import tunesmith.objectives.rl as rl

    tokenizer, model, config, prompts = _setup(tmp_path, max_completion_tokens=3, overlong="mask", group_size=3,
                                               dynamic_sampling=False, overlong_buffer=2)  # fmt: skip
    monkeypatch.setattr(rl, "generate_groups", _fake_generation([1, 2, 3], 3))
    rollouts = Rollouts(config, tokenizer, prompts, model, uses_peft=False)
    rollouts.rewards = [_reward("chars", lambda s: float(len(s.completion)))]
    rows, logged, _ = rollouts.rollout(FakeTrainer(model), step=1, position=0)
    assert logged["truncated"] == pytest.approx(1 / 3) and logged["completion_len_max"] == 3
    assert sorted(len(row.tokens) for row in rows) == [1, 1, 2, 2]  # masked: no cut completion is trained on
    assert logged["reward"] == pytest.approx(1.5)  # and none scored: the mean of 1 and 2
    config.rl.overlong = "penalty"
    rows, logged, _ = rollouts.rollout(FakeTrainer(model), step=1, position=0)
    assert sorted(len(row.tokens) for row in rows) == [1, 1, 2, 2, 3, 3]  # penalised, not dropped
    samples = [Sample("p", "abc", None, {}, tokens, tokens == 3) for tokens in (1, 2, 3)]
    group = Group(0, [None] * 3, samples, score(rollouts.rewards, samples))
    assert combined_rewards(group, config.rl) == [3.0, 3.0 - 0.5, 3.0 - 1.0]  # DAPO's soft penalty, -1 at the limit
    config.rl.overlong = "mask"
    assert combined_rewards(group, config.rl) == [3.0, 3.0, None]


def test_a_reward_that_raises_returns_none_or_hangs_skips_its_completion(tmp_path):
    module = tmp_path / "my_rewards.py"
    module.write_text(
        "import time\n"
        "def picky(prompt, completion, example):\n"
        "    if completion == 'boom':\n        raise ValueError('no')\n"
        "    if completion == 'none':\n        return None\n"
        "    if completion == 'slow':\n        time.sleep(5)\n"
        "    return 1.0\n"
    )
    spec = f"{module}:picky"
    entry = RewardConfig(code=spec, timeout_s=0.2)
    with pytest.raises(TunesmithError, match="rl.rewards names code"):
        build_rewards([entry], None, 8)  # not named on this command line
    trust.grant([spec])
    rewards = build_rewards([entry, RewardConfig(metric="exact_match")], None, 8)
    samples = [Sample("p", text, "ok", {}, 1, False) for text in ("ok", "boom", "none", "slow")]
    scored = score(rewards, samples)
    assert scored.values["picky"] == [1.0, None, None, None]
    assert scored.skipped == {"picky": 3, "exact_match": 0}
    assert scored.combined == [2.0, None, None, None]


def test_a_code_reward_from_a_run_folders_config_is_refused(tiny_model_dir, chat_file, tmp_path, capsys):
    module = tmp_path / "reward.py"
    marker = tmp_path / "ran.txt"
    module.write_text(
        f"open({str(marker)!r}, 'w').write('ran')\ndef fn(prompt, completion, example):\n    return 1.0\n"
    )
    folder = tmp_path / "shared-run"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    config = {"model": str(tiny_model_dir), "objective": "grpo", "rl": {"rewards": [{"code": f"{module}:fn"}]},
              "data": {"path": str(chat_file)}, "out": str(tmp_path / "out")}  # fmt: skip
    (folder / "config.yaml").write_text(json.dumps(config))
    assert trust.code_entries(config) == [("rl.rewards", f"{module}:fn")]
    assert main(["train", str(folder / "config.yaml"), "--allow-warnings", "true"]) == 2
    message = capsys.readouterr().err
    assert "rl.rewards names code" in message and "--allow-code" in message
    assert not marker.exists() and not (tmp_path / "out").exists()


# --- Learning and resuming --------------------------------------------------------------------------------------


def _fit(run_dir, tokenizer, model, config, prompts, **session):
    rollouts = Rollouts(config, tokenizer, prompts, model, uses_peft=hasattr(model, "disable_adapter"))
    run_dir.mkdir(exist_ok=True)
    return fit(
        model, prompts, config.train, tokenizer.pad_token_id, run_dir / "metrics.jsonl",
        session=Session(run_dir=run_dir, checkpoint=CheckpointConfig(every=2), objective=rollouts.objective,
                        source=rollouts, **session),
    )  # fmt: skip


def test_a_metric_reward_rises_on_a_tiny_task(tmp_path):
    """A random 2-layer Llama learns to answer in vowels: chrF against the reference 'aeiou aeiou' rises."""
    tokenizer, model, config, prompts = _setup(tmp_path, n=16)
    records = [dict(r, messages=[r["messages"][0], {"role": "assistant", "content": "aeiou aeiou"}])
               for r in chat_records(16)]  # fmt: skip
    conversations, _ = read_conversations(write_jsonl(tmp_path / "vowels.jsonl", records))
    config = RunConfig(
        objective="grpo",
        rl=RlConfig(rewards=[RewardConfig(metric="chrf")], group_size=8, prompts_per_step=4, max_completion_tokens=6,
                    overlong="none"),
        train=TrainConfig(max_steps=15, batch_size=16, lr=2e-2, warmup_ratio=0.0, schedule="constant", seed=0,
                          max_grad_norm=None),
    )  # fmt: skip
    prompts, _ = tokenize_prompts(tokenizer, conversations, 256, config.rl)
    result = _fit(tmp_path / "run", tokenizer, model, config, prompts)
    rewards = [row["reward"] for row in result.history]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > 3 * first and last > first + 0.04, rewards  # measured: 0.007 -> 0.09


def test_grpo_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """SIGTERM at step 3 (mid-way through a rollout's 2 iterations), then resume: same weights, same rows."""
    from tunesmith.config import LoraConfig
    from tunesmith.methods.lora import apply_lora
    from tunesmith.models import load_model

    tokenizer, _, config, prompts = _setup(tmp_path, beta=0.1, iterations=2, max_completion_tokens=5,
                                           overlong="penalty")  # fmt: skip
    config.train = TrainConfig(max_steps=6, batch_size=4, lr=5e-3, warmup_ratio=0.2, seed=3)

    def policy():
        torch.manual_seed(1)
        model = load_model(str(tiny_model_dir), torch.float32)
        return apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))[0]

    straight = policy()
    _fit(tmp_path / "straight", tokenizer, straight, config, prompts)

    def stop_at_step_3(record):
        if record.get("step") == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted):
        _fit(tmp_path / "broken", tokenizer, policy(), config, prompts, log=stop_at_step_3)
    resumed = policy()
    latest = ckpt.latest_checkpoint(tmp_path / "broken")
    assert json.loads((latest / "state.json").read_text())["rollouts"]["rows"]  # the pending rollout is kept
    _fit(tmp_path / "broken", tokenizer, resumed, config, prompts, resume_from=latest)
    expected = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    for name, parameter in resumed.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    keys = ("step", "loss", "reward", "kl", "prompts_drawn", "iteration")
    straight_rows = [tuple(r.get(k) for k in keys) for r in _rows(tmp_path / "straight", "train")]
    assert [tuple(r.get(k) for k in keys) for r in _rows(tmp_path / "broken", "train")] == straight_rows


def test_data_check_says_which_rewards_need_a_reference(chat_file, capsys):
    assert main(["data", "check", str(chat_file), "--rewards", "[{metric: json_fields}, {regex: x}]", "--json"]) in (
        0,
        1,
    )
    report = json.loads(capsys.readouterr().out)
    assert report["rewards"] == {"need_reference": ["json_fields"], "rows_without_reference": 0}


# --- Prompts without answers ------------------------------------------------------------------------------------


def _prompt_only_records(n):
    """The colour task's prompts in the three SFT layouts, none with an answer."""
    system = {"role": "system", "content": "Be brief."}
    layouts = {
        "chat": lambda i: {"messages": [system, {"role": "user", "content": chat_prompt(i)}]},
        "prompt": lambda i: {"prompt": chat_prompt(i)},
        "alpaca": lambda i: {"instruction": chat_prompt(i), "input": "as JSON"},
    }
    return {name: [layout(i) for i in range(n)] for name, layout in layouts.items()}


@pytest.mark.parametrize("layout", ["chat", "prompt", "alpaca"])
def test_prompts_without_answers_are_read_for_grpo_and_refused_otherwise(layout, tmp_path):
    path = write_jsonl(tmp_path / f"{layout}.jsonl", _prompt_only_records(3)[layout])
    conversations, _ = read_conversations(path, prompt_only=True)
    assert [c.reference for c in conversations] == [None, None, None]
    asked = conversations[1].prompt_messages[-1]
    assert asked.role == "user" and asked.content.startswith(chat_prompt(1))
    # Read back as a run's split is (write_jsonl of the records, then read): the same prompts.
    again, _ = read_conversations(write_jsonl(tmp_path / "again.jsonl", [c.to_record() for c in conversations]),
                                  prompt_only=True)  # fmt: skip
    assert [c.prompt_messages for c in again] == [c.prompt_messages for c in conversations]
    expected = {"chat": "must end with an assistant turn", "prompt": "missing field 'completion'",
                "alpaca": "missing field 'output'"}[layout]  # fmt: skip
    with pytest.raises(TunesmithError, match=expected) as refused:
        read_conversations(path)
    assert f"{path}:1:" in str(refused.value) and f"{path}:3:" in str(refused.value)


def test_a_prompt_only_conversation_must_still_end_with_the_users_turn(tmp_path):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]}
    with pytest.raises(TunesmithError, match="ends with a system turn: end it with the user's prompt"):
        read_conversations(write_jsonl(tmp_path / "bad.jsonl", [record]), prompt_only=True)


def test_data_check_reads_prompts_for_rewards_and_names_the_lines_a_reference_reward_lacks(tmp_path, capsys):
    records = chat_records(30)
    for record in records[5:]:
        record["messages"] = record["messages"][:1]  # 25 prompts without an answer, 5 with
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    assert main(["data", "check", str(path), "--rewards", "[{regex: '[aeiou]'}, {length: 4}]", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rewards"] == {"need_reference": [], "rows_without_reference": 25} and not report["errors"]
    codes = {w["code"] for w in report["warnings"]}
    assert not codes & {"short_answers", "repeated_answers"} and not report["conflicts"]  # a missing answer is none
    assert main(["data", "check", str(path), "--rewards", "[{metric: token_f1}, {regex: x}]"]) == 1
    printed = capsys.readouterr().out
    assert "token_f1 need a reference answer; 25 rows have none" in printed
    assert "25 rows have none (lines [6, 7, 8" in printed.replace("\n", " ")
    assert main(["data", "check", str(path)]) == 1  # not for grpo: an answer per row, as before
    assert "must end with an assistant turn" in capsys.readouterr().out


def test_grpo_trains_on_prompts_without_answers_and_sft_refuses_them(tiny_model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "prompts.jsonl", _prompt_only_records(40)["prompt"])
    out = tmp_path / "run"
    flags = ["--objective", "grpo", "--rl.rewards", "[{regex: '[aeiou]'}]", "--rl.dynamic_sampling", "false"]
    assert main(train_args(tiny_model_dir, path, out, *RL_FLAGS, *flags)) == 0
    split = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert split and all(row["messages"][-1]["role"] == "user" for row in split)
    assert len(_rows(out, "train")) == 2
    failing = ["--objective", "grpo", "--rl.rewards", "[{metric: exact_match}]"]
    assert main(train_args(tiny_model_dir, path, tmp_path / "needs", *RL_FLAGS, *failing)) == 2
    assert "exact_match score against the reference answer, but 40 rows have none" in capsys.readouterr().err
    assert main(train_args(tiny_model_dir, path, tmp_path / "sft", "--max-steps", "1", "--quiet")) == 2
    assert "missing field 'completion'" in capsys.readouterr().err


# --- compare: the reward on the test split ----------------------------------------------------------------------


def test_compare_of_a_grpo_run_scores_its_rewards_and_runs_code_only_when_allowed(tiny_model_dir, chat_file, tmp_path,
                                                                                 capsys):  # fmt: skip
    import re

    from tunesmith.evaluate.metrics import per_item_functions

    module, marker = tmp_path / "rw.py", tmp_path / "ran.txt"
    module.write_text(
        f"def letters(prompt, completion, example):\n    open({str(marker)!r}, 'a').write('x')\n"
        "    return float(len(completion) % 3)\n"
    )
    out = tmp_path / "run"
    rewards = f"[{{regex: '[aeiou]'}}, {{metric: token_f1, weight: 2}}, {{code: '{module}:letters'}}]"
    flags = ["--method", "lora", "--objective", "grpo", "--rl.rewards", rewards, "--rl.dynamic_sampling", "false"]
    assert main(train_args(tiny_model_dir, chat_file, out, *RL_FLAGS, *flags)) == 0
    trust.reset()  # a later command line that names no code: compare reads the code reward from the run folder
    marker.unlink(missing_ok=True)
    capsys.readouterr()
    assert main(["compare", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    scored = summary["rewards"]
    assert not marker.exists()  # the code reward never ran
    assert scored["rewards"] == ["regex", "token_f1"] and scored["weights"] == {"regex": 1.0, "token_f1": 2.0}
    assert [s["reward"] for s in scored["skipped_rewards"]] == ["letters"]
    assert "--allow-code" in scored["skipped_rewards"][0]["why"]
    # The same functions as training, by hand, on the answers compare saved.
    rows = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    f1 = per_item_functions(["token_f1"], None)["token_f1"]
    for contestant in ("zero_shot", "tuned"):
        answers = [r[contestant] for r in rows]
        by_hand = [float(re.search("[aeiou]", a.strip()) is not None) + 2 * f1(a, r["reference"])
                   for a, r in zip(answers, rows, strict=True)]  # fmt: skip
        assert scored["contestants"][contestant]["reward"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-5)
    row = summary["baselines"]["zero_shot"]["metrics"]["reward"]
    assert row["tuned"] == pytest.approx(scored["contestants"]["tuned"]["reward"], abs=1e-5)
    assert row["base"] == pytest.approx(scored["contestants"]["zero_shot"]["reward"], abs=1e-5)
    assert row["role"] == "secondary" and "p_holm" in row  # corrected with the other secondary metrics
    page = (out / "eval" / "report.html").read_text()
    assert "Reward on the test split" in page and "Reward letters" in page and "skipped" in page
    assert main(["compare", str(out), "--allow-code"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert marker.exists() and "skipped:" not in printed
    assert re.search(r"Reward on the test split .* combined .* regex .* token_f1 .* letters", printed)


def test_compare_says_a_test_split_of_prompts_only_has_no_answers_to_score(tmp_path):
    from tunesmith.evaluate.compare import split_items

    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "test.jsonl", _prompt_only_records(3)["chat"])
    with pytest.raises(TunesmithError, match="holds prompts without answers .* Give the test prompts their answers"):
        split_items(tmp_path, "test", None)
