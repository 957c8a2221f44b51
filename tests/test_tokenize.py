import pytest

from tunesmith.data.formats import Conversation, Message
from tunesmith.data.tokenize import (
    DEFAULT_CHAT_TEMPLATE,
    prompt_ids,
    render,
    tokenize_all,
    tokenize_conversation,
    use_chat_template,
)
from tunesmith.errors import TunesmithError

from .conftest import build_tokenizer

MULTI = Conversation(
    messages=(
        Message("system", "Be brief."),
        Message("user", "hi"),
        Message("assistant", "hello"),
        Message("user", "bye"),
        Message("assistant", "ciao"),
    )
)

CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_default_template_is_used_when_the_tokenizer_has_none():
    tokenizer = build_tokenizer()
    assert use_chat_template(tokenizer, None) == DEFAULT_CHAT_TEMPLATE
    text = render(tokenizer, MULTI.messages, generation_prompt=False)
    assert (
        text
        == "<s>Be brief.\n\n### User:\nhi\n\n### Assistant:\nhello</s>\n\n### User:\nbye\n\n### Assistant:\nciao</s>"
    )


def test_multi_turn_loss_falls_exactly_on_the_answers():
    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None)
    example = tokenize_conversation(tokenizer, MULTI)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    first_prompt = [bos] + ids(tokenizer, "Be brief.\n\n### User:\nhi\n\n### Assistant:\n")
    first_answer = ids(tokenizer, "hello") + [eos]
    second_prompt = ids(tokenizer, "\n\n### User:\nbye\n\n### Assistant:\n")
    second_answer = ids(tokenizer, "ciao") + [eos]
    assert example.input_ids == first_prompt + first_answer + second_prompt + second_answer
    expected_mask = (
        [0] * len(first_prompt) + [1] * len(first_answer) + [0] * len(second_prompt) + [1] * len(second_answer)
    )
    assert example.loss_mask == expected_mask
    learned = [t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if m]
    assert tokenizer.decode(learned) == "hello</s>ciao</s>"


def test_inference_prompt_is_the_training_prefix():
    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None)
    example = tokenize_conversation(tokenizer, MULTI)
    prefix = prompt_ids(tokenizer, MULTI.prompt_messages)
    assert example.input_ids[: len(prefix)] == prefix
    assert example.loss_mask[len(prefix) - 1] == 0 and example.loss_mask[len(prefix)] == 1


def test_model_template_without_eos_gets_eos_appended_to_the_final_answer():
    tokenizer = build_tokenizer(CHATML)
    use_chat_template(tokenizer, None)
    example = tokenize_conversation(tokenizer, MULTI)
    assert example.input_ids[-1] == tokenizer.eos_token_id and example.loss_mask[-1] == 1
    learned = tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if m])
    assert learned == "hello<|end|>ciao<|end|></s>"


def test_an_answer_ended_by_eos_and_a_newline_gets_no_second_eos():
    """ChatML (SmolLM2, Qwen) ends a turn with EOS <|im_end|> and then a newline: EOS is learned once, not again."""
    tokenizer = build_tokenizer(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    use_chat_template(tokenizer, None)
    example = tokenize_conversation(tokenizer, MULTI)
    assert example.input_ids.count(tokenizer.eos_token_id) == 5  # one per turn
    learned = tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if m])
    assert learned == "hello</s>\nciao</s>\n"


def test_train_on_all_and_plain_text():
    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None)
    assert set(tokenize_conversation(tokenizer, MULTI, train_on="all").loss_mask) == {1}
    text = tokenize_conversation(tokenizer, Conversation(text="hello world"))
    assert text.input_ids == [tokenizer.bos_token_id] + ids(tokenizer, "hello world") + [tokenizer.eos_token_id]
    assert set(text.loss_mask) == {1}


def test_truncation_is_counted_and_answerless_examples_dropped():
    tokenizer = build_tokenizer()
    use_chat_template(tokenizer, None)
    long_prompt = Conversation(messages=(Message("user", "word " * 200), Message("assistant", "ok")))
    long_answer = Conversation(messages=(Message("user", "q"), Message("assistant", "word " * 200)))
    kept, stats = tokenize_all(tokenizer, [long_prompt, long_answer, MULTI], max_length=64)
    assert stats.truncated == 2 and stats.dropped_no_loss == 1
    assert len(kept) == 2 and all(len(e) <= 64 for e in kept)
    assert stats.summary()["kept"] == 2


def test_template_that_rewrites_history_is_refused():
    # Renders the last turn differently from earlier ones, so prefixes do not grow.
    template = "{% for m in messages %}{% if loop.last %}LAST{% endif %}{{ m['content'] }}{% endfor %}"
    tokenizer = build_tokenizer(template)
    use_chat_template(tokenizer, None)
    with pytest.raises(TunesmithError, match="growing prefixes"):
        tokenize_conversation(tokenizer, MULTI)
