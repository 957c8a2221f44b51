"""Write a Hugging Face causal LM as a GGUF file that llama.cpp, Ollama and transformers read.

Tensor names come from gguf-py's own name map; the two layout conventions llama.cpp expects are
applied here: Llama-style rotary Q/K rows are interleaved per head, and Gemma's RMSNorm weights are
stored as 1 + w. Metadata comes from the model config; the tokenizer is written from tokenizer.json
(byte-level BPE) or, when the base model was itself a GGUF file, copied from that file unchanged.
A BPE tokenizer is labelled only with a llama.cpp pre-tokenizer that splits text exactly as it does;
one that matches none is refused, never written under a guessed label.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.errors import TunesmithError

ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
TYPES = ("f16", "q8_0", "f32")

# tokenizer.json's Split regexes for the families whose splitting llama.cpp reproduces with a hand-written
# splitter (unicode.cpp): Llama 3 (digits in threes), Qwen2 (single digits), Qwen3.5 (Qwen2 with
# combining marks kept in words). Most other regexes llama.cpp rewrites for std::regex, which only
# approximates them (GPT-4o's and Tekken's split accented capitals differently), so they are not labelled.
_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LINE_ENDS = r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+" + _LINE_ENDS
QWEN2_REGEX = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+" + _LINE_ENDS
QWEN35_REGEX = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+" + _LINE_ENDS


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
# (tokenizer.ggml.pre, pre-tokenizer steps without offset trimming, the BPE model's ignore_merges): llama.cpp
# ties whole-word lookup (ignore_merges) to the label, so a label fits only when both agree with the tokenizer.
PRE_TOKENIZERS: tuple[tuple[str, list[dict[str, Any]], bool], ...] = (
    ("gpt-2", [{"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}], False),
    ("llama-bpe", [_split(LLAMA3_REGEX), _BYTES], True),
    ("smaug-bpe", [_split(LLAMA3_REGEX), _BYTES], False),
    ("qwen2", [_split(QWEN2_REGEX), _BYTES], False),
    ("qwen35", [_split(QWEN35_REGEX), _BYTES], False),
    # StarCoder and SmolLM: every digit alone, then GPT-2's split. llama.cpp has two names for this split;
    # "smollm" is the one that, like transformers by default, leaves spaces before punctuation when decoding.
    ("smollm", [{"type": "Digits", "individual_digits": True}, {**_BYTES, "use_regex": True}], False),
)


def _arch(config: Any) -> str:
    model_type = getattr(config, "model_type", "?")
    if model_type not in ARCHS:
        raise TunesmithError(
            f"GGUF export knows the architectures {sorted(ARCHS)}; this model is '{model_type}'. Export "
            "--format merged and convert that folder with llama.cpp's convert_hf_to_gguf.py."
        )
    return ARCHS[model_type]


def _rope_theta(config: Any) -> float:
    if getattr(config, "rope_theta", None):
        return float(config.rope_theta)
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(params.get("full_attention", {}).get("rope_theta", 10000.0))


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """HF's half-split rotary layout to llama.cpp's interleaved one (rows regrouped within each head)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _gguf_tensors(model: Any, arch: str) -> list[tuple[str, np.ndarray]]:
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    out = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        stem, _, suffix = hf_name.rpartition(".")
        mapped = names.get_name(stem)
        if mapped is None:
            raise TunesmithError(f"GGUF export: no GGUF name for tensor {hf_name} ({arch}).")
        data = tensor.detach().float().cpu().numpy()
        if arch == "llama" and stem.endswith("self_attn.q_proj"):
            data = _permute(data, config.num_attention_heads)
        elif arch == "llama" and stem.endswith("self_attn.k_proj"):
            data = _permute(data, config.num_key_value_heads)
        elif arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            data = data + 1.0
        out.append((f"{mapped}.{suffix}", data))
    return out


def _write_metadata(writer: Any, config: Any, arch: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(config.vocab_size)
    if arch == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)
    else:
        writer.add_rope_dimension_count(head_dim)


def _steps(pre_tokenizer: dict[str, Any] | None) -> list[dict[str, Any]]:
    """tokenizer.json's pre-tokenizer as a flat list of steps; offset trimming is left out, it moves no split."""
    if pre_tokenizer is None:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [step for inner in pre_tokenizer.get("pretokenizers", []) for step in _steps(inner)]
    return [{key: value for key, value in pre_tokenizer.items() if key != "trim_offsets"}]


def split_as_labelled(tokenizer: Any, label: str) -> bool:
    """Give a tokenizer read from a GGUF file the pre-tokenizer its llama.cpp label (tokenizer.ggml.pre) names, where
    that label is one of PRE_TOKENIZERS and the tokenizer splits otherwise; True if it was changed.

    transformers reads labels it has no split for (SmolLM's "smollm": every digit alone) as GPT-2's split, which
    tokenizes runs of spaces before a digit differently from llama.cpp and from the model's own training.
    """
    known = {name: steps for name, steps, _ in PRE_TOKENIZERS}
    backend = tokenizer.backend_tokenizer
    spec = json.loads(backend.to_str())
    if label not in known or _steps(spec.get("pre_tokenizer")) == known[label]:
        return False
    from tokenizers import Tokenizer

    steps = [{"trim_offsets": True, **step} if step["type"] == "ByteLevel" else step for step in known[label]]
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": steps}
    backend.pre_tokenizer = Tokenizer.from_str(json.dumps(spec)).pre_tokenizer
    return True


def pre_tokenizer_name(tokenizer: Any) -> str:
    """The llama.cpp pre-tokenizer (tokenizer.ggml.pre) that splits text as this byte-level BPE tokenizer does.

    Raises TunesmithError for any other tokenizer: a wrong label silently tokenizes digits, spaces and
    punctuation differently from training.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    steps = _steps(spec.get("pre_tokenizer"))
    way_out = (
        "Export --format merged and convert that folder with llama.cpp's convert_hf_to_gguf.py, which "
        "recognises more tokenizers."
    )
    if model.get("type") != "BPE" or not any(step.get("type") == "ByteLevel" for step in steps):
        raise TunesmithError(
            "GGUF export writes byte-level BPE tokenizers (Llama 3, Qwen, GPT-2 style); this one is "
            f"{model.get('type')} without a byte-level pre-tokenizer. {way_out}"
        )
    # llama.cpp never normalizes BPE input; NFC is let through because it leaves already-composed text (almost
    # all text) unchanged, and llama.cpp treats Qwen2's own NFC tokenizer the same way.
    normalizer = spec.get("normalizer")
    if normalizer not in (None, {"type": "NFC"}, {"type": "Sequence", "normalizers": []}):
        raise TunesmithError(
            f"tokenizer.json normalizes text ({json.dumps(normalizer)}) before BPE and llama.cpp does not, so "
            f"a GGUF export would tokenize differently from training. {way_out}"
        )
    ignore_merges = bool(model.get("ignore_merges", False))
    for name, known_steps, known_ignore_merges in PRE_TOKENIZERS:
        if steps == known_steps and ignore_merges == known_ignore_merges:
            return name
    raise TunesmithError(
        "GGUF export cannot name a llama.cpp pre-tokenizer that splits text as this tokenizer does "
        f"(tokenizer.json pre_tokenizer: {json.dumps(spec.get('pre_tokenizer'))}, ignore_merges: "
        f"{ignore_merges}); it labels only {', '.join(name for name, _, _ in PRE_TOKENIZERS)}. {way_out}"
    )


def _bpe_tokenizer(writer: Any, tokenizer: Any) -> bool:
    """Byte-level BPE from tokenizer.json: tokens, types, merges and pre-tokenizer; True if it adds BOS."""
    import gguf

    pre = pre_tokenizer_name(tokenizer)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, index in vocab.items():
        tokens[index] = token
    special = set(tokenizer.all_special_ids)
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    types = [
        gguf.TokenType.CONTROL
        if i in special
        else gguf.TokenType.USER_DEFINED
        if tokens[i] in added
        else gguf.TokenType.NORMAL
        for i in range(size)
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, token_id in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("pad", tokenizer.pad_token_id),
        ("unk", tokenizer.unk_token_id),
    ):
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    probe = tokenizer("a")["input_ids"]
    adds_bos = bool(probe) and probe[0] == tokenizer.bos_token_id
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(False)
    return adds_bos


def _copied_tokenizer(writer: Any, source: Path) -> bool:
    """The base GGUF's tokenizer fields, unchanged (the tokenizer the base was trained with); True if it adds BOS."""
    import gguf

    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.ggml."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, list(field.contents()))
        else:
            writer.add_key_value(key, field.contents(), kind)
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    return bool(field and field.contents())


def write_gguf(
    model: Any,
    tokenizer: Any,
    template: str,
    end_of_turn: int | None,
    path: Path,
    kind: str = "q8_0",
    name: str = "tunesmith model",
    source_gguf: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> bool:
    """Write `model` (merged, unquantized) with its tokenizer and chat template to `path`.

    Returns whether the file tells runtimes to add BOS themselves (so templates must leave it out).
    """
    try:
        import gguf
        from gguf.quants import quantize
    except ImportError:
        raise TunesmithError("GGUF export needs the gguf package: pip install gguf.") from None
    if kind not in TYPES:
        raise TunesmithError(f"GGUF type '{kind}' is not one of {', '.join(TYPES)}.")
    arch = _arch(model.config)
    qtype, file_type = {
        "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
        "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    }[kind]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_metadata(writer, model.config, arch)
    if source_gguf is not None:
        adds_bos = _copied_tokenizer(writer, source_gguf)
    else:
        adds_bos = _bpe_tokenizer(writer, tokenizer)
    if end_of_turn is not None:  # the chat template's end-of-turn token, when it is not EOS itself
        writer.add_eot_token_id(end_of_turn)
    writer.add_chat_template(template)
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    for tensor_name, data in _gguf_tensors(model, arch):
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor_name, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % block == 0:
            writer.add_tensor(tensor_name, quantize(data, qtype), raw_dtype=qtype)
        else:  # F16, or rows that do not split into Q8_0 blocks
            writer.add_tensor(tensor_name, data.astype(np.float16))
        if progress:
            progress(tensor_name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return adds_bos
