"""Checkpoints and exact resume: signals, SIGKILL (also mid-write), full disk, NaN, early stopping."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.cli import main
from tunesmith.config import CheckpointConfig, LoraConfig, TrainConfig, ValidationConfig
from tunesmith.errors import TrainingInterrupted, TunesmithError
from tunesmith.methods.lora import apply_lora
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.loop import Session, fit

from .conftest import build_model, build_tokenizer
from .test_cli import train_args
from .test_train import examples_for

SETTINGS = dict(max_steps=8, batch_size=4, grad_accum=2, lr=5e-3, warmup_ratio=0.25, log_every=1)


def lora_model(vocab: int, seed: int):
    torch.manual_seed(seed)
    model, _ = apply_lora(build_model(vocab, seed=3), LoraConfig(r=4, alpha=8, dropout=0.1))
    return model


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == "train"]


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_sigterm_checkpoints_and_resume_equals_an_uninterrupted_run(chat_file, tmp_path):
    tokenizer = build_tokenizer()
    examples = examples_for(chat_file, tokenizer)
    settings = TrainConfig(**SETTINGS)

    def run(run_dir, model, **session):
        return fit(
            model, examples, settings, tokenizer.pad_token_id, run_dir / "metrics.jsonl",
            session=Session(run_dir=run_dir, checkpoint=CheckpointConfig(every=3), **session),
        )  # fmt: skip

    straight_dir, broken_dir = tmp_path / "straight", tmp_path / "broken"
    straight_dir.mkdir(), broken_dir.mkdir()
    straight = lora_model(len(tokenizer), seed=1)
    run(straight_dir, straight)

    def terminate_at_step_5(record):
        if record.get("step") == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as stop:
        run(broken_dir, lora_model(len(tokenizer), seed=1), log=terminate_at_step_5)
    assert stop.value.step == 5 and stop.value.exit_code == 143
    assert [p.name for p in ckpt.complete_checkpoints(broken_dir)] == ["step-000003", "step-000005"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    # A different initialisation proves the weights come from the checkpoint, not from the seed.
    resumed = lora_model(len(tokenizer), seed=99)
    result = run(broken_dir, resumed, resume_from=ckpt.latest_checkpoint(broken_dir))
    assert result.resumed_from == 5 and result.steps == 8
    for name, tensor in trainable(straight).items():
        torch.testing.assert_close(trainable(resumed)[name], tensor, rtol=1e-5, atol=1e-7, msg=name)
    expected = [(r["step"], r["loss"], r["lr"]) for r in train_rows(straight_dir)]
    assert [(r["step"], r["loss"], r["lr"]) for r in train_rows(broken_dir)] == expected
    assert [p.name for p in ckpt.complete_checkpoints(broken_dir)] == ["step-000006", "step-000008"]  # keep_last 2


def test_a_full_disk_keeps_the_previous_checkpoint(chat_file, tmp_path, monkeypatch):
    tokenizer = build_tokenizer()
    examples = examples_for(chat_file, tokenizer)
    real_save = torch.save
    calls = {"n": 0}

    def save_until_full(obj, path, *args, **kwargs):
        if "step-000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        calls["n"] += 1
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save_until_full)
    with pytest.raises(TunesmithError, match="previous checkpoint step-000002 is intact"):
        fit(
            lora_model(len(tokenizer), 1), examples, TrainConfig(**SETTINGS), tokenizer.pad_token_id,
            session=Session(run_dir=tmp_path, checkpoint=CheckpointConfig(every=2)),
        )  # fmt: skip
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000002"]
    model = lora_model(len(tokenizer), 7)
    state = ckpt.load_checkpoint(tmp_path / "checkpoints" / "step-000002", model, *optimizer_and_scheduler(model))
    assert state.step == 2 and state.micro_batches == 4


def optimizer_and_scheduler(model):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def nan_on_steps(model, steps: set[int]):
    """Make the embedding output NaN on the given optimizer steps (one micro-batch each)."""
    seen = {"calls": 0}

    def hook(module, args, output):
        if module.training:
            seen["calls"] += 1
            if seen["calls"] in steps:
                return output * float("nan")
        return None

    model.get_input_embeddings().register_forward_hook(hook)


def test_nonfinite_loss_stops_naming_the_step_and_causes(chat_file):
    tokenizer = build_tokenizer()
    model = lora_model(len(tokenizer), 1)
    nan_on_steps(model, {3})
    settings = TrainConfig(**(SETTINGS | {"grad_accum": 1}))
    with pytest.raises(TunesmithError) as error:
        fit(model, examples_for(chat_file, tokenizer), settings, tokenizer.pad_token_id)
    message = str(error.value)
    assert "Step 3" in message and "train.lr" in message and "data lines" in message and "on_nonfinite" in message


def test_nonfinite_steps_can_be_skipped(chat_file, tmp_path):
    tokenizer = build_tokenizer()
    model = lora_model(len(tokenizer), 1)
    nan_on_steps(model, {3})
    settings = TrainConfig(**(SETTINGS | {"grad_accum": 1, "on_nonfinite": "skip"}))
    result = fit(model, examples_for(chat_file, tokenizer), settings, tokenizer.pad_token_id, tmp_path / "m.jsonl")
    assert result.skipped_steps == 1 and result.steps == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())
    events = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "event"] == [3]


def test_early_stopping_best_checkpoint_and_overfitting_warning(chat_file, tmp_path):
    tokenizer = build_tokenizer()
    scores = iter([1.0, 0.8, 0.9, 0.95, 0.99, 1.2])  # best at the 2nd validation, then worse and worse
    settings = TrainConfig(**(SETTINGS | {"max_steps": 12, "grad_accum": 1, "lr": 1e-3}))
    session = Session(
        run_dir=tmp_path,
        checkpoint=CheckpointConfig(keep_last=1),
        validation=ValidationConfig(every=2, patience=3),
        validate=lambda model: {"val_loss": next(scores)},
    )
    result = fit(
        lora_model(len(tokenizer), 1), examples_for(chat_file, tokenizer), settings, tokenizer.pad_token_id,
        tmp_path / "metrics.jsonl", session=session,
    )  # fmt: skip
    assert result.stopped == "early_stopped" and result.steps == 10  # 3 validations (6, 8, 10) after the best
    assert result.best == {"metric": "val_loss", "value": 0.8, "step": 4}
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-000004", "step-000010"]  # last + best
    val = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["type"] == "val"]
    assert [r["step"] for r in val if r.get("best")] == [2, 4]
    assert any(r.get("overfitting") for r in val)  # the loss fell while val loss rose


def _popen_train(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tunesmith", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=os.environ | env,
    )


def _wait_for(process: subprocess.Popen, marker: str) -> str:
    seen = []
    for line in process.stderr:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"{marker!r} never appeared:\n{''.join(seen)}")


RUN_FLAGS = ["--max-steps", "8", "--train.batch_size", "4", "--lr", "5e-3", "--lora.dropout", "0.1"]
RUN_FLAGS += ["--checkpoint.every", "2", "--checkpoint.keep_last", "5", "--quiet"]


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_then_resume_matches(tiny_model_dir, chat_file, tmp_path, capsys):
    # Every run in its own process: the reference, the killed one and the resumed one (Adam's first steps
    # amplify float noise, so in-process and subprocess runs need not agree bit for bit).
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert _popen_train(train_args(tiny_model_dir, chat_file, reference, *RUN_FLAGS), {}).wait(timeout=300) == 0

    process = _popen_train(
        train_args(tiny_model_dir, chat_file, killed, *RUN_FLAGS), {ckpt.PAUSE_ENV: "6:120"}
    )  # fmt: skip
    _wait_for(process, "checkpoint-writing")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert any(n.startswith(".tmp-step-000006") for n in names), names  # killed mid-write
    assert [p.name for p in ckpt.complete_checkpoints(killed)] == ["step-000002", "step-000004"]
    capsys.readouterr()
    assert main(["runs", "show", str(killed), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "crashed"

    assert _popen_train(train_args(tiny_model_dir, chat_file, killed, *RUN_FLAGS, "--resume"), {}).wait(300) == 0
    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    expected = load_file(reference / "adapter" / "adapter_model.safetensors")
    resumed = load_file(killed / "adapter" / "adapter_model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-7, msg=name)
    assert [(r["step"], r["loss"]) for r in train_rows(killed)] == [
        (r["step"], r["loss"]) for r in train_rows(reference)
    ]
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["resumed"][0]["from"] == "step-000004"


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_checkpoints_and_exits_130(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    process = _popen_train(train_args(tiny_model_dir, chat_file, out, *RUN_FLAGS), {ckpt.PAUSE_ENV: "2:5"})
    _wait_for(process, "checkpoint-writing")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "--resume" in err and "Stopped after step 3" in err
    assert ckpt.latest_checkpoint(out).name == "step-000003"
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"


def test_resume_refuses_a_changed_config_and_a_missing_run(tiny_model_dir, chat_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, chat_file, tmp_path / "none", "--resume")) == 2
    assert "holds no run to resume" in capsys.readouterr().err
    assert main(train_args(tiny_model_dir, chat_file, out, "--max-steps", "2", "--train.batch_size", "4")) == 0
    assert main(train_args(tiny_model_dir, chat_file, out, "--max-steps", "2", "--resume")) == 2
    assert "train.batch_size: 4 -> 8" in capsys.readouterr().err
    # resume auto on a finished run: nothing left to train, the run stays complete
    assert (
        main(
            train_args(
                tiny_model_dir, chat_file, out, "--max-steps", "2", "--train.batch_size", "4", "--resume", "auto"
            )
        )
        == 0
    )
    assert json.loads((out / "manifest.json").read_text())["status"] == "completed"


def test_the_printed_resume_command_drops_overwrite_and_an_earlier_resume_value():
    from tunesmith.cli.train import resume_command

    assert resume_command(["train", "c.yaml", "--resume", "auto", "--lr", "1e-3"]) == [
        "train",
        "c.yaml",
        "--lr",
        "1e-3",
    ]
    assert resume_command(["train", "c.yaml", "--overwrite", "--resume"]) == ["train", "c.yaml"]
    assert resume_command(["train", "--resume=auto", "c.yaml"]) == ["train", "c.yaml"]


def test_resume_refuses_a_changed_or_missing_saved_split_naming_it(tiny_model_dir, chat_file, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--max-steps", "2", "--train.batch_size", "4", "--test-fraction", "0.2", "--set", "data.val_fraction=0.1"]
    assert main(train_args(tiny_model_dir, chat_file, out, *flags)) == 0
    recorded = json.loads((out / "manifest.json").read_text())["splits"]
    assert set(recorded) == {"train", "val", "test"} and all(len(digest) == 64 for digest in recorded.values())
    train = out / "data" / "train.jsonl"
    original = train.read_text()
    train.write_text(original.replace("red", "crimson", 1))  # one answer edited by hand
    assert main(train_args(tiny_model_dir, chat_file, out, *flags, "--resume")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert str(train) in err and "train split" in err and "changed since the run started" in err
    train.write_text(original)
    (out / "data" / "val.jsonl").unlink()
    assert main(train_args(tiny_model_dir, chat_file, out, *flags, "--resume")) == 2
    assert "val.jsonl is missing" in " ".join(capsys.readouterr().err.split())
