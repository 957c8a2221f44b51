"""A reader of the subset of Go's text/template that Ollama Modelfiles use, to test exported templates.

Supports: literal text, {{ $v := x }}, {{ $v = x }}, {{ range $i, $m := .Messages }} (or over $m.Field or
$.Field), {{ if C }}, {{ else if C }}, {{ else }}, {{ end }}, {{ "literal" }}, {{ $m.Field }}, with conditions
`eq A B`, `ne A B`, `not X` and a bare value. It raises on anything else, so an exported template that leaves
this subset fails the test instead of being rendered wrongly.
"""

from __future__ import annotations

import json
import re
import shlex

ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)


def _tokens(template: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    for match in ACTION.finditer(template):
        out.append(("text", template[pos : match.start()]))
        out.append(("action", match.group(1).strip()))
        pos = match.end()
    out.append(("text", template[pos:]))
    return [t for t in out if t != ("text", "")]


def _parse(tokens: list[tuple[str, str]], pos: int, stop: tuple[str, ...]) -> tuple[list, int]:
    nodes = []
    while pos < len(tokens):
        kind, value = tokens[pos]
        if kind == "action" and (value == "end" or value.startswith("else")) and stop:
            return nodes, pos
        pos += 1
        if kind == "text":
            nodes.append(("text", value))
        elif value.startswith("range "):
            match = re.fullmatch(r"range \$(\w+), \$(\w+) := (\.\w+|\$[\w.]*)", value)
            if not match:
                raise ValueError(f"unsupported range: {value}")
            body, pos = _parse(tokens, pos, ("end",))
            pos += 1
            nodes.append(("range", match.groups(), body))
        elif value.startswith("if "):
            branches, pos = _branches(tokens, pos, value[3:])
            nodes.append(("if", branches))
        else:
            nodes.append(("action", value))
    if stop:
        raise ValueError("missing {{ end }}")
    return nodes, pos


def _branches(tokens, pos, condition):
    branches = []
    while True:
        body, pos = _parse(tokens, pos, ("end", "else"))
        branches.append((condition, body))
        kind, value = tokens[pos]
        pos += 1
        if value == "end":
            return branches, pos
        condition = value[len("else if ") :] if value.startswith("else if ") else "true"


def _value(expr: str, scope: dict):
    if expr in ("true", "false"):
        return expr == "true"
    if expr.startswith('"'):
        return shlex.split(expr)[0]
    if re.fullmatch(r"-?\d+", expr):
        return int(expr)
    match = re.fullmatch(r"\$(\w*)((?:\.\w+)*)", expr)
    if not match:
        raise ValueError(f"unsupported expression: {expr}")
    value = scope[match.group(1)]
    for field in filter(None, match.group(2).split(".")):
        value = value[field]
    return value


def _test(condition: str, scope: dict) -> bool:
    parts = shlex.split(condition, posix=False)
    if parts[0] in ("eq", "ne"):
        same = _value(parts[1], scope) == _value(parts[2], scope)
        return same if parts[0] == "eq" else not same
    if parts[0] == "not":
        return not _value(parts[1], scope)
    return bool(_value(condition, scope))


def _run(nodes: list, scope: dict, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "range":
            (index, item, expr), body = node[1], node[2]
            items = scope[""][expr[1:]] if expr.startswith(".") else _value(expr, scope)
            for i, element in enumerate(items or []):
                scope[index], scope[item] = i, element
                _run(body, scope, out)
        elif node[0] == "if":
            for condition, body in node[1]:
                if _test(condition, scope):
                    _run(body, scope, out)
                    break
        else:
            action = node[1]
            assign = re.fullmatch(r"\$(\w+) :?= (.+)", action)
            if assign:
                scope[assign.group(1)] = _value(assign.group(2), scope)
            else:
                out.append(str(_value(action, scope)))


class GoJSON(dict):
    """A value Ollama prints as its JSON (api.ToolFunction, ToolCallFunctionArguments: json.Marshal, compact; Go
    sorts a map's keys, and tunesmith's schemas are maps here too)."""

    def __str__(self) -> str:
        return json.dumps(self, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def _message(m: dict) -> dict:
    calls = [
        {"Function": {"Name": c["function"]["name"], "Arguments": GoJSON(c["function"]["arguments"])}}
        for c in m.get("tool_calls") or []
    ]
    return {"Role": m["role"], "Content": m.get("content") or "", "ToolCalls": calls}


def render(template: str, messages: list[dict], tools: list[dict] | None = None) -> str:
    """Render like Ollama does for a chat request: `.Messages` with Role, Content and ToolCalls (each a Function
    with Name and Arguments), `.Tools` each with its Function."""
    nodes, _ = _parse(_tokens(template), 0, ())
    out: list[str] = []
    offered = [{"Function": GoJSON(tool["function"])} for tool in tools or []]
    _run(nodes, {"": {"Messages": [_message(m) for m in messages], "Tools": offered}}, out)
    return "".join(out)
