"""advise: the guide's criteria, and evidence from a model that already solves the task versus one that does not."""

import json

import pytest

from tunesmith.cli import main
from tunesmith.evaluate import baselines
from tunesmith.evaluate.baselines import few_shot_prompt
from tunesmith.plan.advise import Evidence, Situation, decide

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


def test_evidence_at_the_floor_is_never_prompting_and_says_what_to_check():
    nothing = Evidence("exact_match", 20, zero_shot=0.0, few_shot=0.0, k=3, target=0.0)
    advice = decide(Situation(need="format", examples=800), nothing)
    assert not nothing.prompting_enough and advice.recommendation == "fine-tune"
    assert any("scores 0 on exact_match" in r and "larger model" in r for r in advice.reasons)
    some = Evidence("exact_match", 20, zero_shot=0.0, few_shot=0.2, k=3, target=0.8)
    assert not any("scores 0" in r for r in decide(Situation(need="format", examples=800), some).reasons)


def test_few_shot_prompt_puts_solved_examples_first():
    shots, question = chat_records(3)[:2], chat_records(3)[2]
    from tunesmith.data.formats import normalise

    convs = [normalise(r, "chat", i) for i, r in enumerate([*shots, question])]
    prompt = few_shot_prompt(convs[2], convs[:2])
    assert [m.role for m in prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert prompt[1].content == convs[0].reference and prompt[-1] == convs[2].messages[0]


def _conversations(n: int):
    from tunesmith.data.formats import normalise

    return [normalise(r, "chat", i) for i, r in enumerate(chat_records(n))]


def test_shots_never_include_the_question_and_similar_picks_the_closest():
    convs = _conversations(12)
    picked = baselines.pick_shots(convs[:3], convs, 4, seed=1)
    for question, shots in zip(convs[:3], picked, strict=True):
        assert len(shots) == 4 and question not in shots
    assert baselines.pick_shots(convs[:3], convs, 4, seed=1) == picked  # seeded
    # Item 0 is red: item 6, the other red one, shares the most words with it.
    similar = baselines.pick_shots(convs[:1], convs, 1, seed=1, similar=True)[0]
    assert similar[0].prompt_messages[0].content.startswith("colour red item 6 ")


def test_few_shot_takes_as_many_shots_as_fit_the_context():
    from tunesmith.data.tokenize import prompt_ids, use_chat_template

    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None)
    convs = _conversations(20)
    roomy = baselines.few_shot(tokenizer, convs[:2], convs, shots=None, limit=4096, max_new_tokens=16, seed=0)
    assert roomy.k == baselines.MAX_AUTO_SHOTS
    one_shot = max(len(prompt_ids(tokenizer, few_shot_prompt(q, [convs[5]]))) for q in convs[:2])
    tight = baselines.few_shot(tokenizer, convs[:2], convs, shots=3, limit=one_shot + 40, max_new_tokens=16, seed=0)
    assert 1 <= tight.k < 3
    assert all(len(prompt_ids(tokenizer, p)) + 16 <= one_shot + 40 for p in tight.prompts)
    none = baselines.few_shot(tokenizer, convs[:2], convs, shots=3, limit=8, max_new_tokens=16, seed=0)
    assert none.k == 0 and none.prompts == [c.prompt_messages for c in convs[:2]]


def test_answers_stop_at_the_templates_turn_boundary():
    from tunesmith.data.tokenize import use_chat_template

    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None)  # the plain "### User:" / "### Assistant:" template
    stops = baselines.turn_stops(tokenizer)
    assert "### User:" in stops and "### Assistant:" in stops
    continued = '{"age": 44, "sex": "M"}\n\n### User:\nExtract the intake record as JSON.'
    assert baselines.cut_at_stops(continued, stops) == '{"age": 44, "sex": "M"}'
    assert baselines.cut_at_stops(" plain answer ", stops) == "plain answer"


def test_a_chatml_turn_opening_stops_as_its_special_token():
    """Answers are decoded without special tokens, so ChatML's "<|im_start|>user" can only stop as a token id."""
    from tunesmith.evaluate.generate import split_stops

    chatml = (  # <s> and </s> stand for <|im_start|> and <|im_end|>, the tokenizer's BOS and EOS
        "{% for m in messages %}{{ '<s>' + m['role'] + '\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
    )
    tokenizer = build_tokenizer(chatml)
    stops = baselines.turn_stops(tokenizer)
    assert stops == ["</s>", "<s>assistant", "<s>system", "<s>user"]
    assert split_stops(tokenizer, stops) == (frozenset({tokenizer.eos_token_id, tokenizer.bos_token_id}), [])
    plain = build_tokenizer()
    assert split_stops(plain, ["### User:"]) == (frozenset({plain.eos_token_id}), ["### User:"])


def test_every_metric_eval_knows_gives_one_value():
    from tunesmith.evaluate.metrics import KNOWN

    predictions, references = ['{"a": 1}', "red"], ['{"a": 1}', "blue"]
    for name in KNOWN:
        if name != "json_schema":
            assert 0.0 <= baselines.metric_value(name, predictions, references) <= 100.0, name
    assert baselines.metric_value("exact_match", predictions, references) == 0.5


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
