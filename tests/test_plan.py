"""plan on 7B and 70B Llama shapes built in-process (no weights), and the --measure probe on a small model."""

import json

import pytest
from transformers import LlamaConfig

from tunesmith.cli import main
from tunesmith.plan.estimate import GIB, Shape, Workload, devices_needed, estimate, recommend, training_flops

LLAMA_7B = LlamaConfig(
    vocab_size=32000,
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
)
LLAMA_70B = LlamaConfig(
    vocab_size=32000,
    hidden_size=8192,
    num_hidden_layers=80,
    intermediate_size=28672,
    num_attention_heads=64,
    num_key_value_heads=8,
)


def test_parameter_counts_match_the_published_sizes():
    assert abs(Shape.from_config(LLAMA_7B).total_params / 6.738e9 - 1) < 0.005
    assert abs(Shape.from_config(LLAMA_70B).total_params / 68.977e9 - 1) < 0.005


def test_lora_trainable_count_and_memory_breakdown():
    shape = Shape.from_config(LLAMA_7B)
    lora = estimate(shape, Workload(method="lora", lora_r=16, weight_dtype="bf16"))
    # r·(in+out) over q,k,v,o (4096->4096) and gate/up (4096->11008), down (11008->4096), 32 layers
    assert lora.trainable_params == 32 * 16 * (4 * 8192 + 3 * (4096 + 11008))
    assert lora.memory_bytes["weights"] == shape.total_params * 2
    assert lora.memory_bytes["optimizer"] == 8 * lora.trainable_params
    full = estimate(shape, Workload(method="full", weight_dtype="bf16"))
    assert full.memory_bytes["gradients"] == 4 * shape.total_params
    qlora = estimate(shape, Workload(method="qlora", weight_dtype="bf16"))
    assert qlora.memory_bytes["weights"] < lora.memory_bytes["weights"] / 3
    checkpointed = estimate(shape, Workload(method="lora", gradient_checkpointing=True))
    assert checkpointed.memory_bytes["activations"] < lora.memory_bytes["activations"] / 5


def test_flops_six_and_four_n_t():
    shape = Shape.from_config(LLAMA_7B)
    full = training_flops(shape, Workload(method="full", tokens=1e6, seq_len=1))
    lora = training_flops(shape, Workload(method="lora", tokens=1e6, seq_len=1))
    assert full == pytest.approx(6 * shape.total_params * 1e6, rel=1e-3)
    assert lora == pytest.approx(4 * shape.total_params * 1e6, rel=1e-3)


def test_what_fits_where_for_7b_and_70b():
    shape7 = Shape.from_config(LLAMA_7B)
    work = Workload(batch_size=4, seq_len=512, weight_dtype="bf16")
    devices = estimate(shape7, Workload(**(work.__dict__ | {"method": "full"}))).devices
    assert not devices["RTX 4090 24GB"]["fits"] and devices["A100 80GB"]["devices_needed"] >= 2
    qlora = Workload(**(work.__dict__ | {"method": "qlora", "gradient_checkpointing": True}))
    assert estimate(shape7, qlora).devices["RTX 4090 24GB"]["fits"]
    advice = recommend(shape7, work, "RTX 4090 24GB", 24 * GIB)
    assert advice["method"] == "lora" and any(r.startswith("full needs") for r in advice["reasons"])
    shape70 = Shape.from_config(LLAMA_70B)
    advice70 = recommend(shape70, work, "A100 80GB", 80 * GIB)
    assert advice70["method"] == "qlora"
    assert recommend(shape70, work, "RTX 4090 24GB", 24 * GIB)["method"] is None
    assert estimate(shape70, Workload(**(work.__dict__ | {"method": "full"}))).devices["H100 80GB"]["fits"] is False
    full70 = estimate(shape70, Workload(**(work.__dict__ | {"method": "full", "gradient_checkpointing": True})))
    assert full70.devices["H100 80GB"]["devices_needed"] >= 12


def test_cost_uses_overridable_prices():
    shape = Shape.from_config(LLAMA_7B)
    work = Workload(method="lora", tokens=20e6, weight_dtype="bf16", batch_size=1)
    default = estimate(shape, work).devices["A100 80GB"]
    cheaper = estimate(shape, work, prices={"A100 80GB": 0.9}).devices["A100 80GB"]
    assert cheaper["cost_usd"] == pytest.approx(default["cost_usd"] / 2, rel=0.01)
    assert default["hours"] == pytest.approx(training_flops(shape, work) / (312e12 * 0.4) / 3600, rel=1e-3)


def test_devices_needed_none_when_activations_alone_overflow():
    assert (
        devices_needed({"weights": 1, "gradients": 0, "optimizer": 0, "activations": 10, "logits_loss": 0}, 5) is None
    )


@pytest.mark.slow
def test_plan_cli_measures_a_small_model_within_25_percent(tmp_path, capsys):
    from .conftest import build_model, build_tokenizer

    shape = dict(
        hidden_size=512, num_hidden_layers=4, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=8
    )
    build_model(32000, **shape).save_pretrained(tmp_path / "m")
    build_tokenizer().save_pretrained(tmp_path / "m")
    args = [
        "plan",
        "--model",
        str(tmp_path / "m"),
        "--method",
        "full",
        "--train.batch_size",
        "4",
        "--seq-len",
        "128",
        "--tokens",
        "1e6",
        "--measure",
        "--measure-steps",
        "2",
        "--json",
    ]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("peak_memory_bytes", "flops", "hours", "cost_usd"):
        assert key in report["estimate"]
    assert report["fits"]["H100 80GB"] and report["recommendation"]["method"] == "lora"
    measured = report["measured"]
    assert measured["tokens_per_second"] > 0
    ratio = report["estimate"]["peak_memory_bytes"] / measured["peak_memory_bytes"]
    assert 0.75 <= ratio <= 1.25, (report["estimate"]["memory_bytes"], measured)
