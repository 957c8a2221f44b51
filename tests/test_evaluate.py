"""Metrics, paired statistics, eval/compare on a tiny model (a real win and a no-difference case), the report."""

import importlib.util
import itertools
import json
import math
import random
import shutil
import subprocess
from dataclasses import asdict
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from tunesmith import trust
from tunesmith.cli import main
from tunesmith.config import build_config
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import metrics as m
from tunesmith.evaluate import stats

from .compare_v1 import write_version_1_comparison
from .conftest import build_model, build_tokenizer, chat_records, write_jsonl
from .test_cli import train_args


@pytest.fixture(scope="module")
def learnable_model_dir(tmp_path_factory):
    """A 64-wide 2-layer Llama: enough capacity to learn the toy colour task in 200 steps."""
    path = tmp_path_factory.mktemp("llama64")
    tokenizer = build_tokenizer()
    shape = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    )
    build_model(len(tokenizer), seed=0, **shape).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_text_metrics_have_known_values():
    assert m.token_f1("the cat sat", "the cat sat down") == pytest.approx(2 * 1 * 2 / 3 / (1 + 2 / 3))  # no "the"
    assert m.token_f1("The cat, sat.", "cat sat") == 1.0  # SQuAD: case, punctuation and articles do not count
    assert m.token_f1("", "") == 1.0 and m.token_f1("x", "") == 0.0 and m.token_f1("a", "") == 1.0  # "a" is an article
    assert m.rouge_l("a b c d", "a c d") == pytest.approx(2 * 0.75 * 1.0 / 1.75)  # LCS a c d
    assert m.rouge_l("x y", "a b") == 0.0
    assert m.chrf("hello world", "hello world") == pytest.approx(1.0)
    assert 0 < m.chrf("hello word", "hello world") < 1
    assert m.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert m.bleu(["a b"], ["c d e f"]) == 0.0


def test_json_fields_f1_gives_list_fields_partial_credit_in_any_order():
    reference = '{"age": 61, "medications": ["aspirin", "lisinopril", "metformin", "warfarin"]}'
    three = '{"age": 61, "medications": ["warfarin", "aspirin", "metformin"]}'  # three of four, another order
    assert m.json_fields(three, reference) == 0.5  # an inexact list is simply wrong there
    assert m.json_fields_f1(three, reference) == pytest.approx((1 + 2 * 1 * 0.75 / 1.75) / 2)
    empty = '{"age": 61, "medications": []}'
    assert m.json_fields_f1(empty, reference) == 0.5 < m.json_fields_f1(three, reference)  # [] is worth nothing
    extra = '{"age": 61, "medications": ["aspirin", "lisinopril", "metformin", "warfarin", "insulin"]}'
    assert m.json_fields_f1(extra, reference) == pytest.approx((1 + 2 * 0.8 * 1 / 1.8) / 2)  # a wrong extra costs
    assert m.json_fields_f1('{"age": 60, "medications": "aspirin"}', reference) == 0.0  # not a list: not equal
    assert m.json_fields_f1(reference, reference) == 1.0 and m.json_fields_f1("not json", reference) == 0.0
    assert m.json_fields_f1('{"tags": []}', '{"tags": []}') == 1.0


def test_structured_and_classification_metrics(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps({"type": "object", "required": ["colour"], "properties": {"colour": {"type": "string"}}})
    )
    conforms = m.schema_checker(str(schema))
    assert conforms('{"colour": "red"}', "") == 1.0
    assert conforms('{"colour": 3}', "") == 0.0 and conforms("not json", "") == 0.0
    fields = m.field_accuracy(['{"a": 1, "b": 2}', '{"a": 1, "b": 3}', "oops"], ['{"a": 1, "b": 2}'] * 3)
    assert fields == {"a": pytest.approx(2 / 3, abs=1e-4), "b": pytest.approx(1 / 3, abs=1e-4)}
    predictions, references = ["pos", "neg", "pos", "maybe"], ["pos", "neg", "neg", "neg"]
    assert m.macro_f1(predictions, references) == pytest.approx((2 / 3 + 2 / 4) / 2)
    assert m.confusion(predictions, references) == {
        "neg": {"neg": 1, "pos": 1, "other": 1},
        "pos": {"neg": 0, "pos": 1, "other": 0},
    }


def test_custom_metric_from_a_file_and_unknown_metrics(tmp_path):
    module = tmp_path / "mymetric.py"
    module.write_text("def starts_ok(prediction, reference):\n    return float(prediction.startswith('ok'))\n")
    spec = f"{module}:starts_ok"
    trust.grant([spec, f"{module}:missing"])
    assert m.score([spec], ["ok yes", "no"], ["", ""]) == {spec: [1.0, 0.0]}
    with pytest.raises(TunesmithError, match="Custom metric"):
        m.score([f"{module}:missing"], ["a"], ["a"])
    with pytest.raises(TunesmithError, match="exact_match"):
        build_config({"eval": {"metrics": ["exact_matsh"]}})


def _squad_reference():
    """lm-eval's copy of the official SQuAD v1.1 evaluation functions, loaded from its file (no task registry)."""
    lm_eval = pytest.importorskip("lm_eval")
    path = Path(lm_eval.__file__).parent / "tasks" / "qasper" / "metrics.py"
    spec = importlib.util.spec_from_file_location("squad_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_token_f1_is_squad_f1():
    squad = _squad_reference()
    pairs = [
        ("The Eiffel Tower, in Paris.", "eiffel tower paris"),
        ("an apple a day", "The apple!"),
        ("It was 1,200 metres (tall)", "1200 metres"),
        ("red red blue", "red blue blue green"),
        ("nothing alike", "completely different"),
        ("Hello-world", "hello world"),
    ]
    for prediction, reference in pairs:
        assert m.squad_normalise(prediction) == squad.normalize_answer(prediction)
        assert m.token_f1(prediction, reference) == pytest.approx(squad.f1_abstractive([prediction], [reference]))


def test_macro_f1_matches_scikit_learn():
    f1_score = pytest.importorskip("sklearn.metrics").f1_score
    rng = random.Random(0)
    labels = ["pos", "neg", "neutral"]
    for _ in range(20):
        references = [rng.choice(labels) for _ in range(25)]
        predictions = [rng.choice([*labels, "maybe"]) for _ in range(25)]  # an answer outside the labels too
        expected = f1_score(references, predictions, average="macro", labels=sorted(set(references)), zero_division=0)
        assert m.macro_f1(predictions, references) == pytest.approx(expected)


def test_exact_tests_match_scipy_and_enumeration():
    base, tuned = [0.0] * 7 + [1.0] * 3, [1.0] * 7 + [0.0] * 3  # 7 fixed, 3 broken
    two_sided = min(1.0, 2 * sum(math.comb(10, k) for k in range(4)) / 2**10)
    assert stats.mcnemar_exact(base, tuned) == pytest.approx(two_sided)
    assert stats.mcnemar_exact(base, tuned) == pytest.approx(scipy_stats.binomtest(7, 10).pvalue)
    # Sign-flip permutation test on 10 items: exact, the share of all 2**10 sign patterns as extreme as observed.
    diffs = np.array([0.3, 0.1, -0.05, 0.2, 0.15, 0.0, 0.25, -0.1, 0.05, 0.4])
    flipped = [abs(np.mean(diffs * signs)) for signs in itertools.product([-1, 1], repeat=diffs.size)]
    enumerated = np.mean(np.array(flipped) >= abs(diffs.mean()) - 1e-12)
    p_value, resamples = stats.permutation_p(diffs, 2000, seed=0)
    assert resamples is None and p_value == pytest.approx(enumerated)
    # Beyond 16 items it resamples, and its p-value is never below 1/(resamples + 1).
    p_value, resamples = stats.permutation_p(np.full(40, 0.1), 500, seed=0)
    assert resamples == 500 and p_value == pytest.approx(1 / 501)
    noisy = np.random.default_rng(0).normal(0.02, 0.2, 40)
    p_value, _ = stats.permutation_p(noisy, 4000, seed=0)
    theirs = scipy_stats.permutation_test((noisy,), np.mean, permutation_type="samples", n_resamples=4000, rng=0)
    assert p_value == pytest.approx(theirs.pvalue, abs=0.03)  # the same null, counted on |mean| and by tails


def test_bootstrap_ci_is_scipys_paired_bca():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 40)
    tuned = np.clip(base + rng.normal(0.05, 0.1, 40), 0, 1)
    result = stats.compare_per_item("token_f1", list(base), list(tuned), binary=False, rounds=999, seed=3)
    theirs = scipy_stats.bootstrap(
        (base, tuned), lambda b, t, axis: np.mean(t - b, axis=axis), paired=True, method="BCa",
        n_resamples=999, rng=3, vectorized=True,
    ).confidence_interval  # fmt: skip
    assert (result.ci_low, result.ci_high) == pytest.approx((theirs.low, theirs.high))
    same = stats.compare_per_item("token_f1", [0.5] * 12, [0.5] * 12, binary=False)
    assert (same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 1.0)  # BCa undefined: no NaN, no false alarm


def test_a_resampling_p_value_is_never_zero():
    result = stats.Comparison(0.1, 0.6, 0.5, 0.4, 0.6, 1 / 2001, "paired_bootstrap", 2000)
    assert result.p_text == "p < 1/2001" and "p < 1/2001" in stats.verdict("macro_f1", result)
    assert result.to_dict()["p_value"] > 0 and result.to_dict()["p_text"] == "p < 1/2001"
    exact = stats.Comparison(0.0, 0.8, 0.8, 0.6, 0.9, 6e-8, "mcnemar_exact")
    assert exact.p_text == "p=6e-08"
    references = [f"label{i % 3}" for i in range(30)]
    clear = stats.compare_corpus(m.macro_f1, ["label0"] * 30, references, references, rounds=200)
    assert clear.test == "paired_bootstrap" and clear.p_value == pytest.approx(1 / 201) and clear.p_text == "p < 1/201"


def test_bleu_and_chrf_take_sacrebleus_paired_test():
    from sacrebleu.metrics import CHRF
    from sacrebleu.significance import PairedTest

    references = [f"the {c} cat sat on the {w} mat today" for c in ("red", "blue", "green") for w in ("big", "old")]
    tuned = [r.replace("today", "") for r in references]
    base = [r.split(" on ")[0] for r in references]
    result = stats.compare_corpus(m.chrf_corpus, base, tuned, references, rounds=300, sacrebleu_metric=CHRF())
    _, theirs = PairedTest([("b", base), ("t", tuned)], {"chrF": CHRF()}, [references], "ar", 300)()
    (column,) = [v for k, v in theirs.items() if k != "System"]
    assert result.test == "sacrebleu_paired_ar" and result.p_value == column[1].p_value > 0
    assert result.tuned == pytest.approx(column[1].score / 100) and result.ci_low > 0
    # Identical outputs: sacrebleu alone would say p = 1/(trials + 1); no difference is never significant.
    same = stats.compare_corpus(m.bleu, base, base, references, rounds=300, sacrebleu_metric=m.sacrebleu_metric("bleu"))
    assert same.p_value == 1.0 and not same.significant


def test_holm_adjusts_the_secondary_metrics():
    assert stats.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert stats.holm({"a": 0.5, "b": 0.6}) == pytest.approx({"a": 1.0, "b": 1.0})


def test_mcnemar_and_bootstrap_on_clear_and_null_effects():
    assert stats.mcnemar_exact([0] * 10, [1] * 10) == pytest.approx(2 / 1024)
    assert stats.mcnemar_exact([1, 0, 1, 0], [0, 1, 1, 0]) == 1.0  # one fixed, one broken
    clear = stats.compare_per_item("exact_match", [0.0] * 30, [1.0] * 25 + [0.0] * 5, binary=True)
    assert clear.significant and clear.ci_low > 0.6 and clear.p_value < 1e-5
    assert "helped" in stats.verdict("exact_match", clear)
    # The same share right, different items: no real difference.
    null = stats.compare_per_item("exact_match", [1.0, 0.0] * 15, [0.0, 1.0] * 15, binary=True)
    assert not null.significant and null.ci_low < 0 < null.ci_high and null.p_value > 0.5
    assert stats.verdict("exact_match", null).startswith("No significant difference")
    noisy = stats.compare_per_item("token_f1", [0.5, 0.6, 0.4, 0.55] * 5, [0.52, 0.58, 0.41, 0.55] * 5, binary=False)
    assert noisy.test == "paired_permutation" and 0 < noisy.p_value <= 1 and noisy.resamples == 2000


def test_corpus_metric_comparison_is_paired():
    references = [f"label{i % 3}" for i in range(30)]
    result = stats.compare_corpus(m.macro_f1, ["label0"] * 30, references, references, rounds=200)
    assert result.tuned == 1.0 and result.significant and result.test == "paired_bootstrap"


def test_wins_come_from_a_per_item_metric_when_a_corpus_metric_comes_first(tmp_path, monkeypatch):
    """eval.metrics [chrf_corpus, chrf]: per-item chrF decides wins and flips, and the summary says so."""
    from tunesmith.data.formats import Conversation, Message
    from tunesmith.evaluate import compare

    references = [f"the {c} cat sat on the {w} mat" for c in ("red", "blue", "green") for w in ("big", "old")] * 2
    items = [
        Conversation((Message("user", f"describe {i}"), Message("assistant", ref)), line=i + 1)
        for i, ref in enumerate(references)
    ]
    outputs = {"zero-shot": ["a dog"] * 12, "tuned": [r.replace(" mat", "") for r in references]}
    config = build_config({"eval": {"metrics": ["chrf_corpus", "chrf"], "bootstrap": 400}})
    loaded = SimpleNamespace(shares_base=True, config=config, tokenizer=None, model=torch.nn.Linear(2, 2))
    monkeypatch.setattr(compare, "load_run", lambda run_dir, base=False: loaded)
    monkeypatch.setattr(compare, "split_items", lambda run_dir, split, limit: items)
    monkeypatch.setattr(
        compare, "_generate", lambda model, items, base, console, label, stops, tools=None: outputs[label]
    )
    losses = [(2.0, 4)] * 12, [(1.0, 4)] * 12
    monkeypatch.setattr(compare, "_losses_of_both", lambda loaded, base, items: losses)
    summary = compare.compare_run(tmp_path)
    zero = summary.baselines["zero_shot"]
    assert summary.primary == "chrf_corpus" and summary.decided_by == zero.decided_by == "chrf"
    assert (zero.wins, zero.ties, zero.losses) == (12, 0, 0) and len(zero.flipped["fixed"]) == 12
    primary, chrf = zero.metrics["chrf_corpus"], zero.metrics["chrf"]
    assert primary["role"] == "primary" and primary["test"] == "sacrebleu_paired_ar" and primary["p_value"] > 0
    assert primary["p_text"] == "p < 1/201" and "p < 1/201" in summary.verdict  # bootstrap // 2 trials
    assert chrf["role"] == "secondary" and chrf["p_holm"] >= chrf["p_value"] and "holm" in summary.correction
    assert zero.metrics["loss"]["role"] == "secondary"
    assert "p=0 " not in json.dumps(asdict(summary)) and "p=0," not in summary.verdict
    assert m.deciding_metric(["bleu"]) == "chrf" and m.deciding_metric(["macro_f1", "bleu"]) == "accuracy"


def _compare_on(tmp_path, monkeypatch, outputs, shots=0):
    """compare_run on 12 colour items with the given zero-shot (and `shots`-shot) and tuned answers (no model, no
    generation); with shots, the few-shot baseline is taken as the strongest."""
    from tunesmith.data.formats import Conversation, Message
    from tunesmith.evaluate import compare

    references = ["red", "blue", "green"] * 4
    items = [
        Conversation((Message("user", f"colour {i}"), Message("assistant", ref)), line=i + 1)
        for i, ref in enumerate(references)
    ]
    config = build_config({"eval": {"metrics": ["exact_match"], "bootstrap": 200}})
    loaded = SimpleNamespace(shares_base=True, config=config, tokenizer=None, model=torch.nn.Linear(2, 2))
    monkeypatch.setattr(compare, "load_run", lambda run_dir, base=False: loaded)
    monkeypatch.setattr(compare, "split_items", lambda run_dir, split, limit: items)
    monkeypatch.setattr(
        compare, "_generate", lambda model, items, base, console, label, stops, tools=None: outputs(references)[label]
    )
    monkeypatch.setattr(compare, "_losses_of_both", lambda loaded, base, items: ([(2.0, 4)] * 12, [(2.0, 4)] * 12))
    if shots:
        few = compare.baselines.Baseline("few_shot", shots, [c.prompt_messages for c in items])
        monkeypatch.setattr(compare, "_prompting", lambda *args: [compare.baselines.zero_shot(items), few])
        monkeypatch.setattr(compare, "_strongest", lambda *args: ("few_shot", "taken in this test"))
    return compare.compare_run(tmp_path)


def test_compare_says_nothing_works_when_every_contestant_scores_zero(tmp_path, monkeypatch):
    summary = _compare_on(tmp_path, monkeypatch, lambda refs: {"zero-shot": ["purple"] * 12, "tuned": ["mauve"] * 12})
    assert summary.verdict.startswith("Neither prompting nor fine-tuning works yet for exact_match")
    assert "zero-shot 0.000, tuned 0.000 on 12 items" in summary.verdict
    assert "train.max_steps" in summary.verdict and "larger model" in summary.verdict
    assert "not needed" not in summary.verdict and "Prompting is as good" not in summary.verdict


def test_compare_keeps_its_verdicts_when_some_contestant_scores(tmp_path, monkeypatch):
    same = _compare_on(
        tmp_path, monkeypatch, lambda refs: {"zero-shot": refs[:6] + ["x"] * 6, "tuned": refs[:6] + ["y"] * 6}
    )
    assert same.verdict.startswith("Prompting is as good: fine-tuning not needed for exact_match")
    won = _compare_on(tmp_path, monkeypatch, lambda refs: {"zero-shot": ["x"] * 12, "tuned": refs})
    assert won.verdict.startswith("Fine-tuning beat the strongest prompting baseline (zero-shot)")


def test_a_comparison_is_written_as_one_entry_per_baseline_and_read_back_the_same(tmp_path, monkeypatch):
    from tunesmith.evaluate.compare import COMPARE_VERSION, read_comparison
    from tunesmith.rundir import RunDir

    answers = lambda refs: {"zero-shot": ["x"] * 12, "2-shot": refs[:6] + ["x"] * 6, "tuned": refs}  # noqa: E731
    summary = _compare_on(tmp_path, monkeypatch, answers, shots=2)
    written = json.loads(RunDir(tmp_path).compare.read_text())
    assert written["version"] == COMPARE_VERSION == 2
    assert list(written["baselines"]) == ["zero_shot", "few_shot"] and written["strongest"] == "few_shot"
    assert not {"metrics", "wins", "ties", "losses", "flipped", "few_shot"} & set(written)  # no copy at the top
    zero, few = written["baselines"]["zero_shot"], written["baselines"]["few_shot"]
    assert set(zero) == set(few) == {"against", "label", "metrics", "decided_by", "wins", "ties", "losses", "flipped",
                                     "verdict"}  # fmt: skip
    assert (zero["label"], few["label"], zero["against"], few["against"]) == ("zero-shot", "2-shot", "zero_shot",
                                                                              "few_shot")  # fmt: skip
    assert (zero["wins"], few["wins"]) == (12, 6) and "loss" in zero["metrics"] and "loss" not in few["metrics"]
    contestants = {"zero_shot", "few_shot", "tuned"}
    assert contestants <= set(written["examples"][0]) and "base" not in written["examples"][0]
    assert set(written["field_accuracy"]) == contestants
    assert set(written["seconds"]) == contestants | {"choosing the strongest baseline"}
    assert written["verdict"].startswith("Fine-tuning beat the strongest prompting baseline (2-shot)")
    assert read_comparison(tmp_path) == summary
    assert read_comparison(tmp_path / "never-compared") is None


def test_a_version_1_comparison_is_read_in_the_new_shape(tmp_path):
    from tunesmith.evaluate.compare import read_comparison

    old = write_version_1_comparison(tmp_path)
    read = read_comparison(tmp_path)
    assert read.version == 2 and list(read.baselines) == ["zero_shot", "few_shot"] and read.strongest == "few_shot"
    zero, few = read.baselines["zero_shot"], read.baselines["few_shot"]
    assert zero.metrics == old["metrics"] and (zero.wins, zero.ties, zero.losses) == (9, 3, 0)
    assert few.metrics == old["few_shot"]["metrics"] and few.wins == 6 and few.verdict == old["few_shot"]["verdict"]
    assert (zero.label, few.label, zero.against, few.against) == ("zero-shot", "3-shot", "zero_shot", "few_shot")
    assert zero.verdict is None  # version 1 kept no verdict of the zero-shot comparison alone
    row = zero.flipped["fixed"][0]
    assert row["zero_shot"] == "old zero-shot answer" and "base" not in row
    assert set(row["scores"]["exact_match"]) == {"zero_shot", "few_shot", "tuned"}
    assert few.flipped["fixed"][0]["zero_shot"] == "old zero-shot answer" and read.examples == [row]
    assert set(read.seconds) == {"zero_shot", "few_shot", "tuned", "choosing the strongest baseline"}
    assert set(read.field_accuracy) == {"zero_shot", "few_shot", "tuned"}
    assert (read.verdict, read.chosen_on, read.shots) == (old["verdict"], old["chosen_on"], 3)


def test_a_version_1_comparison_still_renders_in_the_report_and_the_cli(tmp_path, capsys):
    from tunesmith.cli.evaluate import print_comparison
    from tunesmith.evaluate.compare import read_comparison
    from tunesmith.evaluate.report import build_report, write_report

    old = write_version_1_comparison(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_text("name: old-run\nmodel: m\nmethod: lora\n")
    report = build_report(tmp_path / "run")
    assert report["comparison"]["version"] == 2 and set(report["comparison"]["baselines"]) == {"zero_shot", "few_shot"}
    parser = _Text()
    parser.feed(write_report(tmp_path / "run").read_text())
    text = " ".join(parser.text)
    assert old["verdict"] in text and "Tuned vs zero-shot prompting" in text and "Tuned vs 3-shot prompting" in text
    assert "Strongest baseline: 3-shot" in text and "9 wins" in text and "6 wins" in text
    assert "old zero-shot answer" in text and "old few-shot answer" in text
    capsys.readouterr()
    print_comparison(read_comparison(tmp_path / "run"))
    printed = capsys.readouterr().out
    assert "Base model zero-shot vs tuned" in printed and "Base model 3-shot vs tuned" in printed
    assert "9 wins, 3 ties, 0 losses" in printed and "old zero-shot answer" in printed
    assert "old few-shot answer" in printed and "zero_shot 1.5 s" in printed and old["verdict"][:40] in printed


def test_a_comparison_of_a_later_version_or_cut_short_is_refused_with_the_fix(tmp_path):
    from tunesmith.evaluate.compare import read_comparison
    from tunesmith.rundir import RunDir

    RunDir(tmp_path).eval.mkdir()
    RunDir(tmp_path).compare.write_text(json.dumps({"version": 3}))
    with pytest.raises(TunesmithError, match="version 3.*Upgrade tunesmith, or compare again"):
        read_comparison(tmp_path)
    RunDir(tmp_path).compare.write_text(json.dumps({"verdict": "a version-1 file cut short"}))
    with pytest.raises(TunesmithError, match="not a comparison tunesmith wrote.*Compare again: tunesmith compare"):
        read_comparison(tmp_path)


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _train(tiny_model_dir, chat_file, out, *flags):
    common = ["--train.batch_size", "4", "--test-fraction", "0.25", "--eval.max_new_tokens", "24", "--quiet"]
    metrics = ["--eval.metrics", "exact_match,json_valid,json_fields,token_f1,bleu", "--eval.bootstrap", "500"]
    assert main(train_args(tiny_model_dir, chat_file, out, *common, *metrics, *flags)) == 0


@pytest.mark.slow
def test_compare_finds_a_real_win_and_writes_the_report(learnable_model_dir, tmp_path, capsys):
    out = tmp_path / "learned"
    data = write_jsonl(tmp_path / "colours.jsonl", chat_records(100))  # enough items of each colour to generalise
    _train(learnable_model_dir, data, out, "--method", "full", "--lr", "3e-3", "--max-steps", "300")
    capsys.readouterr()
    assert main(["compare", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["version"] == 2 and {"baselines", "verdict", "strongest", "primary", "decided_by"} <= set(result)
    zero = result["baselines"]["zero_shot"]
    exact = zero["metrics"]["exact_match"]
    assert {"base", "tuned", "diff", "ci_low", "ci_high", "p_value"} <= set(exact)
    assert exact["tuned"] > 0.8 and exact["base"] == 0.0 and exact["ci_low"] > 0 and exact["p_value"] < 0.01
    assert result["verdict"].startswith("Fine-tuning beat the strongest prompting baseline") and zero["wins"] >= 8
    # The few-shot baseline: k shots from the training split, compared too, chosen or not on the val split.
    few = result["baselines"]["few_shot"]
    assert result["shots"] >= 1 and few["against"] == "few_shot" and few["metrics"]["exact_match"]["significant"]
    assert set(few) == set(zero) and few["label"] == f"{result['shots']}-shot" and zero["label"] == "zero-shot"
    assert result["strongest"] in ("zero_shot", "few_shot") and "validation items" in result["chosen_on"]
    assert {"zero_shot", "few_shot", "tuned", "choosing the strongest baseline"} <= set(result["seconds"])
    assert all({"zero_shot", "few_shot", "tuned"} <= set(row) for row in few["flipped"]["fixed"])
    assert zero["flipped"]["fixed"] and all(r["zero_shot"] != r["tuned"] for r in zero["flipped"]["fixed"])
    assert zero["metrics"]["loss"]["tuned"] < zero["metrics"]["loss"]["base"]
    assert "bleu" in zero["metrics"] and zero["metrics"]["perplexity"]["tuned"] < zero["metrics"]["perplexity"]["base"]

    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["comparison"]["verdict"] == result["verdict"]
    assert report["loss_curve"]["train"] and report["loss_curve"]["val"]
    assert report["time_and_cost"]["spent_seconds"] > 0 and report["time_and_cost"]["estimated_seconds_here"] > 0
    page = (out / "eval" / "report.html").read_text()
    parser = _Text()
    parser.feed(page)
    text = " ".join(parser.text)
    assert "Fine-tuning beat" in text and "95% CI" in text and "Fixed by fine-tuning" in text
    assert "-shot" in text and "Tuned vs" in text
    assert any(tag == "polyline" for tag, _ in parser.tags)
    assert not any(
        attrs.get("src", "").startswith("http") or attrs.get("href", "").startswith("http") for _, attrs in parser.tags
    )

    assert main(["eval", str(out), "--json"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert tuned["metrics"]["exact_match"] == pytest.approx(exact["tuned"]) and tuned["perplexity"] > 1
    assert main(["eval", str(out), "--base", "--split", "val", "--json"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert (
        base["model"] == "base" and base["split"] == "val" and (out / "eval" / "predictions-val-base.jsonl").is_file()
    )
    _screenshot_is_not_blank(out / "eval" / "report.html", tmp_path)


def _screenshot_is_not_blank(page, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1000,1400",
         page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    from PIL import Image

    image = Image.open(shot).convert("L")
    low, high = image.getextrema()
    assert high - low > 100  # text and lines on a white page, not a blank or black one
    histogram = image.histogram()
    assert sum(histogram[:128]) > 500  # plenty of dark pixels: the text rendered


@pytest.mark.slow
def test_compare_says_not_significant_when_nothing_changed(tiny_model_dir, chat_file, tmp_path, capsys):
    out = tmp_path / "unchanged"
    _train(tiny_model_dir, chat_file, out, "--lr", "1e-9", "--max-steps", "2")
    capsys.readouterr()
    assert main(["compare", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    zero = result["baselines"]["zero_shot"]
    exact = zero["metrics"]["exact_match"]
    assert exact["diff"] == 0 and exact["p_value"] == 1.0 and not exact["significant"]
    few = result["baselines"].get("few_shot", {}).get("metrics", {}).get("exact_match", {}).get("base", 0)
    at_floor = exact["base"] == exact["tuned"] == few == 0  # a random tiny model answers nothing right
    expected = "Neither prompting nor fine-tuning works yet" if at_floor else "Prompting is as good: fine-tuning not"
    assert result["verdict"].startswith(expected)
    assert math.isclose(zero["metrics"]["loss"]["diff"], 0, abs_tol=1e-3)


TASK_YAML = """task: tiny_colours
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_general_ability_runs_a_local_lm_eval_task_on_base_and_tuned(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from tunesmith.evaluate.general import general_ability
    from tunesmith.evaluate.generate import load_run

    trained_run = tmp_path / "run"
    _train(tiny_model_dir, chat_file, trained_run, "--max-steps", "4", "--lr", "1e-2")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    colours = ["red", "blue", "green", "black"]
    rows = [{"question": f"colour {c} item", "choices": colours, "label": i} for i, c in enumerate(colours * 3)]
    data = tmp_path / "colours.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny_colours.yaml").write_text(TASK_YAML.format(data=data))
    loaded = load_run(trained_run)
    eval_config = loaded.config.eval.model_copy(
        update={"lm_eval_tasks": ["tiny_colours"], "lm_eval_include_path": str(tasks), "lm_eval_limit": None}
    )
    trust.grant([str(tasks)])  # as --allow-code or a user's own config would
    table = general_ability(loaded, loaded, eval_config)
    acc = table["tiny_colours"]["acc"]
    assert 0 <= acc["base"] <= 1 and 0 <= acc["tuned"] <= 1
    assert acc["diff"] == pytest.approx(acc["tuned"] - acc["base"])


def test_report_html_shows_every_value_from_the_run_as_text_never_as_markup(tmp_path):
    from tunesmith.evaluate.report import write_report

    tag = "<script>alert(1)</script>"
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(json.dumps({"name": tag, "model": tag, "method": tag, "train": {"lr": tag}}))
    (run / "train_summary.json").write_text(json.dumps({"steps": 2, "stopped": tag, "best": {tag: tag}}))
    (run / "plan.json").write_text(json.dumps({"cloud": {tag: tag}}))
    write_jsonl(run / "metrics.jsonl", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}])
    result = {"base": 0.1, "tuned": 0.9, "diff": 0.8, "ci_low": 0.5, "ci_high": 1.0, "p_text": tag, "p_holm": tag,
              "test": tag, "role": tag, "significant": True}  # fmt: skip
    flipped = [{"line": tag, "prompt": tag, "reference": tag, "zero_shot": tag, "tuned": tag}]
    versus = {
        "against": "zero_shot", "label": tag, "metrics": {tag: result}, "decided_by": tag, "wins": tag, "ties": tag,
        "losses": tag, "flipped": {"fixed": flipped, "broken": flipped}, "verdict": tag,
    }  # fmt: skip
    compare = {
        "version": 2, "run_dir": tag, "verdict": tag, "primary": tag, "baselines": {"zero_shot": versus},
        "items": tag, "split": tag, "shots": tag, "strongest": "zero_shot", "chosen_on": tag, "correction": tag,
        "seconds": {"zero_shot": tag, "tuned": tag}, "decided_by": tag, "examples": flipped,
        "preference": {"items": tag, "start_run": tag, "tuned_vs_base": result},
        "general_ability": {tag: {tag: {"base": 0.1, "tuned": 0.2, "diff": 0.1}}},
    }  # fmt: skip
    (run / "eval" / "compare.json").write_text(json.dumps(compare))
    page = write_report(run).read_text()
    assert "<script" not in page and "alert(1)" in page  # every value is there, as escaped text
    assert page.count("&lt;script&gt;") >= 20


def test_a_run_from_another_is_compared_with_its_starting_run(tmp_path, tiny_model_dir):
    """init_from: compare adds the starting run's answers to the same prompts ("start") and its paired statistics;
    they are the answers the starting run gives in its own comparison of the same test items."""
    from tunesmith.evaluate import compare

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    flags = ["--method", "lora", "--train.batch_size", "4", "--lr", "1e-2", "--test-fraction", "0.25"]
    flags += ["--set", "eval.max_new_tokens=6", "--set", "eval.shots=0", "--quiet"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(train_args(tiny_model_dir, data, first, *flags, "--max-steps", "3")) == 0
    continued = [*flags, "--max-steps", "3", "--set", f"init_from={first}"]
    assert main(train_args(tiny_model_dir, data, second, *continued)) == 0
    summary = compare.compare_run(second)
    assert summary.start is not None and summary.start.label == f"start ({first})"
    assert set(summary.start.metrics) == set(summary.baselines["zero_shot"].metrics) - {"loss", "perplexity"}
    assert "Against the starting run" in summary.verdict
    rows = [json.loads(line) for line in (second / "eval" / "predictions.jsonl").read_text().splitlines()]
    compare.compare_run(first)
    own = [json.loads(line) for line in (first / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["start"] for r in rows] == [r["tuned"] for r in own]
    assert compare.read_comparison(second).start == summary.start  # compare.json keeps it
