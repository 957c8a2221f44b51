"""Read data files in any supported layout and normalise every record to a `Conversation`.

Files: JSONL, JSON (a list of records), CSV, Parquet. Record formats: chat `messages` (OpenAI roles),
ShareGPT `conversations` (from/value), Alpaca (instruction/input/output), prompt/completion, plain
text. Every bad record is reported with its line (or row) number; reading never stops at the first.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMATS = ("chat", "sharegpt", "alpaca", "prompt_completion", "text")
MAX_REPORTED = 50


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """One training example. `text` is set (and `messages` empty) for plain-text pretraining records."""

    messages: tuple[Message, ...] = ()
    text: str | None = None
    line: int = 0

    def to_record(self) -> dict[str, Any]:
        if self.text is not None:
            return {"text": self.text}
        return {"messages": [{"role": m.role, "content": m.content} for m in self.messages]}

    @property
    def prompt_messages(self) -> tuple[Message, ...]:
        """Everything before the last assistant turn: what a model is asked at inference."""
        last = max((i for i, m in enumerate(self.messages) if m.role == "assistant"), default=len(self.messages))
        return self.messages[:last]

    @property
    def reference(self) -> str | None:
        """The last assistant answer: the expected output when evaluating."""
        answers = [m.content for m in self.messages if m.role == "assistant"]
        return answers[-1] if answers else None


@dataclass
class Problems:
    """Bad records found while reading, each as (line, message)."""

    path: Path
    items: list[tuple[int, str]] = field(default_factory=list)

    def add(self, line: int, message: str) -> None:
        self.items.append((line, message))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = "\n".join(f"  {self.path}:{line}: {msg}" for line, msg in self.items[:MAX_REPORTED])
        more = f"\n  ... and {len(self.items) - MAX_REPORTED} more" if len(self.items) > MAX_REPORTED else ""
        raise TunesmithError(
            f"{self.path}: {len(self.items)} bad record(s):\n{shown}{more}\nFix or remove these records and run again."
        )


def iter_raw_records(path: Path, problems: Problems) -> Iterator[tuple[int, Any]]:
    """Yield (line or row number, parsed record) for every record of a data file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    yield number, json.loads(raw)
                except json.JSONDecodeError as exc:
                    problems.add(number, f"invalid JSON ({exc.msg} at column {exc.colno})")
    elif suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            problems.add(exc.lineno, f"invalid JSON ({exc.msg} at column {exc.colno})")
            return
        if isinstance(records, dict) and isinstance(records.get("data"), list):
            records = records["data"]
        if not isinstance(records, list):
            problems.add(1, 'a .json data file must hold a list of records (or {"data": [...]})')
            return
        # Record numbers are 1-based positions in the list; JSON has no reliable line per record.
        yield from enumerate(records, start=1)
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            for row in reader:
                # Line numbers count the header as line 1, as a spreadsheet shows them.
                yield reader.line_num, _decode_json_cells(row)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield number, row
    else:
        raise TunesmithError(f"{path}: unsupported file type '{suffix}'. Use .jsonl, .json, .csv, .tsv or .parquet.")


def _decode_json_cells(row: dict[str, Any]) -> dict[str, Any]:
    """CSV cells holding JSON lists (a messages column) are decoded; other cells stay strings."""
    decoded = {}
    for key, value in row.items():
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        decoded[key] = value
    return decoded


def detect_format(record: Any) -> str | None:
    """The format whose defining fields the record has, or None."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def _text(record: dict[str, Any], key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _turns(items: Any, field_name: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[Message]:
    if not isinstance(items, list) or not items:
        raise ValueError(f"'{field_name}' must be a non-empty list of turns")
    messages = []
    for index, turn in enumerate(items):
        where = f"{field_name}[{index}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where} must be an object with '{role_key}' and '{content_key}'")
        role = turn.get(role_key)
        if role not in roles:
            raise ValueError(f"{where}: unknown role {role!r}; use one of {', '.join(sorted(roles))}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise ValueError(f"{where}: '{content_key}' must be a string, got {type(content).__name__}")
        messages.append(Message(roles[role], content))
    return messages


def normalise(record: Any, fmt: str, line: int) -> Conversation:
    """Turn one raw record of a known format into a Conversation; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object with fields, got {type(record).__name__}")
    if fmt == "text":
        text = _text(record, "text")
        if not text.strip():
            raise ValueError("'text' is empty")
        return Conversation(text=text, line=line)
    if fmt == "chat":
        messages = _turns(record.get("messages"), "messages", "role", "content", {r: r for r in ROLES})
    elif fmt == "sharegpt":
        messages = _turns(record.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    elif fmt == "alpaca":
        instruction, extra = _text(record, "instruction"), _text(record, "input", required=False)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [Message("user", prompt), Message("assistant", _text(record, "output"))]
        if record.get("system"):
            messages.insert(0, Message("system", _text(record, "system")))
    elif fmt == "prompt_completion":
        messages = [Message("user", _text(record, "prompt")), Message("assistant", _text(record, "completion"))]
    else:
        raise ValueError(f"unknown format {fmt!r}")
    if messages[-1].role != "assistant":
        raise ValueError("the conversation must end with an assistant turn (the answer to learn)")
    for message in messages:
        if message.role == "assistant" and not message.content.strip():
            raise ValueError("an assistant answer is empty")
    return Conversation(messages=tuple(messages), line=line)


@dataclass
class ParsedFile:
    """Every good record of a file as a Conversation, and every bad one as a problem."""

    conversations: list[Conversation]
    format: str
    problems: Problems


def parse_file(path: str | Path, fmt: str = "auto") -> ParsedFile:
    """Read a data file without stopping at bad records; raises only when the file cannot be read at all."""
    path = Path(path)
    if not path.is_file():
        raise TunesmithError(f"Data file {path} not found. Check data.path (or --data).")
    problems = Problems(path)
    conversations: list[Conversation] = []
    chosen = None if fmt == "auto" else fmt
    for line, record in iter_raw_records(path, problems):
        if chosen is None:
            chosen = detect_format(record)
            if chosen is None:
                fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise TunesmithError(
                    f"{path}:{line}: cannot tell the format from the fields ({fields}). Use 'messages', "
                    "'conversations', 'instruction'/'output', 'prompt'/'completion' or 'text', "
                    "or set data.format."
                )
        try:
            conversations.append(normalise(record, chosen, line))
        except ValueError as exc:
            problems.add(line, str(exc))
    return ParsedFile(conversations, str(chosen or fmt), problems)


def read_conversations(path: str | Path, fmt: str = "auto") -> tuple[list[Conversation], str]:
    """Read a data file into Conversations and the format used; every bad record is reported at once."""
    parsed = parse_file(path, fmt)
    parsed.problems.raise_if_any()
    if not parsed.conversations:
        raise TunesmithError(f"{path}: no records found. Add at least one example.")
    return parsed.conversations, parsed.format


def write_jsonl(path: Path, conversations: list[Conversation]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for conversation in conversations:
            handle.write(json.dumps(conversation.to_record(), ensure_ascii=False) + "\n")
