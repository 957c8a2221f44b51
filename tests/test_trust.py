"""A run folder read back runs no code: custom metrics and lm-eval include paths need this command line's consent."""

from __future__ import annotations

import shutil

import pytest
import yaml

from tunesmith import trust
from tunesmith.cli import build_parser, main
from tunesmith.cli.common import config_from_args
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import metrics as m


def _metric_file(folder, marker):
    """A custom metric whose import leaves a marker file: proof that its code ran."""
    module = folder / "planted_metric.py"
    module.write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef score(prediction, reference):\n    return 1.0\n")
    return f"{module}:score"


def _plant(run, spec, field=("eval", "metrics")):
    """Edit a run folder's config.yaml as someone who shared it could."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    section, key = field
    config.setdefault(section, {})[key] = [spec, "exact_match"] if key == "metrics" else spec
    (run / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def shared_run(tmp_path, lora_run):
    """A copy of a finished run, as downloaded: its config names a custom metric."""
    run = tmp_path / "downloaded"
    shutil.copytree(lora_run, run)
    marker = tmp_path / "ran.txt"
    spec = _metric_file(tmp_path, marker)
    _plant(run, spec)
    return run, spec, marker


@pytest.mark.parametrize("command", ["compare", "eval"])
def test_compare_and_eval_of_a_shared_run_refuse_its_code_and_name_the_entry_and_the_flag(shared_run, command, capsys):
    run, spec, marker = shared_run
    assert main([command, str(run)]) == 2
    message = capsys.readouterr().err
    assert "eval.metrics" in message and "planted_metric.py:score" in message.replace("\n", "")
    assert "--allow-code" in message
    assert not marker.exists()


def test_allow_code_on_the_command_line_runs_it(shared_run):
    run, spec, marker = shared_run
    assert main(["eval", str(run), "--limit", "2", "--allow-code"]) == 0
    assert marker.read_text() == "ran"


def test_resuming_from_a_run_folders_config_refuses_its_code_before_any_work(shared_run, capsys):
    run, spec, marker = shared_run
    before = (run / "manifest.json").read_text()
    assert main(["run", str(run / "config.yaml"), "--resume", "--quiet"]) == 2
    assert "--allow-code" in capsys.readouterr().err
    assert not marker.exists()
    assert (run / "manifest.json").read_text() == before  # refused before training touched the run


def test_a_config_file_the_user_passes_may_name_code(tmp_path):
    marker = tmp_path / "ran.txt"
    spec = _metric_file(tmp_path, marker)
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({"model": "m", "data": {"path": "d.jsonl"}, "eval": {"metrics": [spec]}}))
    config_from_args(build_parser().parse_args(["train", str(config)]))
    assert trust.allowed(spec)


def test_code_named_by_a_flag_is_allowed_even_over_a_run_folders_config(shared_run, tmp_path):
    run, spec, marker = shared_run
    (tmp_path / "mine").mkdir()
    mine = _metric_file(tmp_path / "mine", tmp_path / "mine.txt")
    args = build_parser().parse_args(["train", str(run / "config.yaml"), "--set", f"validation.metrics={mine}"])
    config_from_args(args)
    assert trust.allowed(mine) and not trust.allowed(spec)


def test_lm_eval_include_path_from_a_run_folder_is_code_too(shared_run, tmp_path, capsys):
    run, _, _ = shared_run
    _plant(run, "exact_match", ("eval", "metrics"))
    _plant(run, str(tmp_path), ("eval", "lm_eval_include_path"))
    assert main(["compare", str(run)]) == 2
    assert "eval.lm_eval_include_path" in capsys.readouterr().err


def test_the_metric_loader_itself_refuses_what_no_command_line_allowed(tmp_path, monkeypatch):
    marker = tmp_path / "ran.txt"
    spec = _metric_file(tmp_path, marker)
    with pytest.raises(TunesmithError, match="--allow-code"):
        m.score([spec], ["a"], ["a"])
    assert not marker.exists()
    # A process tunesmith ui launched may run nothing, whatever it is told.
    monkeypatch.setenv(trust.LAUNCHED_BY_UI, "1")
    trust.grant(everything=True)
    with pytest.raises(TunesmithError, match="tunesmith ui"):
        m.score([spec], ["a"], ["a"])
    assert not marker.exists()


def test_code_entries_reads_lists_comma_strings_and_skips_built_in_names():
    tree = {"eval": {"metrics": "exact_match, a.py:f", "lm_eval_include_path": None}, "validation": {"metrics": []}}
    assert trust.code_entries(tree) == [("eval.metrics", "a.py:f")]
