"""The run's chat template, taken apart into per-role text so that other runtimes can render it.

Exports carry the Jinja template itself (Hugging Face, GGUF, vLLM read it as is). Ollama reads Go
templates, so the Jinja template is rendered on sentinel contents, the literal text around each role
is read off, and a Go template is built from those pieces. Either way, `check_equal` renders real
conversations both ways and refuses an export whose template would render differently from training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tunesmith.data.formats import Message
from tunesmith.data.tokenize import render
from tunesmith.data.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TOOLS_INTRO, TOOLS_OUTRO
from tunesmith.errors import TunesmithError

MARK = {"system": "\x01SYS\x01", "user": "\x01USR\x01", "assistant": "\x01AST\x01"}


@dataclass(frozen=True)
class TurnFormat:
    """Literal text around each message: first[role] opens a conversation, prefix[role] opens a later turn."""

    first: dict[str, str]
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    system_merged: bool  # the system text opens the first user turn (Gemma): no user prefix after it

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = True) -> str:
        """What the Go template built by `go_template` renders; used to check the pieces."""
        out, after_system = [], False
        for index, message in enumerate(messages):
            role = message["role"]
            if role == "user" and after_system:
                out.append(self.after_system_user)
            else:
                out.append(self.first[role] if index == 0 else self.prefix[role])
            out.append(message["content"] + self.suffix[role])
            after_system = role == "system"
        if generation_prompt and (not messages or messages[-1]["role"] != "assistant"):
            out.append(self.generation)
        return "".join(out)

    @property
    def after_system_user(self) -> str:
        return "" if self.system_merged else self.prefix["user"]

    @property
    def stop(self) -> str:
        """The text that ends an answer (end-of-turn token, EOS), without surrounding whitespace."""
        return self.suffix["assistant"].strip()


def _split(text: str, *marks: str) -> list[str]:
    pieces = []
    for mark in marks:
        if mark not in text:
            raise KeyError(mark)
        head, text = text.split(mark, 1)
        pieces.append(head)
    return [*pieces, text]


def _render(tokenizer: Any, roles: list[str], generation: bool) -> str:
    messages = tuple(Message(role, MARK[role] + str(i)) for i, role in enumerate(roles))
    return render(tokenizer, messages, generation_prompt=generation)


def _strip_start(text: str, start: str, what: str) -> str:
    if not text.startswith(start):
        raise ValueError(what)
    return text[len(start) :]


def turn_format(tokenizer: Any) -> TurnFormat:
    """Read the per-role text off the tokenizer's chat template; a clear error when it has no such shape."""
    m = {role: MARK[role] for role in MARK}
    try:
        first_user, user_suffix = _split(_render(tokenizer, ["user"], False), m["user"] + "0")
        between, assistant_suffix = _split(
            _render(tokenizer, ["user", "assistant"], False), m["user"] + "0", m["assistant"] + "1"
        )[1:]
        assistant_prefix = _strip_start(between, user_suffix, "assistant prefix")
        after_answer = _split(
            _render(tokenizer, ["user", "assistant", "user"], False), m["assistant"] + "1", m["user"] + "2"
        )[1]
        user_prefix = _strip_start(after_answer, assistant_suffix, "user prefix")
        generation = _strip_start(
            _split(_render(tokenizer, ["user"], True), m["user"] + "0")[1], user_suffix, "generation prompt"
        )
        first_system, between_system, _ = _split(
            _render(tokenizer, ["system", "user"], False), m["system"] + "0", m["user"] + "1"
        )
    except Exception as error:  # the template raised on a role order or rendered no sentinel
        raise TunesmithError(
            f"The run's chat template cannot be taken apart per role ({error}); export it with --format merged "
            "or adapter, which carry the Jinja template unchanged."
        ) from None
    merged = not between_system.endswith(user_prefix)
    system_suffix = between_system if merged else between_system[: len(between_system) - len(user_prefix)]
    return TurnFormat(
        first={"system": first_system, "user": first_user, "assistant": assistant_prefix},
        prefix={"system": first_system, "user": user_prefix, "assistant": assistant_prefix},
        suffix={"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
        generation=generation,
        system_merged=merged,
    )


SAMPLE_CONVERSATIONS = (
    [{"role": "user", "content": "Hello there."}],
    [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "Note: fever since Monday."},
        {"role": "assistant", "content": '{"symptom": "fever"}'},
        {"role": "user", "content": "And cough?"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ],
)


def check_equal(tokenizer: Any, render_other: Any, what: str, strip_bos: bool = False) -> None:
    """Refuse an export whose template renders a sample conversation differently from training."""
    bos = getattr(tokenizer, "bos_token", None) or ""
    for conversation in SAMPLE_CONVERSATIONS:
        generation = conversation[-1]["role"] != "assistant"
        expected = render(
            tokenizer, tuple(Message(m["role"], m["content"]) for m in conversation), generation_prompt=generation
        )
        if strip_bos and bos and expected.startswith(bos):
            expected = expected[len(bos) :]
        got = render_other(conversation, generation)
        if got != expected:
            raise TunesmithError(
                f"The exported {what} renders a conversation differently from training:\n"
                f"  training: {expected!r}\n  {what}: {got!r}\n"
                "Set chat_template in the config to a template that appends each turn, or export merged/adapter."
            )


def stop_tokens(tokenizer: Any) -> tuple[list[int], list[str]]:
    """What ends an answer: EOS and the template's end-of-turn as token ids when each is one token,
    else the end-of-turn as a stop text (templates that cannot be taken apart end at EOS only)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        stop = turn_format(tokenizer).stop
    except TunesmithError:
        return ids, []
    encoded = tokenizer(stop, add_special_tokens=False)["input_ids"] if stop else []
    if len(encoded) == 1:
        return ids + [t for t in encoded if t not in ids], []
    return ids, [stop] if stop else []


GO_LITERALS = {"{{": '{{ "{{" }}', '"': '{{ "\\"" }}', "{": '{{ "{" }}'}


def _go_text(text: str) -> str:
    """Literal Go-template text: everything is literal except the action delimiter, written as an action. Quotes
    are written as actions too, so that no line of the template ends in a quote: Ollama's Modelfile parser, which
    has no escapes, would end the triple-quoted TEMPLATE there. A brace before a quote or at the end is an action
    too: with the action after it, it would read as the opening delimiter."""
    return re.sub(r'\{\{|"|\{(?="|$)', lambda found: GO_LITERALS[found.group()], text)


def go_template(turns: TurnFormat, strip_bos: str = "", tools: bool = False) -> str:
    """An Ollama (Go text/template) rendering of `turns`; `strip_bos` is left to the runtime's BOS token. With
    `tools` (the run's template is tunesmith's tools block in front of these turns), it renders `.Tools` and the
    messages' calls and results as that block does (see ToolTurns)."""

    def opening(role: str) -> str:
        first = turns.first[role]
        if strip_bos and first.startswith(strip_bos):
            first = first[len(strip_bos) :]
        return f"{{{{ if not $started }}}}{_go_text(first)}{{{{ else }}}}{_go_text(turns.prefix[role])}{{{{ end }}}}"

    def body(role: str, after: str = "") -> str:
        return f"{{{{ $m.Content }}}}{after}{_go_text(turns.suffix[role])}"

    user_open = f"{{{{ if $sys }}}}{_go_text(turns.after_system_user)}{{{{ else }}}}{opening('user')}{{{{ end }}}}"
    tool = ToolTurns(opening("system"), user_open, turns) if tools else None
    return (
        '{{ $sys := false }}{{ $started := false }}{{ $last := "" }}{{ range $i, $m := .Messages }}'
        f"{tool.results_end('$m.Role') + tool.block_turn if tool else ''}"
        f'{{{{ if eq $m.Role "system" }}}}{opening("system")}{body("system", tool.after_system if tool else "")}'
        "{{ $sys = true }}"
        f'{{{{ else if eq $m.Role "user" }}}}{user_open}{body("user")}{{{{ $sys = false }}}}'
        f"{tool.result if tool else ''}"
        f"{{{{ else }}}}{opening('assistant')}{body('assistant', tool.calls if tool else '')}{{{{ $sys = false }}}}"
        "{{ end }}{{ $started = true }}{{ $last = $m.Role }}{{ end }}"
        f"{tool.results_end('') if tool else ''}"
        f'{{{{ if ne $last "assistant" }}}}{_go_text(turns.generation)}{{{{ end }}}}'
    )


NEWLINE = _go_text("\n")


@dataclass(frozen=True)
class ToolTurns:
    """Go template pieces that rewrite a tool conversation as data/tools.TOOLS_PREAMBLE does, in Ollama's terms
    (`.Tools`, a message's `.ToolCalls`, role "tool"): the tools block ends the first system turn (or is one),
    calls follow the answer text in <tool_call> blocks, consecutive results are one user turn. Ollama writes the
    JSON of schemas and arguments itself (compact); the markup, order and text around it are training's."""

    system_open: str
    user_open: str
    turns: TurnFormat

    @property
    def block(self) -> str:
        tool = _go_text('\n{"type": "function", "function": ') + "{{ $t.Function }}" + _go_text("}")
        return _go_text(TOOLS_INTRO) + "{{ range $j, $t := $.Tools }}" + tool + "{{ end }}" + _go_text(TOOLS_OUTRO)

    @property
    def after_system(self) -> str:
        """After the first system message's text: the tools block."""
        return f"{{{{ if $.Tools }}}}{{{{ if not $started }}}}{NEWLINE}{NEWLINE}{self.block}{{{{ end }}}}{{{{ end }}}}"

    @property
    def block_turn(self) -> str:
        """Before a first message that is not the system's: the tools block as a system turn of its own."""
        suffix = _go_text(self.turns.suffix["system"])
        return (
            '{{ if $.Tools }}{{ if not $started }}{{ if ne $m.Role "system" }}'
            f"{self.system_open}{self.block}{suffix}{{{{ $sys = true }}}}{{{{ $started = true }}}}"
            "{{ end }}{{ end }}{{ end }}"
        )

    @property
    def calls(self) -> str:
        """After an assistant message's text: each call, on a new line unless it opens the answer."""
        return (
            "{{ range $j, $c := $m.ToolCalls }}"
            f"{{{{ if $m.Content }}}}{NEWLINE}{{{{ else if ne $j 0 }}}}{NEWLINE}{{{{ end }}}}"
            + _go_text(TOOL_CALL_OPEN + '{"name": "')
            + "{{ $c.Function.Name }}"
            + _go_text('", "arguments": ')
            + "{{ $c.Function.Arguments }}"
            + _go_text("}" + TOOL_CALL_CLOSE)
            + "{{ end }}"
        )

    @property
    def result(self) -> str:
        """A tool message: a <tool_response> block, opening the user turn of a run of results."""
        return (
            '{{ else if eq $m.Role "tool" }}'
            f'{{{{ if eq $last "tool" }}}}{NEWLINE}{{{{ else }}}}{self.user_open}{{{{ end }}}}'
            + _go_text("<tool_response>\n")
            + "{{ $m.Content }}"
            + _go_text("\n</tool_response>")
            + "{{ $sys = false }}"
        )

    def results_end(self, role: str) -> str:
        """The end of the user turn of a run of results: before the next message that is not one (`role` its
        role), or after the last message ('')."""
        suffix = _go_text(self.turns.suffix["user"])
        if not role:
            return f'{{{{ if eq $last "tool" }}}}{suffix}{{{{ end }}}}'
        return f'{{{{ if eq $last "tool" }}}}{{{{ if ne {role} "tool" }}}}{suffix}{{{{ end }}}}{{{{ end }}}}'
