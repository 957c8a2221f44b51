"""The restated decoder forward (tunesmith.decoder) gives the logits of the model's own forward, on every family it
takes, in prefill and decode, with LoRA merged, unmerged and switched off; it declines models whose bypassed modules
carry hooks, so the engine falls back to the model's forward there."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tunesmith.decoder import Decoder
from tunesmith.generation import Engine, Request, generation_view

SHAPE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256)  # fmt: skip


def gemma() -> Gemma3ForCausalLM:
    layers = ["sliding_attention", "full_attention", "sliding_attention"]
    config = Gemma3TextConfig(**SHAPE, sliding_window=4, layer_types=layers, query_pre_attn_scalar=8,
                              final_logit_softcapping=30.0)  # fmt: skip
    return Gemma3ForCausalLM(config)


FAMILIES = {
    "gemma3": gemma,
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SHAPE)),
}


def _random(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    for parameter in model.parameters():  # norms start at 0 or 1: random weights exercise every formula
        parameter.data.normal_(0, 0.3)
    return model.eval()


def _answers(model, prompts, rows: int, *, restated: bool) -> list[list[int]]:
    engine = Engine(model, max_rows=rows, max_length=64, prefill_chunk=5)
    if not restated:
        engine.decoder = None
    return [r.tokens for r in engine.run([Request(p, 10) for p in prompts])]


PROMPTS = [[5, 17, 3, 44, 9, 12, 61, 7], [8, 2, 90], [33, 1, 4, 15, 26, 11, 70, 3, 3, 19, 40, 6], [50]]


def _logits(engine: Engine, prompt: list[int], decode: int) -> torch.Tensor:
    """The engine's logits for the last position of `prompt`, prefilled but for its last `decode` tokens, which are
    then fed one decode step at a time."""
    cache = engine.cache
    head, tail = prompt[: len(prompt) - decode], prompt[len(prompt) - decode :]
    cache.slot, cache.start, cache.span = 0, torch.tensor([0]), len(head)
    positions = torch.arange(len(head))[None]
    logits = engine._forward(torch.tensor([head]), positions, positions[:, :, None], [None])
    cache.slot = None
    for offset, token in enumerate(tail):
        position = torch.tensor([len(head) + offset])
        cache.rows, cache.start, cache.span = 1, position, int(position) + 1
        logits = engine._forward(torch.tensor([[token]]), position[:, None], position[:, None, None], [None])
    return logits[:, -1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_restated_forward_gives_the_models_logits_in_prefill_and_decode(family):
    model = _random(FAMILIES[family](), 1)
    assert Decoder.of(model) is not None
    with torch.inference_mode():
        for decode in (0, 6):  # Gemma's sliding window (4) is passed in decode
            restated, own = Engine(model, max_rows=1, max_length=32), Engine(model, max_rows=1, max_length=32)
            own.decoder = None
            expected = _logits(own, PROMPTS[2], decode)
            torch.testing.assert_close(_logits(restated, PROMPTS[2], decode), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("rows", [1, 3])
def test_greedy_answers_match_the_models_forward_in_every_batch(family, rows):
    model = _random(FAMILIES[family](), 2)
    with torch.inference_mode():
        assert _answers(model, PROMPTS, rows, restated=True) == _answers(model, PROMPTS, rows, restated=False)


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_lora_merged_unmerged_and_off_answer_as_the_models_forward(family):
    model = _random(FAMILIES[family](), 3).to(torch.bfloat16)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    for merge in (True, False):
        with torch.inference_mode(), generation_view(peft, merge=merge):
            assert Decoder.of(peft) is not None
            assert _answers(peft, PROMPTS, 2, restated=True) == _answers(peft, PROMPTS, 2, restated=False)
            with peft.disable_adapter():
                assert _answers(peft, PROMPTS, 2, restated=True) == _answers(peft, PROMPTS, 2, restated=False)


def test_a_model_with_hooks_on_a_layer_keeps_its_own_forward():
    model = _random(FAMILIES["llama"](), 4)
    handle = model.model.layers[1].mlp.register_forward_hook(lambda module, args, output: output * 2)
    assert Decoder.of(model) is None
    assert Engine(model, max_rows=1, max_length=32).decoder is None
    handle.remove()
    assert Decoder.of(model) is not None


def test_an_unknown_family_keeps_its_own_forward():
    from transformers import GPT2Config, GPT2LMHeadModel

    assert Decoder.of(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))) is None


def test_a_model_wrapped_in_another_module_keeps_its_own_forward():
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_base_model(self):
            return self.inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    assert Decoder.of(Wrapper(_random(FAMILIES["llama"](), 5))) is None
