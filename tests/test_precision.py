"""train.dtype: the decision table (capability flags faked), and bf16 training on a tiny model on any CPU:
frozen weights bf16, trainable weights and optimizer state fp32, round trips, merge and resume."""

import json
import os
import signal

import pytest
import torch

from tunesmith.cli import main
from tunesmith.config import CheckpointConfig
from tunesmith.errors import TrainingInterrupted, TunesmithError
from tunesmith.methods import (
    apply_method,
    load_base,
    load_trained,
    merged_model,
    method_of,
    save_trained,
    training_dtype,
)
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import precision as prec
from tunesmith.train.batching import collate
from tunesmith.train.loop import Session, fit

from .conftest import build_tokenizer
from .test_cli import train_args
from .test_methods import logits, make_config
from .test_train import examples_for, snapshot

BF16 = prec.Precision("bf16", "set by the test")


@pytest.fixture
def machine(monkeypatch):
    """Fake the hardware: CPU flags, GPU presence and its bf16 support."""
    monkeypatch.delenv(prec.CPU_BF16_ENV, raising=False)

    def fake(flags=(), gpu=None):
        monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu is not None)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: gpu == "bf16")
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: f"fake GPU ({gpu})")

    return fake


@pytest.mark.parametrize(
    "flags, gpu, expected",
    [
        ({"avx2", "avx512f", "amx_bf16", "avx512_bf16"}, None, "bf16"),
        ({"avx2", "avx512f", "avx512_bf16"}, None, "bf16"),
        ({"avx2", "avx512f"}, None, "fp32"),
        ({"avx2"}, None, "fp32"),
        (set(), None, "fp32"),
        ({"avx2"}, "bf16", "bf16"),
        ({"avx2"}, "no-bf16", "fp16"),
    ],
)
def test_auto_picks_by_hardware_and_says_why(machine, flags, gpu, expected):
    machine(flags, gpu)
    chosen = prec.resolve("auto")
    assert chosen.name == expected
    assert chosen.reason.startswith("auto: ")
    if gpu is None and expected == "bf16":
        assert ("amx_bf16" if "amx_bf16" in flags else "avx512_bf16") in chosen.reason
    if gpu is None and expected == "fp32":
        assert "emulated" in chosen.reason


def test_explicit_dtypes_and_refusals(machine, monkeypatch):
    machine({"avx2"}, None)
    assert prec.resolve("fp32").name == "fp32" and prec.resolve("bf16").name == "bf16"
    with pytest.raises(TunesmithError, match="fp16 needs a CUDA GPU"):
        prec.resolve("fp16")
    machine({"avx2"}, "no-bf16")
    assert prec.resolve("auto", model_type="llama").name == "fp16"
    with pytest.raises(TunesmithError, match="gemma3_text models overflow in fp16"):
        prec.resolve("auto", model_type="gemma3_text")
    machine({"avx2"}, None)
    monkeypatch.setenv(prec.CPU_BF16_ENV, "1")
    assert prec.resolve("auto").name == "bf16" and prec.CPU_BF16_ENV in prec.resolve("auto").reason


def test_inference_dtype_follows_the_run_unless_only_emulated(machine):
    machine({"avx512_bf16"}, None)
    assert prec.inference_dtype("bf16") == torch.bfloat16 and prec.inference_dtype("fp32") == torch.float32
    machine({"avx2"}, None)
    assert prec.inference_dtype("bf16") == torch.float32


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "adapter", "full"])
def test_bf16_run_keeps_frozen_weights_bf16_and_trainable_state_fp32(method, tiny_model_dir, chat_file, tmp_path):
    tokenizer = build_tokenizer()
    config = make_config(method, train={"dtype": "bf16"})
    model, _ = apply_method(load_base(config, str(tiny_model_dir), training_dtype(config, torch.bfloat16)), config)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    if method == "full":
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    else:
        floating = [p for p in frozen if p.is_floating_point()]
        assert floating and all(p.dtype == torch.bfloat16 for p in floating)
    before = snapshot(model)
    examples = examples_for(chat_file, tokenizer)
    settings = config.train.model_copy(update={"max_steps": 8, "batch_size": 8, "lr": 2e-2})
    result = fit(model, examples, settings, tokenizer.pad_token_id, session=Session(run_dir=tmp_path / "r"))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter, before[name])
        assert changed == parameter.requires_grad, name
    state = torch.load(ckpt.latest_checkpoint(tmp_path / "r") / "optimizer.pt", weights_only=True)["state"]
    moments = [t for entry in state.values() for k, t in entry.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(t.dtype == torch.float32 for t in moments)

    model.eval()
    batch = collate(examples[:3], tokenizer.pad_token_id)
    trained = logits(model, batch)
    save_trained(model, config, tmp_path / "w")
    if method == "full":
        reloaded = load_trained(config, str(tiny_model_dir), tmp_path / "w", torch.float32).eval()
        torch.testing.assert_close(logits(reloaded, batch), trained, rtol=0, atol=0)
        return
    reloaded = load_trained(config, str(tiny_model_dir), tmp_path / "w", torch.bfloat16).eval()
    torch.testing.assert_close(logits(reloaded, batch), trained, rtol=0, atol=0)
    if method_of(config).merge is not None:
        merged = merged_model(config, str(tiny_model_dir), tmp_path / "w", torch.bfloat16).eval()
        assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
        torch.testing.assert_close(logits(merged, batch).float(), trained.float(), rtol=0.05, atol=0.05)


def test_bf16_resume_equals_an_uninterrupted_run(tiny_model_dir, chat_file, tmp_path):
    tokenizer = build_tokenizer()
    config = make_config("lora", lora={"r": 4, "alpha": 8, "dropout": 0.1}, train={"dtype": "bf16"})
    examples = examples_for(chat_file, tokenizer)
    settings = config.train.model_copy(update={"max_steps": 6, "batch_size": 4, "lr": 5e-3})

    def model():
        torch.manual_seed(1)
        return apply_method(load_base(config, str(tiny_model_dir), torch.bfloat16), config)[0]

    straight = model()
    fit(straight, examples, settings, 0, session=Session(run_dir=tmp_path / "a", checkpoint=CheckpointConfig(every=3)))

    def terminate_at_step_3(record):
        if record.get("step") == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted):
        fit(model(), examples, settings, 0, session=Session(run_dir=tmp_path / "b", log=terminate_at_step_3))
    resumed = model()
    checkpoint = ckpt.latest_checkpoint(tmp_path / "b")
    fit(resumed, examples, settings, 0, session=Session(run_dir=tmp_path / "b", resume_from=checkpoint))
    for name, tensor in snapshot(straight).items():
        torch.testing.assert_close(snapshot(resumed)[name], tensor, rtol=1e-5, atol=1e-7, msg=name)


def test_the_run_records_its_dtype_and_a_resume_keeps_it(tiny_model_dir, chat_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs" / "p"
    extra = ["--method", "lora", "--max-steps", "4", "--train.batch_size", "4", "--test-fraction", "0.25"]
    extra += ["--set", "checkpoint.every=2"]
    monkeypatch.setenv(prec.CPU_BF16_ENV, "1")  # auto: bf16 here
    assert main(train_args(tiny_model_dir, chat_file, out, *extra)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == {"dtype": "bf16", "reason": f"auto: {prec.CPU_BF16_ENV}=1"}
    assert "dtype bf16 (auto:" in capsys.readouterr().err
    monkeypatch.setenv(prec.CPU_BF16_ENV, "0")  # the same run resumed where auto means fp32
    assert main(train_args(tiny_model_dir, chat_file, out, *extra, "--resume")) == 0
    err = capsys.readouterr().err
    assert "auto resolves to fp32 here" in err and "continuing in bf16" in err
    assert json.loads((out / "manifest.json").read_text())["precision"]["dtype"] == "bf16"
    assert prec.trained_dtype(out) == "bf16"

    from tunesmith.evaluate.generate import load_run

    assert load_run(out).model.get_input_embeddings().weight.dtype == torch.float32  # bf16 only emulated "here"
    monkeypatch.setenv(prec.CPU_BF16_ENV, "1")
    assert load_run(out).model.get_input_embeddings().weight.dtype == torch.bfloat16  # the run's own dtype


def test_qlora_compute_dtype_follows_train_dtype(tiny_model_dir):
    import bitsandbytes as bnb

    for settings, expected in (({}, torch.bfloat16), ({"compute_dtype": "fp32"}, torch.float32)):
        config = make_config("qlora", qlora=settings, train={"dtype": "bf16"})
        model = load_base(config, str(tiny_model_dir), torch.bfloat16)
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert {m.compute_dtype for m in layers} == {expected}


def test_fp16_loss_scaling_path_trains(tiny_model_dir, chat_file):
    """The GradScaler branch of the loop (GPUs without bf16), run on CPU with the dtype given directly."""
    tokenizer = build_tokenizer()
    config = make_config("lora")
    model, _ = apply_method(load_base(config, str(tiny_model_dir), torch.float16), config)
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float16}
    settings = config.train.model_copy(update={"max_steps": 6, "batch_size": 8, "lr": 2e-2})
    fp16 = prec.Precision("fp16", "set by the test")
    result = fit(model, examples_for(chat_file, tokenizer), settings, tokenizer.pad_token_id, precision=fp16)
    assert result.skipped_steps == 0 and result.history[-1]["loss"] < result.history[0]["loss"]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
