"""The tokenize cache returns exactly what tokenizing gives, and its key changes with tokenizer or template."""

from tunesmith.data.cache import cache_key, cached_tokenize
from tunesmith.data.formats import read_conversations
from tunesmith.data.tokenize import tokenize_all, use_chat_template

from .conftest import build_tokenizer, chat_records, write_jsonl


def test_cache_hit_equals_fresh_tokenization(tmp_path):
    conversations = read_conversations(write_jsonl(tmp_path / "d.jsonl", chat_records(12)))[0]
    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None)
    fresh, stats = tokenize_all(tokenizer, conversations, 64)
    first, _, hit_first = cached_tokenize(tokenizer, conversations, 64, "assistant", tmp_path / "cache")
    second, cached_stats, hit_second = cached_tokenize(tokenizer, conversations, 64, "assistant", tmp_path / "cache")
    assert (hit_first, hit_second) == (False, True)
    assert [(e.input_ids, e.loss_mask, e.line) for e in second] == [(e.input_ids, e.loss_mask, e.line) for e in fresh]
    assert cached_stats.summary() == stats.summary()
    assert not list((tmp_path / "cache").glob("*.partial"))


def test_key_changes_with_tokenizer_template_data_and_settings(tmp_path):
    conversations = read_conversations(write_jsonl(tmp_path / "d.jsonl", chat_records(5)))[0]
    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None)
    key = cache_key(conversations, tokenizer, 64, "assistant")
    assert cache_key(conversations, build_tokenizer("{{ messages }}"), 64, "assistant") != key
    other_vocab = build_tokenizer()
    other_vocab.add_tokens(["<new_token>"])
    use_chat_template(other_vocab, None)
    assert cache_key(conversations, other_vocab, 64, "assistant") != key
    assert cache_key(conversations[:4], tokenizer, 64, "assistant") != key
    assert cache_key(conversations, tokenizer, 65, "assistant") != key
    assert cache_key(conversations, tokenizer, 64, "all") != key
    same = build_tokenizer()
    use_chat_template(same, None)
    assert cache_key(conversations, same, 64, "assistant") == key
