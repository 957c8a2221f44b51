"""Tool calls as tunesmith holds, writes and reads them: the call type, the text form a model writes, the
parser of each template's form, the tools block added to templates that have none, and the argument rules.

Arguments are a decoded JSON object everywhere inside tunesmith; they are encoded once, where text is written.
This module imports nothing of tunesmith's data types, so formats, tokenize, check and metrics all use it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"
THINK_TAG, THINK_END = "<think>", "</think>"


@dataclass(frozen=True)
class ToolCall:
    """One function call of an assistant turn. `arguments` is the decoded object (a JSON string on the wire)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict, hash=False)
    id: str = ""

    def to_record(self) -> dict[str, Any]:
        """The OpenAI shape, arguments kept as an object (JSONL written by tunesmith, and chat templates)."""
        call: dict[str, Any] = {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return {"id": self.id, **call} if self.id else call


def call_json(call: ToolCall) -> str:
    """A call as one JSON object, {"name", "arguments"}, spaced as Jinja's tojson writes it in templates."""
    return json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)


def written_turn(content: str, calls: tuple[ToolCall, ...]) -> str:
    """An assistant turn as tunesmith writes it (references, text checks): its content, then each call in a
    <tool_call> block, the form of tunesmith's tools template and of Hermes/Qwen models."""
    blocks = [f"{TOOL_CALL_OPEN}{call_json(call)}{TOOL_CALL_CLOSE}" for call in calls]
    return "\n".join(part for part in (content, *blocks) if part)


@dataclass(frozen=True)
class ParsedTurn:
    """Generated text taken apart: the answer text, the calls, the reasoning, and the call blocks that did not
    decode (as written: a call the model botched is counted, not silently dropped)."""

    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning: str | None = None
    malformed: tuple[str, ...] = ()


def decode_call(value: Any) -> ToolCall | None:
    """A call from {"name", "arguments"} (or Llama's "parameters"), arguments an object or a JSON string of one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return ToolCall(value["name"], arguments) if isinstance(arguments, dict) else None


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class ReasoningSplitter:
    """An answer that may open with a <think> block, read as it is generated: `feed` says which of the new text is
    reasoning and which is the answer as soon as that is sure (a possible start of the closing tag waits); `finish`
    gives what is left. An answer that does not open with the block is all answer, as generated; one cut off
    inside the block is all reasoning. The blank lines between the block and the answer are dropped."""

    def __init__(self) -> None:
        self.text = ""
        self.start: int | None = None  # where the reasoning begins (after "<think>" and its newline)
        self.sent = 0  # how far the reasoning has been handed out
        self.answer_from: int | None = None  # where the answer begins
        self.answer_sent = 0
        self.answering = False  # the answer's first non-blank character has been handed out

    @property
    def reasoned(self) -> bool:
        return self.start is not None

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning, answer) ready now."""
        self.text += delta
        if self.answer_from is None and self.start is None:
            head = self.text.lstrip()
            if not head.startswith(THINK_TAG):
                if (THINK_TAG + "\n").startswith(head):  # blank so far, or a part of the opening: wait
                    return "", ""
                self.answer_from, self.answering = 0, True
                return "", self._answer()
            if len(head) == len(THINK_TAG):  # its newline may follow
                return "", ""
            at = len(self.text) - len(head) + len(THINK_TAG)
            self.start = self.sent = at + (self.text[at] == "\n")
        if self.answer_from is not None:
            return "", self._answer()
        assert self.start is not None
        end = self.text.find(THINK_END, self.start)
        if end < 0:
            held = max(_held(self.text, "\n" + THINK_END), _held(self.text, THINK_END))
            ready = max(self.sent, len(self.text) - held)
            reasoning, self.sent = self.text[self.sent : ready], ready
            return reasoning, ""
        body_end = end - 1 if end > self.start and self.text[end - 1] == "\n" else end
        reasoning, self.sent = self.text[self.sent : max(self.sent, body_end)], max(self.sent, body_end)
        self.answer_from = self.answer_sent = end + len(THINK_END)
        return reasoning, self._answer()

    def _answer(self) -> str:
        if not self.answering:
            rest = self.text[self.answer_sent :]
            self.answer_sent += len(rest) - len(rest.lstrip())
            self.answering = self.answer_sent < len(self.text)
        answer, self.answer_sent = self.text[self.answer_sent :], len(self.text)
        return answer

    def finish(self) -> tuple[str, str]:
        """(reasoning, answer) not yet handed out, once the answer is whole."""
        if self.answer_from is None and self.start is None:
            self.answer_from = 0
            answer, self.answer_sent = self.text[self.answer_sent :], len(self.text)
            return "", answer
        if self.answer_from is None:
            reasoning, self.sent = self.text[self.sent :], len(self.text)
            return reasoning, ""
        return "", self._answer()


def _held(text: str, tag: str) -> int:
    """How many characters `text` ends with that could be the start of `tag`."""
    return next((n for n in range(len(tag) - 1, 0, -1) if text.endswith(tag[:n])), 0)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """A whole answer's reasoning (None where it opens with no <think> block) and its answer, as ReasoningSplitter
    reads a streamed one."""
    splitter = ReasoningSplitter()
    reasoning, answer = splitter.feed(text)
    more, rest = splitter.finish()
    return (reasoning + more if splitter.reasoned else None), answer + rest


def parse_hermes(text: str) -> ParsedTurn:
    """tunesmith's tools template, Hermes, Qwen 2.5/3: <think>…</think>, text, <tool_call>{json}</tool_call>…
    The reasoning is read as serve's stream reads it (split_reasoning): an answer cut off inside its <think> block is
    all reasoning, with no calls."""
    reasoning, rest = split_reasoning(text)
    calls, malformed = [], []
    for body in HERMES_CALL.findall(rest):
        call = decode_call(_json(body))
        if call is None:
            malformed.append(body)
        else:
            calls.append(call)
    content = rest.split("<tool_call>", 1)[0].strip()
    return ParsedTurn(content, tuple(calls), reasoning, tuple(malformed))


def parse_mistral(text: str) -> ParsedTurn:
    """Mistral's v3 templates: text, then [TOOL_CALLS] and a JSON list of {"name", "arguments"}."""
    content, marker, calls_text = text.partition("[TOOL_CALLS]")
    if not marker:
        return ParsedTurn(text.strip())
    found = _json(calls_text.strip())
    items = found if isinstance(found, list) else [found]
    calls = [decode_call(item) for item in items]
    if any(call is None for call in calls):
        return ParsedTurn(content.strip(), malformed=(calls_text.strip(),))
    return ParsedTurn(content.strip(), tuple(call for call in calls if call is not None))


def parse_json_call(text: str) -> ParsedTurn:
    """Llama 3.1/3.2's templates: the whole answer is one call, {"name", "parameters"}, maybe after <|python_tag|>.
    Other JSON (the answer of a JSON task) is an answer, not a call; after <|python_tag|> anything is a call."""
    tagged = text.strip().startswith("<|python_tag|>")
    body = text.strip().removeprefix("<|python_tag|>").strip()
    value = _json(body)
    looks_like_call = isinstance(value, dict) and "name" in value and ("arguments" in value or "parameters" in value)
    if not (tagged or looks_like_call):
        return ParsedTurn(text.strip())
    call = decode_call(value)
    return ParsedTurn("", (call,)) if call else ParsedTurn("", malformed=(body,))


# The parser of each template family, in the order a template's rendering is tried against them (see
# tokenize.tool_parser); `parse_any` reads text whose template is unknown (metrics) the same way.
PARSERS: dict[str, Callable[[str], ParsedTurn]] = {
    "hermes": parse_hermes,
    "mistral": parse_mistral,
    "json": parse_json_call,
}


def parse_any(text: str) -> ParsedTurn:
    """Generated text read by the first parser that finds a call (or a botched one) in it; else plain text."""
    for parse in PARSERS.values():
        parsed = parse(text)
        if parsed.tool_calls or parsed.malformed:
            return parsed
    return parse_hermes(text)


TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call>"
)


def _jinja_text(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Jinja string literal


# Put in front of a chat template that cannot render tools: it rewrites `messages` into system/user/assistant
# turns of plain text (the tools block ends the system turn, calls are <tool_call> blocks after the answer text,
# reasoning a <think> block before it, consecutive tool results one user turn of <tool_response> blocks, as Qwen
# 2.5 renders them) and hides `tools`, so the template after it renders what it always could.
TOOLS_PREAMBLE = (
    "{%- set ns = namespace(turns=[], results='', text='', block='') -%}"
    "{%- if tools -%}"
    f"{{%- set ns.block = {_jinja_text(TOOLS_INTRO)} -%}}"
    "{%- for tool in tools -%}{%- set ns.block = ns.block + '\\n' + (tool | tojson) -%}{%- endfor -%}"
    f"{{%- set ns.block = ns.block + {_jinja_text(TOOLS_OUTRO)} -%}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.turns = [{'role': 'system', 'content': messages[0]['content'] + '\\n\\n' + ns.block}] -%}"
    "{%- else -%}{%- set ns.turns = [{'role': 'system', 'content': ns.block}] -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'tool' -%}"
    "{%- set ns.results = ns.results + ('\\n' if ns.results else '') + '<tool_response>\\n' + (m['content'] or '')"
    " + '\\n</tool_response>' -%}"
    "{%- elif not (tools and loop.first and m['role'] == 'system') -%}"
    "{%- if ns.results -%}"
    "{%- set ns.turns = ns.turns + [{'role': 'user', 'content': ns.results}] -%}{%- set ns.results = '' -%}"
    "{%- endif -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set ns.text = '' -%}"
    "{%- if m['reasoning_content'] is defined and m['reasoning_content'] is not none -%}"
    f"{{%- set ns.text = {_jinja_text(THINK_OPEN)} + m['reasoning_content'] + {_jinja_text(THINK_CLOSE)} -%}}"
    "{%- endif -%}"
    "{%- set ns.text = ns.text + (m['content'] or '') -%}"
    "{%- if m['tool_calls'] is defined -%}{%- for call in m['tool_calls'] -%}"
    "{%- set ns.text = ns.text + ('\\n' if m['content'] or not loop.first else '')"
    f" + {_jinja_text(TOOL_CALL_OPEN)}"
    " + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    f" + {_jinja_text(TOOL_CALL_CLOSE)} -%}}"
    "{%- endfor -%}{%- endif -%}"
    "{%- set ns.turns = ns.turns + [{'role': 'assistant', 'content': ns.text}] -%}"
    "{%- else -%}{%- set ns.turns = ns.turns + [{'role': m['role'], 'content': m['content']}] -%}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.results -%}{%- set ns.turns = ns.turns + [{'role': 'user', 'content': ns.results}] -%}{%- endif -%}"
    "{%- set messages = ns.turns -%}{%- set tools = none %}"
)


def with_tools_block(template: str) -> str:
    """`template` able to render tools, tool calls, tool results and reasoning (TOOLS_PREAMBLE in front)."""
    return template if template.startswith(TOOLS_PREAMBLE) else TOOLS_PREAMBLE + template


JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


def type_matches(value: Any, schema_type: Any) -> bool:
    """Whether a JSON value has a JSON-schema type (one name or a list); a bool is no integer, 2.0 is one."""
    names = schema_type if isinstance(schema_type, list) else [schema_type]
    for name in names:
        if not isinstance(name, str) or name not in JSON_TYPES:
            return True  # a type tunesmith does not know is not held against the data
        if isinstance(value, bool) and name not in ("boolean",):
            continue
        if name == "integer" and isinstance(value, float) and value.is_integer():
            return True
        if isinstance(value, JSON_TYPES[name]):
            return True
    return False


def _schema_part(schema: dict[str, Any], key: str, kind: type) -> Any:
    """schema[key] when it is of `kind`, else an empty one: a malformed schema is read as saying nothing."""
    value = schema.get(key)
    return value if isinstance(value, kind) else kind()


def argument_problems(arguments: dict[str, Any], parameters: dict[str, Any]) -> list[tuple[str, str]]:
    """(code, what is wrong) for each argument that breaks the tool's parameter schema: a required one missing,
    one the schema does not name, a value of the wrong type or outside its enum."""
    properties: dict[str, Any] = _schema_part(parameters, "properties", dict)
    required: list[Any] = _schema_part(parameters, "required", list)
    problems = [
        ("missing_argument", f"required argument '{name}' is missing")
        for name in required
        if isinstance(name, str) and name not in arguments
    ]
    for name, value in arguments.items():
        schema = properties.get(name)
        if not isinstance(schema, dict):
            if parameters.get("additionalProperties") is not True:
                known = ", ".join(sorted(properties)) or "none"
                problems.append(("unexpected_argument", f"argument '{name}' is not a parameter (parameters: {known})"))
            continue
        if "type" in schema and not type_matches(value, schema["type"]):
            problems.append(("wrong_type", f"argument '{name}' should be {schema['type']}, got {json.dumps(value)}"))
        elif isinstance(schema.get("enum"), list) and value not in schema["enum"]:
            allowed = ", ".join(json.dumps(v) for v in schema["enum"])
            problems.append(("wrong_type", f"argument '{name}' is {json.dumps(value)}, not one of {allowed}"))
    return problems


PUNCTUATION_IN_STRINGS = re.compile(r"[ ,./\-_*^]")


def normalised_value(value: Any) -> Any:
    """A value as the Berkeley Function Calling Leaderboard compares it: strings lower-cased without spaces and
    ,./-_*^ punctuation and with ' read as ", integers as floats (2 == 2.0, but never a bool), lists and objects
    item by item."""
    if isinstance(value, str):
        return PUNCTUATION_IN_STRINGS.sub("", value.lower()).replace("'", '"')
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list):
        return [normalised_value(item) for item in value]
    if isinstance(value, dict):
        return {key: normalised_value(item) for key, item in value.items()}
    return value


def _same_kind(got: Any, want: Any) -> bool:
    """BFCL's type rule: the JSON types agree (an integer stands for a number; a bool is neither)."""
    if isinstance(got, bool) or isinstance(want, bool):
        return isinstance(got, bool) and isinstance(want, bool)
    if isinstance(want, float) and isinstance(got, int):
        return True
    if isinstance(got, int | float) and isinstance(want, int | float):
        return isinstance(got, type(want))
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(_same_kind(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(_same_kind(got[k], want[k]) for k in want)
    return type(got) is type(want)


def same_json(got: Any, want: Any) -> bool:
    """Equal as JSON values: 2 and 2.0 are one number, true is no number, keys in any order."""
    if isinstance(got, bool) or isinstance(want, bool):
        return isinstance(got, bool) and isinstance(want, bool) and got == want
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(same_json(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(same_json(got[k], want[k]) for k in want)
    if isinstance(got, int | float) and isinstance(want, int | float):
        return got == want
    return type(got) is type(want) and got == want


def call_matches(got: ToolCall, want: ToolCall) -> bool:
    """BFCL's AST match of one call: the same function, the same argument names (every required one present,
    none unexpected), each value of the right type and equal after normalisation."""
    if got.name != want.name or got.arguments.keys() != want.arguments.keys():
        return False
    return all(
        _same_kind(got.arguments[k], want.arguments[k])
        and normalised_value(got.arguments[k]) == normalised_value(want.arguments[k])
        for k in want.arguments
    )


def calls_match(
    got: tuple[ToolCall, ...], want: tuple[ToolCall, ...], same: Callable[[ToolCall, ToolCall], bool]
) -> bool:
    """Whether the calls pair off one to one under `same`, in any order (parallel calls)."""
    if len(got) != len(want):
        return False
    if not want:
        return True
    first, rest = want[0], want[1:]
    return any(
        same(candidate, first) and calls_match(got[:i] + got[i + 1 :], rest, same) for i, candidate in enumerate(got)
    )
