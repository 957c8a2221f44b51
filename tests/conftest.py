"""Tiny random models and tokenizers built in-process: no network, no files outside the test's tmp dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

CORPUS = [
    "The patient reports chest pain and shortness of breath.",
    "Summarise the note as a JSON record with age, sex and diagnosis.",
    '### User:\n### Assistant:\n{"age": 54, "sex": "F"}',
    "hello world, the quick brown fox jumps over the lazy dog 0123456789",
]


def build_tokenizer(
    chat_template: str | None = None,
    pre_tokenizer=None,
    normalizer=None,
    ignore_merges: bool = False,
    corpus: list[str] | None = None,
    vocab_size: int = 300,
):
    """A byte-level BPE trained in-process on `corpus` (default: CORPUS); GPT-2's pre-tokenizer unless given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None, ignore_merges=ignore_merges))
    core.normalizer = normalizer
    core.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator((corpus or CORPUS) * 5, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_model(vocab_size: int, seed: int = 0, **shape):
    """A random Llama; 2 layers of width 32 unless `shape` overrides LlamaConfig fields."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    defaults = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    config = LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, **(defaults | shape))
    return LlamaForCausalLM(config)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep the tokenize and model caches of every test inside the test's own temporary directory."""
    os.environ["TUNESMITH_CACHE"] = str(tmp_path_factory.mktemp("tunesmith-cache"))


@pytest.fixture(autouse=True)
def _no_code_grants():
    """Each test starts with no user code allowed, as a fresh `tunesmith` process does (grants are per process)."""
    from tunesmith import trust

    trust.reset()
    yield
    trust.reset()


# train.dtype auto would pick bf16 on CPUs with AVX512-BF16 and fp32 on the others: tests that do not pin a dtype
# get fp32 on every CPU (subprocesses inherit it), so their numbers do not depend on the machine CI gets.
os.environ["TUNESMITH_CPU_BF16"] = "0"


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved 2-layer Llama and its tokenizer, loadable as `model: <dir>`."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    build_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


FILLER = (
    "patient reports chest pain shortness breath note record age sex diagnosis hello world quick brown fox jumps"
).split()


def chat_prompt(i: int) -> str:
    """Item i's question: its colour, and three filler words that make items of one colour differ by more than
    a near-duplicate (data check would group "colour red item 0" with "colour red item 6": same answer)."""
    colours = ["red", "green", "blue", "black", "white", "pink"]
    filler = (FILLER[i % 17], FILLER[(i * 7 + 3) % 17], FILLER[(i * 5 + 11) % 17])
    return f"colour {colours[i % 6]} item {i} " + " ".join(filler)


def chat_records(n: int) -> list[dict]:
    """A learnable toy task: answer a colour question with a fixed JSON record."""
    colours = ["red", "green", "blue", "black", "white", "pink"]
    return [
        {
            "messages": [
                {"role": "user", "content": chat_prompt(i)},
                {"role": "assistant", "content": json.dumps({"colour": colours[i % 6]})},
            ]
        }
        for i in range(n)
    ]


@pytest.fixture
def chat_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", chat_records(40))


def train_lora_run(root: Path, model_dir: Path, name: str, seed: int = 0, *flags: str) -> Path:
    """A finished 4-step LoRA run of the colour task under root/runs/NAME (for export and serve tests)."""
    from tests.test_cli import train_args
    from tunesmith.cli import main

    data = write_jsonl(root / f"{name}.jsonl", chat_records(40))
    out = root / "runs" / name
    extra = ["--method", "lora", "--max-steps", "4", "--train.batch_size", "4", "--lr", "3e-2", "--quiet"]
    extra += ["--test-fraction", "0.25", "--set", "eval.max_new_tokens=8", "--train.seed", str(seed), *flags]
    assert main(train_args(model_dir, data, out, *extra)) == 0
    return out


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, tiny_model_dir) -> Path:
    return train_lora_run(tmp_path_factory.mktemp("deploy"), tiny_model_dir, "colours")


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tiny_model_dir, lora_run) -> list[Path]:
    """Two finished LoRA runs over one base, `colours` and `shades`, trained once for every serve and monitor test."""
    second = train_lora_run(tmp_path_factory.mktemp("second"), tiny_model_dir, "shades", 7, "--lr", "5e-2")
    return [lora_run, second]


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """`runs` served in a thread with an API key, one server per test module: (url, request log path, app)."""
    from tests.serve_helpers import serving
    from tunesmith.deploy.engine import Engine

    with serving(Engine(runs, queue_size=64), tmp_path_factory.mktemp("log")) as live:
        yield live
