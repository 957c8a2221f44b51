"""QLoRA gives the same, correct gradients on every CPU, whichever bitsandbytes kernel the CPU could take.

bitsandbytes repacks 4-bit weights for an AVX512-BF16 kernel (no autograd) the first time a layer runs in
eval mode without grad. Each test runs the same assertions on every CPU: the "bitsandbytes default" case
leaves bitsandbytes' own CPU detection in place (so it exercises the packed path exactly where a CPU has
the instructions), and the "forced packed" case needs AVX512-BF16 and says so when it skips.
"""

import pytest
import torch

from tunesmith.methods import apply_method, load_base
from tunesmith.train.batching import collate
from tunesmith.train.speed import prepare_model, use_portable_kernels

from .conftest import build_model, build_tokenizer
from .test_methods import make_config
from .test_train import examples_for


def _has_avx512bf16() -> bool:
    import bitsandbytes.functional as bnb_f

    return bool(bnb_f.has_avx512bf16())


def _linear4bit(model):
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _require_packable(model) -> None:
    if not _has_avx512bf16():
        pytest.skip("needs a CPU with AVX512-BF16 to exercise bitsandbytes' packed kernel (this CPU has none)")
    if model.config.hidden_size % 64:
        pytest.skip("bitsandbytes' packed kernel cannot serve layers of width 32: nothing to force there")


def _lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _validation_pass(model, batch) -> None:
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.train()


@pytest.fixture(params=[32, 64], ids=["hidden32", "hidden64"])
def model_dir(request, tmp_path_factory):
    """Width 32 is too small for the packed kernel; width 64 (out features a multiple of 32) fits it."""
    tokenizer = build_tokenizer()
    path = tmp_path_factory.mktemp(f"qlora-{request.param}")
    build_model(len(tokenizer), hidden_size=request.param, intermediate_size=2 * request.param).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("kernels", ["bitsandbytes-default", "forced-packed"])
def test_gradients_equal_before_and_after_a_validation_pass(kernels, model_dir, chat_file):
    tokenizer = build_tokenizer()
    config = make_config("qlora")
    model, _ = apply_method(load_base(config, str(model_dir)), config)
    layers = _linear4bit(model)
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)  # load_base keeps it off
    if kernels == "forced-packed":
        _require_packable(model)
        for module in layers:  # as a 4-bit model loaded by anyone else comes: bitsandbytes' own choice
            module.support_avx512bf16_for_cpu = True
    prepare_model(model, config.train)  # what the training loop does first
    batch = collate(examples_for(chat_file, tokenizer)[:4], tokenizer.pad_token_id)
    before = _lora_grads(model, batch)
    _validation_pass(model, batch)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    after = _lora_grads(model, batch)
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, rtol=0, atol=0, msg=name)


def test_weights_already_packed_are_unpacked(model_dir):
    import bitsandbytes.functional as bnb_f

    model = load_base(make_config("qlora"), str(model_dir))
    _require_packable(model)
    layers = _linear4bit(model)
    original = [bnb_f.dequantize_4bit(m.weight.data, m.weight.quant_state) for m in layers]
    for module in layers:
        module.support_avx512bf16_for_cpu = True
    _validation_pass(model, {"input_ids": torch.tensor([[1, 5, 7]]), "attention_mask": torch.ones(1, 3)})
    assert all(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert use_portable_kernels(model) == len(layers)
    for module, weight in zip(layers, original, strict=True):
        assert not module.support_avx512bf16_for_cpu
        restored = bnb_f.dequantize_4bit(module.weight.data, module.weight.quant_state)
        # The packed layout keeps the block scales in bf16, so the way back is exact only up to bf16 rounding.
        torch.testing.assert_close(restored, weight, rtol=1e-2, atol=1e-3)


def test_eval_outputs_equal_train_mode_outputs(model_dir, chat_file):
    """Validation sees the numbers training sees (no bf16 kernel switched in for eval on some CPUs)."""
    tokenizer = build_tokenizer()
    config = make_config("qlora")
    model, _ = apply_method(load_base(config, str(model_dir)), config)
    batch = collate(examples_for(chat_file, tokenizer)[:4], tokenizer.pad_token_id)
    model.train()
    with torch.no_grad():
        train_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.eval()
    with torch.no_grad():
        eval_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(eval_logits, train_logits, rtol=0, atol=0)
