"""GGUF exports tokenize like training: llama.cpp splits digits, spaces and scripts exactly as transformers does.

Byte-level BPE tokenizers with the pre-tokenizers of GPT-2, Llama 3, Qwen2 and Qwen3.5 are trained in-process
on a tiny corpus, written by our GGUF writer and read back by llama-cpp-python (vocab only).
"""

from __future__ import annotations

import json
import shutil
import unicodedata

import pytest

from tests.conftest import CORPUS, build_model, build_tokenizer
from tunesmith.deploy import gguf_writer
from tunesmith.deploy.gguf_writer import pre_tokenizer_name, write_gguf
from tunesmith.errors import TunesmithError

# The Split regexes as published in each family's tokenizer.json, written out here rather than imported so
# that the writer's table is checked against the originals.
CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
LLAMA3 = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN35 = (
    CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

PROBES = [
    "1234567 and 3.14159",
    "In 2024, 1,000,000 people paid $12.50 (about 99.9%) each.",
    "a  b   c    d     e",
    "line one\nline two\n\n\tindented\r\n  two spaces\n\n\n",
    "\t\ttabs\tand \t mixed \n whitespace   ",
    "naïve café, Émile, ÉCOLE, Straße, über, Ångström",
    "東京は日本の首都です。中文测试，你好世界！",
    "नमस्ते दुनिया, हिन्दी",  # combining vowel signs (\p{M}) inside words
    "emoji 😀👍🏽 and 🇫🇷 flags 🎉🎉",
    "I'm sure they're done; we'll see, it'd've been FINE'S",
    "mixed: x=42;y='it'\tπ≈3.14 你好 world!! v2.0.1-rc3 0x1F ²³ ٣٤٥",
    "   leading spaces, trailing newline\n",
]


def _tokenizer(steps: list, normalizer=None, ignore_merges: bool = False):
    """A byte-level BPE trained on the probes and a small corpus, with the given pre-tokenizer steps."""
    from tokenizers import pre_tokenizers

    return build_tokenizer(
        pre_tokenizer=pre_tokenizers.Sequence(steps),
        normalizer=normalizer,
        ignore_merges=ignore_merges,
        corpus=CORPUS + PROBES,
        vocab_size=700,
    )


def _split(regex: str):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)


def _bytes(use_regex: bool):
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def _family(name: str):
    from tokenizers import normalizers, pre_tokenizers

    return {
        "gpt-2": lambda: _tokenizer([_bytes(use_regex=True)]),
        "llama-bpe": lambda: _tokenizer([_split(LLAMA3), _bytes(use_regex=False)], ignore_merges=True),
        "smaug-bpe": lambda: _tokenizer([_split(LLAMA3), _bytes(use_regex=False)]),
        "qwen2": lambda: _tokenizer([_split(QWEN2), _bytes(use_regex=False)], normalizer=normalizers.NFC()),
        "qwen35": lambda: _tokenizer([_split(QWEN35), _bytes(use_regex=False)]),
        "smollm": lambda: _tokenizer([pre_tokenizers.Digits(individual_digits=True), _bytes(use_regex=True)]),
    }[name]()


def _gguf(tokenizer, path):
    model = build_model(len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    write_gguf(model, tokenizer, "{{ messages[0]['content'] }}", None, path, kind="f32")
    return path


def _mismatches(llama_cpp, tokenizer, path) -> list[str]:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return [
        text
        for text in PROBES
        if llm.tokenize(text.encode(), add_bos=False, special=False)
        != tokenizer(text, add_special_tokens=False)["input_ids"]
    ]


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")


FAMILIES = ["gpt-2", "llama-bpe", "smaug-bpe", "qwen2", "qwen35", "smollm"]


def test_probes_are_normalized_text():
    # NFC is let through for Qwen2 on the grounds that composed text is the norm; the probes are such text.
    assert all(unicodedata.is_normalized("NFC", text) for text in PROBES)


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_tokenizes_the_export_like_transformers(llama_cpp, family, tmp_path):
    import gguf

    tokenizer = _family(family)
    path = _gguf(tokenizer, tmp_path / f"{family}.gguf")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == family
    assert _mismatches(llama_cpp, tokenizer, path) == []


# Pairs where the family's vocabulary has tokens the wrong split cannot reach (multi-digit numbers, words with
# their combining marks); the other way round the probes may tokenize alike.
WRONG_LABELS = [
    ("llama-bpe", "gpt-2"),
    ("qwen2", "gpt-2"),
    ("llama-bpe", "qwen2"),
    ("qwen35", "qwen2"),
    ("gpt-2", "smollm"),
]


@pytest.mark.parametrize("family,wrong", WRONG_LABELS)
def test_the_probes_catch_a_wrong_label(llama_cpp, family, wrong, tmp_path, monkeypatch):
    """The old fixed 'gpt-2' label, and near neighbours, visibly mis-tokenize: the probe set has teeth."""
    tokenizer = _family(family)
    monkeypatch.setattr(gguf_writer, "pre_tokenizer_name", lambda _: wrong)
    assert _mismatches(llama_cpp, tokenizer, _gguf(tokenizer, tmp_path / "wrong.gguf"))


def _whole_word_tokenizer(ignore_merges: bool):
    """'abc' is in the vocabulary but the merges, applied in order, stop at ['a', 'bc']."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for char in pre_tokenizers.ByteLevel.alphabet():
        vocab[char] = len(vocab)
    for token in ("bc", "ab", "abc"):
        vocab[token] = len(vocab)
    merges = [("b", "c"), ("a", "b"), ("ab", "c")]
    core = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    core.pre_tokenizer = pre_tokenizers.Sequence([_split(LLAMA3), _bytes(use_regex=False)])
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.mark.parametrize("ignore_merges,label", [(True, "llama-bpe"), (False, "smaug-bpe")])
def test_whole_word_lookup_follows_the_tokenizer(llama_cpp, ignore_merges, label, tmp_path):
    tokenizer = _whole_word_tokenizer(ignore_merges)
    expected = tokenizer("abc", add_special_tokens=False)["input_ids"]
    assert len(expected) == (1 if ignore_merges else 2)
    assert pre_tokenizer_name(tokenizer) == label
    llm = llama_cpp.Llama(model_path=str(_gguf(tokenizer, tmp_path / "w.gguf")), vocab_only=True, verbose=False)
    assert llm.tokenize(b"abc", add_bos=False, special=False) == expected


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param(lambda: [_split(GPT4O), _bytes(use_regex=False)], id="gpt-4o regex"),
        pytest.param(lambda: [_split(LLAMA3.replace("{1,3}", "{1,2}")), _bytes(use_regex=False)], id="edited regex"),
        pytest.param(lambda: [_bytes(use_regex=False)], id="no split at all"),
    ],
)
def test_a_pre_tokenizer_llama_cpp_cannot_match_is_refused(steps, tmp_path):
    tokenizer = _tokenizer(steps())
    with pytest.raises(TunesmithError, match="convert_hf_to_gguf.py"):
        _gguf(tokenizer, tmp_path / "refused.gguf")
    assert not (tmp_path / "refused.gguf").exists()


def test_a_normalizing_tokenizer_is_refused():
    from tokenizers import normalizers

    tokenizer = _tokenizer([_split(QWEN2), _bytes(use_regex=False)], normalizer=normalizers.Lowercase())
    with pytest.raises(TunesmithError, match="normalizes text"):
        pre_tokenizer_name(tokenizer)


def test_export_refuses_an_unknown_pre_tokenizer_before_loading_the_model(lora_run, tmp_path, monkeypatch):
    from tunesmith.deploy import export

    def never(_run_dir):
        raise AssertionError("the model was loaded for an export that is refused")

    monkeypatch.setattr(export, "_merged", never)
    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("export"))
    tokenizer_file = run / "tokenizer" / "tokenizer.json"
    spec = json.loads(tokenizer_file.read_text())
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\p{N}{1,4}"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    tokenizer_file.write_text(json.dumps(spec))
    with pytest.raises(TunesmithError, match="pre_tokenizer"):
        export.export_run(run, "gguf", tmp_path / "out")
    assert list(tmp_path.iterdir()) == [run]  # nothing written, not even a staging folder
