"""The UI's launcher against real processes: a run's process is known by pid, host and start time (never a pid
alone), a run on another host is never counted or signalled here, and two launchers on one runs folder share one
queue under one lock. The "training" processes are `sleep`s standing in for `python -m tunesmith run`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.ui.launcher import Launcher
from tunesmith.watch import process_identity, run_status, running_here, this_host


@pytest.fixture
def sleeper():
    """A live process of this user that is not any run's."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def _run(root, name, **manifest):
    run = root / name
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"status": "running", "started": "2026-01-01T00:00:00"} | manifest))
    (run / "config.yaml").write_text(f"name: {name}\nmodel: m\nmethod: lora\n")
    return run


def test_a_pid_reused_by_another_process_is_not_the_run(tmp_path, sleeper):
    identity = process_identity(sleeper.pid)
    assert run_status({"status": "running"} | identity) == "running" and running_here({"status": "running"} | identity)
    reused = {"status": "running"} | identity | {"pid_started": identity["pid_started"] - 3600}  # a dead run's pid
    assert run_status(reused) == "crashed" and not running_here(reused)
    _run(tmp_path, "old", **reused)
    launcher = Launcher(tmp_path)
    assert launcher.active() == []  # it holds no place of --max-trainings
    with pytest.raises(TunesmithError, match="not running"):
        launcher.stop("old")
    time.sleep(0.2)
    assert sleeper.poll() is None  # never signalled


def test_a_run_on_another_host_is_shown_there_and_never_counted_or_signalled(tmp_path, sleeper):
    from tunesmith.watch import describe

    elsewhere = process_identity(sleeper.pid) | {"host": f"not-{this_host()}"}
    run = _run(tmp_path, "copied", **elsewhere)
    assert describe(run)["status"] == "running" and describe(run)["host"] == f"not-{this_host()}"
    launcher = Launcher(tmp_path)
    assert launcher.active() == []
    with pytest.raises(TunesmithError, match="stop it there"):
        launcher.stop("copied")
    assert sleeper.poll() is None


def test_stopping_another_users_run_says_so(tmp_path, sleeper, monkeypatch):
    _run(tmp_path, "theirs", **process_identity(sleeper.pid))

    def refuse(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refuse)
    with pytest.raises(TunesmithError, match="another user"):
        Launcher(tmp_path).stop("theirs")


def test_stop_signals_a_live_run_that_is_its_process(tmp_path, sleeper):
    _run(tmp_path, "live", **process_identity(sleeper.pid))
    assert Launcher(tmp_path).active() == ["live"]
    assert "stopping" in Launcher(tmp_path).stop("live")
    assert sleeper.wait(10) == -signal.SIGINT


@pytest.fixture
def fake_python(tmp_path):
    """A 'python' that trains nothing: it sleeps, whatever it is asked to run."""
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)
    return str(script)


def test_two_launchers_on_one_folder_share_one_limit_and_one_lock(tmp_path, fake_python):
    from filelock import Timeout

    runs = tmp_path / "runs"
    first, second = Launcher(runs, 1, fake_python), Launcher(runs, 1, fake_python)
    try:
        first.enqueue("a", "name: a\n")
        second.enqueue("b", "name: b\n")
        first.tick()  # starts a: no manifest yet, only its launch record says it runs
        second.tick()  # must see a's launch and wait
        assert list(first.children) == ["a"] and second.children == {}
        assert second.active() == ["a"] and [e["name"] for e in second.queue()] == ["b"]
        with pytest.raises(TunesmithError, match="already queued or running"):
            second.enqueue("a", "name: a\n")
        with first.locked(), pytest.raises(Timeout):
            second.file_lock.acquire(timeout=0.2)  # the queue is held across processes, not only threads
        first.children["a"].kill()
        first.children["a"].wait()
        first.tick()  # reaps a, records its exit, and takes the next run off the shared queue
        second.tick()
        assert list(first.children) == ["b"] and second.children == {} and second.queue() == []
    finally:
        for launcher in (first, second):
            for child in launcher.children.values():
                child.kill()
                child.wait()


def test_a_run_records_what_names_its_process(lora_run):
    manifest = json.loads((lora_run / "manifest.json").read_text())
    assert manifest["host"] == this_host() and isinstance(manifest["pid"], int)
    assert isinstance(manifest["pid_started"], float) and manifest["pid_started"] <= time.time()
