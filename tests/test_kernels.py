"""tunesmith's bf16 generation kernel (tunesmith.kernels): the product over packed weights equals torch's within bf16
rounding for every shape a model has (odd widths, outputs not a multiple of 16, 1 to 20 rows, with and without bias),
on every CPU (the plain loop where AVX512-BF16 is missing); generation uses it only where it pays and goes on with
oneDNN when it cannot be built."""

from __future__ import annotations

import pytest
import torch

from tunesmith import kernels
from tunesmith.generation import PackedWeight


@pytest.fixture(scope="module")
def built():
    if not kernels.available():
        pytest.skip("no C++ compiler here: generation runs on oneDNN (the fallback is tested below)")


@pytest.mark.parametrize("out_features, in_features", [(40, 64), (100, 33), (17, 7), (256, 640), (48, 130)])
@pytest.mark.parametrize("rows", [1, 3, 5, 8, 13, 20])
def test_the_kernel_computes_the_linear_layer_within_bf16_rounding(built, out_features, in_features, rows):
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    bias = torch.randn(out_features, generator=generator).bfloat16()
    x = torch.randn(2, rows, in_features, generator=generator).bfloat16()
    packed = kernels.pack(weight)
    for b in (bias, None):
        got = kernels.linear(x, packed, out_features, b)
        exact = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
        assert got.shape == (2, rows, out_features) and got.dtype == torch.bfloat16
        # one rounding to bf16 of a float32 sum: within half a bf16 step (2^-8 relative) plus float32's error
        tolerance = exact.abs() * 2**-8 + 1e-3 * in_features**0.5
        assert ((got.double() - exact).abs() <= tolerance).all()


def test_packing_keeps_every_weight_once(built):
    weight = torch.randn(37, 11).bfloat16()
    packed = kernels.pack(weight)
    assert packed.shape == (3, 6, 16, 2)
    values = packed.permute(0, 2, 1, 3).reshape(48, 12)  # back to [out, in], padded
    assert torch.equal(values[:37, :11], weight)
    assert not values[37:].any() and not values[:, 11:].any()


def test_a_packed_weight_uses_the_kernel_only_where_it_pays(built, monkeypatch):
    weight = torch.randn(32, 16).bfloat16()
    monkeypatch.setattr(kernels, "pays", lambda: True)
    assert PackedWeight(weight).native
    monkeypatch.setattr(kernels, "pays", lambda: False)
    packed = PackedWeight(weight)
    assert not packed.native
    x = torch.randn(3, 16).bfloat16()
    torch.testing.assert_close(packed(x, None), torch.nn.functional.linear(x, weight))


def test_switching_the_kernel_off_by_environment(monkeypatch):
    monkeypatch.setenv("TUNESMITH_KERNELS", "0")
    assert not kernels.pays()


def test_a_kernel_that_cannot_be_built_leaves_generation_on_onednn(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def no_compiler(**_):
        raise RuntimeError("g++: command not found")

    kernels.available.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(kernels, "pays", lambda: True)
    try:
        assert not kernels.available()
        assert "could not be built (g++: command not found)" in caplog.text
        assert not PackedWeight(torch.randn(8, 4).bfloat16()).native
    finally:
        kernels.available.cache_clear()


@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_the_kernels_rms_norm_is_the_families_formula(built, family):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = (Gemma3RMSNorm(96, eps=1e-6) if family == "gemma" else LlamaRMSNorm(96, eps=1e-6)).bfloat16()
    torch.nn.init.normal_(norm.weight, 0.5, 0.3)
    x = (torch.randn(3, 5, 96) * 4).bfloat16()
    scale = 1.0 + norm.weight.float() if family == "gemma" else norm.weight.float()
    with torch.inference_mode():
        own = norm(x)
        got = kernels.rms_norm(x, scale, 1e-6, weight_after=family == "llama")
    # the same formula; the sum of squares runs in another order, so a value may land one bf16 step away
    step = own.float().abs() * 2**-7 + 1e-6
    assert got.dtype == torch.bfloat16 and ((got.float() - own.float()).abs() <= step).all()
    assert (got == own).float().mean() > 0.95


def test_only_bf16_weights_in_cpu_memory_go_through_the_kernel(built, monkeypatch):
    monkeypatch.setattr(kernels, "pays", lambda: True)  # a GPU host's CPU often has AVX512-BF16 too
    assert kernels.takes(torch.zeros(4, 4, dtype=torch.bfloat16))
    assert not kernels.takes(torch.zeros(4, 4, dtype=torch.bfloat16, device="meta"))  # stands in for CUDA's
    assert not kernels.takes(torch.zeros(4, 4))


@pytest.mark.parametrize("width", [2048, 7])  # 16 lanes at a time, and the plain loop of a tail
def test_the_gated_mlp_input_is_as_exact_as_torchs(built, width):
    """bf16(bf16(act(gate)) * up): SiLU and GELU (tanh form) within one bf16 step of the float64 result, and as
    often exact as torch's (whose 1 + tanh cancels where tanh is near -1)."""
    generator = torch.Generator().manual_seed(width)
    gate = (torch.randn(64, width, generator=generator) * 3).bfloat16()
    up = torch.randn(64, width, generator=generator).bfloat16()
    x = gate.double()
    for gelu, exact_act, theirs in (
        (True, 0.5 * x * (1 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x**3))),
         torch.nn.functional.gelu(gate, approximate="tanh")),
        (False, x * torch.sigmoid(x), torch.nn.functional.silu(gate)),
    ):  # fmt: skip
        exact = (exact_act.bfloat16().double() * up.double()).bfloat16()
        ours = kernels.gated(gate, up, gelu)
        assert ours.dtype == torch.bfloat16 and ours.shape == gate.shape
        torch.testing.assert_close(ours.float(), exact.float(), rtol=2**-7, atol=1e-4)
        assert (ours != exact).sum() <= (theirs * up != exact).sum() + gate.numel() // 100


def test_greedy_picks_equal_torchs_argmax_ties_and_nans_included(built):
    logits = torch.randn(4, 262_147).bfloat16()  # a vocabulary not a multiple of 16
    logits[1, 5] = logits[1, 70_000] = logits[1].max() + 1  # a tie: the first wins
    logits[2, 123_456] = float("nan")  # a NaN wins, as in torch
    logits[3] = float("-inf")
    assert kernels.argmax(logits).tolist() == logits.argmax(-1).tolist()
    assert kernels.argmax(logits).tolist()[1:3] == [5, 123_456]


def _alone(x: torch.Tensor, weight: torch.Tensor) -> list[int]:
    """Each row's greedy pick over the bf16 logits the kernel's product gives for that row alone."""
    packed = kernels.pack(weight)
    return [int(kernels.argmax(kernels.linear(x[r : r + 1], packed, weight.shape[0], None))[0]) for r in range(len(x))]


@pytest.mark.parametrize("vocabulary, width", [(1000, 64), (4099, 130), (517, 7), (2000, 640)])
@pytest.mark.parametrize("rows", [1, 3, 8, 11])
def test_the_screen_picks_what_argmax_over_the_whole_output_layer_picks(built, vocabulary, width, rows):
    generator = torch.Generator().manual_seed(vocabulary + rows)
    weight = (torch.randn(vocabulary, width, generator=generator) * 0.05).bfloat16()
    weight[9] = weight[4]  # an exact tie with entry 4: the first of them wins
    weight[12] = weight[4]
    weight[12, 0] = (weight[4, 0].float() * (1 + 2**-6)).bfloat16()  # a near tie, far below int8's resolution
    weight[20] = weight[21] = weight[4] * 0.5
    weight[21, 1] = (weight[21, 1].float() * (1 - 2**-6)).bfloat16()
    x = torch.randn(rows, width, generator=generator).bfloat16()
    x[0] = (weight[4].float() * 40).bfloat16()  # confident: 4, 9 and 12 at the top, a rounding apart
    if rows > 1:
        x[1] = (weight[20].float() * 40).bfloat16()
        x[1, 0] = 300.0  # an outlier that coarsens the row's int8 rounding
    if rows > 2:
        x[2] = x[2] * 0.01  # small logits, close together
    got, computed = kernels.greedy(x, weight, kernels.screen(weight))
    assert got.dtype == torch.long and got.tolist() == _alone(x, weight)
    assert (computed >= 1).all() and (computed <= vocabulary).all()


def test_the_screen_computes_rows_it_cannot_narrow_whole_and_leaves_non_finite_ones_to_the_caller(built):
    weight = (torch.randn(40_000, 32) * 0.05).bfloat16()
    weight[7] = 0.0
    x = torch.randn(5, 32).bfloat16()
    x[1] = 0.0  # every logit 0: all 40,000 tie and the first wins
    x[2] = x[2] * 1e-4  # 40,000 logits within a few bf16 steps of each other
    x[3, 3] = float("nan")
    x[4, 0] = float("inf")
    got, computed = kernels.greedy(x, weight, kernels.screen(weight))
    assert got.tolist()[:3] == _alone(x[:3], weight) and got[1] == 0
    assert got.tolist()[3:] == [-1, -1]
    assert computed[0] < 100 and computed[1] == 40_000  # a confident row: a few entries; the flat one whole


def test_the_screen_holds_each_weight_rounded_to_int8_within_its_bound(built):
    weight = (torch.randn(37, 11) * 0.1).bfloat16()
    weight[5] = 0.0
    screen = kernels.screen(weight)
    assert screen.q.shape == (3, 3, 16, 4) and screen.q.dtype == torch.int8
    q = screen.q.permute(0, 2, 1, 3).reshape(48, 12)[:37, :11].double()  # back to [out, in]
    rounded = q * screen.scale.double()[:, None]
    assert ((weight.double() - rounded).norm(dim=1) <= screen.error.double()).all()
    assert torch.equal(screen.sums, q.sum(1).int())
    assert screen.q.abs().max() <= 127 and screen.scale[5] == 0 and not q[5].any()


def test_a_weight_that_is_not_finite_gets_no_screen(built):
    weight = torch.randn(40, 8).bfloat16()
    weight[3, 5] = float("nan")  # a NaN passes unseen through a max of absolute values
    with pytest.raises(RuntimeError, match="not finite"):
        kernels.screen(weight)
