"""The matmul probe behind "this machine"'s time estimate: measured once per machine, cached, named in the label."""

import json
import math

import pytest
import torch

from tunesmith.plan import probe
from tunesmith.plan.estimate import CPU_ROW, HERE_UTILIZATION, Shape, Workload, training_flops
from tunesmith.plan.report import estimate_with_cpu
from tunesmith.train import precision

from .test_plan import LLAMA_7B

FLAGS = frozenset({"fpu", "sse2", "avx2", "avx512f", "avx512_bf16", "amx_bf16"})


@pytest.fixture
def timed(tmp_path, monkeypatch):
    """A private cache, fixed CPU flags, and a fake timer that counts its calls (no speed of this CPU)."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "cpu_flags", lambda: FLAGS)
    calls = []

    def fake(dtype, device):
        calls.append((dtype, device))
        return {"fp32": 2.5e11, "bf16": 6.8e11}[dtype]

    monkeypatch.setattr(probe, "time_matmul", fake)
    return calls


def test_the_speed_is_measured_once_and_then_read_from_the_cache(timed, tmp_path):
    first = probe.matmul_speed("bf16", "cpu")
    again = probe.matmul_speed("bf16", "cpu")
    assert timed == [("bf16", "cpu")] and not first.cached and again.cached
    assert first.flops == again.flops == 6.8e11
    cached = json.loads((tmp_path / "cache" / probe.CACHE_FILE).read_text())
    (key,) = cached
    assert f"torch={torch.__version__}" in key and f"threads={torch.get_num_threads()}" in key and "device=cpu" in key
    assert probe.matmul_speed("fp32", "cpu").flops == 2.5e11 and timed[-1] == ("fp32", "cpu")  # one entry per dtype


def test_the_label_names_what_was_measured(timed):
    threads = torch.get_num_threads()
    label = probe.matmul_speed("bf16", "cpu").label
    plural = "s" if threads != 1 else ""
    assert (
        label
        == f"measured 680 GFLOP/s bf16 matmul on this CPU (amx_bf16, avx512_bf16, avx512f), {threads} thread{plural}"
    )


def test_a_cached_speed_of_other_cpu_flags_or_threads_is_not_reused(timed, monkeypatch):
    probe.matmul_speed("bf16", "cpu")
    monkeypatch.setattr(precision, "cpu_flags", lambda: FLAGS - {"amx_bf16"})
    other = probe.matmul_speed("bf16", "cpu")
    assert len(timed) == 2 and not other.cached and "amx_bf16" not in other.label
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    assert not probe.matmul_speed("bf16", "cpu").cached and len(timed) == 3


def test_a_damaged_cache_is_measured_again(timed, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / probe.CACHE_FILE).write_text("{not json")
    assert not probe.matmul_speed("fp32", "cpu").cached and len(timed) == 1
    assert probe.matmul_speed("fp32", "cpu").cached


def test_the_real_probe_gives_a_finite_speed_quickly(monkeypatch):
    monkeypatch.setattr(probe, "SHAPES", {"cpu": (16, 32, 32)})
    monkeypatch.setattr(probe, "SECONDS", 0.01)
    flops = probe.time_matmul("fp32", "cpu")
    assert math.isfinite(flops) and flops > 0


def test_this_machines_time_comes_from_the_measured_speed(timed):
    shape, work = Shape.from_config(LLAMA_7B), Workload(method="lora", tokens=1e6, dtype="bf16")
    row = estimate_with_cpu(shape, work, cpu_work=work).devices[CPU_ROW]
    expected = training_flops(shape, work) / (6.8e11 * HERE_UTILIZATION) / 3600
    assert row["hours"] == pytest.approx(expected, rel=1e-3) and row["utilization"] == HERE_UTILIZATION
    assert row["speed"].startswith("measured 680 GFLOP/s bf16 matmul on this CPU")
    given = estimate_with_cpu(shape, work, cpu_work=work, cpu_tflops=0.34).devices[CPU_ROW]
    assert given["hours"] == pytest.approx(expected * 2, rel=1e-3) and "set by --cpu-tflops" in given["speed"]
    assert len(timed) == 1  # --cpu-tflops measures nothing


def test_a_runs_plan_json_names_the_measured_speed(timed):
    from tunesmith.config import build_config
    from tunesmith.plan.report import run_estimate

    plan = run_estimate(build_config({"train": {"dtype": "fp32"}}), LLAMA_7B, [])
    assert plan["this machine"]["speed"].startswith("measured 250 GFLOP/s fp32 matmul on ")
    assert plan["this machine"]["speed"] in plan["assumptions"] and "2-core" not in plan["assumptions"]
