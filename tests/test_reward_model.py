"""objective: reward_model: the Bradley-Terry loss by hand, every method trains a head that is saved and loaded back
with equal scores, a scorer learns separable pairs (compare measures it against its untrained start), and loading a
run folder runs no code from it."""

import json
import math
import random

import pytest
import torch
from safetensors import safe_open

from tunesmith.cli import main
from tunesmith.config import LoraConfig
from tunesmith.data.formats import read_conversations
from tunesmith.data.tokenize import use_chat_template
from tunesmith.errors import TunesmithError
from tunesmith.methods import METHODS
from tunesmith.methods.lora import apply_lora
from tunesmith.models import load_model
from tunesmith.objectives import OBJECTIVES
from tunesmith.objectives.preference import tokenize_preferences
from tunesmith.objectives.reward_model import CENTERING, HEAD, fresh_head, load_reward_model, sequence_scores
from tunesmith.rundir import RunDir
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.batching import collate

from .conftest import FILLER, build_tokenizer, chat_prompt, write_jsonl
from .test_cli import train_args

COLOURS = ["red", "green", "blue", "black", "white", "pink"]


def separable_pairs(n: int) -> list[dict]:
    """Pairs as `monitor --export-preferences` writes them (the prompt as messages, the sides' models and source).
    Both answers are four random filler words, but only the chosen one says "fox": a small fixed difference under
    large differences from pair to pair, so a fresh head ranks them about as chance does and a trained one learns it."""
    rows = []
    words = [w for w in FILLER if w != "fox"]
    for i in range(n):
        draw = random.Random(i)
        chosen, rejected = draw.sample(words, 3), draw.sample(words, 4)
        chosen.insert(draw.randrange(4), "fox")
        rows.append({
            "prompt": [{"role": "user", "content": chat_prompt(i)}],
            "chosen": " ".join(chosen),
            "rejected": " ".join(rejected),
            "chosen_model": None,
            "rejected_model": "colours",
            "source": "correction",
            "chosen_request": f"r{i}",
            "rejected_request": f"r{i}",
        })  # fmt: skip
    return rows


def _rows(run_dir, kind):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == kind]


FLAGS = ["--objective", "reward_model", "--train.batch_size", "4", "--test-fraction", "0.25", "--quiet"]


def test_the_loss_is_bradley_terry_with_a_small_centering_term(tiny_model_dir, tmp_path):
    """loss_sum against the formula written out: a dot product of the last real token's hidden state with the head,
    -log(1 / (1 + exp(-(r_c - r_r)))) + 1e-3 * (r_c + r_r)^2 summed over pairs; accuracy and margin likewise."""
    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None)
    conversations, _ = read_conversations(write_jsonl(tmp_path / "p.jsonl", separable_pairs(6)))
    pairs, _ = tokenize_preferences(tokenizer, conversations, 128, "pair")
    objective = OBJECTIVES["reward_model"]
    model = objective.attach(load_model(str(tiny_model_dir), torch.float32).eval(), seed=3)
    with torch.no_grad():  # a head that separates the sides a little, so the margin is not all zero
        getattr(model, HEAD).weight.normal_(0.0, 0.5)
        getattr(model, HEAD).bias.fill_(0.3)
    batch = objective.collate(pairs, tokenizer.pad_token_id, 0, False)
    loss, stats = objective.loss_sum(model, batch, None)

    head = getattr(model, HEAD)
    scores = []
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        for row, ids in enumerate([p.first.input_ids for p in pairs] + [p.second.input_ids for p in pairs]):
            final = hidden[row, len(ids) - 1]
            scores.append(float(final @ head.weight[0] + head.bias[0]))
    chosen, rejected = scores[: len(pairs)], scores[len(pairs) :]
    expected = sum(
        -math.log(1.0 / (1.0 + math.exp(-(c - r)))) + CENTERING * (c + r) ** 2
        for c, r in zip(chosen, rejected, strict=True)
    )
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert stats["reward_accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected, strict=True)))
    assert stats["reward_margin"] == pytest.approx(sum(c - r for c, r in zip(chosen, rejected, strict=True)), abs=1e-4)
    assert len({round(s, 6) for s in scores}) > 1


def test_the_score_reads_the_decoder_not_the_lm_head(tiny_model_dir):
    """Changing the output layer leaves the score alone: it is the head on the last hidden state."""
    model = OBJECTIVES["reward_model"].attach(load_model(str(tiny_model_dir), torch.float32).eval(), 0)
    ids, mask = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        before = sequence_scores(model, getattr(model, HEAD), batch)
        model.get_output_embeddings().weight.mul_(-3.0)
        after = sequence_scores(model, getattr(model, HEAD), batch)
    torch.testing.assert_close(before, after)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_a_reward_model_whose_head_is_saved(method, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(24))
    out = tmp_path / method
    assert main(train_args(tiny_model_dir, data, out, "--method", method, "--max-steps", "2", *FLAGS)) == 0
    rows = _rows(out, "train")
    assert rows and all(0.0 <= r["reward_accuracy"] <= 1.0 and "reward_margin" in r for r in rows)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert "val_reward_accuracy" in _rows(out, "val")[-1]
    layout = RunDir(out)
    assert layout.reward_head.is_file() and layout.read_config().objective == "reward_model"
    # The method saved exactly what it always saves: no head inside its weights.
    names = _tensor_names(layout.weights(layout.read_config()))
    assert names and all(HEAD not in name for name in names)
    scores = load_reward_model(out).score(["colour red item 0 fox"], ["the quick brown fox red"])
    assert len(scores) == 1 and math.isfinite(scores[0])


def _tensor_names(folder) -> list[str]:
    names = []
    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as saved:
            names += list(saved.keys())
    return names


@pytest.fixture(scope="module")
def lora_reward_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("rm")
    data = write_jsonl(root / "pairs.jsonl", separable_pairs(80))
    out = root / "rm"
    flags = [*FLAGS, "--method", "lora", "--max-steps", "80", "--lr", "1e-2", "--train.batch_size", "8"]
    assert main(train_args(tiny_model_dir, data, out, *flags)) == 0
    return out


def test_the_loaded_head_scores_as_the_trained_model_did(lora_reward_run, tiny_model_dir):
    """The last checkpoint holds the model as training left it (adapter and head by their training names); the run
    folder's adapter and reward_head.safetensors, loaded back, score every test pair the same."""
    scorer = load_reward_model(lora_reward_run)
    config = scorer.run.config
    trained = OBJECTIVES["reward_model"].attach(
        apply_lora(load_model(str(tiny_model_dir), torch.float32), LoraConfig(**config.lora.model_dump()))[0], 0
    )
    ckpt.load_trainable(trained, ckpt.latest_checkpoint(lora_reward_run) / "trainable.safetensors")
    trained.eval()
    conversations, _ = read_conversations(lora_reward_run / "data" / "test.jsonl")
    pairs, _ = tokenize_preferences(scorer.run.tokenizer, conversations, 512, "pair")
    rows = [p.first for p in pairs] + [p.second for p in pairs]
    with torch.no_grad():
        expected = sequence_scores(trained, getattr(trained, HEAD), collate(rows, scorer.run.tokenizer.pad_token_id))
    loaded = torch.tensor(scorer.pair_scores(pairs)).T.reshape(-1)  # chosen rows, then rejected, as batched
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-5)


def test_scores_are_batched_alike_from_messages_or_text(lora_reward_run):
    """A prompt as messages or as the user's text scores the same, one at a time or padded in a batch."""
    scorer = load_reward_model(lora_reward_run, batch_size=3)
    prompts = [chat_prompt(i) for i in range(5)]
    answers = ["the quick brown fox red", "the lazy dog", "fox", "the quick brown fox jumps over the lazy dog", ""]
    batched = scorer.score(prompts, answers)
    alone = [scorer.score([[{"role": "user", "content": p}]], [a])[0] for p, a in zip(prompts, answers, strict=True)]
    assert batched == pytest.approx(alone, abs=1e-4)
    with pytest.raises(TunesmithError, match="2 prompts but 1 completions"):
        scorer.score(prompts[:2], answers[:1])


def test_a_reward_model_learns_separable_pairs_and_compare_measures_it(lora_reward_run, capsys):
    """Held-out pair accuracy: well above chance for the trained head, against about chance for the untrained start
    (the base with the same fresh head), the difference's 95% CI above 0, in compare.json and the printed report."""
    val = _rows(lora_reward_run, "val")
    assert val[-1]["val_reward_accuracy"] > 0.8
    capsys.readouterr()
    assert main(["compare", str(lora_reward_run), "--json"]) == 0
    compared = json.loads(capsys.readouterr().out)
    preference = compared["preference"]
    assert preference["items"] >= 15 and preference["tuned"] > 0.85 and preference["base"] < 0.75
    assert preference["tuned_vs_base"]["ci_low"] > 0
    assert compared["baselines"] == {} and "learned the preference" in compared["verdict"]
    assert json.loads(RunDir(lora_reward_run).compare.read_text())["preference"] == preference
    assert main(["compare", str(lora_reward_run)]) == 0
    printed = capsys.readouterr().out
    assert "higher reward-model score" in printed and "Verdict" in printed
    assert "Preference accuracy" in RunDir(lora_reward_run).report_html.read_text()


def test_the_untrained_start_is_the_head_training_began_with(tiny_model_dir):
    model = load_model(str(tiny_model_dir), torch.float32)
    first = fresh_head(model.config, 0)
    again = OBJECTIVES["reward_model"].attach(model, 0)
    torch.testing.assert_close(getattr(again, HEAD).weight, first.weight)
    assert float(first.weight.detach().std()) == pytest.approx(model.config.initializer_range, rel=0.5)


def test_full_fine_tuning_learns_separable_pairs(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(80))
    out = tmp_path / "full"
    flags = [*FLAGS, "--method", "full", "--max-steps", "60", "--lr", "3e-3", "--train.batch_size", "8"]
    assert main(train_args(tiny_model_dir, data, out, *flags)) == 0
    capsys.readouterr()
    assert main(["compare", str(out), "--json"]) == 0
    preference = json.loads(capsys.readouterr().out)["preference"]
    assert preference["tuned"] > 0.85 and preference["tuned_vs_base"]["ci_low"] > 0


def test_loading_a_reward_model_runs_no_code_from_the_run_folder(lora_reward_run, tmp_path):
    """A config naming a metric in a file of the folder loads without importing it; a head file that is not
    safetensors (a pickle could run code) is refused, naming it."""
    marker = tmp_path / "ran"
    (lora_reward_run / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef fn(p, r):\n    return 1\n")
    layout = RunDir(lora_reward_run)
    original = layout.config.read_text()
    head = layout.reward_head.read_bytes()
    try:
        layout.config.write_text(original.replace("metrics:\n", "metrics:\n  - evil.py:fn\n", 1))
        assert "evil.py:fn" in layout.config.read_text()
        assert math.isfinite(load_reward_model(lora_reward_run).score(["hi"], ["the quick brown fox"])[0])
        assert not marker.exists()
        torch.save({"weight": torch.zeros(1, 32)}, layout.reward_head)
        with pytest.raises(TunesmithError, match="reward_head.safetensors: not a reward head"):
            load_reward_model(lora_reward_run)
    finally:
        layout.config.write_text(original)
        layout.reward_head.write_bytes(head)
        (lora_reward_run / "evil.py").unlink()


def test_a_run_of_another_objective_is_not_a_reward_model(lora_run):
    with pytest.raises(TunesmithError, match="not a reward model"):
        load_reward_model(lora_run)


def test_a_reward_model_is_not_exported_as_a_language_model(lora_reward_run, tmp_path):
    from tunesmith.deploy.export import export_run

    with pytest.raises(TunesmithError, match="reward model"):
        export_run(lora_reward_run, "merged", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_reward_model_run_is_a_reward_of_grpo(lora_reward_run):
    from tunesmith.config import RewardConfig
    from tunesmith.rewards import Sample, build_rewards, score

    (reward,) = build_rewards([RewardConfig(model=str(lora_reward_run))], None, 16)
    prompt = "colour red item 1"
    samples = [Sample(prompt, answer, None, {}, 3, False) for answer in ("the fox ran", "a cat sat")]
    scored = score([reward], samples)
    expected = load_reward_model(lora_reward_run).score([prompt, prompt], ["the fox ran", "a cat sat"])
    assert scored.combined == pytest.approx(expected)
    assert scored.skipped[reward.name] == 0
