"""The review flow driven by scripted key presses: verdicts stored, resumable, applied, round-tripped via a sheet."""

import csv
import json
import subprocess
import sys

from tunesmith.data.review import apply_review, load_verdicts, sample_items, verdict_path

from .conftest import write_jsonl
from .test_check import clean_records
from .test_split import labelled_records


def run_review(data, keys, *extra):
    return subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", "data", "review", str(data), *extra],
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
