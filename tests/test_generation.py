"""The generation engine (tunesmith.generation) on a tiny random Llama: greedy answers equal transformers'
generate for every prompt whatever joins or leaves the batch, seeded sampling is the same alone and in a batch,
stops and cancellation end a row at once."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_model
from tunesmith.generation import Engine, Request


@pytest.fixture(scope="module")
def model():
    return build_model(100, seed=3, num_hidden_layers=3).eval()


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 100, (n,), generator=generator).tolist() for n in (5, 9, 3, 12, 7, 4, 10, 6, 8, 11)]


def _reference(model, prompt: list[int], tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0)  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("rows, chunk", [(1, 256), (3, 4), (8, 2)])
def test_greedy_answers_equal_transformers_whatever_the_batch(model, rows, chunk):
    prompts = _prompts()
    engine = Engine(model, max_rows=rows, max_length=64, prefill_chunk=chunk)
    requests = engine.run([Request(p, 12) for p in prompts])
    assert [r.tokens for r in requests] == [_reference(model, p, 12) for p in prompts]
    assert all(r.finish_reason == "length" for r in requests)


def test_a_row_joining_a_running_batch_answers_as_alone(model):
    prompts = _prompts()
    engine = Engine(model, max_rows=4, max_length=64)
    first = Request(prompts[0], 12)
    engine.submit(first)
    for _ in range(5):
        engine.step()  # the first row is mid-answer when the others arrive
    late = [Request(p, 12) for p in prompts[1:4]]
    engine.run(late)
    assert first.tokens == _reference(model, prompts[0], 12)
    assert [r.tokens for r in late] == [_reference(model, p, 12) for p in prompts[1:4]]


def test_seeded_sampling_is_the_same_alone_and_beside_others(model):
    prompts = _prompts()
    alone = Engine(model, max_rows=1, max_length=64).run([Request(prompts[0], 10, temperature=0.9, seed=7)])[0]
    crowd = [Request(p, 10, temperature=0.9, seed=7 if i == 0 else i) for i, p in enumerate(prompts[:5])]
    Engine(model, max_rows=5, max_length=64).run(crowd)
    assert crowd[0].tokens == alone.tokens


def test_stops_and_cancellation_end_a_row_at_once(model):
    prompts = _prompts()
    reference = _reference(model, prompts[1], 12)
    stop = Request(prompts[1], 12, stop_ids=frozenset({reference[3]}))
    text_stop = Request(prompts[1], 12, on_token=lambda request, token: len(request.tokens) == 2)
    flag = {"gone": False}
    cancelled = Request(prompts[2], 12, cancelled=lambda: flag["gone"])
    engine = Engine(model, max_rows=4, max_length=64)
    for request in (stop, text_stop, cancelled):
        engine.submit(request)
    engine.step()
    flag["gone"] = True
    while engine.busy:
        engine.step()
    assert stop.tokens == reference[: reference.index(reference[3]) + 1] and stop.finish_reason == "stop"
    assert text_stop.tokens == reference[:2] and text_stop.finish_reason == "stop"
    assert cancelled.finish_reason == "cancelled" and len(cancelled.tokens) <= 1
