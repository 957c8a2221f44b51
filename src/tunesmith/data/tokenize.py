"""Render Conversations with a chat template and tokenize them into token ids plus a loss mask.

The same renderer serves training and inference: a prompt at inference is exactly the token prefix
the model saw in training before an answer. Loss falls on assistant tokens only unless asked
otherwise, and the final answer ends with EOS so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.formats import Conversation, Message
from tunesmith.errors import TunesmithError

# Used when a tokenizer has no chat template (base models such as the Gemma 3 270M GGUF). Plain text
# markers keep it readable by any tokenizer; each answer ends with EOS. It is saved with the run so
# generation, export and serving render prompts exactly as training did.
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] }}"
    "{% else %}{{ '### Assistant:\\n' + message['content'] }}{% if eos_token %}{{ eos_token }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\n### Assistant:\\n' }}{% endif %}"
)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    loss_mask: list[int]
    line: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped_no_loss: int = 0
    lengths: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.lengths)
        return {
            "examples": self.examples,
            "kept": len(ordered),
            "truncated": self.truncated,
            "dropped_no_loss_tokens": self.dropped_no_loss,
            "tokens": sum(ordered),
            "max_length": ordered[-1] if ordered else 0,
            "median_length": ordered[len(ordered) // 2] if ordered else 0,
        }


def use_chat_template(tokenizer: Any, template: str | None) -> str:
    """Give the tokenizer the run's chat template: the configured one, its own, or the default."""
    chosen = template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    tokenizer.chat_template = chosen
    return chosen


def render(tokenizer: Any, messages: tuple[Message, ...] | list[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def segments(tokenizer: Any, messages: tuple[Message, ...]) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_answer) pieces that concatenate to the full render.

    Each answer piece is what rendering the answer adds after the prompt that asks for it, so the
    prompt piece is exactly what `render(..., generation_prompt=True)` gives at inference.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message.role != "assistant":
            continue
        prompt = render(tokenizer, messages[:index], generation_prompt=True)
        answered = render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not prompt.startswith(done) or not answered.startswith(prompt):
            raise TunesmithError(
                "The chat template does not render conversations as growing prefixes, so the answer "
                "tokens cannot be located. Set chat_template to a template that appends each turn."
            )
        pieces.append((prompt[len(done) :], False))
        pieces.append((answered[len(prompt) :], True))
        done = answered
    full = render(tokenizer, messages, generation_prompt=False)
    if full[len(done) :]:
        pieces.append((full[len(done) :], False))
    return pieces


def tokenize_conversation(tokenizer: Any, conversation: Conversation, train_on: str = "assistant") -> TokenizedExample:
    """Token ids and a 0/1 loss mask for one conversation (1 where the token is learned): every assistant turn
    ("assistant"), every token ("all"), or the last answer only ("last": preference pairs, whose earlier turns
    are the shared prompt)."""
    ids: list[int] = []
    mask: list[int] = []
    eos = tokenizer.eos_token_id
    if conversation.text is not None:
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + _encode(
            tokenizer, conversation.text
        )
        ids.append(eos)
        return TokenizedExample(ids, [1] * len(ids), conversation.line)
    pieces = segments(tokenizer, conversation.messages)
    last_answer = max(i for i, (_, answer) in enumerate(pieces) if answer)
    for index, (text, is_answer) in enumerate(pieces):
        piece_ids = _encode(tokenizer, text)
        # ChatML's answer ends with EOS (<|im_end|>) and a newline: EOS is there already, only not last.
        if index == last_answer and eos is not None and eos not in piece_ids:
            piece_ids.append(eos)  # the template did not end the answer with EOS; the model must learn to stop
        ids.extend(piece_ids)
        learned = train_on == "all" or (is_answer and (train_on != "last" or index == last_answer))
        mask.extend([1 if learned else 0] * len(piece_ids))
    return TokenizedExample(ids, mask, conversation.line)


def tokenize_all(
    tokenizer: Any, conversations: list[Conversation], max_length: int, train_on: str = "assistant"
) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize, truncate to max_length and drop examples left with no loss token; counts each."""
    stats = TokenizeStats()
    kept = []
    for conversation in conversations:
        example = tokenize_conversation(tokenizer, conversation, train_on)
        stats.examples += 1
        if len(example) > max_length:
            stats.truncated += 1
            example = TokenizedExample(example.input_ids[:max_length], example.loss_mask[:max_length], example.line)
        # Position 0 is never predicted, so a loss token must sit after it.
        if sum(example.loss_mask[1:]) == 0:
            stats.dropped_no_loss += 1
            continue
        stats.lengths.append(len(example))
        kept.append(example)
    return kept, stats


def prompt_ids(tokenizer: Any, messages: tuple[Message, ...]) -> list[int]:
    """The token ids a model is given at inference: the conversation so far plus the answer cue."""
    return _encode(tokenizer, render(tokenizer, messages, generation_prompt=True))
