"""plan on 7B and 70B Llama shapes built in-process (no weights), and the --measure probe on small models."""

import json
import os
import subprocess
import sys

import pytest
from transformers import LlamaConfig

from tunesmith.cli import main
from tunesmith.plan.estimate import (
    CUDA_CONTEXT_BYTES,
    GIB,
    Shape,
    Workload,
    devices_needed,
    estimate,
    memory_breakdown,
    recommend,
    training_flops,
)
from tunesmith.train.precision import CPU_BF16_ENV, cpu_bf16

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
    lora = estimate(shape, Workload(method="lora", lora_r=16, dtype="bf16"))
    # r·(in+out) over q,k,v,o (4096->4096) and gate/up (4096->11008), down (11008->4096), 32 layers
    assert lora.trainable_params == 32 * 16 * (4 * 8192 + 3 * (4096 + 11008))
    assert lora.memory_bytes["weights"] == shape.total_params * 2
    assert lora.memory_bytes["optimizer"] == 8 * lora.trainable_params
    full = estimate(shape, Workload(method="full", dtype="bf16"))
    assert full.memory_bytes["gradients"] == 4 * shape.total_params
    qlora = estimate(shape, Workload(method="qlora", dtype="bf16"))
    assert qlora.memory_bytes["weights"] < lora.memory_bytes["weights"] / 3
    checkpointed = estimate(shape, Workload(method="lora", gradient_checkpointing=True))
    assert checkpointed.memory_bytes["activations"] < lora.memory_bytes["activations"] / 5


def test_every_registered_method_is_planned_from_its_own_memory_terms():
    """plan reads what a method costs from its registry entry: a method added to METHODS is planned too."""
    from tunesmith.methods import METHODS

    shape = Shape.from_config(LLAMA_7B)
    lora = estimate(shape, Workload(method="lora", dtype="bf16"))
    for name, method in METHODS.items():
        planned = estimate(shape, Workload(method=name, dtype="bf16"))
        assert all(value >= 0 for value in planned.memory_bytes.values()), name
        trains_base = method.memory.trains_base
        assert (planned.trainable_params == shape.total_params) == trains_base, name
        assert planned.flops == pytest.approx(lora.flops * (1.5 if trains_base else 1), rel=0.01), name
        quantized = planned.memory_bytes["weights"] < lora.memory_bytes["weights"] / 3
        assert quantized == method.memory.quantized_base, name


def test_every_term_counts_in_the_dtype_it_has():
    shape = Shape.from_config(LLAMA_7B)
    lora16, lora32 = (memory_breakdown(shape, Workload(method="lora", dtype=d)) for d in ("bf16", "fp32"))
    trainable = lora16["gradients"] // 4
    # The frozen base and the activations follow the run's dtype; trainable weights, gradients, AdamW stay fp32.
    assert lora16["weights"] * 2 == lora32["weights"] == 4 * shape.total_params
    assert lora16["trainable_weights"] == lora32["trainable_weights"] == 4 * trainable
    assert lora16["optimizer"] == lora32["optimizer"] == 8 * trainable
    assert lora32["activations"] > 1.4 * lora16["activations"]
    assert lora16["autocast_copies"] == 2 * trainable and lora32["autocast_copies"] == 0
    assert lora16["logits_loss"] == lora32["logits_loss"]  # fp32 logits in every dtype
    # Full fine-tuning keeps fp32 master weights under bf16 autocast, plus the 16-bit copies autocast caches.
    full16 = memory_breakdown(shape, Workload(method="full", dtype="bf16"))
    assert full16["weights"] == full16["gradients"] == 4 * shape.total_params
    assert full16["optimizer"] == 8 * shape.total_params
    assert full16["autocast_copies"] == 2 * (shape.linear_params + shape.embedding_params)
    # QLoRA computes in the run's dtype unless qlora.compute_dtype says otherwise.
    assert Workload(method="qlora", dtype="bf16").compute_dtype == "bf16"
    assert Workload(method="qlora", dtype="bf16", qlora_compute_dtype="fp32").compute_dtype == "fp32"
    # The CUDA context and foreach AdamW's temporaries only on a GPU.
    cpu = memory_breakdown(shape, Workload(method="full", dtype="bf16"), gpu=False)
    assert full16["cuda_context"] == CUDA_CONTEXT_BYTES and "cuda_context" not in cpu
    assert full16["optimizer_step"] == 4 * shape.total_params > cpu["optimizer_step"]


def test_7b_lora_on_an_rtx_4090_plans_in_bf16_and_fits_one_card(tmp_path, capsys):
    LLAMA_7B.save_pretrained(tmp_path / "llama7b")
    command = ["plan", "--model", str(tmp_path / "llama7b"), "--method", "lora", "--gpu", "RTX 4090 24GB"]
    assert main([*command, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # train.dtype auto: bf16 on the table's GPUs, as TRL, Axolotl and Unsloth train a 7B LoRA on one 24 GB card.
    assert report["precision"]["dtype"] == report["workload"]["dtype"] == "bf16"
    assert report["precision"]["reason"].startswith("train.dtype auto")
    assert report["fits"]["RTX 4090 24GB"] and report["devices"]["RTX 4090 24GB"]["devices_needed"] == 1
    assert report["recommendation"]["method"] == "lora"
    memory = report["estimate"]["memory_bytes"]
    assert memory["weights"] == 2 * report["estimate"]["params"] and memory["cuda_context"] == CUDA_CONTEXT_BYTES
    assert report["estimate"]["peak_memory_bytes"] < 0.9 * 24 * GIB
    # The CPU row is planned in what this machine would train in (tests pin it to a CPU without bf16).
    assert report["this_machine"]["precision"] == {"dtype": "fp32", "reason": f"auto: {CPU_BF16_ENV}=0"}
    # Its time comes from this CPU's fp32 matmul speed, measured here, not from a constant.
    assert (
        report["this_machine"]["speed"].startswith("measured ")
        and " fp32 matmul on this CPU" in report["this_machine"]["speed"]
    )
    # In fp32, what plan answered before it followed train.dtype: two cards.
    assert main([*command, "--weight-dtype", "fp32", "--json"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert fp32["precision"] == {"dtype": "fp32", "reason": "set by --weight-dtype"}
    assert fp32["devices"]["RTX 4090 24GB"]["devices_needed"] == 2
    assert main(command) == 0
    text = capsys.readouterr().out
    assert "dtype bf16 on the GPUs below (train.dtype auto" in text and "cuda_context" in text
    assert "time from the measured" in " ".join(text.split())


def test_flops_six_and_four_n_t():
    shape = Shape.from_config(LLAMA_7B)
    full = training_flops(shape, Workload(method="full", tokens=1e6, seq_len=1))
    lora = training_flops(shape, Workload(method="lora", tokens=1e6, seq_len=1))
    assert full == pytest.approx(6 * shape.total_params * 1e6, rel=1e-3)
    assert lora == pytest.approx(4 * shape.total_params * 1e6, rel=1e-3)


def test_what_fits_where_for_7b_and_70b():
    shape7 = Shape.from_config(LLAMA_7B)
    work = Workload(batch_size=4, seq_len=512, dtype="bf16")
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
    work = Workload(method="lora", tokens=20e6, dtype="bf16", batch_size=1)
    default = estimate(shape, work).devices["A100 80GB"]
    cheaper = estimate(shape, work, prices={"A100 80GB": 0.9}).devices["A100 80GB"]
    assert cheaper["cost_usd"] == pytest.approx(default["cost_usd"] / 2, rel=0.01)
    assert default["hours"] == pytest.approx(training_flops(shape, work) / (312e12 * 0.4) / 3600, rel=1e-3)


def test_devices_needed_none_when_activations_alone_overflow():
    assert (
        devices_needed({"weights": 1, "gradients": 0, "optimizer": 0, "activations": 10, "logits_loss": 0}, 5) is None
    )


def _native_bf16_or_skip(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 on a CPU without bf16 instructions is emulated, hundreds of times slower: measure it only natively."""
    if dtype == "bf16":
        monkeypatch.delenv(CPU_BF16_ENV)  # conftest pins it off; the question here is the real CPU
        native, evidence = cpu_bf16()
        if not native:
            pytest.skip(f"bf16 would be emulated here: {evidence}")


def _measured_plan(model_dir, method: str, dtype: str) -> dict:
    """`tunesmith plan --measure` in a fresh process, as a user runs it: the resident memory of a test process
    that has already run other tests (allocator arenas, threads) would blur a peak of a few tens of MiB."""
    args = ["plan", "--model", str(model_dir), "--method", method, "--train.dtype", dtype]
    args += ["--train.batch_size", "4", "--seq-len", "128", "--tokens", "1e6", "--measure", "--measure-steps", "2"]
    done = subprocess.run([sys.executable, "-m", "tunesmith", *args, "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    measured = report["measured"]
    assert measured["precision"]["dtype"] == dtype and measured["tokens_per_second"] > 0
    assert measured["live_memory"] and measured["peak_reset"]
    ratio = measured["estimate_peak_memory_bytes"] / measured["peak_memory_bytes"]
    assert 0.75 <= ratio <= 1.25, (measured["estimate_memory_bytes"], measured)
    return report


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="the CPU peak needs Linux's clear_refs")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_plan_cli_measures_a_small_model_within_25_percent(dtype, tmp_path, monkeypatch):
    from .conftest import build_model

    _native_bf16_or_skip(dtype, monkeypatch)
    shape = dict(
        hidden_size=512, num_hidden_layers=4, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=8
    )
    build_model(32000, **shape).save_pretrained(tmp_path / "m")
    report = _measured_plan(tmp_path / "m", "full", dtype)
    for key in ("peak_memory_bytes", "flops", "hours", "cost_usd"):
        assert key in report["estimate"]
    assert report["fits"]["H100 80GB"] and report["recommendation"]["method"] == "lora"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="the CPU peak needs Linux's clear_refs")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_plan_cli_measures_a_1_5m_parameter_model_within_25_percent(dtype, tmp_path, monkeypatch):
    """At this size the runtime and allocator dwarf the training state: before the probe's warm-up and pinned
    mmap threshold, the estimate was 70-80% below the measured peak."""
    from .conftest import build_model

    _native_bf16_or_skip(dtype, monkeypatch)
    shape = dict(hidden_size=128, num_hidden_layers=4, intermediate_size=352, num_attention_heads=4)
    model = build_model(3000, num_key_value_heads=4, **shape)
    assert 1.4e6 < sum(p.numel() for p in model.parameters()) < 1.6e6
    model.save_pretrained(tmp_path / "m")
    _measured_plan(tmp_path / "m", "lora", dtype)


# --- objective grpo -------------------------------------------------------------------------------------------


def test_grpo_memory_counts_the_engines_kv_cache_and_the_merged_lora_weights():
    shape = Shape.from_config(LLAMA_70B)  # grouped-query attention: 8 kv heads of 64
    rollout = {"rollout_rows": 64, "rollout_length": 1024, "step_sequences": 64, "dtype": "bf16", "batch_size": 4}
    lora = memory_breakdown(shape, Workload(method="lora", **rollout))
    assert (
        lora["kv_cache"] == 80 * 64 * 8 * 1024 * 128 * 2 * 2
    )  # layers x rows x kv heads x length x head dim x 2 x 2 B
    assert lora["merged_weights"] == shape.linear_params * 2  # every adapted linear merged in bf16 while sampling
    for method in ("qlora", "dora"):  # sampled unmerged
        assert memory_breakdown(shape, Workload(method=method, **rollout))["merged_weights"] == 0
    full = memory_breakdown(shape, Workload(method="full", **rollout))
    assert full["kv_cache"] == 2 * lora["kv_cache"]  # the engine caches in the parameters' dtype: fp32 masters
    assert "kv_cache" not in memory_breakdown(shape, Workload(method="lora", dtype="bf16"))  # SFT holds none
    # A long rollout on a small update: the peak is the sampling phase, not the backward pass.
    long = estimate(shape, Workload(method="lora", **(rollout | {"rollout_length": 32768, "batch_size": 1})))
    assert long.peak_phase == "rollout"
    # Sampling costs a forward pass (2·N) per token on top of the update's 4·N.
    plain = training_flops(shape, Workload(method="lora", tokens=1e6, seq_len=1))
    sampled = training_flops(shape, Workload(method="lora", tokens=1e6, seq_len=1, rollout_tokens=1e6))
    assert sampled - plain == pytest.approx(2 * shape.total_params * 1e6, rel=1e-3)


def test_plan_of_a_grpo_run_counts_the_groups_sequences_and_says_so(tiny_model_dir, tmp_path, capsys):
    from tests.conftest import chat_prompt, write_jsonl

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": chat_prompt(i)} for i in range(20)])  # no answers
    command = ["plan", "--model", str(tiny_model_dir), "--data", str(data), "--objective", "grpo", "--cpu-tflops", "1"]
    command += ["--rl.group_size", "4", "--rl.prompts_per_step", "3", "--rl.max_completion_tokens", "32"]
    command += ["--max-steps", "10", "--train.batch_size", "2", "--rl.rewards", "[{regex: x}]"]
    assert main([*command, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    work, memory = report["workload"], report["estimate"]["memory_bytes"]
    assert work["step_sequences"] == 12 and work["rollout_rows"] == 12 and work["batch_size"] == 2
    from tunesmith.data.formats import read_conversations
    from tunesmith.data.tokenize import prompt_ids
    from tunesmith.models import load_chat_tokenizer

    tokenizer = load_chat_tokenizer(str(tiny_model_dir))
    prompts = [prompt_ids(tokenizer, c.prompt_messages) for c in read_conversations(data, prompt_only=True)[0]]
    longest = max(len(ids) for ids in prompts) + 32  # the longest prompt and a full-length completion
    assert work["rollout_length"] == longest
    # The tiny Llama: 2 layers, 2 kv heads of 8, fp32 here (tests pin the CPU to fp32; GPUs plan in bf16).
    assert memory["kv_cache"] == 2 * 12 * 2 * longest * 8 * 2 * 2
    assert work["tokens"] > 10 * 12 * 32 and work["rollout_tokens"] == work["tokens"]  # iterations 1
    assert "KV cache holds 12 rows" in report["rollout"]
    assert main(command) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "grpo: each step trains 12 sequences (rl.prompts_per_step x rl.group_size)" in printed
    assert f"KV cache holds 12 rows x {longest} tokens" in printed
