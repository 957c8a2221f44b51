"""Writes into a run or data folder never follow a symbolic link planted there, and logs stay valid JSON."""

from __future__ import annotations

import json
import shutil

import pytest

from tunesmith.cli import main
from tunesmith.errors import TunesmithError
from tunesmith.files import append_text, json_line, mark, write_text_atomic
from tunesmith.rundir import RunDir


@pytest.fixture
def target(tmp_path):
    """A file outside the run that a planted link points at; its content must survive."""
    outside = tmp_path / "outside"
    outside.mkdir()
    path = outside / "precious.txt"
    path.write_text("keep me")
    return path


def test_atomic_writes_replace_a_planted_link_instead_of_writing_through_it(tmp_path, target):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.config.symlink_to(target)
    run.write_config("model: m\n")
    (run.path / "notes.json").symlink_to(target)
    write_text_atomic(run.path / "notes.json", "{}")
    (run.path / ".tunesmith.json").symlink_to(target)
    mark(run.path, "run")
    assert target.read_text() == "keep me"
    assert not run.config.is_symlink() and run.config.read_text() == "model: m\n"
    assert json.loads((run.path / ".tunesmith.json").read_text())["written_by"] == "tunesmith"


def test_appending_refuses_a_link_even_a_dangling_one(tmp_path, target):
    log = tmp_path / "metrics.jsonl"
    log.symlink_to(target)
    with pytest.raises(TunesmithError, match="symbolic link"):
        append_text(log, "{}\n")
    dangling = tmp_path / "verdicts.jsonl"
    dangling.symlink_to(tmp_path / "nowhere" / "new.txt")
    with pytest.raises(TunesmithError, match="symbolic link"):
        append_text(dangling, "{}\n")
    assert target.read_text() == "keep me" and not (tmp_path / "nowhere").exists()


def test_non_finite_numbers_are_logged_as_null():
    line = json_line({"loss": 1.5, "grad_norm": float("inf"), "nested": [float("nan"), {"x": -float("inf")}]})
    assert json.loads(line) == {"loss": 1.5, "grad_norm": None, "nested": [None, {"x": None}]}
    assert "Infinity" not in line and "NaN" not in line


def test_compare_on_a_downloaded_run_writes_through_none_of_its_links(tmp_path, lora_run, target):
    run = tmp_path / "downloaded"
    shutil.copytree(lora_run, run)
    eval_dir = run / "eval"
    shutil.rmtree(eval_dir, ignore_errors=True)
    eval_dir.mkdir()
    planted = ["compare.json", "predictions.jsonl", "report.json", "report.html", "eval-test-base.json"]
    for name in planted:
        (eval_dir / name).symlink_to(target)
    assert main(["compare", str(run), "--limit", "2"]) == 0
    assert target.read_text() == "keep me"
    assert json.loads((eval_dir / "compare.json").read_text())["items"] >= 1
