"""The review flow driven by scripted key presses: verdicts stored, resumable, applied, round-tripped via a sheet."""

import csv
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunesmith.cli import main
from tunesmith.data.review import (
    apply_review,
    export_sheet,
    import_sheet,
    load_verdicts,
    record_verdict,
    sample_items,
    sheet_cell,
    sheet_value,
    verdict_path,
)
from tunesmith.errors import TunesmithError

from .conftest import write_jsonl
from .test_check import clean_records
from .test_split import labelled_records


def run_review(data, keys, *extra):
    return subprocess.run(
        [sys.executable, "-m", "tunesmith", "data", "review", str(data), *extra],
        input=keys,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_scripted_review_resume_and_apply(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", clean_records(30))
    original = data.read_text()
    first = run_review(data, "a\nr wrong animal\nx\ne fixed wording\nThe corrected answer.\n\nq\n", "--sample", "5")
    assert first.returncode == 0, first.stderr
    assert "keys: a = accept" in first.stdout and "1/5" in first.stdout
    verdicts = list(load_verdicts(data).values())
    assert [v["verdict"] for v in verdicts] == ["accept", "reject", "edit"]
    assert verdicts[1]["note"] == "wrong animal" and verdicts[2]["edited_answer"] == "The corrected answer."
    assert "2 of 5 sampled left" in first.stdout

    second = run_review(data, "s\na\n", "--sample", "5")  # resumes at the 4th: skip it, accept the 5th
    assert "1/2" in second.stdout
    assert [v["verdict"] for v in load_verdicts(data).values()] == ["accept", "reject", "edit", "accept"]
    assert data.read_text() == original  # the data file itself is never touched

    summary = apply_review(data)
    cleaned = [json.loads(line) for line in (tmp_path / "d.reviewed.jsonl").read_text().splitlines()]
    assert len(cleaned) == 29
    rejected_line, edited_line = verdicts[1]["line"], verdicts[2]["line"]
    source = [json.loads(line) for line in original.splitlines()]
    assert source[rejected_line - 1] not in cleaned
    assert any(r["messages"][1]["content"] == "The corrected answer." for r in cleaned)
    assert source[edited_line - 1] not in cleaned
    assert summary.verdicts == {"accept": 2, "reject": 1, "edit": 1}
    assert (tmp_path / "d.reviewed.summary.json").is_file()


def test_sample_is_stratified_by_class(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", labelled_records(200))  # 25% bug, 75% feature
    items = sample_items(data, 20, seed=1)
    labels = [item.label for item in items]
    assert len(items) == 20 and labels.count("bug") == 5 and labels.count("feature") == 15
    assert [i.hash for i in sample_items(data, 20, seed=1)] == [i.hash for i in items]


def test_acceptance_rate_per_class(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", labelled_records(40))
    result = run_review(data, "r\n" * 4 + "a\n" * 6, "--sample", "10", "--json")
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["reviewed"] == 10 and summary["remaining"] == 0
    assert summary["verdicts"] == {"reject": 4, "accept": 6}
    expected = {}
    for label in ("bug", "feature"):
        mine = [v for v in load_verdicts(data).values() if v["label"] == label]
        expected[label] = round(sum(v["verdict"] == "accept" for v in mine) / len(mine), 4)
    assert summary["acceptance_by_class"] == expected


def test_sheet_export_and_import(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", clean_records(30))
    sheet = tmp_path / "sheet.csv"
    assert run_review(data, "", "--sample", "4", "--export", str(sheet)).returncode == 0
    rows = list(csv.DictReader(sheet.open()))
    assert len(rows) == 4 and rows[0]["prompt"] and rows[0]["verdict"] == ""
    rows[0]["verdict"], rows[1]["verdict"], rows[1]["edited_answer"] = "reject", "edit", "Sheet answer."
    with sheet.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = run_review(data, "", "--import", str(sheet))
    assert "Imported 2 verdict(s)" in result.stdout
    verdicts = load_verdicts(data)
    assert verdicts[rows[0]["hash"]]["verdict"] == "reject"
    assert verdicts[rows[1]["hash"]]["edited_answer"] == "Sheet answer."
    assert verdict_path(data).name == "d.review.jsonl"
    rows[2]["verdict"] = "maybe"
    with sheet.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    bad = run_review(data, "", "--import", str(sheet))
    assert bad.returncode == 2 and "verdict 'maybe'" in bad.stderr


FORMULAS = ['=HYPERLINK("http://x")', "+1", "-2 degrees", "@SUM(A1)", "\tindented", "\rreturn", "'=quoted", "''+two"]


def test_sheet_cells_never_start_a_formula_and_import_undoes_exactly_that(tmp_path):
    records = clean_records(30)
    for record, formula in zip(records, FORMULAS, strict=False):
        record["messages"][0]["content"] = formula + " prompt"
        record["messages"][1]["content"] = formula
    data = write_jsonl(tmp_path / "d.jsonl", records)
    items = sample_items(data, 30, seed=0)
    for item, formula in zip(items, FORMULAS, strict=False):
        record_verdict(data, item, "edit", note=formula, edited=formula + " fixed")
    before = load_verdicts(data)
    sheet = tmp_path / "sheet.csv"
    assert export_sheet(data, items, sheet) == 30
    rows = list(csv.reader(sheet.open(encoding="utf-8", newline="")))
    assert not [cell for row in rows for cell in row if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert {row[4] for row in rows} >= {"'" + f for f in FORMULAS}
    verdict_path(data).unlink()
    assert import_sheet(data, sheet) == len(FORMULAS)
    after = load_verdicts(data)
    assert {h: (v["note"], v["edited_answer"]) for h, v in after.items()} == {
        h: (v["note"], v["edited_answer"]) for h, v in before.items()
    }
    for value in ["", "'", "''", "'x", "=", "'='", "a=b", "-", "'-'-", "\t", "plain"] + FORMULAS:
        assert sheet_value(sheet_cell(value)) == value


def test_export_refuses_to_overwrite_without_the_flag(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", clean_records(30))
    sheet = tmp_path / "sheet.csv"
    args = ["data", "review", str(data), "--sample", "4", "--export", str(sheet)]
    assert main(args) == 0
    exported = sheet.read_bytes()
    assert main(args) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err and sheet.read_bytes() == exported
    assert main([*args, "--overwrite"]) == 0 and len(list(csv.DictReader(sheet.open()))) == 4
    sheet.write_bytes(exported.replace(b",,,\r\n", b",reject,,\r\n", 1))  # a reviewer's work
    assert main([*args, "--overwrite"]) == 2
    assert "not a review sheet that tunesmith wrote" in capsys.readouterr().err and "reject" in sheet.read_text()
    assert main(["data", "review", str(data), "--export", str(data), "--overwrite"]) == 2
    assert "would overwrite the data" in capsys.readouterr().err


def test_import_reads_what_spreadsheet_programs_save(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", clean_records(30))
    sheet = tmp_path / "sheet.csv"
    export_sheet(data, sample_items(data, 3, seed=0), sheet)
    rows = list(csv.DictReader(sheet.open(encoding="utf-8", newline="")))
    rows[0]["verdict"] = "reject"
    with sheet.open("w", encoding="utf-8-sig", newline="") as handle:  # BOM and CRLF, as Excel writes them
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
    assert import_sheet(data, sheet) == 1
    assert load_verdicts(data)[rows[0]["hash"]]["verdict"] == "reject"
    sheet.write_bytes(sheet.read_bytes().replace(b"reject", b"r\xe9ject"))  # saved as Windows-1252
    assert main(["data", "review", str(data), "--import", str(sheet)]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    sheet.write_text("line,hash,label,prompt,answer,verdict,note,edited_answer\n1,abc\n")
    assert main(["data", "review", str(data), "--import", str(sheet)]) == 2
    assert "sheet.csv:2: 2 cells but the header has 8 columns" in capsys.readouterr().err


def test_a_sheet_with_a_mistake_imports_nothing(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", clean_records(30))
    sheet = tmp_path / "sheet.csv"
    export_sheet(data, sample_items(data, 3, seed=0), sheet)
    rows = list(csv.DictReader(sheet.open(encoding="utf-8", newline="")))
    rows[0]["verdict"], rows[2]["verdict"] = "accept", "maybe"
    with sheet.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(TunesmithError, match=r"sheet\.csv:4: verdict 'maybe'"):
        import_sheet(data, sheet)
    assert load_verdicts(data) == {}


def test_verdict_file_keeps_any_note_and_names_a_broken_line(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", clean_records(12))
    item = sample_items(data, 1, seed=0)[0]
    record_verdict(data, item, "reject", note="one\u2028two\x0bthree")  # separators that are not line ends
    assert load_verdicts(data)[item.hash]["note"] == "one\u2028two\x0bthree"
    with verdict_path(data).open("a", encoding="utf-8") as handle:
        handle.write('["not", "a", "verdict"]\n')
    with pytest.raises(TunesmithError, match=r"d\.review\.jsonl:2: not a verdict written by tunesmith"):
        load_verdicts(data)


def test_apply_writes_parquet_records_with_timestamps(tmp_path):
    rows = [r["messages"] for r in clean_records(12)]
    table = [
        {"prompt": m[0]["content"], "completion": m[1]["content"], "at": datetime(2024, 5, i + 1)}
        for i, m in enumerate(rows)
    ]
    data = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(table), data)
    summary = apply_review(data)
    written = [json.loads(line) for line in Path(summary.written).read_text().splitlines()]
    assert len(written) == 12 and written[0]["at"] == "2024-05-01T00:00:00"


def test_apply_overwrite_replaces_only_its_own_output(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", clean_records(30))
    apply_review(data)
    out = tmp_path / "d.reviewed.jsonl"
    with pytest.raises(TunesmithError, match="pass --overwrite"):
        apply_review(data)
    apply_review(data, overwrite=True)  # ours: replaced
    out.write_text(out.read_text() + '{"messages": []}\n')  # edited by hand since: no longer ours
    with pytest.raises(TunesmithError, match="not a reviewed data file that tunesmith wrote"):
        apply_review(data, overwrite=True)
    assert out.read_text().endswith('{"messages": []}\n')


@pytest.mark.parametrize(
    "record, field",
    [
        ({"prompt": "Say hi.", "chosen": "Hi.", "rejected": "No."}, lambda r: r["chosen"]),
        (
            {"prompt": "Say hi.", "chosen": [{"role": "assistant", "content": "Hi."}], "rejected": "No."},
            lambda r: r["chosen"][0]["content"],
        ),
        (
            {
                "chosen": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}],
                "rejected": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "No."}],
            },
            lambda r: r["chosen"][1]["content"],
        ),
        ({"prompt": "Say hi.", "completion": "Hi.", "label": True}, lambda r: r["completion"]),
    ],
    ids=["pair-text", "pair-one-turn", "pair-conversations", "kto"],
)
def test_an_edited_answer_applies_to_preference_and_kto_rows(tmp_path, record, field):
    data = write_jsonl(tmp_path / "pairs.jsonl", [record])
    item = sample_items(data, 1, seed=0)[0]
    record_verdict(data, item, "edit", edited="Hello there.")
    summary = apply_review(data)
    (written,) = [json.loads(line) for line in (tmp_path / "pairs.reviewed.jsonl").read_text().splitlines()]
    assert field(written) == "Hello there." and summary.verdicts == {"edit": 1}
    assert written.get("rejected") == record.get("rejected")  # only the chosen answer is the one reviewed


def test_a_link_planted_as_the_verdict_file_is_never_written_through(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", clean_records(5))
    elsewhere = tmp_path / "outside" / "created.txt"
    verdict_path(data).symlink_to(elsewhere)  # dangling: the first verdict would create the target
    item = sample_items(data, 1, seed=0)[0]
    with pytest.raises(TunesmithError, match="symbolic link"):
        record_verdict(data, item, "accept")
    assert not elsewhere.exists()
