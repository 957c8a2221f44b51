"""Metrics, paired statistics, eval/compare on a tiny model (a real win and a no-difference case), the report."""

import json
import math
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from tunesmith.cli import main
from tunesmith.config import build_config
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import metrics as m
from tunesmith.evaluate import stats

from .conftest import build_model, build_tokenizer
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
    assert m.token_f1("the cat sat", "the cat sat down") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert m.token_f1("", "") == 1.0 and m.token_f1("a", "") == 0.0
    assert m.rouge_l("a b c d", "a c d") == pytest.approx(2 * 0.75 * 1.0 / 1.75)  # LCS a c d
    assert m.rouge_l("x y", "a b") == 0.0
    assert m.chrf("hello world", "hello world") == pytest.approx(1.0)
    assert 0 < m.chrf("hello word", "hello world") < 1
    assert m.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert m.bleu(["a b"], ["c d e f"]) == 0.0


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
    assert m.score([spec], ["ok yes", "no"], ["", ""]) == {spec: [1.0, 0.0]}
    with pytest.raises(TunesmithError, match="Custom metric"):
        m.score([f"{module}:missing"], ["a"], ["a"])
    with pytest.raises(TunesmithError, match="exact_match"):
        build_config({"eval": {"metrics": ["exact_matsh"]}})


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
    assert noisy.test == "paired_permutation" and 0 <= noisy.p_value <= 1


def test_corpus_metric_comparison_is_paired():
    references = [f"label{i % 3}" for i in range(30)]
    result = stats.compare_corpus(m.macro_f1, ["label0"] * 30, references, references, rounds=200)
    assert result.tuned == 1.0 and result.significant and result.test == "bootstrap"


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
def test_compare_finds_a_real_win_and_writes_the_report(learnable_model_dir, chat_file, tmp_path, capsys):
    out = tmp_path / "learned"
    _train(learnable_model_dir, chat_file, out, "--method", "full", "--lr", "3e-3", "--max-steps", "200")
    capsys.readouterr()
    assert main(["compare", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"metrics", "wins", "ties", "losses", "flipped", "verdict"} <= set(result)
    exact = result["metrics"]["exact_match"]
    assert {"base", "tuned", "diff", "ci_low", "ci_high", "p_value"} <= set(exact)
    assert exact["tuned"] > 0.8 and exact["base"] == 0.0 and exact["ci_low"] > 0 and exact["p_value"] < 0.01
    assert result["verdict"].startswith("Fine-tuning helped") and result["wins"] >= 8
    assert result["flipped"]["fixed"] and all(r["base"] != r["tuned"] for r in result["flipped"]["fixed"])
    assert result["metrics"]["loss"]["tuned"] < result["metrics"]["loss"]["base"]
    assert (
        "bleu" in result["metrics"]
        and result["metrics"]["perplexity"]["tuned"] < result["metrics"]["perplexity"]["base"]
    )

    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["comparison"]["verdict"] == result["verdict"]
    assert report["loss_curve"]["train"] and report["loss_curve"]["val"]
    assert report["time_and_cost"]["spent_seconds"] > 0 and report["time_and_cost"]["estimated_seconds_here"] > 0
    page = (out / "eval" / "report.html").read_text()
    parser = _Text()
    parser.feed(page)
    text = " ".join(parser.text)
    assert "Fine-tuning helped" in text and "95% CI" in text and "Fixed by fine-tuning" in text
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
    exact = result["metrics"]["exact_match"]
    assert exact["diff"] == 0 and exact["p_value"] == 1.0 and not exact["significant"]
    assert result["verdict"].startswith("No significant difference")
    assert math.isclose(result["metrics"]["loss"]["diff"], 0, abs_tol=1e-3)


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
    settings = loaded.config.eval.model_copy(
        update={"lm_eval_tasks": ["tiny_colours"], "lm_eval_include_path": str(tasks), "lm_eval_limit": None}
    )
    table = general_ability(loaded, loaded, settings)
    acc = table["tiny_colours"]["acc"]
    assert 0 <= acc["base"] <= 1 and 0 <= acc["tuned"] <= 1
    assert acc["diff"] == pytest.approx(acc["tuned"] - acc["base"])
