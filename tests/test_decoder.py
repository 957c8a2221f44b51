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


# --- The native decode step (kernels.decode_layer) ------------------------------------------------------------


def _qwen2_with_bias():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**SHAPE))  # q, k and v carry biases


def _wide_gemma():
    """Heads of 32: the kernel's vectorised RoPE and attention (16 lanes) rather than its plain loops."""
    layers = ["sliding_attention", "full_attention", "sliding_attention"]
    shape = SHAPE | {"head_dim": 32, "hidden_size": 64}
    return Gemma3ForCausalLM(Gemma3TextConfig(**shape, sliding_window=4, layer_types=layers, query_pre_attn_scalar=32))


NATIVE = {**FAMILIES, "qwen2": _qwen2_with_bias, "gemma3-wide": _wide_gemma}


@pytest.fixture
def native(monkeypatch):
    """The kernel built and used on this CPU whatever its flags (the plain loop where AVX512-BF16 is missing)."""
    from tunesmith import kernels

    if not kernels.available():
        pytest.skip("no C++ compiler here: decode steps run the restated forward (tested above)")
    monkeypatch.setattr(kernels, "pays", lambda: True)


def _decoding_engine(model, prompts) -> Engine:
    """An engine whose rows have all been prefilled (rows at different positions, past Gemma's sliding window)."""
    engine = Engine(model, max_rows=len(prompts), max_length=48, prefill_chunk=5)
    for prompt in prompts:
        engine.submit(Request(prompt, 20))
    while engine.waiting or any(row.next_token is None for row in engine.rows):
        engine.step()
    for _ in range(3):  # a few decode steps so the rows' positions differ by more than their prompts
        engine.step()
    return engine


def _one_step(engine: Engine, native: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits of one decode step of every row, and the cache it leaves, through the native step or the
    restated forward (on a copy of the cache, so both start from the same state)."""
    rows = engine.rows
    ids = torch.tensor([[row.next_token] for row in rows])
    positions = torch.tensor([row.position for row in rows])
    cache = engine.cache
    saved = [tensor.clone() for tensor in cache.keys + cache.values]
    cache.rows, cache.start, cache.span = len(rows), positions, int(positions.max()) + 1
    decoder = engine.decoder
    if native:
        everyone = list(range(len(rows)))
        logits = decoder.step(ids[:, 0], torch.tensor(everyone), positions, everyone, cache)
        assert logits is not None, "the native step declined a model it should take"
        logits = logits[:, None]
    else:
        logits = decoder(ids, positions[:, None], engine._masks(positions[:, None, None]), cache)
    after = [tensor.clone() for tensor in cache.keys + cache.values]
    for tensor, before in zip(cache.keys + cache.values, saved, strict=True):
        tensor.copy_(before)
    return logits[:, -1].float(), after


@pytest.mark.parametrize("family", sorted(NATIVE))
@pytest.mark.parametrize("adapter", ["merged", "off"])
def test_the_native_decode_step_gives_the_restated_logits_and_cache(native, family, adapter):
    model = _random(NATIVE[family](), 6).to(torch.bfloat16)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    prompts = [PROMPTS[2], PROMPTS[0], PROMPTS[1]]
    with torch.inference_mode(), generation_view(peft):
        context = peft.disable_adapter() if adapter == "off" else torch.inference_mode()
        with context:
            engine = _decoding_engine(peft, prompts)
            ours, our_cache = _one_step(engine, native=True)
            theirs, their_cache = _one_step(engine, native=False)
    # the same ops rounded at the same points; only the attention's sums run in another order (float32, then one
    # bf16 rounding of each head's output), which moves a logit by a few bf16 steps at most
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 0.03 * scale, (ours - theirs).abs().max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 2 / 3
    for mine, expected in zip(our_cache, their_cache, strict=True):  # keys and values written where and as theirs
        _close_to_rounding(mine, expected)


def test_the_native_step_follows_the_adapter_switch(native):
    model = _random(FAMILIES["llama"](), 7).to(torch.bfloat16)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    with torch.inference_mode(), generation_view(peft):
        engine = _decoding_engine(peft, [PROMPTS[0]])
        tuned, _ = _one_step(engine, native=True)
        with peft.disable_adapter():
            base, _ = _one_step(engine, native=True)
            base_restated, _ = _one_step(engine, native=False)
        assert len(engine.decoder.plans) == 2  # one plan a state, made once
    assert not torch.allclose(tuned, base)
    assert (base - base_restated).abs().max() <= 0.03 * base_restated.abs().max()


def test_the_native_step_declines_weights_it_does_not_compute(native, monkeypatch):
    from tunesmith import kernels

    model = _random(FAMILIES["gemma3"](), 8).to(torch.bfloat16)
    with torch.inference_mode():
        engine = _decoding_engine(model, [PROMPTS[0]])  # no generation_view: nothing packed
        step = (torch.tensor([3]), torch.tensor([0]), torch.tensor([engine.rows[0].position]), [0], engine.cache)
        assert engine.decoder.step(*step) is None
        peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
        with generation_view(peft, merge=False):  # an unmerged adapter: three products a layer, not one
            assert Decoder.of(peft).step(*step) is None
        monkeypatch.setattr(kernels, "pays", lambda: False)  # TUNESMITH_KERNELS=0, or a CPU without AVX512-BF16
        with generation_view(model):
            assert Decoder.of(model).step(*step) is None


def test_answers_through_the_native_step_equal_the_restated_forwards(native):
    model = _random(FAMILIES["gemma3"](), 9).to(torch.bfloat16)
    with torch.inference_mode(), generation_view(model):
        native_answers = _answers(model, PROMPTS, 3, restated=True)
        engine = Engine(model, max_rows=3, max_length=64, prefill_chunk=5)
        engine.decoder.run = lambda *args: None  # type: ignore[method-assign]  # the native layer off
        restated = [r.tokens for r in engine.run([Request(p, 10) for p in PROMPTS])]
    assert sum(a == b for a, b in zip(native_answers, restated, strict=True)) >= 3


@pytest.mark.parametrize("family", ["gemma3", "gemma3-wide", "llama"])
def test_one_native_step_reads_a_prompt_beside_decoding_rows_as_the_restated_forward(native, family):
    """A step's tokens in one pass: two rows' next tokens and a 12-token prompt (past Gemma's window of 4) in the
    third slot give the logits and cache of the restated forward reading the prompt, then decoding the rows."""
    model = _random(NATIVE[family](), 10).to(torch.bfloat16)
    prompt = PROMPTS[1] + PROMPTS[3] + PROMPTS[0]
    with torch.inference_mode(), generation_view(model):
        engine = Engine(model, max_rows=3, max_length=48, prefill_chunk=5)
        for other in (PROMPTS[2], PROMPTS[0]):
            engine.submit(Request(other, 20))
        while engine.waiting or any(row.next_token is None for row in engine.rows):
            engine.step()
        rows, cache, decoder = engine.rows, engine.cache, engine.decoder
        saved = [tensor.clone() for tensor in cache.keys + cache.values]
        ids = [row.next_token for row in rows] + prompt
        slots = [0, 1] + [2] * len(prompt)
        positions = [row.position for row in rows] + list(range(len(prompt)))
        keep = [0, 1, len(ids) - 1]
        ours = decoder.step(torch.tensor(ids), torch.tensor(slots), torch.tensor(positions), keep, cache)
        assert ours is not None, "the native step declined a model it should take"
        our_cache = [tensor.clone() for tensor in cache.keys + cache.values]
        for tensor, before in zip(cache.keys + cache.values, saved, strict=True):
            tensor.copy_(before)
        cache.slot, cache.start, cache.span = 2, torch.tensor([0]), len(prompt)
        span = torch.arange(len(prompt))[None]
        read = decoder(torch.tensor([prompt]), span, engine._masks(span[:, :, None]), cache)[:, -1]
        cache.slot = None
        at = torch.tensor([row.position for row in rows])
        cache.rows, cache.start, cache.span = 2, at, int(at.max()) + 1
        next_tokens = torch.tensor([[row.next_token] for row in rows])
        decoded = decoder(next_tokens, at[:, None], engine._masks(at[:, None, None]), cache)[:, -1]
        theirs = torch.cat([decoded, read]).float()
    assert ours.shape == theirs.shape
    assert (ours.float() - theirs).abs().max() <= 0.03 * theirs.abs().max()
    for mine, expected in zip(our_cache, cache.keys + cache.values, strict=True):
        _close_to_rounding(mine, expected)


def _close_to_rounding(mine: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to a few bf16 steps of the largest entry (a later layer's keys carry the earlier layers' rounding of
    the attention sums); a key written to the wrong slot or position is off by the entries themselves."""
    torch.testing.assert_close(mine, expected, rtol=0.02, atol=0.01 * float(expected.abs().max()))


def test_greedy_picks_through_the_output_layers_screen_are_each_rows_argmax(native, monkeypatch):
    """The engine's greedy rows pick through the screen (kernels.greedy) without logits: the same tokens as the
    argmax over each row's logits from the whole output layer, in every batch; sampled rows still get logits."""
    from tunesmith import kernels

    model = _random(FAMILIES["llama"](), 11).to(torch.bfloat16)  # the test Gemma's soft cap takes no screen
    calls = []
    screened = kernels.greedy
    monkeypatch.setattr(kernels, "greedy", lambda *args: calls.append(1) or screened(*args))
    with torch.inference_mode(), generation_view(model):
        answers = _answers(model, PROMPTS, 3, restated=True)
        assert calls, "the screen was not used"
        count = len(calls)

        def whole(self, hidden):
            return [int(kernels.argmax(self.logits(hidden[r : r + 1]))[0]) for r in range(len(hidden))]

        monkeypatch.setattr(Decoder, "greedy", whole)
        assert _answers(model, PROMPTS, 3, restated=True) == answers
        sampled = Engine(model, max_rows=2, max_length=64).run([Request(PROMPTS[0], 5, temperature=1.0, seed=3)])
        assert len(sampled[0].tokens) == 5 and len(calls) == count


def test_the_screen_rests_where_it_keeps_computing_rows_whole(native, monkeypatch):
    """A model with flat distributions leaves rows the screen cannot narrow; after a few such steps the engine
    computes logits instead (the same answers: up to 4 rows the product sums each row as it does alone) and tries
    the screen again later."""
    from tunesmith import decoder as decoder_module
    from tunesmith import kernels

    model = _random(FAMILIES["llama"](), 11).to(torch.bfloat16)
    real, steps_screened = kernels.greedy, []

    def flat(*args):
        steps_screened.append(step)
        picks, computed = real(*args)
        return picks, torch.full_like(computed, 10**6)  # as if every row had been computed whole

    with torch.inference_mode(), generation_view(model):
        answers = _answers(model, PROMPTS, 3, restated=True)
        monkeypatch.setattr(kernels, "greedy", flat)
        monkeypatch.setattr(decoder_module, "SCREEN_REST", 4)
        engine = Engine(model, max_rows=3, max_length=64, prefill_chunk=5)
        requests = [Request(p, 10) for p in PROMPTS]
        for request in requests:
            engine.submit(request)
        step = 0
        while engine.busy:
            engine.step()
            step += 1
    rested = [b - a for a, b in zip(steps_screened, steps_screened[1:], strict=False) if b - a > 1]
    assert rested and all(gap == 5 for gap in rested)  # 4 steps without the screen, then it is tried again
    assert [r.tokens for r in requests] == answers
