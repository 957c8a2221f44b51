"""Tool calls at serve time: a request's `tools` and `tool_choice`, the forced start of an answer that must call,
the answer split into text and calls as it streams, and calls in OpenAI's wire shape.

Calls are read by the served template's one parser (data/tools.py, named by tokenize.tool_parser) and the tools
are read as training reads a row's; this module never parses call text or tool schemas itself.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from tunesmith.data.formats import function_tools
from tunesmith.data.tokenize import PROBE, PROBE_CALL, PROBE_TOOLS, render
from tunesmith.data.tools import PARSERS, ToolCall

CHOICES = ("none", "auto", "required")
# Where a call starts in each parser's form; the json form (Llama 3.1/3.2) is a whole answer that opens so.
CALL_MARKERS: dict[str, str] = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}
JSON_CALL_STARTS = ("{", "<|python_tag|>")
RETRY = 'Nothing is passed off as a call: retry (a sampled answer may call), or send tool_choice "auto".'


class FieldError(ValueError):
    """A request field the server cannot use: `param` names it, the message says what to send instead."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolRequest:
    """What a chat request asks of tools: the functions offered and `choice` (none, auto, required, or the
    name of the one function the answer must call)."""

    tools: tuple[dict[str, Any], ...] = ()
    choice: str = "none"

    @property
    def named(self) -> str | None:
        return None if self.choice in CHOICES else self.choice

    @property
    def enforced(self) -> bool:
        """The answer must be a call (tool_choice required or a named function)."""
        return self.choice != "none" and self.choice != "auto"

    @property
    def rendered_tools(self) -> tuple[dict[str, Any], ...]:
        """The tools the prompt shows: none for tool_choice none (the model is not offered any)."""
        return () if self.choice == "none" else self.tools


def tool_request(tools: Any, tool_choice: Any) -> ToolRequest:
    """The request's `tools` and `tool_choice`, checked; FieldError names the field and the fix."""
    try:
        offered = function_tools(tools)
    except ValueError as error:
        raise FieldError(
            "tools",
            f"{error}. Send tools as OpenAI function tools: "
            '[{"type": "function", "function": {"name": ..., "description": ..., "parameters": {JSON schema}}}].',
        ) from None
    names = [tool["function"]["name"] for tool in offered]
    if tool_choice is None:
        return ToolRequest(offered, "auto" if offered else "none")
    choice = _choice(tool_choice)
    if choice != "none" and not offered:
        raise FieldError("tool_choice", f"tool_choice {json.dumps(tool_choice)} needs tools; send `tools` too.")
    if choice not in CHOICES and choice not in names:
        raise FieldError(
            "tool_choice", f"tool_choice names function '{choice}', which is not among the tools ({', '.join(names)})."
        )
    return ToolRequest(offered, choice)


def _choice(value: Any) -> str:
    if isinstance(value, str) and value in CHOICES:
        return value
    function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    if isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"]:
        return function["name"]
    raise FieldError(
        "tool_choice",
        f'tool_choice {json.dumps(value)[:80]} is not one of "none", "auto", "required" or '
        '{"type": "function", "function": {"name": "NAME"}}.',
    )


def call_opening(tokenizer: Any, name: str | None) -> str | None:
    """The text the template writes before a call's name (`name` None) or before the arguments of a call to `name`:
    read off the template's rendering of a probe call, so an answer that starts with it can only be a call. None
    when the template's call does not show its name and arguments as JSON."""
    asked = render(tokenizer, PROBE[:1], generation_prompt=True, tools=PROBE_TOOLS)
    answer = render(tokenizer, PROBE[:2], generation_prompt=False, tools=PROBE_TOOLS)[len(asked) :]
    probe_name, probe_arguments = json.dumps(PROBE_CALL.name), json.dumps(PROBE_CALL.arguments)
    name_at, arguments_at = answer.find(probe_name), answer.find(probe_arguments)
    if name_at < 0 or arguments_at < name_at:
        return None
    if name is None:
        return answer[:name_at]
    return answer[:arguments_at].replace(probe_name, json.dumps(name, ensure_ascii=False), 1)


@dataclass(frozen=True)
class Answered:
    """A generated answer taken apart: the text outside any call markup, the calls, and `malformed` (the answer
    has call markup that does not decode: it is answered as text, or refused when a call was required)."""

    content: str
    calls: tuple[ToolCall, ...] = ()
    malformed: bool = False


class AnswerSplitter:
    """Reads an answer as it is generated and says which of its text can go out as content now: text before a
    call's markup, never the markup, nor what may yet become it. `finish` takes the whole answer apart."""

    def __init__(self, parser: str, opening: str = "") -> None:
        self.parse, self.marker = PARSERS[parser], CALL_MARKERS.get(parser)
        self.text, self.sent = opening, 0

    def feed(self, delta: str) -> str:
        self.text += delta
        ready = self._ready()
        out, self.sent = self.text[self.sent : max(ready, self.sent)], max(ready, self.sent)
        return out

    def _ready(self) -> int:
        """How much of the text is surely content (trailing whitespace waits: it may precede a call)."""
        if self.marker is None:
            head = self.text.lstrip()
            if self.sent == 0 and (head.startswith(JSON_CALL_STARTS) or JSON_CALL_STARTS[1].startswith(head)):
                return 0  # the whole answer may be a call
            return len(self.text.rstrip())
        at = self.text.find(self.marker)
        if at >= 0:
            return len(self.text[:at].rstrip())
        held = next((n for n in range(len(self.marker) - 1, 0, -1) if self.text.endswith(self.marker[:n])), 0)
        return len(self.text[: len(self.text) - held].rstrip())

    def finish(self) -> tuple[Answered, str]:
        """The answer taken apart, and the content not yet sent."""
        parsed = self.parse(self.text)
        if parsed.malformed or not parsed.tool_calls:
            return Answered(self.text, (), bool(parsed.malformed)), self.text[self.sent :]
        at = self.text.find(self.marker) if self.marker else 0
        content = self.text[:at].rstrip()
        return Answered(content.strip(), parsed.tool_calls), content[self.sent :]


def enforcement_error(answered: Answered, request: ToolRequest) -> str | None:
    """Why the answer breaks a required or named tool_choice (None when it keeps it)."""
    if not request.enforced:
        return None
    wanted = request.named or "one of the tools"
    if not answered.calls:
        what = "a call that does not decode" if answered.malformed else "no call"
        shown = answered.content[:200]
        return f"tool_choice asked for a call to {wanted}, and the model's answer holds {what}: {shown!r}. {RETRY}"
    offered = {tool["function"]["name"] for tool in request.tools}
    stray = sorted({call.name for call in answered.calls if call.name != request.named and call.name not in offered})
    if stray or (request.named and any(call.name != request.named for call in answered.calls)):
        names = ", ".join(call.name for call in answered.calls)
        return f"tool_choice asked for a call to {wanted}, and the model called {names}. {RETRY}"
    return None


def wire_calls(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    """Calls as the OpenAI API sends them: an id each, arguments as a JSON string."""
    return [
        {
            "id": call.id or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
        }
        for call in calls
    ]


def call_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stream deltas of wire calls, as OpenAI streams them: per call, its index, id, type and name with empty
    arguments, then the arguments (the openai client's accumulation joins the fragments)."""
    deltas = []
    for index, call in enumerate(calls):
        head = {"name": call["function"]["name"], "arguments": ""}
        deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function", "function": head}]})
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call["function"]["arguments"]}}]})
    return deltas
