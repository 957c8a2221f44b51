"""advise: the guide's criteria, and evidence from a model that already solves the task versus one that does not."""

import json

import pytest

from tunesmith.cli import main
from tunesmith.plan.advise import Evidence, Situation, decide, few_shot_prompt

from .conftest import build_model, build_tokenizer, chat_records, write_jsonl


def test_knowledge_that_changes_or_fits_in_context_goes_to_rag():
    assert decide(Situation(need="knowledge", knowledge_changes=True)).recommendation == "rag"
    assert decide(Situation(need="knowledge", knowledge_fits_context=True)).recommendation == "rag"
    assert decide(Situation(need="knowledge", examples=800)).recommendation == "fine-tune"


def test_style_and_format_go_to_fine_tuning_with_enough_data():
    advice = decide(Situation(need="format", examples=800, latency_critical=True, private=True))
    assert advice.recommendation == "fine-tune"
    assert any("format" in r for r in advice.reasons) and any("own hardware" in r for r in advice.reasons)
    assert decide(Situation(need="style", examples=40)).recommendation == "collect-data"


def test_evidence_decides_between_prompting_and_fine_tuning():
    solved = Evidence("exact_match", 20, zero_shot=0.5, few_shot=0.9, k=3, target=0.8)
    unsolved = Evidence("exact_match", 20, zero_shot=0.0, few_shot=0.2, k=3, target=0.8)
    assert decide(Situation(need="format", examples=800), solved).recommendation == "prompting"
    advice = decide(Situation(need="format", examples=800), unsolved)
    assert advice.recommendation == "fine-tune" and any("headroom +0.60" in r for r in advice.reasons)


def test_few_shot_prompt_puts_solved_examples_first():
    shots, question = chat_records(3)[:2], chat_records(3)[2]
    from tunesmith.data.formats import normalise

    convs = [normalise(r, "chat", i) for i, r in enumerate([*shots, question])]
    prompt = few_shot_prompt(convs[2], convs[:2])
    assert [m.role for m in prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert prompt[1].content == convs[0].reference and prompt[-1] == convs[2].messages[0]


@pytest.fixture(scope="module")
def solver_dir(tmp_path_factory):
    """A tiny model trained on the colour task until it answers it: a base model for which prompting suffices."""
    from rich.console import Console

    from tunesmith.config import TrainConfig
    from tunesmith.data.formats import read_conversations
    from tunesmith.data.tokenize import tokenize_all, use_chat_template
    from tunesmith.methods.full import apply_full
    from tunesmith.train.loop import fit

    path = tmp_path_factory.mktemp("solver")
    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None)
    data = write_jsonl(path / "colours.jsonl", chat_records(60))
    examples, _ = tokenize_all(tokenizer, read_conversations(data)[0], 128)
    model, _ = apply_full(build_model(len(tokenizer)))
    fit(
        model,
        examples,
        TrainConfig(max_steps=120, batch_size=16, lr=1e-2, warmup_ratio=0.05),
        tokenizer.pad_token_id,
        console=Console(quiet=True),
    )
    model.save_pretrained(path / "model")
    build_tokenizer().save_pretrained(path / "model")
    return path


@pytest.mark.slow
def test_advise_with_evidence(solver_dir, tiny_model_dir, capsys):
    data = solver_dir / "colours.jsonl"
    common = [
        "advise",
        "--need",
        "format",
        "--data",
        str(data),
        "--sample",
        "10",
        "--k",
        "2",
        "--max-new-tokens",
        "24",
        "--json",
    ]
    assert main([*common, "--model", str(solver_dir / "model")]) == 0
    solved = json.loads(capsys.readouterr().out)
    assert solved["recommendation"] == "prompting", solved
    assert solved["evidence"]["prompting_enough"] and solved["evidence"]["items"] == 10
    assert main([*common, "--model", str(tiny_model_dir)]) == 0
    unsolved = json.loads(capsys.readouterr().out)
    assert unsolved["recommendation"] == "collect-data"  # 60 examples: too few, and prompting does not solve it
    assert unsolved["evidence"]["zero_shot"] < 0.8 and unsolved["evidence"]["few_shot"] < 0.8
