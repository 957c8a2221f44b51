"""The real entry point on a tiny model: files written, adapters loadable, nothing overwritten."""

import json

import pytest
import torch

from tunesmith.cli import main

from .conftest import chat_prompt, chat_records, write_jsonl

pytestmark = pytest.mark.slow


def train_args(model_dir, data, out, *extra):
    # The toy files are small, so the data check's size warning is allowed through.
    base = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out)]
    return [*base, "--allow-warnings", "true", *extra]


@pytest.fixture
def trained_run(tmp_path, tiny_model_dir, chat_file):
    out = tmp_path / "runs" / "x"
    extra = ["--method", "lora", "--max-steps", "4", "--train.batch_size", "4", "--lr", "1e-2"]
    extra += ["--test-fraction", "0.25", "--set", "eval.max_new_tokens=8"]
    assert main(train_args(tiny_model_dir, chat_file, out, *extra)) == 0
    return out


def test_train_writes_a_complete_run_directory(trained_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name in [
        "config.yaml",
        "manifest.json",
        "metrics.jsonl",
        "chat_template.jinja",
        "train_summary.json",
        "data/train.jsonl",
        "data/val.jsonl",
        "data/test.jsonl",
        "loss.png",
        "checkpoints/step-000004/trainable.safetensors",
        "data/tokenize.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "tokenizer/tokenizer.json",
    ]:
        assert (trained_run / name).is_file(), name
    assert not list(trained_run.glob("*.partial"))
    assert len((trained_run / "data" / "train.jsonl").read_text().splitlines()) == 28
    assert len((trained_run / "data" / "val.jsonl").read_text().splitlines()) == 2
    assert len((trained_run / "data" / "test.jsonl").read_text().splitlines()) == 10
    metrics = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["type"] == "train"] == [1, 2, 3, 4]
    assert [m["step"] for m in metrics if m["type"] == "val"] == [1, 2, 3, 4]  # ten times per run, at most every step
    assert all(m["val_loss"] > 0 for m in metrics if m["type"] == "val")
    manifest = json.loads((trained_run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["torch"] == torch.__version__
    assert len(next(iter(manifest["data"].values()))) == 64
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), trained_run / "adapter")
    assert any("lora_A" in n for n, _ in model.named_parameters())
    saved_template = json.loads((trained_run / "tokenizer" / "tokenizer_config.json").read_text()).get("chat_template")
    jinja_file = trained_run / "tokenizer" / "chat_template.jinja"
    assert (saved_template or jinja_file.read_text()) == (trained_run / "chat_template.jinja").read_text()


def test_existing_run_is_not_overwritten_without_the_flag(trained_run, tiny_model_dir, chat_file, capsys):
    before = (trained_run / "adapter" / "adapter_model.safetensors").read_bytes()
    args = train_args(tiny_model_dir, chat_file, trained_run, "--max-steps", "1")
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert (trained_run / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert main(args + ["--overwrite"]) == 0
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1]


def test_generate_tuned_and_base(trained_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["generate", str(trained_run), "--prompt", "colour red item 3", "--max-new-tokens", "5", "--json"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert tuned[0]["prompt"] == "colour red item 3" and isinstance(tuned[0]["answer"], str)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, chat_records(1)[0]])
    assert (
        main(["generate", str(trained_run), "--prompts", str(prompts), "--base", "--max-new-tokens", "5", "--json"])
        == 0
    )
    base = json.loads(capsys.readouterr().out)
    assert [row["prompt"] for row in base] == ["a", chat_prompt(0)]


def test_compare_scores_base_and_tuned(trained_run, capsys):
    capsys.readouterr()
    assert main(["compare", str(trained_run), "--limit", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["items"] == 3 and {"base", "tuned", "diff", "ci_low", "ci_high", "p_value"} <= set(
        result["baselines"]["zero_shot"]["metrics"]["exact_match"]
    )
    rows = (trained_run / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 3 and {"reference", "zero_shot", "tuned"} <= set(json.loads(rows[0]))


def test_full_fine_tuning_run_saves_a_model(tmp_path, tiny_model_dir, chat_file, capsys):
    out = tmp_path / "full"
    assert main(train_args(tiny_model_dir, chat_file, out, "--method", "full", "--max-steps", "2", "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trainable_params"] == summary["total_params"] > 0
    assert (out / "model" / "config.json").is_file() and not (out / "adapter").exists()
    assert main(["generate", str(out), "--prompt", "hi", "--max-new-tokens", "3"]) == 0


def test_user_errors_print_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{oops\n')
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "line 1: 'messages' must be a non-empty list" in err and "line 2: invalid JSON" in err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()
    assert main(["train", "--max-steps", "1", "--out", str(tmp_path / "r")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a tunesmith run" in capsys.readouterr().err


def test_data_check_warnings_stop_the_run_unless_allowed(tmp_path, tiny_model_dir, chat_file, capsys):
    out = tmp_path / "r"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(chat_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "small_dataset" in err and "data.allow_warnings" in err and not out.exists()
    assert main(train_args(tiny_model_dir, chat_file, out, "--max-steps", "1")) == 0
    check = json.loads((out / "data" / "check.json").read_text())
    assert check["examples"] == 40 and check["warnings"][0]["code"] == "small_dataset"


@pytest.mark.parametrize("method", ["qlora", "dora", "adapter"])
def test_other_methods_train_compare_and_generate(method, tmp_path, tiny_model_dir, chat_file, capsys):
    out = tmp_path / method
    args = ["--method", method, "--max-steps", "2", "--set", "eval.max_new_tokens=3", "--json"]
    assert main(train_args(tiny_model_dir, chat_file, out, *args)) == 0
    assert (out / "adapter").is_dir()
    capsys.readouterr()
    assert main(["compare", str(out), "--limit", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == 2
    assert main(["generate", str(out), "--prompt", "colour red", "--max-new-tokens", "3"]) == 0
