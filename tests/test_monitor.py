"""`tunesmith monitor`: the report on production traffic, the datasets exported from feedback, and its command
forms."""

from __future__ import annotations

import json

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
