"""Every shipped example config is valid and runs, found recursively (with a tiny model in place of the real one)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.cli import main
from tunesmith.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(ROOT.glob("examples/**/*.yaml"))


def test_there_are_example_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_config_opens_with_its_command_and_validates(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run with:") and "tunesmith" in first
    config = load_config(path)
    assert (ROOT / str(config.data.path)).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_config_runs_end_to_end(path, tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    common = [f"model={tiny_model_dir}", "train.max_steps=2", "eval.limit=2", "eval.max_new_tokens=4"]

    def run(config: Path, out: Path, *overrides: str) -> dict:
        args = ["run", str(config), "--json"] + [
            item for o in (*common, f"out={out}", *overrides) for item in ("--set", o)
        ]
        assert main(args) == 0
        return json.loads(capsys.readouterr().out)

    extra = []
    start = load_config(path).init_from
    if start:  # a later stage: run the example stage it starts from first, on the same tiny model
        stage = next(p for p in CONFIGS if load_config(p).run_dir == Path(start))
        run(stage, tmp_path / "first")
        extra = [f"init_from={tmp_path / 'first'}"]
    result = run(path, tmp_path / "run", *extra)
    assert result["train"]["steps"] == 2 and result["compare"]["items"] == 2


def regenerated_records(example: str, data_file: str, tmp_path: Path) -> list[dict]:
    """The example's shipped data file, after checking its seeded generator writes it byte for byte."""
    shipped = ROOT / "examples" / example / data_file
    regenerated = tmp_path / data_file
    script = ROOT / "examples" / example / "make_data.py"
    subprocess.run([sys.executable, str(script), "--out", str(regenerated)], check=True, capture_output=True)
    assert regenerated.read_bytes() == shipped.read_bytes()
    return [json.loads(line) for line in shipped.read_text().splitlines()]


def test_preference_generator_reproduces_the_shipped_pairs(tmp_path):
    records = regenerated_records("preference", "replies.jsonl", tmp_path)
    assert len(records) >= 400 and all(r["chosen"] != r["rejected"] for r in records)
    longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in records) / len(records)
    assert 0.2 < longer < 0.8  # length alone cannot tell chosen from rejected


def test_quickstart_generator_reproduces_the_shipped_data(tmp_path):
    records = regenerated_records("quickstart", "notes.jsonl", tmp_path)
    assert len(records) >= 600
    assert len({r["messages"][0]["content"] for r in records}) == len(records)


def test_rl_generator_reproduces_the_shipped_data_with_the_quickstarts_record(tmp_path):
    records = regenerated_records("rl", "notes.jsonl", tmp_path)
    quickstart = json.loads(regenerated_records("quickstart", "notes.jsonl", tmp_path)[0]["messages"][1]["content"])
    answers = [json.loads(r["messages"][1]["content"]) for r in records]
    assert len(records) >= 600 and all(a.keys() == quickstart.keys() for a in answers)
    assert all(3 <= len(a["medications"]) <= 5 and a["medications"] == sorted(a["medications"]) for a in answers)


def test_tools_generator_reproduces_the_shipped_conversations_of_every_kind(tmp_path):
    records = regenerated_records("tools", "calls.jsonl", tmp_path)
    assert len(records) >= 500 and len({json.dumps(r["messages"]) for r in records}) == len(records)
    last = [r["messages"][-1] for r in records]
    calls = [len(m.get("tool_calls") or []) for m in last]
    assert {0, 1, 2} <= set(calls)  # no call, one call, parallel calls
    assert any(m["role"] == "tool" for r in records for m in r["messages"])  # a call that uses a result
    # the end of a loop: a call, its result, then text for the person
    ends = [r["messages"][-3:] for r in records]
    assert any(c.get("tool_calls") and t["role"] == "tool" and not a.get("tool_calls") for c, t, a in ends)
    names = {t["function"]["name"] for t in records[0]["tools"]}
    assert all(c["function"]["name"] in names for m in last for c in m.get("tool_calls") or [])


def test_the_tools_agent_loop_counts_a_task_complete_only_for_the_right_two_calls():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "examples/tools/agent_loop.py"
    spec = importlib.util.spec_from_file_location("agent_loop", path)
    assert spec is not None and spec.loader is not None
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    request, name, day = loop.task(__import__("random").Random(3))
    assert name in request and day.startswith("2027-")

    def calls(*made):
        clinic = loop.Clinic()
        for tool, arguments in made:
            clinic.run(tool, arguments)
        return clinic

    found = loop.Clinic().ids[name]
    assert loop.complete(
        calls(("find_patient", {"name": name}), ("book", {"patient_id": found, "day": day})), name, day
    )
    assert not loop.complete(calls(("book", {"patient_id": found, "day": day})), name, day)  # never looked up
    wrong_id = calls(("find_patient", {"name": name}), ("book", {"patient_id": "P-000", "day": day}))
    assert not loop.complete(wrong_id, name, day)
    wrong_day = calls(("find_patient", {"name": name}), ("book", {"patient_id": found, "day": "2027-13-01"}))
    assert not loop.complete(wrong_day, name, day)
    assert loop.Clinic().run("find_patient", {"name": "Nobody"}) == {"error": "no such patient"}
