"""`tunesmith monitor`: the report on production traffic, the datasets exported from feedback, and its command
forms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.serve_helpers import PROMPTS, client, running
from tunesmith.cli import main
from tunesmith.deploy.engine import Engine
from tunesmith.deploy.requestlog import RequestLog
from tunesmith.deploy.serve import create_app

pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


def test_monitor_reports_drift_and_format_failures_and_exports_corrections(runs, tmp_path, capsys):
    from tunesmith.deploy.monitor import monitor_report

    db = tmp_path / "requests.sqlite"
    engine = Engine(runs[:1])
    app = create_app(engine, RequestLog(db), default_max_tokens=4)
    with running(app) as url:
        api = client(url, key="unused")
        ids = [
            api.chat.completions.create(model="colours", messages=[{"role": "user", "content": p}]).id
            for p in [*PROMPTS, *[f"zebra giraffe hippo safari number {i} " * 6 for i in range(5)]]
        ]
        for request_id, correction in ((ids[0], '{"colour": "red"}'), (ids[4], '{"colour": "none"}')):
            httpx.post(f"{url}/v1/feedback", json={"id": request_id, "rating": 0, "correction": correction})
        httpx.post(f"{url}/v1/feedback", json={"id": ids[1], "rating": 5})
    engine.close()
    report = monitor_report(runs[0], db)
    assert report["traffic"]["requests"] == 8 and report["traffic"]["errors"] == 0
    lengths, words = report["drift"]["prompt_tokens"], report["drift"]["vocabulary"]
    assert lengths["longer_than_training"] == pytest.approx(5 / 8)
    assert words["unseen_word_share"] > 0.5 and "zebra" in words["top_unseen"]
    assert any("Vocabulary drifted" in alert for alert in report["alerts"])
    # The toy run's eval metrics have no format check; the tiny random model's answers are not JSON either way.
    assert report["format"]["checks"] == []
    assert report["feedback"] == {"count": 3, "mean_rating": pytest.approx(5 / 3, abs=1e-3), "corrections": 2}

    out = tmp_path / "new.jsonl"
    assert main(["monitor", str(runs[0]), "--db", str(db), "--export", str(out), "--min-rating", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["messages"][-1] == {"role": "assistant", "content": '{"colour": "red"}'}
    assert main(["monitor", str(runs[0]), "--db", str(db), "--export", str(out)]) == 2  # never overwritten silently
    assert main(["data", "check", str(out)]) in (0, 1)  # our format: no parse errors (1 = warnings only)
    assert "Traceback" not in capsys.readouterr().err
    assert main(["monitor", str(runs[0]), "--db", str(db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["traffic"]["requests"] == 8


def test_monitor_counts_answers_failing_the_runs_format_check(runs, tmp_path):
    from tunesmith.deploy.monitor import monitor_report

    db = tmp_path / "requests.sqlite"
    log = RequestLog(db)
    for i, output in enumerate(['{"colour": "red"}', "not json", '{"colour": "blue"}', "{broken"]):
        log.record(
            id=f"r{i}",
            endpoint="chat",
            model="colours",
            status=200,
            latency_ms=10.0,
            prompt_tokens=30,
            completion_tokens=5,
            messages=[{"role": "user", "content": "colour red item 1"}],
            output=output,
        )
    log.record(id="r9", endpoint="chat", model="colours", status=500, error="boom")
    log.record(id="r10", endpoint="chat", model="colours", status=499, error="client gone")  # not a server failure
    run = runs[0]
    config_text = (run / "config.yaml").read_text()
    try:
        (run / "config.yaml").write_text(config_text.replace("- exact_match", "- exact_match\n  - json_valid", 1))
        report = monitor_report(run, db)
    finally:
        (run / "config.yaml").write_text(config_text)
    assert report["format"]["json_valid"]["failing"] == 2 and report["format"]["json_valid"]["share"] == 0.5
    assert report["traffic"]["errors"] == 1 and report["traffic"]["error_rate"] == round(1 / 6, 4)
    assert report["traffic"]["client_gone"] == 1
    assert any("fail json_valid" in alert for alert in report["alerts"])
    assert any("requests failed" in alert for alert in report["alerts"])


def _rated_log(db: Path) -> Path:
    """A request log with a correction, a good and a poor answer to one prompt, and an unrated answer."""
    log = RequestLog(db)
    answers = [(PROMPTS[0], "blue", 1, '{"colour": "red"}'), (PROMPTS[1], '{"colour": "blue"}', 5, None)]
    answers += [(PROMPTS[1], "pink", 1, None), (PROMPTS[2], '{"colour": "pink"}', None, None)]
    for i, (prompt, output, rating, correction) in enumerate(answers):
        log.record(id=f"r{i}", endpoint="chat", model="colours", status=200, latency_ms=10.0, prompt_tokens=9,
                   completion_tokens=3, messages=[{"role": "user", "content": prompt}], output=output)  # fmt: skip
        if rating is not None:
            log.feedback(f"r{i}", rating, correction, None)
    log.close()
    return db


def _monitor(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["monitor", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("mode", "flag", "options"),
    [
        ("export", "--export", ["--min-rating", "4"]),
        ("export-preferences", "--export-preferences", ["--good-rating", "4", "--bad-rating", "2"]),
        ("export-preferences", "--export-preferences", ["--kto"]),
    ],
)
def test_each_export_mode_writes_what_its_old_flag_writes(runs, tmp_path, capsys, mode, flag, options):
    db, run = str(_rated_log(tmp_path / "requests.sqlite")), str(runs[0])
    new, old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    code, new_out, new_err = _monitor(capsys, mode, run, "--db", db, "--out", str(new), *options)
    assert code == 0 and new.read_text() and new_err == ""
    code, old_out, old_err = _monitor(capsys, run, "--db", db, flag, str(old), *options)
    assert code == 0 and old.read_text() == new.read_text()
    assert old_out.replace(str(old), "FILE") == new_out.replace(str(new), "FILE")
    assert f"tunesmith monitor {mode} RUN --out FILE" in old_err and len(old_err.strip().splitlines()) == 1
    for argv in ([mode, run, "--db", db, "--out", str(new)], [run, "--db", db, flag, str(old)]):
        assert _monitor(capsys, *argv, *options)[0] == 2  # an existing file is never replaced silently
        assert _monitor(capsys, *argv, *options, "--overwrite")[0] == 0
    assert old.read_text() == new.read_text()


def test_the_report_mode_prints_what_the_plain_form_prints(runs, tmp_path, capsys):
    db, run = str(_rated_log(tmp_path / "requests.sqlite")), str(runs[0])
    for options in (["--json"], []):
        code, plain, plain_err = _monitor(capsys, run, "--db", db, *options)
        assert code == 0 and plain_err == ""
        assert _monitor(capsys, "report", run, "--db", db, *options) == (0, plain, "")
    code, report, _ = _monitor(capsys, "--db", db, "--json", run)  # options before RUN, as ever
    assert json.loads(report)["traffic"]["requests"] == 4 and json.loads(report)["feedback"]["corrections"] == 1
    assert _monitor(capsys, "report", "--db", db, "--json", run) == (0, report, "")


def test_a_run_folder_named_like_a_mode_is_reached_by_its_path(runs, tmp_path, capsys, monkeypatch):
    db = str(_rated_log(tmp_path / "requests.sqlite"))
    shutil.copytree(runs[0], tmp_path / "export")
    monkeypatch.chdir(tmp_path)
    code, report, _ = _monitor(capsys, "./export", "--db", db, "--json")
    assert code == 0 and json.loads(report)["traffic"]["requests"] == 4
    assert _monitor(capsys, "report", "export", "--db", db, "--json") == (0, report, "")
    assert _monitor(capsys, "./export", "--db", db, "--export", "next.jsonl")[0] == 0
    assert _monitor(capsys, "export", "export", "--db", db, "--out", "again.jsonl")[0] == 0
    assert (tmp_path / "next.jsonl").read_text() == (tmp_path / "again.jsonl").read_text()


def test_both_old_export_flags_together_are_refused(runs, tmp_path, capsys):
    db = str(_rated_log(tmp_path / "requests.sqlite"))
    code, _, err = _monitor(capsys, str(runs[0]), "--db", db, "--export", "a.jsonl", "--export-preferences", "b.jsonl")
    assert code == 2 and "not both" in err
    assert not (tmp_path / "a.jsonl").exists()


HELP = {
    "report": (["RUN", "--db", "--hours", "--json"], ["--out", "--min-rating", "--kto", "--overwrite"]),
    "export": (["RUN", "--db", "--out", "--min-rating", "--overwrite"], ["--hours", "--json", "--kto"]),
    "export-preferences": (
        ["RUN", "--db", "--out", "--good-rating", "--bad-rating", "--kto", "--overwrite"],
        ["--hours", "--json", "--min-rating"],
    ),
}


@pytest.mark.parametrize("mode", list(HELP))
def test_each_monitor_mode_has_a_help_that_lists_its_own_options_only(mode, capsys):
    with pytest.raises(SystemExit) as done:
        main(["monitor", mode, "--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0 and text.startswith(f"usage: tunesmith monitor {mode} ")
    listed, absent = HELP[mode]
    for option in listed:
        assert option in text, option
    for option in absent:
        assert option not in text, option


def test_monitor_help_names_the_modes_and_run_alone_reports(capsys):
    with pytest.raises(SystemExit):
        main(["monitor", "--help"])
    overview = capsys.readouterr().out
    assert all(f"tunesmith monitor {form}" in overview for form in ("[report] RUN", "export RUN --out FILE"))
    assert "export-preferences RUN --out FILE" in overview and "./export" in overview
    with pytest.raises(SystemExit):
        main(["monitor", "runs/x", "--help"])
    assert capsys.readouterr().out.startswith("usage: tunesmith monitor report ")
    with pytest.raises(SystemExit) as missing:
        main(["monitor"])
    assert missing.value.code == 2 and "RUN" in capsys.readouterr().err
