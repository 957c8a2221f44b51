"""Render Conversations with a chat template and tokenize them into token ids plus a loss mask.

The same renderer serves training and inference: a prompt at inference is exactly the token prefix
the model saw in training before an answer. Loss falls on assistant tokens only unless asked
otherwise, and the final answer ends with EOS so the model learns to stop. Tool calls and reasoning are part of
the assistant turn (reasoning may be kept in context without loss); tool results and the tools block are prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from tunesmith.data.formats import Conversation, Message
from tunesmith.data.tools import PARSERS, ToolCall, split_reasoning, with_tools_block
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


def use_chat_template(tokenizer: Any, template: str | None, tools: bool = False) -> str:
    """Give the tokenizer the run's chat template: the configured one, its own, or the default. With `tools`
    (the data has tool calls or results) a template that does not render them gets tunesmith's tools block and
    tool-call block in front (tools.TOOLS_PREAMBLE); one that still cannot is refused."""
    chosen = template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    tokenizer.chat_template = chosen
    if tools and tool_parser(tokenizer) is None:
        tokenizer.chat_template = with_tools_block(chosen)
        if tool_parser(tokenizer) is None:
            tokenizer.chat_template = chosen
            raise TunesmithError(
                "The chat template cannot render tool calls and tool results, even with tunesmith's tools block in "
                "front: rendering a small tool conversation raised, or left out the tools, the call, the result or "
                "the answer. Set chat_template to a template that renders `tools`, `tool_calls` and role 'tool' "
                "messages (see docs/tools.md)."
            )
    return tokenizer.chat_template


PROBE_CALL = ToolCall("probe_lookup", {"probe_key": "probe value 7"}, "call_probe")
PROBE_TOOLS = (
    {
        "type": "function",
        "function": {
            "name": "probe_lookup",
            "description": "Probe tool description.",
            "parameters": {
                "type": "object",
                "properties": {"probe_key": {"type": "string"}},
                "required": ["probe_key"],
            },
        },
    },
)
PROBE = (
    Message("user", "Probe question?"),
    Message("assistant", "", (PROBE_CALL,)),
    Message("tool", "probe result 9", tool_call_id="call_probe", name="probe_lookup"),
    Message("assistant", "Probe answer."),
)


def tool_parser(tokenizer: Any) -> str | None:
    """The name of the parser (tools.PARSERS) that reads the tokenizer's chat template's tool calls back, found
    by rendering a small tool conversation; None when the template does not render the tools, the call and the
    result, or renders the call in a form no parser reads."""
    try:
        full = render(tokenizer, PROBE, generation_prompt=False, tools=PROBE_TOOLS)
        asked = render(tokenizer, PROBE[:1], generation_prompt=True, tools=PROBE_TOOLS)
        called = render(tokenizer, PROBE[:2], generation_prompt=False, tools=PROBE_TOOLS)
    except Exception:  # a template raising on tools or on the tool role cannot render them
        return None
    shown = ("Probe tool description.", "probe value 7", "probe result 9", "Probe answer.")
    if not all(text in full for text in shown) or not called.startswith(asked):
        return None
    answer = _without_end(tokenizer, called[len(asked) :])
    for name, parse in PARSERS.items():
        parsed = parse(answer)
        if [(c.name, c.arguments) for c in parsed.tool_calls] == [(PROBE_CALL.name, PROBE_CALL.arguments)]:
            return name
    return None


def renders_reasoning(tokenizer: Any) -> bool:
    """Whether the chat template writes an answer's reasoning as a <think> block before its text (tunesmith's tools
    template, Qwen3, DeepSeek R1): then a served answer's opening block is its reasoning, sent apart as
    reasoning_content. Found by rendering a probe answer with reasoning and reading it back."""
    question = (Message("user", "Probe question?"),)
    answer = Message("assistant", "Probe answer.", reasoning="probe thought 5")
    try:
        asked = render(tokenizer, question, generation_prompt=True)
        full = render(tokenizer, (*question, answer), generation_prompt=False)
    except Exception:  # a template that cannot render the turn cannot have reasoning in it either
        return False
    if not full.startswith(asked):
        return False
    thought, rest = split_reasoning(full[len(asked) :])
    return thought == "probe thought 5" and rest.startswith("Probe answer.")


def _without_end(tokenizer: Any, answer: str) -> str:
    """An answer piece without the end of turn the template puts after it (what generation stops at)."""
    answer = answer.rstrip()
    for token in (tokenizer.eos_token, *getattr(tokenizer, "additional_special_tokens", ())):
        if token and answer.endswith(token):
            return answer[: -len(token)].rstrip()
    return answer


def render(
    tokenizer: Any,
    messages: tuple[Message, ...] | list[Message],
    generation_prompt: bool,
    tools: tuple[dict[str, Any], ...] = (),
) -> str:
    """The conversation as the chat template writes it; the tools block only when `tools` are given."""
    return tokenizer.apply_chat_template(
        [m.to_record() for m in messages],
        tools=list(tools) or None,
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def segments(
    tokenizer: Any, messages: tuple[Message, ...], tools: tuple[dict[str, Any], ...] = (), reasoning: str = "learn"
) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_answer) pieces that concatenate to the full render.

    Each answer piece is what rendering the answer adds after the prompt that asks for it, so the
    prompt piece is exactly what `render(..., generation_prompt=True)` gives at inference. With reasoning
    "context", an answer's reasoning is a piece of its own that is not an answer.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message.role != "assistant":
            continue
        prompt = render(tokenizer, messages[:index], generation_prompt=True, tools=tools)
        answered = render(tokenizer, messages[: index + 1], generation_prompt=False, tools=tools)
        if not prompt.startswith(done) or not answered.startswith(prompt):
            dropped = " (templates that drop earlier turns' reasoning, as Qwen3's does, are such)"
            raise TunesmithError(
                "The chat template does not render conversations as growing prefixes, so the answer "
                f"tokens cannot be located{dropped if message.reasoning is not None else ''}. Set chat_template to "
                "a template that appends each turn."
            )
        pieces.append((prompt[len(done) :], False))
        answer = answered[len(prompt) :]
        if reasoning == "context" and message.reasoning:
            bare = render(tokenizer, (*messages[:index], replace(message, reasoning=None)), False, tools=tools)
            head = len(answer) - _common_suffix(answer, bare[len(prompt) :])
            pieces.append((answer[:head], False))
            answer = answer[head:]
        pieces.append((answer, True))
        done = answered
    full = render(tokenizer, messages, generation_prompt=False, tools=tools)
    if full[len(done) :]:
        pieces.append((full[len(done) :], False))
    return pieces


def _common_suffix(a: str, b: str) -> int:
    """How many characters a and b end with in common: what follows an answer's reasoning block."""
    count = 0
    while count < min(len(a), len(b)) and a[len(a) - 1 - count] == b[len(b) - 1 - count]:
        count += 1
    return count


def tokenize_conversation(
    tokenizer: Any, conversation: Conversation, train_on: str = "assistant", reasoning: str = "learn"
) -> TokenizedExample:
    """Token ids and a 0/1 loss mask for one conversation (1 where the token is learned): every assistant turn
    ("assistant"), every token ("all"), or the last answer only ("last": preference pairs, whose earlier turns
    are the shared prompt). An assistant turn's tool calls are learned with it; its reasoning too, unless
    `reasoning` is "context" (kept in the context, without loss)."""
    ids: list[int] = []
    mask: list[int] = []
    eos = tokenizer.eos_token_id
    if conversation.text is not None:
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + _encode(
            tokenizer, conversation.text
        )
        ids.append(eos)
        return TokenizedExample(ids, [1] * len(ids), conversation.line)
    pieces = segments(tokenizer, conversation.messages, conversation.tools, reasoning)
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
    tokenizer: Any,
    conversations: list[Conversation],
    max_length: int,
    train_on: str = "assistant",
    reasoning: str = "learn",
) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize, truncate to max_length and drop examples left with no loss token; counts each. Stops when a
    tool call is not among the learned tokens (a template that drops calls would train on nearly nothing)."""
    stats = TokenizeStats()
    kept = []
    for conversation in conversations:
        example = tokenize_conversation(tokenizer, conversation, train_on, reasoning)
        check_calls_learned(tokenizer, conversation, example)
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


def check_calls_learned(tokenizer: Any, conversation: Conversation, example: TokenizedExample) -> None:
    """Stop when a tool call's function name is missing from the learned tokens of its conversation."""
    names = [call.name for m in conversation.messages for call in m.tool_calls]
    if not names:
        return
    learned = "".join(text for text, is_learned in learned_runs(tokenizer, example) if is_learned)
    missing = sorted({name for name in names if name not in learned})
    if missing:
        raise TunesmithError(
            f"line {conversation.line}: the tool call(s) {', '.join(missing)} are not among the learned tokens, so "
            "the run would learn nearly nothing of them: the chat template drops or hides tool calls. Leave "
            "chat_template unset (tunesmith adds its tools block) or set it to one that renders `tool_calls`; "
            "`tunesmith data check --model M --show-masks 3` shows what is learned."
        )


def learned_runs(tokenizer: Any, example: TokenizedExample) -> list[tuple[str, bool]]:
    """The example's text in runs of tokens that are all learned or all not, as (text, learned)."""
    runs: list[tuple[str, bool]] = []
    start = 0
    for end in range(1, len(example.input_ids) + 1):
        if end == len(example.input_ids) or example.loss_mask[end] != example.loss_mask[start]:
            runs.append((tokenizer.decode(example.input_ids[start:end]), bool(example.loss_mask[start])))
            start = end
    return runs


def prompt_ids(tokenizer: Any, messages: tuple[Message, ...], tools: tuple[dict[str, Any], ...] = ()) -> list[int]:
    """The token ids a model is given at inference: the conversation so far (and its tools) plus the answer cue."""
    return _encode(tokenizer, render(tokenizer, messages, generation_prompt=True, tools=tools))
