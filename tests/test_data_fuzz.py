"""Every data file, however broken, either loads or stops with a TunesmithError: never another exception.

Hand-made bad files, then a few hundred seeded mutations (truncations, flipped, inserted and deleted bytes)
of valid JSONL, JSON, CSV, TSV and Parquet files, through the reader, the data check and `tunesmith train`.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunesmith.cli import main
from tunesmith.data.check import check_data
from tunesmith.data.formats import read_conversations
from tunesmith.errors import TunesmithError

from .conftest import chat_records


def _parquet(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def _jsonl(records: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


CHAT = chat_records(1)[0]
PARQUET = _parquet([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)])

# name: (file name, content, regex the reader's message must match). Every message names the file and,
# where the file has lines, the line.
BAD_FILES: dict[str, tuple[str, bytes, str]] = {
    "latin-1 jsonl": (
        "d.jsonl",
        _jsonl([CHAT]) + b'{"text": "caf\xe9"}\n',
        r"d\.jsonl:2: not UTF-8 .*0xe9 at column 14",
    ),
    "latin-1 csv": ("d.csv", b"prompt,completion\nq,a\nq2,caf\xe9\n", r"d\.csv:3: not UTF-8 text"),
    "utf-16 json": ("d.json", json.dumps([CHAT]).encode("utf-16"), r"d\.json:1: UTF-16 text\. Save the file as UTF-8"),
    "binary garbage": ("d.jsonl", bytes(range(256)) * 8, r"d\.jsonl:\d+: not UTF-8 text"),
    "NUL bytes": ("d.jsonl", b"\x00\x00\x00\n", r"d\.jsonl:1: invalid JSON"),
    "empty jsonl": ("d.jsonl", b"", r"d\.jsonl: no records found"),
    "blank jsonl": ("d.jsonl", b"\n  \r\n\n", r"d\.jsonl: no records found"),
    "empty json": ("d.json", b"", r"d\.json:1: invalid JSON"),
    "empty csv": ("d.csv", b"", r"d\.csv: no records found"),
    "empty parquet": ("d.parquet", b"", r"d\.parquet: cannot read it as Parquet"),
    "jsonl nested thousands deep": (
        "d.jsonl",
        _jsonl([CHAT]) + b"[" * 100_000 + b"\n",
        r"d\.jsonl:2: JSON nested too deeply",
    ),
    "json nested thousands deep": ("d.json", b'{"data": ' + b"[" * 100_000, r"d\.json: JSON nested too deeply"),
    "integer of 5000 digits": (
        "d.jsonl",
        b'{"text": ' + b"7" * 5000 + b"}\n",
        r"d\.jsonl:1: JSON holds a value Python",
    ),
    "json top-level scalar": ("d.json", b"42", r"d\.json: a \.json data file must hold a list .* not a number"),
    "json object without data": ("d.json", b'{"rows": []}', r"d\.json: a \.json data file must hold a list"),
    "json trailing garbage": ("d.json", json.dumps([CHAT]).encode() + b"\n]", r"d\.json:2: invalid JSON: Extra data"),
    "json list of strings": (
        "d.json",
        b'["a", "b"]',
        r"d\.json: record 1: expected an object with fields, got a string",
    ),
    "json null record": ("d.json", json.dumps([CHAT, None]).encode(), r"d\.json: record 2: .*got null"),
    "jsonl line that is an array": (
        "d.jsonl",
        b"[1, 2]\n" + _jsonl([CHAT]),
        r"d\.jsonl:1: expected an object .* an array",
    ),
    "jsonl unknown fields": (
        "d.jsonl",
        _jsonl([{"q": "x", "a": "y"}]),
        r"d\.jsonl:1: cannot tell the format .*\(q, a\)",
    ),
    "null field": ("d.jsonl", _jsonl([{"prompt": None, "completion": "a"}]), r"d\.jsonl:1: field 'prompt' is null"),
    "null messages": ("d.jsonl", _jsonl([{"messages": None}]), r"d\.jsonl:1: 'messages' must be a non-empty .* null"),
    "content parts instead of a string": (
        "d.jsonl",
        _jsonl([{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}]),
        r"d\.jsonl:1: messages\[0\]: 'content' must be a string, got an array",
    ),
    "number as answer": ("d.jsonl", _jsonl([{"prompt": "2+2", "completion": 4}]), r"d\.jsonl:1: .*got a number"),
    "role that is a list": (
        "d.jsonl",
        _jsonl([{"messages": [{"role": ["user"], "content": "q"}, {"role": "assistant", "content": "a"}]}]),
        r"d\.jsonl:1: messages\[0\]: 'role' must be one of assistant, function, system, tool, user, got an array",
    ),
    "unpaired surrogate": ("d.jsonl", b'{"text": "bad \\ud800 escape"}\n', r"d\.jsonl:1: .*unpaired surrogate"),
    "csv extra and missing cells": (
        "d.csv",
        b"prompt,completion\nq,a\nq2,a2,surplus\nq3\n",
        r"d\.csv:3: 3 cells but the header has 2 columns(.|\n)*d\.csv:4: 1 cell but",
    ),
    "csv unclosed quote": ("d.csv", b'prompt,completion\nq,"a\nq2,a2\n', r"d\.csv:2: not valid CSV .*quote"),
    "csv repeated column": ("d.csv", b"prompt,prompt,completion\nq,q,a\n", r"d\.csv:1: column\(s\) prompt appear"),
    "csv messages cell not JSON": ("d.csv", b'messages\n"[{""role"": ""user"""\n', r"d\.csv:2: column 'messages' must"),
    "csv messages cell too deep": (
        "d.csv",
        b"messages\n" + b"[" * 5000 + b"\n",
        r"d\.csv:2: column 'messages' must .* nested too deeply",
    ),
    "tsv extra cell": ("d.tsv", b"prompt\tcompletion\nq\ta\tb\n", r"d\.tsv:2: 3 cells .* contain a tab"),
    "truncated parquet": ("d.parquet", PARQUET[: len(PARQUET) // 2], r"d\.parquet: cannot read it as Parquet"),
    "text renamed to parquet": ("d.parquet", _jsonl([CHAT]), r"d\.parquet: cannot read it as Parquet"),
    "parquet of the wrong types": (
        "d.parquet",
        _parquet([{"prompt": [1, 2], "completion": 1.5}]),
        r"d\.parquet:1: field 'prompt' must be a string, got an array",
    ),
}


def write_bad_file(tmp_path: Path, case: str) -> Path:
    name, content, _ = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_each_bad_file_names_the_file_line_and_problem(tmp_path, case):
    path = write_bad_file(tmp_path, case)
    with pytest.raises(TunesmithError, match=BAD_FILES[case][2]):
        read_conversations(path)


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_data_check_reports_each_bad_file_without_a_traceback(tmp_path, case, capsys):
    path = write_bad_file(tmp_path, case)
    assert main(["data", "check", str(path)]) in (1, 2)
    printed = capsys.readouterr()
    assert path.name in printed.out + printed.err and "Traceback" not in printed.err


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_train_stops_on_each_bad_file_with_a_message(tmp_path, case, tiny_model_dir, capsys):
    path, out = write_bad_file(tmp_path, case), tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(path), "--out", str(out), "--max-steps", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and path.name in err and "Traceback" not in err
    assert not out.exists()


def _valid_files() -> dict[str, bytes]:
    records = chat_records(6)
    pairs = [{"prompt": f'say "{i}", then, stop', "completion": f"ok {i}\nsecond line"} for i in range(6)]
    csv_text = "prompt,completion\r\n" + "".join(
        '"{}","{}"\r\n'.format(p["prompt"].replace('"', '""'), p["completion"]) for p in pairs
    )
    messages_csv = "messages,label\n" + "".join(
        '"{}",x\n'.format(json.dumps(r["messages"]).replace('"', '""')) for r in records
    )
    return {
        "chat.jsonl": _jsonl(records),
        "pairs.jsonl": _jsonl(pairs),
        "chat.json": json.dumps(records, indent=1).encode(),
        "data.json": json.dumps({"data": pairs}).encode(),
        "pairs.csv": b"\xef\xbb\xbf" + csv_text.encode(),
        "messages.csv": messages_csv.encode(),
        "pairs.tsv": b"prompt\tcompletion\n" + b"".join(f"q{i}\ta{i}\n".encode() for i in range(6)),
    }


SPECIAL = [b'"', b"'", b",", b"\t", b"\n", b"\r", b"[", b"{", b"]", b"}", b":", b"\\", b"\x00", b"\xff", b"\xc3"]
SPECIAL += [b"\xef\xbb\xbf", b"null", b"\\ud800", b"[" * 3000, b'"role": 1', b"\xe2\x80\xa8"]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three random edits: truncate, flip a byte, insert a special token, delete or repeat a span."""
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(data) + 1)
        kind = rng.randrange(5)
        if kind == 0:
            data = data[:at]
        elif kind == 1 and at < len(data):
            data = data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]
        elif kind == 2:
            data = data[:at] + rng.choice(SPECIAL) + data[at:]
        elif kind == 3:
            data = data[:at] + data[at + rng.randint(1, 40) :]
        else:
            data = data[:at] + data[at : at + rng.randint(1, 80)] * 2 + data[at:]
    return data


def loads_or_explains(path: Path) -> None:
    """The reader and the data check either succeed or raise a TunesmithError that names the file."""
    for read in (read_conversations, check_data):
        try:
            read(path)
        except TunesmithError as exc:
            assert path.name in str(exc)


def test_random_mutations_of_valid_files_load_or_explain(tmp_path):
    rng = random.Random(14)
    valid = _valid_files()
    cases = 0
    for name, data in valid.items():
        loads_or_explains(_write(tmp_path / name, data))  # the seeds themselves are valid
        for index in range(50):
            loads_or_explains(_write(tmp_path / f"m{index}-{name}", mutate(data, rng)))
            cases += 1
    assert cases == 50 * len(valid)


def test_random_damage_to_a_parquet_file_loads_or_explains(tmp_path):
    rng = random.Random(14)
    for index in range(40):
        cut = PARQUET[: rng.randrange(len(PARQUET))] if index % 2 else mutate(PARQUET, rng)
        loads_or_explains(_write(tmp_path / f"m{index}.parquet", cut))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
