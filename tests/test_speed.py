"""The speed and memory switches change memory and time, never the numbers."""

import pytest
import torch

from tunesmith.config import LoraConfig, TrainConfig
from tunesmith.errors import TunesmithError
from tunesmith.methods.lora import apply_lora
from tunesmith.train.batching import collate
from tunesmith.train.loss import model_loss_sum
from tunesmith.train.speed import MemoryReleaser, attention_implementation, memory_releaser, prepare_model

from .conftest import build_model, build_tokenizer
from .test_train import examples_for


def loss_and_grads(chat_file, **switches):
    tokenizer = build_tokenizer()
    batch = collate(examples_for(chat_file, tokenizer)[:4], tokenizer.pad_token_id)
    batch = {k: v for k, v in batch.items() if k != "real_tokens"}
    model, _ = apply_lora(build_model(len(tokenizer), seed=5), LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # LoRA B starts at zero; give it values so its gradient path is exercised
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    model = prepare_model(model, TrainConfig(**switches))
    model.train()
    releaser = MemoryReleaser()
    releaser.attach(model)
    try:
        loss = model_loss_sum(model, batch)
        loss.backward()
    finally:
        releaser.detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, model


def test_gradient_checkpointing_and_memory_release_keep_loss_and_gradients(chat_file):
    plain_loss, plain_grads, plain = loss_and_grads(chat_file, gradient_checkpointing=False)
    ckpt_loss, ckpt_grads, checkpointed = loss_and_grads(chat_file, gradient_checkpointing=True)
    decoder = checkpointed.get_decoder()
    assert all(layer.gradient_checkpointing for layer in decoder.layers)
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in plain.get_decoder().layers)
    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert set(ckpt_grads) == set(plain_grads) and len(plain_grads) > 0
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_memory_releaser_hooks_every_layer_and_detaches(tiny_model_dir):
    model = build_model(300)
    releaser = MemoryReleaser()
    assert releaser.available  # glibc on these machines
    calls = []
    releaser.release = lambda: calls.append(1)
    releaser.attach(model)
    model(input_ids=torch.tensor([[1, 2, 3]]))
    assert len(calls) == len(model.get_decoder().layers)
    releaser.detach()
    model(input_ids=torch.tensor([[1, 2, 3]]))
    assert len(calls) == len(model.get_decoder().layers)


def test_memory_release_modes():
    cpu = torch.device("cpu")
    assert not memory_releaser(TrainConfig(), cpu).per_layer  # auto on CPU: after each step only
    assert memory_releaser(TrainConfig(release_memory="layer"), cpu).per_layer
    assert memory_releaser(TrainConfig(release_memory="off"), cpu) is None
    assert memory_releaser(TrainConfig(), torch.device("meta")) is None  # auto: only when training on CPU
    assert memory_releaser(TrainConfig(release_memory="step"), torch.device("meta")) is not None


def test_gpu_only_switches_fail_clearly_without_a_gpu():
    assert attention_implementation("auto") == "sdpa"
    assert attention_implementation("eager") == "eager"
    if not torch.cuda.is_available():
        with pytest.raises(TunesmithError, match="flash-attn"):
            attention_implementation("flash_attention_2")
        with pytest.raises(TunesmithError, match="liger"):
            prepare_model(build_model(300), TrainConfig(gradient_checkpointing=False, liger_kernels=True))


@pytest.mark.slow
def test_compile_compiles_the_layers_that_run_and_keeps_parameter_names(chat_file):
    """train.compile compiles each decoder layer in place: the loss path runs them, names stay checkpointable."""
    plain_loss, plain_grads, _ = loss_and_grads(chat_file, gradient_checkpointing=False)
    compiled_loss, compiled_grads, model = loss_and_grads(chat_file, gradient_checkpointing=False, compile=True)
    assert all(layer._compiled_call_impl is not None for layer in model.get_decoder().layers)
    assert set(compiled_grads) == set(plain_grads) and not any("_orig_mod" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(compiled_loss, plain_loss, rtol=1e-4, atol=1e-4)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_attention_auto_follows_the_gpu_and_flash_attn(monkeypatch):
    """The same assertions on any machine: GPU presence and flash-attn are faked both ways."""
    import importlib.util

    from tunesmith.train import speed

    real_find_spec = importlib.util.find_spec
    for gpu in (False, True):
        for flash in (False, True):
            monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
            monkeypatch.setattr(
                importlib.util,
                "find_spec",
                lambda name, *a, flash=flash: object() if name == "flash_attn" and flash else real_find_spec(name, *a),
            )
            expected = "flash_attention_2" if gpu and flash else "sdpa"
            assert speed.attention_implementation("auto") == expected, (gpu, flash)
