import json
from datetime import date, datetime
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunesmith.data.formats import Message, Problems, detect_format, iter_raw_records, read_conversations
from tunesmith.errors import TunesmithError

from .conftest import write_jsonl

EXPECTED = (Message("user", "What is 2+2?"), Message("assistant", "4"))

RECORDS = {
    "chat": {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]},
    "alpaca": {"instruction": "What is 2+2?", "input": "", "output": "4"},
    "prompt_completion": {"prompt": "What is 2+2?", "completion": "4"},
}


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_each_format_is_detected_and_normalised(tmp_path, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS[fmt]] * 2)
    conversations, detected = read_conversations(path)
    assert detected == fmt
    assert [c.messages for c in conversations] == [EXPECTED, EXPECTED]
    assert [c.line for c in conversations] == [1, 2]


def test_alpaca_input_joins_the_instruction(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Translate", "input": "chat", "output": "cat"}])
    (conversation,), _ = read_conversations(path)
    assert conversation.messages[0] == Message("user", "Translate\n\nchat")


def test_sharegpt_system_turn_and_multi_turn(tmp_path):
    record = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "bye"},
            {"from": "gpt", "value": "ciao"},
        ]
    }
    (conversation,), _ = read_conversations(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert [m.role for m in conversation.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conversation.reference == "ciao"
    assert conversation.prompt_messages[-1] == Message("user", "bye")


def test_plain_text(tmp_path):
    (conversation,), fmt = read_conversations(write_jsonl(tmp_path / "d.jsonl", [{"text": "raw corpus"}]))
    assert fmt == "text" and conversation.text == "raw corpus" and conversation.messages == ()


def test_json_csv_and_parquet_files(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(3)))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.csv", "d.parquet"):
        conversations, fmt = read_conversations(tmp_path / name)
        assert fmt == "prompt_completion", name
        assert [c.reference for c in conversations] == ["a0", "a1", "a2"], name


def test_csv_messages_column_holds_json(tmp_path):
    cell = json.dumps(RECORDS["chat"]["messages"]).replace('"', '""')
    (tmp_path / "d.csv").write_text(f'messages\n"{cell}"\n')
    (conversation,), fmt = read_conversations(tmp_path / "d.csv")
    assert fmt == "chat" and conversation.messages == EXPECTED


def test_format_can_be_forced(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "prompt": "p", "completion": "c"}])
    (conversation,), fmt = read_conversations(path, "prompt_completion")
    assert fmt == "prompt_completion" and conversation.reference == "c"


def test_every_bad_line_is_reported(tmp_path):
    good = RECORDS["chat"]
    lines = [
        json.dumps(good),  # 1 ok
        "{not json",  # 2
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),  # 3 no answer
        json.dumps(good),  # 4 ok
        json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),  # 5
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}),  # 6
        json.dumps({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "y"}]}),  # 7
        json.dumps({"messages": "hello"}),  # 8
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TunesmithError) as caught:
        read_conversations(path)
    message = str(caught.value)
    assert "6 bad record(s)" in message
    for line, words in [
        (2, "invalid JSON"),
        (3, "end with an assistant"),
        (5, "unknown role 'wizard'"),
        (6, "answer is empty"),
        (7, "must be a string"),
        (8, "non-empty list"),
    ]:
        assert f"bad.jsonl:{line}: " in message and words in message, (line, words)
    assert "bad.jsonl:1:" not in message and "bad.jsonl:4:" not in message


def test_unknown_format_names_the_fields(tmp_path):
    with pytest.raises(TunesmithError, match=r"d.jsonl:1: cannot tell the format.*question, answer"):
        read_conversations(write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}]))


def test_missing_file_and_unsupported_suffix(tmp_path):
    with pytest.raises(TunesmithError, match="not found"):
        read_conversations(tmp_path / "nope.jsonl")
    (tmp_path / "d.xml").write_text("<x/>")
    with pytest.raises(TunesmithError, match="unsupported file type '.xml'"):
        read_conversations(tmp_path / "d.xml")


def test_detect_format_of_non_records():
    assert detect_format([1, 2]) is None
    assert detect_format({"foo": 1}) is None


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.tsv"])
def test_byte_order_mark_and_crlf_line_ends_are_accepted(tmp_path, name):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    text = {
        "d.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
        "d.json": json.dumps(rows, indent=2),
        "d.csv": "prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(3)),
        "d.tsv": "prompt\tcompletion\n" + "".join(f"q{i}\ta{i}\n" for i in range(3)),
    }[name]
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    conversations, fmt = read_conversations(tmp_path / name)
    assert fmt == "prompt_completion"
    assert [c.messages for c in conversations] == [
        (Message("user", f"q{i}"), Message("assistant", f"a{i}")) for i in range(3)
    ]


def test_csv_cells_beyond_the_csv_modules_size_limit_load(tmp_path):
    document = "word " * 60_000  # 300 kB, over the csv module's default limit of 128 KiB
    (tmp_path / "d.csv").write_text(f'text\n"{document}"\nshort\n')
    conversations, fmt = read_conversations(tmp_path / "d.csv")
    assert fmt == "text" and [c.text for c in conversations] == [document, "short"]


def test_csv_cells_that_look_like_json_stay_text(tmp_path):
    deep = "[" * 5000
    rows = [("[1, 2, 3]", '{"a": 1}'), ("[citation needed]", "[]"), (deep, "null")]
    body = "".join(f'"{p}","{c.replace(chr(34), chr(34) * 2)}"\n' for p, c in rows)
    (tmp_path / "d.csv").write_text("prompt,completion\n" + body)
    conversations, _ = read_conversations(tmp_path / "d.csv")
    assert [(c.messages[0].content, c.reference) for c in conversations] == rows


def test_csv_rows_are_numbered_by_the_line_they_start_on(tmp_path):
    (tmp_path / "d.csv").write_text('prompt,completion\n"two\nlines",a\nq,\n\n,,\nq3,a3,x\n')
    with pytest.raises(TunesmithError) as caught:
        read_conversations(tmp_path / "d.csv")
    message = str(caught.value)
    assert "d.csv:4: an assistant answer is empty" in message
    assert "d.csv:7: 3 cells but the header has 2 columns" in message and "2 bad record(s)" in message


def test_a_format_that_does_not_exist_is_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS["chat"]])
    with pytest.raises(TunesmithError, match="Unknown data format 'openai'; use auto or one of chat, sharegpt"):
        read_conversations(path, "openai")


def test_json_problems_are_numbered_by_record(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([RECORDS["chat"], {"messages": []}], indent=2))
    with pytest.raises(TunesmithError, match=r"d\.json: record 2: 'messages' must be a non-empty list"):
        read_conversations(tmp_path / "d.json")


def test_parquet_values_without_a_json_type_become_json(tmp_path):
    row = {"prompt": b"q", "completion": "a", "at": datetime(2024, 1, 2, 3, 4), "day": date(2024, 1, 2)}
    row |= {"blob": b"\xff\x00", "price": Decimal("1.50"), "tags": {"k": [b"x"]}}
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    (conversation,), _ = read_conversations(path)
    assert conversation.messages == (Message("user", "q"), Message("assistant", "a"))
    [(_, record)] = iter_raw_records(path, Problems(path))
    assert json.loads(json.dumps(record)) == {
        "prompt": "q",
        "completion": "a",
        "at": "2024-01-02T03:04:00",
        "day": "2024-01-02",
        "blob": "/wA=",
        "price": "1.50",
        "tags": {"k": ["x"]},
    }
