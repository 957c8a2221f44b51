"""Data-parallel training with 2 CPU processes (gloo): same learning as one process, one writer, resume anywhere."""

from __future__ import annotations

import json
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import build_model, build_tokenizer, chat_records
from tests.test_cli import train_args
from tests.test_resume import _popen_train, _wait_for
from tunesmith.config import TrainConfig
from tunesmith.data.formats import Conversation, Message
from tunesmith.data.tokenize import DEFAULT_CHAT_TEMPLATE, tokenize_conversation
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.batching import collate
from tunesmith.train.distributed import World, launch_command, strip_option
from tunesmith.train.loop import loss_scale, loss_tokens_of, micro_batches
from tunesmith.train.loss import IGNORE, model_loss_sum

# Dropout off: its masks depend on how a batch is split, everything else must not.
FLAGS = ["--max-steps", "6", "--train.batch_size", "4", "--lr", "1e-2", "--set", "lora.dropout=0"]
FLAGS += ["--checkpoint.every", "2", "--checkpoint.keep_last", "5", "--quiet", "--test-fraction", "0.25"]


def _examples(n: int):
    tokenizer = build_tokenizer(chat_template=DEFAULT_CHAT_TEMPLATE)
    return [
        tokenize_conversation(tokenizer, Conversation(tuple(Message(**m) for m in r["messages"]), line=i + 1))
        for i, r in enumerate(chat_records(n))
    ]


@pytest.mark.parametrize("size", [2, 3])
def test_each_micro_batch_is_partitioned_across_processes(size):
    examples = _examples(22)  # 22 = 5 batches of 4 + 2: the last micro-batch is smaller than 3 processes
    settings = TrainConfig(batch_size=4, seed=3)
    streams = [micro_batches(examples, settings, 0, 64, world=World(rank, size)) for rank in range(size)]
    seen = []
    for _ in range(6):  # one epoch
        drawn = [next(stream) for stream in streams]
        everyone = drawn[0][0]
        assert all(d[0] == everyone for d in drawn)  # every process agrees on the whole micro-batch
        shares = [everyone[rank::size] for rank in range(size)]
        assert sorted(i for share in shares for i in share) == sorted(everyone)
        for (_, batch, weight), share in zip(drawn, shares, strict=True):
            assert weight == (1.0 if share else 0.0)  # an empty share joins the all-reduce at weight 0
            if share:
                assert batch["input_ids"].shape[0] == len(share)
        seen += everyone
    assert sorted(seen) == list(range(22))  # no example twice in the epoch
    assert loss_tokens_of(examples[0]) == sum(examples[0].loss_mask[1:]) > 0


@pytest.mark.parametrize("size", [1, 2, 3])
def test_a_step_on_any_number_of_processes_is_one_large_batch(size):
    """loss_scale: accumulated micro-batches on `size` processes, averaged as DDP does, equal one large batch."""
    examples = _examples(22)  # one epoch is 3 steps; for 3 processes one share is empty (a weight-0 placeholder)
    settings = TrainConfig(batch_size=4, grad_accum=2, seed=3)
    model = build_model(1 + max(max(e.input_ids) for e in examples))
    streams = [micro_batches(examples, settings, 0, 64, world=World(rank, size)) for rank in range(size)]
    for _ in range(3):
        drawn = [[next(stream) for _ in range(settings.grad_accum)] for stream in streams]
        step = [examples[i] for indices, _, _ in drawn[0] for i in indices]
        step_tokens = sum(loss_tokens_of(e) for e in step)
        grads, step_loss = [], 0.0
        for rank, micro in enumerate(drawn):
            model.zero_grad()
            for _, batch, weight in micro:
                loss = model_loss_sum(model, batch) * loss_scale(weight, step_tokens, World(rank, size))
                loss.backward()
                step_loss += loss.item() / size
            grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        model.zero_grad()
        whole = collate(step, 0)
        mean = model_loss_sum(model, whole) / int((whole["labels"][:, 1:] != IGNORE).sum())
        mean.backward()
        assert step_loss == pytest.approx(mean.item(), rel=1e-5)  # the loss the loop reports for the step
        for name, parameter in model.named_parameters():
            averaged = sum(g[name] for g in grads) / size  # what DDP's all-reduce leaves on every process
            torch.testing.assert_close(averaged, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_launch_command_runs_the_same_tunesmith_command_on_n_cpu_processes():
    argv = ["train", "config.yaml", "--nproc", "4", "--strategy", "fsdp", "--set", "train.lr=1e-4"]
    command, env = launch_command(argv, 4)
    assert command[:4] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert command[4:6] == ["--nproc-per-node", "4"]
    assert command[6:] == [
        "-m",
        "tunesmith",
        "train",
        "config.yaml",
        "--strategy",
        "fsdp",
        "--set",
        "train.lr=1e-4",
    ]
    assert env["ACCELERATE_USE_CPU"] == "true" and int(env["OMP_NUM_THREADS"]) >= 1
    assert strip_option(["a", "--nproc=2", "b"], "--nproc") == ["a", "b"]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_rows(run):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in _rows(run) if r["type"] == "train"]


def _same_adapter(a, b):
    expected, got = (
        load_file(a / "adapter" / "adapter_model.safetensors"),
        load_file(b / "adapter" / "adapter_model.safetensors"),
    )
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def _same_curve(a, b):
    for (step_a, loss_a, norm_a), (step_b, loss_b, norm_b) in zip(_train_rows(a), _train_rows(b), strict=True):
        assert (
            step_a == step_b and loss_a == pytest.approx(loss_b, rel=1e-5) and norm_a == pytest.approx(norm_b, rel=1e-4)
        )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("reference")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_records(40)))
    out = root / "single"
    assert _popen_train(train_args(tiny_model_dir, data, out, *FLAGS), {}).wait(timeout=300) == 0
    return data, out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_learn_exactly_like_one_and_write_once(reference, tiny_model_dir, tmp_path, strategy):
    data, single = reference
    out = tmp_path / strategy
    command = "run" if strategy == "ddp" else "train"  # run: the launching process compares after training
    args = [command, *train_args(tiny_model_dir, data, out, *FLAGS)[1:], "--nproc", "2", "--strategy", strategy]
    process = _popen_train(args, {})
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert "2 processes x 2 examples x 1 accumulated = effective batch 4" in err
    _same_curve(single, out)
    _same_adapter(single, out)
    rows = _rows(out)
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]  # one writer: no line twice
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    assert json.loads((out / "manifest.json").read_text())["status"] == "completed"
    if command == "run":
        assert (out / "eval" / "report.json").is_file()


def _interrupt(args, pause_step):
    """Start training, SIGTERM it while it writes the checkpoint of `pause_step`, return its exit code."""
    process = _popen_train(args, {ckpt.PAUSE_ENV: f"{pause_step}:10"})
    _wait_for(process, "checkpoint-writing")
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=300)
    return process.returncode


@pytest.mark.slow
def test_checkpoints_from_two_processes_resume_on_one_and_back(reference, tiny_model_dir, tmp_path):
    data, single = reference
    # Two DDP processes, stopped during step 4's checkpoint: they finish step 5, save it and exit 143.
    out = tmp_path / "ddp-then-single"
    args = train_args(tiny_model_dir, data, out, *FLAGS)
    assert _interrupt([*args, "--nproc", "2"], 4) == 143
    assert [p.name for p in ckpt.complete_checkpoints(out)][-1] == "step-000005"
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    assert _popen_train([*args, "--resume"], {}).wait(timeout=300) == 0  # one process takes over
    _same_curve(single, out)
    _same_adapter(single, out)

    # One process stopped, two FSDP processes (sharded state) take over.
    out = tmp_path / "single-then-fsdp"
    args = train_args(tiny_model_dir, data, out, *FLAGS)
    assert _interrupt(args, 2) == 143
    resumed = _popen_train([*args, "--resume", "--nproc", "2", "--strategy", "fsdp"], {})
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    _same_curve(single, out)
    _same_adapter(single, out)
    assert json.loads((out / "manifest.json").read_text())["resumed"][0]["from"] == "step-000003"
