"""Read data files in any supported layout and normalise every record to a `Conversation`.

Files: JSONL, JSON (a list of records), CSV, Parquet. Record formats: chat `messages` (OpenAI roles, with
tool calls, tool results, reasoning and a per-row `tools` list), ShareGPT `conversations` (from/value, with
LLaMA-Factory's function_call/observation turns), Alpaca (instruction/input/output), prompt/completion, plain
text, and for preference tuning: pairs of a chosen and a rejected answer, and KTO's single answers
labelled desirable or not. A file holds one format, detected from its first record. Every bad record
is reported with its line (or row) number; reading never stops at the first.
Whatever the bytes of a file, reading it raises nothing but TunesmithError (tests/test_data_fuzz.py).
"""

from __future__ import annotations

import base64
import codecs
import csv
import datetime
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.tools import ToolCall, written_turn
from tunesmith.errors import TunesmithError

ROLES = ("system", "user", "assistant")
CHAT_ROLES = (*ROLES, "tool", "function")  # "function": the results of OpenAI's older function calling
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SHAREGPT_TOOL_ROLES = {"function_call": "assistant", "observation": "tool", "tool": "tool"}
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
FORMATS = ("chat", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "kto")
MAX_REPORTED = 50
CSV_FIELD_LIMIT = 2**31 - 1
TURN_COLUMNS = ("messages", "conversations")
# json.loads fails with these: JSONDecodeError (a ValueError), ValueError for an integer of more than 4300
# digits, RecursionError for nesting past the recursion limit.
JSON_ERRORS = (ValueError, RecursionError)
UNPAIRED_SURROGATE = re.compile(r"[\ud800-\udfff]")


@dataclass(frozen=True)
class Message:
    """One turn. An assistant turn may carry tool calls and its reasoning; a tool turn (role "tool") holds a
    result in `content`, the id of the call it answers and optionally the tool's name."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning: str | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @property
    def written(self) -> str:
        """The turn as text: its content and, for an assistant turn, its calls (see tools.written_turn)."""
        return written_turn(self.content, self.tool_calls)

    def to_record(self) -> dict[str, Any]:
        """The OpenAI message, arguments kept as objects; what chat templates are given and splits are written as."""
        record: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning is not None:
            record["reasoning_content"] = self.reasoning
        if self.tool_calls:
            record["tool_calls"] = [call.to_record() for call in self.tool_calls]
        if self.tool_call_id is not None:
            record["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            record["name"] = self.name
        return record


@dataclass(frozen=True)
class Conversation:
    """One training example. `text` is set (and `messages` empty) for plain-text pretraining records.

    A preference pair is its chosen conversation (the last assistant turn is the chosen answer) with the
    rejected answer in `rejected`; a KTO row is its conversation with `label` saying whether the last
    answer is desirable. So a pair or a KTO row reads as an SFT example wherever only one answer matters.
    """

    messages: tuple[Message, ...] = ()
    text: str | None = None
    line: int = 0
    rejected: str | None = None
    label: bool | None = None
    # The functions this conversation's model may call, as OpenAI function tools ({"type": "function",
    # "function": {name, description, parameters}}); rendered in the prompt by the chat template.
    tools: tuple[dict[str, Any], ...] = field(default=(), hash=False)

    @property
    def kind(self) -> str:
        """ "sft", "pair" (chosen and rejected answers) or "kto" (one answer labelled desirable or not)."""
        if self.rejected is not None:
            return "pair"
        return "sft" if self.label is None else "kto"

    def to_record(self) -> dict[str, Any]:
        if self.text is not None:
            return {"text": self.text}
        if self.kind == "sft":
            tools = {"tools": list(self.tools)} if self.tools else {}
            return {"messages": [m.to_record() for m in self.messages]} | tools
        prompt = [{"role": m.role, "content": m.content} for m in self.prompt_messages]
        if self.kind == "pair":
            return {"prompt": prompt, "chosen": self.reference, "rejected": self.rejected}
        return {"prompt": prompt, "completion": self.reference, "label": self.label}

    @property
    def rejected_messages(self) -> tuple[Message, ...]:
        """A pair's rejected conversation: the prompt and the rejected answer (empty for other kinds)."""
        if self.rejected is None:
            return ()
        return (*self.prompt_messages, Message("assistant", self.rejected))

    @property
    def prompt_messages(self) -> tuple[Message, ...]:
        """Everything before the last assistant turn: what a model is asked at inference."""
        last = max((i for i, m in enumerate(self.messages) if m.role == "assistant"), default=len(self.messages))
        return self.messages[:last]

    @property
    def reference(self) -> str | None:
        """The last assistant answer, its tool calls written after its text: the expected output when evaluating."""
        answers = [m.written for m in self.messages if m.role == "assistant"]
        return answers[-1] if answers else None

    @property
    def uses_tools(self) -> bool:
        """Whether the conversation has tools, tool calls or tool results (and so needs a template for them)."""
        return bool(self.tools) or any(m.tool_calls or m.role == "tool" for m in self.messages)


def position_word(path: str | Path) -> str:
    """What a record's number counts in this file: its position ("record") in a .json file, else its line."""
    return "record" if Path(path).suffix.lower() == ".json" else "line"


@dataclass
class Problems:
    """Bad records found while reading, each as (line, message)."""

    path: Path
    items: list[tuple[int, str]] = field(default_factory=list)
    # How the records were read, named in the message: "format 'kto', detected from line 1".
    read_as: str | None = None

    def add(self, line: int, message: str) -> None:
        self.items.append((line, message))

    def where(self, line: int) -> str:
        """The file and line of a record, or its position for a .json file (see _json_records)."""
        return f"{self.path}: record {line}" if position_word(self.path) == "record" else f"{self.path}:{line}"

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = "\n".join(f"  {self.where(line)}: {msg}" for line, msg in self.items[:MAX_REPORTED])
        more = f"\n  ... and {len(self.items) - MAX_REPORTED} more" if len(self.items) > MAX_REPORTED else ""
        read_as = f" (read as {self.read_as})" if self.read_as else ""
        raise TunesmithError(
            f"{self.path}: {len(self.items)} bad record(s){read_as}:\n{shown}{more}\n"
            "Fix or remove these records and run again."
        )


def iter_raw_records(path: Path, problems: Problems) -> Iterator[tuple[int, Any]]:
    """Yield (line or row number, parsed record) for every record of a data file.

    A record that cannot be parsed is added to `problems`; a file that cannot be read at all (not UTF-8,
    not JSON, not Parquet) raises TunesmithError. No other exception escapes, whatever the bytes.
    """
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            yield from _jsonl_records(path, problems)
        elif suffix == ".json":
            yield from _json_records(path)
        elif suffix in (".csv", ".tsv"):
            yield from iter_csv_records(path, problems, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".parquet":
            yield from _parquet_records(path)
        else:
            raise TunesmithError(
                f"{path}: unsupported file type '{suffix}'. Use .jsonl, .json, .csv, .tsv or .parquet."
            )
    except OSError as exc:
        raise TunesmithError(f"{path}: cannot read it ({exc.strerror or exc}). Check its permissions.") from None


def _jsonl_records(path: Path, problems: Problems) -> Iterator[tuple[int, Any]]:
    # Lines are split on b"\n" and decoded one at a time so that a bad byte is reported at its own line;
    # a CRLF ending leaves a "\r" that JSON reads as whitespace.
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            text = _utf8(path, raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw, number)
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except JSON_ERRORS as exc:
                problems.add(number, _json_error(exc))


def _json_records(path: Path) -> Iterator[tuple[int, Any]]:
    text = read_text(path)
    try:
        records = json.loads(text)
    except JSON_ERRORS as exc:
        line = f":{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise TunesmithError(f"{path}{line}: {_json_error(exc)}. Fix the file and run again.") from None
    if isinstance(records, dict) and isinstance(records.get("data"), list):
        records = records["data"]
    if not isinstance(records, list):
        raise TunesmithError(
            f'{path}: a .json data file must hold a list of records (or {{"data": [...]}}), not '
            f"{_kind(records)}. Wrap the records in [ ], or save one record per line as .jsonl."
        )
    # Record numbers are 1-based positions in the list: JSON has no reliable line per record (a minified
    # file has one line), and the number must tell records apart.
    yield from enumerate(records, start=1)


def iter_csv_records(path: Path, problems: Problems, delimiter: str = ",") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, {column: cell}) per row of a CSV file with a header; rows of the wrong shape go to `problems`."""
    # A cell may hold a whole document; the csv module's default limit of 128 KiB would refuse it. The
    # limit is process-wide and only ever raised here; 2**31 - 1 fits the C long of every platform.
    csv.field_size_limit(CSV_FIELD_LIMIT)
    # strict: an unclosed quote is an error at its row instead of swallowing the rest of the file.
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    while True:
        # A quoted cell may span lines; a row is reported at the line where it starts, as an editor shows it.
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if header is None:
                raise TunesmithError(f"{path}:{start}: the header row is not valid CSV ({exc}).") from None
            problems.add(start, f'not valid CSV ({exc}); check that every quote " in the row is closed')
            continue
        if not any(cell.strip() for cell in row):
            continue  # blank lines, and the ",,," rows spreadsheets write for empty rows
        if header is None:
            header = _csv_header(path, row, start)
        elif len(row) != len(header):
            problems.add(
                start,
                f"{len(row)} cell{'s' * (len(row) != 1)} but the header has {len(header)} columns; quote cells that "
                f"contain {'a tab' if delimiter == chr(9) else 'a comma'}, and give every row one cell per column",
            )
        else:
            record = dict(zip(header, row, strict=True))
            try:
                yield start, _decode_turn_cells(record)
            except ValueError as exc:
                problems.add(start, str(exc))


def _csv_header(path: Path, row: list[str], line: int) -> list[str]:
    header = [name.strip() for name in row]
    repeated = sorted(name for name, count in Counter(header).items() if count > 1 and name)
    if repeated:
        raise TunesmithError(
            f"{path}:{line}: column(s) {', '.join(repeated)} appear more than once in the header; rename them."
        )
    return header


def _decode_turn_cells(record: dict[str, Any]) -> dict[str, Any]:
    """Decode the JSON list in a messages/conversations cell; every other cell stays text, whatever it looks like."""
    for key in TURN_COLUMNS:
        if key in record:
            try:
                record[key] = json.loads(record[key])
            except JSON_ERRORS as exc:
                raise ValueError(f"column '{key}' must hold the turns as a JSON array: {_json_error(exc)}") from None
    return record


def _parquet_records(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise TunesmithError(
            f"{path}: cannot read it as Parquet ({exc}). A truncated copy or a file renamed to .parquet does "
            "not load: write the file again (e.g. pandas DataFrame.to_parquet)."
        ) from None
    for number, row in enumerate(rows, start=1):
        yield number, _json_value(row)


def _json_value(value: Any) -> Any:
    """A Parquet value as the JSON value it stands for, so that records can be written back as JSONL.

    Binary holding UTF-8 is text (some writers store strings that way), other binary is base64; timestamps,
    dates and decimals become their usual string form.
    """
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return str(value)


def read_text(path: Path) -> str:
    """A whole text file as UTF-8, with the byte-order mark spreadsheet programs write accepted and dropped."""
    return _utf8(path, path.read_bytes().removeprefix(codecs.BOM_UTF8), 1)


def _utf8(path: Path, raw: bytes, first_line: int) -> str:
    """Decode text, or stop with the line and column of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if first_line == 1 and raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            found = "UTF-16 text"
        else:
            column = exc.start - raw.rfind(b"\n", 0, exc.start)
            found = f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at column {column}"
        line = first_line + raw.count(b"\n", 0, exc.start)
        raise TunesmithError(
            f"{path}:{line}: {found}. Save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT) "
            "and run again; a binary file is not a data file."
        ) from None


def _json_error(exc: ValueError | RecursionError) -> str:
    """What is wrong with text that json.loads refused, in words for the person who wrote it."""
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} (column {exc.colno})"
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply to read (over about 1000 levels of [ and {); flatten the record"
    # CPython refuses integers of more than 4300 digits; its own hint (sys.set_int_max_str_digits) is not
    # one a user of tunesmith can take.
    return f"JSON holds a value Python cannot read ({str(exc).split(';')[0]}); write it as a string"


def _kind(value: Any) -> str:
    """The JSON name of a value's type, as the user wrote it in the file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    for kind, name in ((dict, "an object"), (list, "an array"), (str, "a string"), ((int, float), "a number")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def detect_format(record: Any) -> str | None:
    """The format whose defining fields the record has, or None."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "instruction" in record and "output" in record:
        return "alpaca"
    # Before prompt_completion: a KTO row read as SFT would teach its undesirable answers.
    if "prompt" in record and "completion" in record and "label" in record:
        return "kto"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    # Prompts without answers (objective grpo): read as their format, so that any other objective names the
    # missing answer field instead of failing to tell the format.
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record and "label" not in record:
        return "prompt_completion"
    return None


def _text(record: dict[str, Any], key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing field '{key}'" if key not in record else f"field '{key}' is null")
        return ""
    return _string(value, f"field '{key}'")


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {_kind(value)}")
    # json.loads turns a lone escape such as \ud800 into a character no UTF-8 file or tokenizer accepts.
    if UNPAIRED_SURROGATE.search(value):
        raise ValueError(f"{where} holds an unpaired surrogate escape (\\ud800-\\udfff); remove or fix it")
    return value


def _turn_objects(
    items: Any, field_name: str, role_key: str, content_key: str, roles: Iterable[str]
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(where, role, turn) for each turn of a list of turns, its role one of `roles`; ValueError says what is wrong."""
    if not isinstance(items, list) or not items:
        got = "an empty array" if items == [] else _kind(items)
        raise ValueError(f"'{field_name}' must be a non-empty list of turns, got {got}")
    shown = ", ".join(sorted(roles))
    for index, turn in enumerate(items):
        where = f"{field_name}[{index}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where} must be an object with '{role_key}' and '{content_key}', got {_kind(turn)}")
        role = turn.get(role_key)
        if not isinstance(role, str):
            raise ValueError(f"{where}: '{role_key}' must be one of {shown}, got {_kind(role)}")
        if role not in roles:
            raise ValueError(f"{where}: unknown role {role[:40]!r}; use one of {shown}")
        yield where, role, turn


def _turns(items: Any, field_name: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[Message]:
    return [
        Message(roles[role], _string(turn.get(content_key), f"{where}: '{content_key}'"))
        for where, role, turn in _turn_objects(items, field_name, role_key, content_key, roles)
    ]


def _tools(record: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """A row's `tools` as OpenAI function tools; LLaMA-Factory's JSON string of the list and bare
    {name, description, parameters} schemas are read too."""
    value = record.get("tools")
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except JSON_ERRORS as exc:
            raise ValueError(f"'tools' is a string but not a JSON list of tools ({_json_error(exc)})") from None
    if not isinstance(value, list):
        raise ValueError(f"'tools' must be a list of function schemas, got {_kind(value)}")
    return tuple(_tool(item, f"tools[{index}]") for index, item in enumerate(value))


def _tool(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ValueError(f"{where} must be an object {{type, function: {{name, parameters}}}}, got {_kind(item)}")
    if item.get("type", "function") != "function":
        raise ValueError(f"{where}: tool type {str(item['type'])[:40]!r} is not supported; give function tools")
    flat = {key: value for key, value in item.items() if key != "type"}  # {name, description, parameters}
    function = item["function"] if isinstance(item.get("function"), dict) else flat
    if not isinstance(function.get("name"), str) or not function["name"].strip():
        raise ValueError(f"{where}: a tool needs a 'name' (a non-empty string)")
    if not isinstance(function.get("parameters", {}), dict):
        raise ValueError(f"{where}: 'parameters' of tool '{function['name']}' must be a JSON schema object")
    _string(json.dumps(function, ensure_ascii=False), where)  # no unpaired surrogate anywhere in the schema
    return {"type": "function", "function": function}


def _arguments(value: Any, where: str) -> dict[str, Any]:
    """A call's arguments as an object: a JSON string is decoded once; one that holds JSON again is refused."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except JSON_ERRORS as exc:
            raise ValueError(
                f"{where}: 'arguments' is not JSON ({_json_error(exc)}); write them as a JSON object, "
                'e.g. {"city": "Paris"}'
            ) from None
        if isinstance(value, str):
            raise ValueError(f"{where}: 'arguments' is JSON encoded twice (a string of a string); encode it once")
    if not isinstance(value, dict):
        raise ValueError(f"{where}: 'arguments' must be a JSON object of named arguments, got {_kind(value)}")
    _string(json.dumps(value, ensure_ascii=False), f"{where}: 'arguments'")  # no unpaired surrogate in a value
    return value


def _tool_call(item: Any, where: str) -> ToolCall:
    """An OpenAI call {id, type, function: {name, arguments}}, or the flat {name, arguments} of LLaMA-Factory,
    Hermes and Glaive data ({name, parameters} of Llama's)."""
    if not isinstance(item, dict):
        raise ValueError(f"{where} must be an object {{id, type, function: {{name, arguments}}}}, got {_kind(item)}")
    if item.get("type", "function") != "function":
        raise ValueError(f"{where}: call type {str(item['type'])[:40]!r} is not supported; give function calls")
    function = item["function"] if isinstance(item.get("function"), dict) else item
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: the call needs the function's 'name' (a non-empty string)")
    arguments = function["arguments"] if "arguments" in function else function.get("parameters")
    call_id = item.get("id")
    if call_id is not None and not isinstance(call_id, str | int):
        raise ValueError(f"{where}: 'id' must be a string, got {_kind(call_id)}")
    return ToolCall(_string(name, f"{where}: 'name'"), _arguments(arguments, where), str(call_id or ""))


def _tool_calls(turn: dict[str, Any], where: str) -> tuple[ToolCall, ...]:
    """An assistant turn's `tool_calls` (or the single `function_call` of OpenAI's older function calling)."""
    calls = turn.get("tool_calls")
    if calls is None and turn.get("function_call") is not None:
        return (_tool_call(turn["function_call"], f"{where}.function_call"),)
    if calls is None:
        return ()
    if not isinstance(calls, list):
        raise ValueError(f"{where}: 'tool_calls' must be a list of calls, got {_kind(calls)}")
    return tuple(_tool_call(call, f"{where}.tool_calls[{index}]") for index, call in enumerate(calls))


def _tool_result(value: Any, where: str) -> str:
    # A result given as a JSON object is what the tool returned: the model reads it as its JSON text.
    return _string(json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else value, where)


def _optional_string(turn: dict[str, Any], key: str, where: str) -> str | None:
    value = turn.get(key)
    return None if value is None else _string(str(value) if isinstance(value, int) else value, f"{where}: '{key}'")


def _chat_message(where: str, role: str, turn: dict[str, Any]) -> Message:
    """One OpenAI message: tool calls and reasoning on assistant turns, results on tool turns."""
    reasoning_field = next((key for key in REASONING_FIELDS if turn.get(key) is not None), None)
    if role != "assistant" and (reasoning_field or turn.get("tool_calls") or turn.get("function_call")):
        what = f"'{reasoning_field}'" if reasoning_field else "tool calls"
        raise ValueError(f"{where}: a {role} turn holds {what}; only assistant turns do")
    if role in ("tool", "function"):
        content = _tool_result(turn.get("content"), f"{where}: 'content'")
        call_id, name = _optional_string(turn, "tool_call_id", where), _optional_string(turn, "name", where)
        return Message("tool", content, tool_call_id=call_id, name=name)
    calls = _tool_calls(turn, where) if role == "assistant" else ()
    content = "" if turn.get("content") is None and calls else _string(turn.get("content"), f"{where}: 'content'")
    reasoning = _string(turn[reasoning_field], f"{where}: '{reasoning_field}'") if reasoning_field else None
    return Message(role, content, calls, reasoning)


def _chat(record: dict[str, Any], prompt_only: bool = False) -> list[Message]:
    turns = _turn_objects(record.get("messages"), "messages", "role", "content", CHAT_ROLES)
    return [_chat_message(where, role, turn) for where, role, turn in turns]


def chat_messages(items: Any) -> list[Message]:
    """OpenAI `messages` (calls' arguments as objects or JSON strings, tool results) as Messages, read as training
    reads them; ValueError names the turn and what is wrong (the serve API's history and request logs use it)."""
    return _chat({"messages": items})


def function_tools(value: Any) -> tuple[dict[str, Any], ...]:
    """A `tools` value as OpenAI function tools, read as training reads a row's tools; ValueError names the tool."""
    return _tools({"tools": value})


def _sharegpt_calls(value: Any, where: str) -> tuple[ToolCall, ...]:
    """A function_call turn's value: one call {name, arguments} or a list of them, as an object or its JSON."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except JSON_ERRORS as exc:
            raise ValueError(f"{where}: a function_call must be JSON {{name, arguments}}: {_json_error(exc)}") from None
    items = value if isinstance(value, list) else [value]
    return tuple(_tool_call(item, where if len(items) == 1 else f"{where}[{i}]") for i, item in enumerate(items))


def _sharegpt(record: dict[str, Any], prompt_only: bool = False) -> list[Message]:
    messages = []
    roles = SHAREGPT_ROLES | SHAREGPT_TOOL_ROLES
    for where, role, turn in _turn_objects(record.get("conversations"), "conversations", "from", "value", roles):
        value = turn.get("value")
        if role == "function_call":
            messages.append(Message("assistant", "", _sharegpt_calls(value, f"{where}: 'value'")))
        elif roles[role] == "tool":
            messages.append(Message("tool", _tool_result(value, f"{where}: 'value'")))
        else:
            messages.append(Message(roles[role], _string(value, f"{where}: 'value'")))
    return messages


def _prompt(value: Any) -> list[Message]:
    """A preference or KTO prompt: a string (one user turn) or a list of chat turns not ending with an answer."""
    if value is None:
        raise ValueError("missing field 'prompt'")
    if isinstance(value, str):
        return [Message("user", _string(value, "field 'prompt'"))]
    messages = _turns(value, "prompt", "role", "content", {r: r for r in ROLES})
    if messages[-1].role == "assistant":
        raise ValueError("'prompt' ends with an assistant turn; the answers go in the answer fields")
    return messages


def _answer(record: dict[str, Any], key: str) -> str:
    """One answer: a string, or a list holding one assistant turn."""
    value = record.get(key)
    if isinstance(value, list):
        turns = _turns(value, key, "role", "content", {r: r for r in ROLES})
        if len(turns) != 1 or turns[0].role != "assistant":
            raise ValueError(
                f"'{key}' must be a string or a list of one assistant turn when a 'prompt' is given, "
                f"got {len(turns)} turn(s) ({', '.join(t.role for t in turns)})"
            )
        answer = turns[0].content
    else:
        answer = _text(record, key)
    if not answer.strip():
        raise ValueError(f"'{key}' is empty")
    return answer


def _preference(record: dict[str, Any], line: int) -> Conversation:
    """A pair: prompt + chosen/rejected answers, or chosen/rejected conversations that share the prompt."""
    if record.get("prompt") is not None:
        prompt = _prompt(record["prompt"])
        chosen, rejected = _answer(record, "chosen"), _answer(record, "rejected")
    else:
        for key in ("chosen", "rejected"):
            if not isinstance(record.get(key), list):
                got = "missing" if key not in record else _kind(record[key])
                raise ValueError(
                    f"without a 'prompt', '{key}' must be a list of chat turns (the whole conversation), got {got}; "
                    "or give the prompt in 'prompt' and the answers as strings"
                )
        sides = {
            key: _turns(record[key], key, "role", "content", {r: r for r in ROLES}) for key in ("chosen", "rejected")
        }
        for key, turns in sides.items():
            if turns[-1].role != "assistant":
                raise ValueError(f"'{key}' must end with an assistant turn (the answer)")
        prompt = sides["chosen"][:-1]
        if sides["rejected"][:-1] != prompt:
            other = sides["rejected"][:-1]
            same = [a == b for a, b in zip(prompt, other, strict=False)]
            turn = same.index(False) if False in same else len(same)
            raise ValueError(
                "'chosen' and 'rejected' must share every turn before their last assistant turn (the prompt); "
                f"they differ at turn {turn}"
            )
        if not prompt:
            raise ValueError("'chosen' and 'rejected' hold only the answer; put the prompt before it, or in 'prompt'")
        chosen, rejected = sides["chosen"][-1].content, sides["rejected"][-1].content
        for key, answer in (("chosen", chosen), ("rejected", rejected)):
            if not answer.strip():
                raise ValueError(f"the '{key}' answer is empty")
    return Conversation(messages=(*prompt, Message("assistant", chosen)), line=line, rejected=rejected)


def _kto_label(record: dict[str, Any]) -> bool:
    value = record.get("label")
    # CSV cells are text: "true" and "false" are the only way to write the label there.
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        shown = repr(value)[:40] if isinstance(value, str | int | float) else _kind(value)
        raise ValueError(
            f"'label' must be true (a desirable answer) or false (an undesirable one), got {shown}. If 'label' is "
            "a class label of SFT data, set the format to prompt_completion (data.format / --format)"
        )
    return value


def _kto(record: dict[str, Any], line: int) -> Conversation:
    prompt, completion, label = _prompt(record.get("prompt")), _answer(record, "completion"), _kto_label(record)
    return Conversation(messages=(*prompt, Message("assistant", completion)), line=line, label=label)


def _answer_turn(record: dict[str, Any], key: str, prompt_only: bool) -> list[Message]:
    """The answer field as an assistant turn; with `prompt_only`, none when the field is missing or null."""
    if prompt_only and record.get(key) is None:
        return []
    return [Message("assistant", _text(record, key))]


def _alpaca(record: dict[str, Any], prompt_only: bool = False) -> list[Message]:
    instruction, extra = _text(record, "instruction"), _text(record, "input", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [Message("user", prompt), *_answer_turn(record, "output", prompt_only)]
    if record.get("system"):
        messages.insert(0, Message("system", _text(record, "system")))
    return messages


def _prompt_completion(record: dict[str, Any], prompt_only: bool = False) -> list[Message]:
    return [Message("user", _text(record, "prompt")), *_answer_turn(record, "completion", prompt_only)]


TOOL_FORMATS = ("chat", "sharegpt")  # the formats whose rows may carry a `tools` list
# The turns of each SFT format but plain text, from one record (and whether a record may lack its answer).
TURNS: dict[str, Any] = {
    "chat": _chat,
    "sharegpt": _sharegpt,
    "alpaca": _alpaca,
    "prompt_completion": _prompt_completion,
}  # fmt: skip


def _check_ending(messages: list[Message], prompt_only: bool) -> None:
    """An SFT conversation ends with the answer to learn; a prompt without one (prompt_only) with a user turn."""
    last = messages[-1].role
    if last == "assistant" or (prompt_only and last == "user"):
        return
    if prompt_only:
        raise ValueError(
            f"the conversation ends with a {last} turn: end it with the user's prompt, or with an assistant answer"
        )
    raise ValueError(
        "the conversation must end with an assistant turn (the answer to learn); prompts without answers are read "
        "only for objective grpo"
    )


def normalise(record: Any, fmt: str, line: int, prompt_only: bool = False) -> Conversation:
    """Turn one raw record of a known format into a Conversation; ValueError says what is wrong. With
    `prompt_only` (objective grpo) an SFT record may hold a prompt without its answer."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object with fields, got {_kind(record)}")
    if fmt == "preference":
        return _preference(record, line)
    if fmt == "kto":
        return _kto(record, line)
    if fmt == "text":
        text = _text(record, "text")
        if not text.strip():
            raise ValueError("'text' is empty")
        return Conversation(text=text, line=line)
    if fmt not in TURNS:
        raise ValueError(f"unknown format {fmt!r}")
    messages = TURNS[fmt](record, prompt_only)
    _check_ending(messages, prompt_only)
    if any(m.role == "assistant" and not m.content.strip() and not m.tool_calls for m in messages):
        raise ValueError("an assistant answer is empty (no text and no tool call)")
    return Conversation(messages=tuple(messages), line=line, tools=_tools(record) if fmt in TOOL_FORMATS else ())


@dataclass
class ParsedFile:
    """Every good record of a file as a Conversation, and every bad one as a problem."""

    conversations: list[Conversation]
    format: str
    problems: Problems


def parse_file(path: str | Path, fmt: str = "auto", prompt_only: bool = False) -> ParsedFile:
    """Read a data file without stopping at bad records; raises only when the file cannot be read at all. With
    `prompt_only` (objective grpo), SFT records without an answer are read as prompts (Conversation.reference
    None)."""
    path = Path(path)
    if not path.is_file():
        raise TunesmithError(f"Data file {path} not found. Check data.path (or --data).")
    if fmt != "auto" and fmt not in FORMATS:
        raise TunesmithError(f"Unknown data format {fmt!r}; use auto or one of {', '.join(FORMATS)}.")
    problems = Problems(path, read_as=None if fmt == "auto" else f"format '{fmt}', as set")
    conversations: list[Conversation] = []
    chosen = None if fmt == "auto" else fmt
    detected_at = 0
    for line, record in iter_raw_records(path, problems):
        # A record that is not an object says nothing about the format; normalise reports it below.
        if chosen is None and isinstance(record, dict):
            chosen = detect_format(record)
            if chosen is None:
                names = [str(name)[:40] for name in list(record)[:10]]
                fields = ", ".join(names) + (", ..." if len(record) > 10 else "") if names else "none"
                raise TunesmithError(
                    f"{problems.where(line)}: cannot tell the format from the fields ({fields}). Use 'messages', "
                    "'conversations', 'instruction'/'output', 'prompt'/'completion', 'text', 'chosen'/'rejected' "
                    "(preference pairs) or 'prompt'/'completion'/'label' (KTO), or set data.format."
                )
            detected_at = line
            problems.read_as = f"format '{chosen}', detected from the fields of {position_word(path)} {line}"
        if detected_at and chosen == "prompt_completion" and isinstance(record, dict) and "label" in record:
            problems.add(
                line,
                "has a 'label' like a KTO row, but the file was read as prompt_completion from its first record "
                f"({position_word(path)} {detected_at}), which has none; give every row a true/false label (KTO) "
                "or none (SFT)",
            )
            continue
        try:
            conversations.append(normalise(record, chosen or fmt, line, prompt_only))
        except ValueError as exc:
            problems.add(line, str(exc))
    return ParsedFile(conversations, str(chosen or fmt), problems)


def read_conversations(
    path: str | Path, fmt: str = "auto", prompt_only: bool = False
) -> tuple[list[Conversation], str]:
    """Read a data file into Conversations and the format used; every bad record is reported at once."""
    parsed = parse_file(path, fmt, prompt_only)
    parsed.problems.raise_if_any()
    if not parsed.conversations:
        raise TunesmithError(f"{path}: no records found. Add at least one example.")
    return parsed.conversations, parsed.format


def write_jsonl(path: Path, conversations: list[Conversation]) -> None:
    from tunesmith.files import json_line, replacing

    with replacing(path) as handle:
        handle.writelines(json_line(conversation.to_record()) for conversation in conversations)
