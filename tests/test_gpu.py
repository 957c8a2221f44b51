"""The GPU path, run where a CUDA GPU exists (bench/gpu_check.sh on a lent machine); skipped elsewhere.

Each test checks what a CPU cannot: autocast and loss scaling on CUDA, every tensor on the model's device,
compile on the GPU, QLoRA's device map.
"""

import pytest
import torch

from tunesmith.evaluate.generate import generate
from tunesmith.methods import apply_method, load_base, training_dtype
from tunesmith.train import precision as prec
from tunesmith.train.loop import fit

from .conftest import build_tokenizer
from .test_methods import make_config
from .test_train import examples_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run bench/gpu_check.sh on one)"),
]


def _train(tiny_model_dir, chat_file, method, steps=8, **train):
    tokenizer = build_tokenizer()
    config = make_config(method, train={"dtype": "auto", **train})
    chosen = prec.resolve(config.train.dtype, device="cuda")
    model, _ = apply_method(load_base(config, str(tiny_model_dir), training_dtype(config, chosen.dtype)), config)
    settings = config.train.model_copy(update={"max_steps": steps, "batch_size": 8, "lr": 2e-2})
    result = fit(model, examples_for(chat_file, tokenizer), settings, tokenizer.pad_token_id, precision=chosen)
    return model, result, chosen, tokenizer


@pytest.mark.parametrize("method", ["lora", "dora", "adapter", "full"])
def test_auto_dtype_trains_on_the_gpu_with_everything_on_it(method, tiny_model_dir, chat_file):
    model, result, chosen, _ = _train(tiny_model_dir, chat_file, method)
    assert chosen.name == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    if method != "full":
        assert {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()} == {chosen.dtype}


def test_fp16_with_loss_scaling_trains(tiny_model_dir, chat_file):
    model, result, chosen, _ = _train(tiny_model_dir, chat_file, "lora", dtype="fp16")
    assert chosen.name == "fp16" and result.skipped_steps == 0
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_generation_inputs_follow_the_model_to_the_gpu(tiny_model_dir, chat_file):
    model, _, _, tokenizer = _train(tiny_model_dir, chat_file, "lora", steps=2)
    from tunesmith.data.formats import Message

    answers = generate(model.eval(), tokenizer, [(Message("user", "colour red item 1"),)], max_new_tokens=4)
    assert len(answers) == 1


def test_compile_and_packing_on_the_gpu(tiny_model_dir, chat_file):
    model, result, _, _ = _train(tiny_model_dir, chat_file, "lora", steps=4, compile=True, packing=True)
    assert all(layer._compiled_call_impl is not None for layer in model.get_decoder().layers)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_qlora_device_map_puts_the_4bit_base_on_the_gpu(tiny_model_dir, chat_file):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed on this GPU machine")
    model, result, _, _ = _train(tiny_model_dir, chat_file, "qlora", steps=4)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert result.history[-1]["loss"] < result.history[0]["loss"]
