"""Each technique trains a tiny model (loss falls, only the intended parameters change) and round-trips
save / load (identical outputs) and merge (equal outputs within tolerance) where merging is defined."""

import pytest
import torch

from tunesmith.config import RunConfig
from tunesmith.methods import (
    METHODS,
    apply_method,
    count_parameters,
    load_base,
    load_trained,
    merged_model,
    method_of,
    save_trained,
)
from tunesmith.train.batching import collate
from tunesmith.train.loop import fit

from .conftest import build_tokenizer
from .test_train import examples_for, snapshot


def make_config(method, **sections):
    return RunConfig.model_validate(
        {"method": method, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "adapter": {"reduction_factor": 4}} | sections
    )


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def expected_trainable(method, name):
    return {"lora": "lora_", "dora": "lora_", "qlora": "lora_", "adapter": "_bottleneck"}.get(method, "") in name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_only_its_parameters_and_round_trips(method, tiny_model_dir, chat_file, tmp_path):
    tokenizer = build_tokenizer()
    config = make_config(method)
    model, trainable = apply_method(load_base(config, str(tiny_model_dir)), config)
    counted, total = count_parameters(model)
    assert trainable == counted and 0 < trainable <= total
    if not method_of(config).base_in_fp32:
        assert trainable < total / 2
    before = snapshot(model)
    examples = examples_for(chat_file, tokenizer)
    result = fit(
        model,
        examples,
        config.train.model_copy(update={"max_steps": 8, "batch_size": 8, "lr": 2e-2}),
        tokenizer.pad_token_id,
    )
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert expected_trainable(method, name), name
            assert not torch.equal(parameter, before[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(parameter, before[name]), f"frozen {name} changed"

    model.eval()
    batch = collate(examples[:3], tokenizer.pad_token_id)
    trained = logits(model, batch)
    save_trained(model, config, tmp_path / "w")
    reloaded = load_trained(config, str(tiny_model_dir), tmp_path / "w").eval()
    torch.testing.assert_close(logits(reloaded, batch), trained, rtol=0, atol=0)
    if method_of(config).merge is not None:  # every registered method that defines a merge is checked
        merged = merged_model(config, str(tiny_model_dir), tmp_path / "w").eval()
        assert not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(logits(merged, batch), trained, rtol=1e-4, atol=1e-4)


def test_qlora_layers_are_4bit(tiny_model_dir):
    import bitsandbytes as bnb

    model = load_base(make_config("qlora"), str(tiny_model_dir))
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert quantized[0].weight.quant_state.quant_type == "nf4"


def test_adapter_starts_as_the_base_model(tiny_model_dir, chat_file):
    tokenizer = build_tokenizer()
    config = make_config("adapter", adapter={"placement": "mlp", "reduction_factor": 8})
    base = load_base(config, str(tiny_model_dir)).eval()
    batch = collate(examples_for(chat_file, tokenizer)[:2], tokenizer.pad_token_id)
    expected = logits(base, batch)
    model, trainable = apply_method(base, config)
    assert trainable == 2 * (32 * 4 + 4 + 4 * 32 + 32)  # two MLP adapters of width 32/8
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)


def test_full_options_freeze_embeddings_and_train_top_layers(tiny_model_dir):
    config = make_config("full", full={"freeze_embeddings": True})
    model, _ = apply_method(load_base(config, str(tiny_model_dir)), config)
    assert not model.get_input_embeddings().weight.requires_grad
    assert model.model.layers[0].self_attn.q_proj.weight.requires_grad
    config = make_config("full", full={"top_k_layers": 1})
    model, trainable = apply_method(load_base(config, str(tiny_model_dir)), config)
    assert not any(p.requires_grad for p in model.model.layers[0].parameters())
    assert all(p.requires_grad for p in model.model.layers[1].parameters())
    assert model.lm_head.weight.requires_grad and not model.get_input_embeddings().weight.requires_grad
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
