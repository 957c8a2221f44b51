"""Preference objectives end to end: every method trains with them, the reference is the starting model, a
run starts from an SFT run, resume is exact, and DPO learns a toy preference that compare then measures."""

import json
import os
import signal

import pytest
import torch

from tunesmith.cli import main
from tunesmith.config import CheckpointConfig, PreferenceConfig, TrainConfig
from tunesmith.data.formats import read_conversations
from tunesmith.data.tokenize import use_chat_template
from tunesmith.errors import TrainingInterrupted
from tunesmith.methods import METHODS
from tunesmith.objectives import OBJECTIVES
from tunesmith.objectives.preference import attach_reference, prefers_chosen, tokenize_preferences
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.loop import Session, fit
from tunesmith.train.loss import model_logps

from .conftest import build_model, build_tokenizer, chat_prompt, chat_records, write_jsonl
from .test_cli import train_args

COLOURS = ["red", "green", "blue", "black", "white", "pink"]


def pair_records(n: int) -> list[dict]:
    """Item i: its colour's record is chosen, the next colour's (same length in tokens, near enough) rejected."""
    return [
        {
            "prompt": chat_prompt(i),
            "chosen": json.dumps({"colour": COLOURS[i % 6]}),
            "rejected": json.dumps({"colour": COLOURS[(i + 1) % 6]}),
        }
        for i in range(n)
    ]


def kto_records(n: int) -> list[dict]:
    return [
        {
            "prompt": chat_prompt(i),
            "completion": json.dumps({"colour": COLOURS[(i + i % 2) % 6]}),
            "label": i % 2 == 0,
        }
        for i in range(n)
    ]


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", pair_records(40))


def _rows(run_dir, kind):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == kind]


FLAGS = ["--max-steps", "2", "--train.batch_size", "4", "--lr", "1e-2", "--test-fraction", "0.2", "--quiet"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_with_dpo_and_logs_rewards(method, tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / method
    assert main(train_args(tiny_model_dir, pairs_file, out, "--method", method, "--objective", "dpo", *FLAGS)) == 0
    rows = _rows(out, "train")
    assert rows and all(0.0 <= r["reward_accuracy"] <= 1.0 and "reward_margin" in r for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert "val_reward_accuracy" in _rows(out, "val")[-1]
    assert json.loads((out / "data" / "reference_logps.json").read_text())["logps"]["train"]


@pytest.mark.parametrize("objective", [o for o in sorted(OBJECTIVES) if o not in ("sft", "grpo")])  # grpo: test_grpo.py
def test_every_objective_trains_on_lora(objective, tiny_model_dir, tmp_path):
    records = kto_records(40) if objective == "kto" else pair_records(40)
    data = write_jsonl(tmp_path / "data.jsonl", records)
    out = tmp_path / objective
    assert main(train_args(tiny_model_dir, data, out, "--objective", objective, *FLAGS)) == 0
    first = _rows(out, "train")[0]
    assert "reward_accuracy" in first and torch.isfinite(torch.tensor(first["loss"]))
    if OBJECTIVES[objective].needs_reference:
        assert (out / "data" / "reference_logps.json").is_file()
    if objective == "dpo":  # the policy starts as the reference: the loss is log 2 (no label smoothing)
        assert first["loss"] == pytest.approx(0.6931, abs=2e-3)


def test_a_preference_objective_refuses_sft_data(tiny_model_dir, chat_file, tmp_path, capsys):
    assert main(train_args(tiny_model_dir, chat_file, tmp_path / "x", "--objective", "dpo", *FLAGS)) == 2
    assert "chosen/rejected pairs" in capsys.readouterr().err


def _examples(tokenizer, records, path):
    conversations, _ = read_conversations(write_jsonl(path, records))
    return tokenize_preferences(tokenizer, conversations, 128, "pair")[0]


def test_the_reference_is_the_starting_model_without_a_second_copy(tiny_model_dir, tmp_path):
    """Measured on the LoRA model about to train (its fresh adapter is a no-op), the reference equals a separately
    loaded base model's log-probs; a second measurement of the same examples comes from the cache."""
    from tunesmith.config import LoraConfig
    from tunesmith.methods.lora import apply_lora
    from tunesmith.models import load_model

    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None)
    examples = _examples(tokenizer, pair_records(8), tmp_path / "p.jsonl")
    policy, _ = apply_lora(load_model(str(tiny_model_dir), torch.float32), LoraConfig(r=4, alpha=8, dropout=0.0))
    cache = tmp_path / "reference.json"
    assert attach_reference(policy, {"train": examples}, tokenizer.pad_token_id, 3, cache, "start") is False
    base = load_model(str(tiny_model_dir), torch.float32).eval()
    batch_rows = [e.first for e in examples] + [e.second for e in examples]
    from tunesmith.train.batching import collate

    with torch.no_grad():
        expected, _ = model_logps(base, collate(batch_rows, tokenizer.pad_token_id))
    measured = torch.tensor([e.reference for e in examples])
    torch.testing.assert_close(measured[:, 0], expected[: len(examples)], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(measured[:, 1], expected[len(examples) :], rtol=1e-5, atol=1e-5)
    again = _examples(tokenizer, pair_records(8), tmp_path / "q.jsonl")
    assert attach_reference(policy, {"train": again}, tokenizer.pad_token_id, 3, cache, "start") is True
    assert [e.reference for e in again] == [e.reference for e in examples]


def _resume_dpo(tiny_model_dir, pairs_file, out, capsys):
    code = main(train_args(tiny_model_dir, pairs_file, out, "--objective", "dpo", *FLAGS, "--resume"))
    return code, capsys.readouterr().err


def test_a_damaged_reference_cache_is_refused_on_resume_naming_the_file(tiny_model_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "dpo"
    assert main(train_args(tiny_model_dir, pairs_file, out, "--objective", "dpo", *FLAGS)) == 0
    cache = out / "data" / "reference_logps.json"
    saved = json.loads(cache.read_text())
    train = saved["logps"]["train"]
    for damage, says in [
        ({"train": train[:-1]}, f"{len(train) - 1} train entries for the {len(train)} train examples"),
        ({"train": [[float("nan"), train[0][1]], *train[1:]]}, "train entry 0 is [nan"),
        ({"train": [["-3.2", 1.0], *train[1:]]}, "not two finite log-probs"),
    ]:
        cache.write_text(json.dumps(saved | {"logps": saved["logps"] | damage}))
        code, err = _resume_dpo(tiny_model_dir, pairs_file, out, capsys)
        flat = " ".join(err.split())
        assert code == 2 and "reference_logps.json" in flat and says in flat and "Delete reference_logps.json" in flat
        assert "Traceback" not in err
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "failed" and "reference_logps.json" in manifest["error"]
    cache.write_text("{half")
    code, err = _resume_dpo(tiny_model_dir, pairs_file, out, capsys)
    assert code == 2 and "not readable JSON" in err
    cache.unlink()  # the fix the message names: measured again
    assert _resume_dpo(tiny_model_dir, pairs_file, out, capsys)[0] == 0
    again = json.loads(cache.read_text())["logps"]["train"]
    torch.testing.assert_close(torch.tensor(again), torch.tensor(train), rtol=0, atol=1e-4)  # the starting model's


def test_the_reference_cache_is_keyed_on_the_starting_weights_content(tiny_model_dir, tmp_path):
    import shutil

    from tunesmith.config import build_config
    from tunesmith.models import load_model
    from tunesmith.objectives.preference import starting_weights, weights_digest

    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    files = starting_weights(build_config({}), str(base))
    assert [p.name for p in files] == ["model.safetensors"]
    before = weights_digest(files)
    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None)
    examples = _examples(tokenizer, pair_records(6), tmp_path / "p.jsonl")
    cache = tmp_path / "reference.json"
    model = load_model(str(base), torch.float32)
    assert attach_reference(model, {"train": examples}, tokenizer.pad_token_id, 3, cache, f"m|{before}") is False
    assert attach_reference(model, {"train": examples}, tokenizer.pad_token_id, 3, cache, f"m|{before}") is True
    build_model(len(tokenizer), seed=7).save_pretrained(base)  # the same name, other weights
    after = weights_digest(starting_weights(build_config({}), str(base)))
    assert after != before
    other = load_model(str(base), torch.float32)
    assert attach_reference(other, {"train": examples}, tokenizer.pad_token_id, 3, cache, f"m|{after}") is False


def test_a_dpo_run_continues_an_sft_run(tiny_model_dir, tmp_path, capsys):
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    assert main(train_args(tiny_model_dir, chat, sft, *FLAGS, "--max-steps", "4")) == 0
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(40))
    flags = ["--objective", "dpo", "--set", f"init_from={sft}"]
    assert main(train_args(tiny_model_dir, pairs, dpo, *flags, *FLAGS)) == 0
    assert json.loads((dpo / "manifest.json").read_text()).get("init_from") == str(sft)
    # The reference is the SFT run's model: its log-probs, not the base's.
    from tunesmith.evaluate.generate import load_run
    from tunesmith.train.batching import collate

    saved = json.loads((dpo / "data" / "reference_logps.json").read_text())["logps"]["train"]
    loaded = load_run(sft)
    conversations, _ = read_conversations(dpo / "data" / "train.jsonl")
    examples = tokenize_preferences(loaded.tokenizer, conversations, 512, "pair")[0][:4]
    with torch.no_grad():
        logps, _ = model_logps(loaded.model, collate([e.first for e in examples], loaded.tokenizer.pad_token_id))
    torch.testing.assert_close(torch.tensor([s[0] for s in saved[:4]]), logps, rtol=1e-4, atol=1e-4)
    # Its adapter is a whole update over the base: served and exported like any LoRA run.
    assert (dpo / "adapter" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert main(["generate", str(dpo), "--prompt", chat_prompt(1), "--max-new-tokens", "4", "--json"]) == 0


def test_dpo_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    from tunesmith.config import LoraConfig
    from tunesmith.methods.lora import apply_lora
    from tunesmith.models import load_model

    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None)
    settings = TrainConfig(max_steps=6, batch_size=4, lr=5e-3, warmup_ratio=0.2, log_every=1)

    def policy():
        torch.manual_seed(1)
        model = load_model(str(tiny_model_dir), torch.float32)
        return apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))[0]

    def run(run_dir, model, **session):
        run_dir.mkdir(exist_ok=True)
        examples = _examples(tokenizer, pair_records(24), run_dir / "pairs.jsonl")
        attach_reference(model, {"train": examples}, tokenizer.pad_token_id, 4)
        return fit(
            model, examples, settings, tokenizer.pad_token_id, run_dir / "metrics.jsonl",
            session=Session(
                run_dir=run_dir, checkpoint=CheckpointConfig(every=2), objective=OBJECTIVES["dpo"],
                preference=PreferenceConfig(), **session,
            ),
        )  # fmt: skip

    straight = policy()
    run(tmp_path / "straight", straight)

    def stop_at_step_3(record):
        if record.get("step") == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "broken", policy(), log=stop_at_step_3)
    resumed = policy()
    run(tmp_path / "broken", resumed, resume_from=ckpt.latest_checkpoint(tmp_path / "broken"))
    expected = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    for name, parameter in resumed.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    keys = ("step", "loss", "reward_accuracy", "reward_margin")
    straight_rows = [tuple(r[k] for k in keys) for r in _rows(tmp_path / "straight", "train")]
    assert [tuple(r[k] for k in keys) for r in _rows(tmp_path / "broken", "train")] == straight_rows


@pytest.mark.slow
def test_dpo_learns_a_toy_preference_and_compare_measures_it(tmp_path, capsys):
    """A 64-wide Llama prefers the right colour record about half the time; after DPO on held-out pairs > 0.9,
    significantly more often than the base (compare's preference accuracy)."""
    model_dir = tmp_path / "llama64"
    tokenizer = build_tokenizer()
    shape = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    )
    build_model(len(tokenizer), seed=0, **shape).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records(100))
    out = tmp_path / "dpo"
    flags = ["--objective", "dpo", "--method", "full", "--max-steps", "120", "--train.batch_size", "8"]
    flags += ["--lr", "2e-3", "--test-fraction", "0.3", "--quiet", "--set", "eval.max_new_tokens=12"]
    assert main(train_args(model_dir, data, out, *flags)) == 0
    val = _rows(out, "val")
    assert val[-1]["val_reward_accuracy"] > 0.9
    capsys.readouterr()
    assert main(["compare", str(out), "--json"]) == 0
    preference = json.loads(capsys.readouterr().out)["preference"]
    assert preference["items"] >= 20 and 0.2 < preference["base"] < 0.8 and preference["tuned"] > 0.9
    assert preference["tuned_vs_base"]["significant"] and preference["tuned_vs_base"]["p_value"] < 0.01
    # The same measurement by hand: the tuned model prefers chosen on held-out pairs.
    from tunesmith.evaluate.generate import load_run

    loaded = load_run(out)
    conversations, _ = read_conversations(out / "data" / "test.jsonl")
    examples = tokenize_preferences(loaded.tokenizer, conversations, 512, "pair")[0]
    wins = prefers_chosen(loaded.model, examples, loaded.tokenizer.pad_token_id, 8)
    assert sum(wins) / len(wins) == pytest.approx(preference["tuned"], abs=1e-3)
