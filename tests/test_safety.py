"""Nothing from disk runs code, and nothing is destroyed by accident: --overwrite only replaces what
tunesmith wrote, resuming never unpickles, a failing checkpoint write keeps the previous one."""

import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from tunesmith.cli import main
from tunesmith.config import CheckpointConfig, TrainConfig
from tunesmith.errors import TrainingInterrupted, TunesmithError
from tunesmith.files import save_atomic, write_text_atomic
from tunesmith.rundir import RunDir
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.loop import Session, fit

from .conftest import build_tokenizer, chat_records, write_jsonl
from .test_cli import train_args
from .test_resume import SETTINGS, lora_model, nan_on_steps, optimizer_and_scheduler
from .test_train import examples_for

QUICK = ["--method", "lora", "--max-steps", "2", "--train.batch_size", "4", "--quiet", "--test-fraction", "0.25"]


def test_train_overwrite_refuses_a_folder_that_is_not_a_run(tiny_model_dir, chat_file, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    code = main(train_args(tiny_model_dir, chat_file, folder, *QUICK, "--overwrite"))
    assert code != 0
    assert "not a run directory that tunesmith wrote" in capsys.readouterr().err
    assert (folder / "thesis.tex").read_text() == "years of work"


def test_train_overwrite_replaces_a_run_including_one_from_before_the_marker(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "runs" / "r"
    assert main(train_args(tiny_model_dir, chat_file, out, *QUICK)) == 0
    (out / ".tunesmith.json").unlink()  # as runs written before the marker existed: the manifest still says ours
    (out / "stale.txt").write_text("old")
    assert main(train_args(tiny_model_dir, chat_file, out, *QUICK, "--overwrite")) == 0
    assert not (out / "stale.txt").exists() and (out / "manifest.json").is_file()


@pytest.mark.parametrize("where", ["cwd", "parent", "home", "root"])
def test_overwrite_refuses_protected_folders(where, tmp_path, monkeypatch):
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    target = {"cwd": inner, "parent": tmp_path / "a", "home": tmp_path / "home", "root": Path("/")}[where]
    (target / "manifest.json").write_text('{"tunesmith": "0.1.0"}') if where != "root" else None
    with pytest.raises(TunesmithError, match="Refusing to replace"):
        RunDir(target).create(overwrite=True)
    assert target.is_dir()


def test_export_overwrite_keeps_a_users_folders(lora_run, tmp_path):
    from tunesmith.deploy.export import export_run

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(TunesmithError, match="not an export that tunesmith wrote"):
        export_run(lora_run, "adapter", out=foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"

    target = tmp_path / "exp"
    beside = [tmp_path / "exp.new", tmp_path / "exp.partial"]  # names the old export used for its temporary folders
    for path in beside:
        path.mkdir()
        (path / "keep.txt").write_text("mine")
    export_run(lora_run, "adapter", out=target)
    export_run(lora_run, "adapter", out=target, overwrite=True)  # ours: replaced
    assert (target / "adapter_config.json").is_file()
    assert all((path / "keep.txt").read_text() == "mine" for path in beside)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "exp.new", "exp.partial", "foreign"]


def test_save_atomic_keeps_the_old_folder_when_writing_the_new_one_fails(tmp_path):
    target = tmp_path / "weights"
    save_atomic(target, lambda p: (p.mkdir(), (p / "w.bin").write_text("old")))

    def broken(path):
        path.mkdir()
        (path / "w.bin").write_text("half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        save_atomic(target, broken, replace=True)
    assert (target / "w.bin").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights"]  # no temporary folder left


def test_split_and_feedback_exports_only_replace_files_tunesmith_wrote(tmp_path):
    from tunesmith.data.split import split_file

    data = write_jsonl(tmp_path / "all.jsonl", chat_records(40))
    out = tmp_path / "split"
    split_file(data, out)
    split_file(data, out, overwrite=True)  # ours: replaced
    (out / "train.jsonl").write_text((out / "train.jsonl").read_text() + "\n")  # edited by hand: no longer ours
    with pytest.raises(TunesmithError, match="not a split file that tunesmith wrote"):
        split_file(data, out, overwrite=True)
    assert (out / "train.jsonl").read_text().endswith("\n\n")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files


def test_manifest_readers_never_see_half_a_file(tmp_path):
    path = tmp_path / "manifest.json"
    write_text_atomic(path, json.dumps({"n": 0}))
    bad: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                json.loads(path.read_text())
            except ValueError as exc:
                bad.append(str(exc))

    reader = threading.Thread(target=read)
    reader.start()
    for n in range(300):
        write_text_atomic(path, json.dumps({"n": n, "pad": "x" * 20000}))
    done.set()
    reader.join()
    assert not bad
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {EXPLOIT_MARK}",))


EXPLOIT_MARK = Path("/tmp/tunesmith-exploit-ran")


def test_resume_never_runs_code_from_a_crafted_checkpoint(chat_file, tmp_path):
    EXPLOIT_MARK.unlink(missing_ok=True)
    tokenizer = build_tokenizer()
    fit(
        lora_model(len(tokenizer), 1), examples_for(chat_file, tokenizer), TrainConfig(**SETTINGS),
        tokenizer.pad_token_id, session=Session(run_dir=tmp_path, checkpoint=CheckpointConfig(every=4)),
    )  # fmt: skip
    latest = ckpt.latest_checkpoint(tmp_path)
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        original = (latest / name).read_bytes()
        (latest / name).write_bytes(pickle.dumps(Exploit()))
        model = lora_model(len(tokenizer), 2)
        with pytest.raises(TunesmithError, match=f"{name} is not a checkpoint file tunesmith can load safely"):
            ckpt.load_checkpoint(latest, model, *optimizer_and_scheduler(model))
        assert not EXPLOIT_MARK.exists(), f"unpickling {name} ran code"
        (latest / name).write_bytes(original)
    model = lora_model(len(tokenizer), 2)
    assert ckpt.load_checkpoint(latest, model, *optimizer_and_scheduler(model)).step == 8  # all load again


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    torch.save(ckpt.rng_states(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


CHILD = """
import resource, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.test_resume import SETTINGS, lora_model
from tests.test_train import examples_for
from tests.conftest import build_tokenizer
from tunesmith.config import CheckpointConfig, TrainConfig
from tunesmith.errors import TunesmithError
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.loop import Session, fit

tokenizer = build_tokenizer()
examples = examples_for(Path({data!r}), tokenizer)

def limit_after_first(path):
    # Once step 2 is on disk, no file may grow past 4 KiB: the next checkpoint's writes fail with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))

try:
    fit(lora_model(len(tokenizer), 1), examples, TrainConfig(**SETTINGS), tokenizer.pad_token_id,
        session=Session(run_dir=Path({run!r}), checkpoint=CheckpointConfig(every=2), on_checkpoint=limit_after_first))
except TunesmithError as exc:
    print("ERROR:", exc)
    sys.exit(3)
"""


def test_a_real_short_write_keeps_the_previous_checkpoint(chat_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    root = str(Path(__file__).resolve().parents[1])
    script = textwrap.dedent(CHILD).format(root=root, data=str(chat_file), run=str(run))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "Writing checkpoint step-000004 failed" in done.stdout
    assert "previous checkpoint step-000002 is intact" in done.stdout
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]  # no temporary folder
    model = lora_model(len(build_tokenizer()), 7)
    assert ckpt.load_checkpoint(run / "checkpoints" / "step-000002", model, *optimizer_and_scheduler(model)).step == 2


@pytest.mark.parametrize("bad_step", [8, 4])
def test_a_skipped_last_or_checkpoint_step_still_checkpoints(bad_step, chat_file, tmp_path):
    tokenizer = build_tokenizer()
    model = lora_model(len(tokenizer), 1)
    nan_on_steps(model, {bad_step})
    settings = TrainConfig(**(SETTINGS | {"grad_accum": 1, "on_nonfinite": "skip"}))
    result = fit(
        model, examples_for(chat_file, tokenizer), settings, tokenizer.pad_token_id,
        session=Session(run_dir=tmp_path, checkpoint=CheckpointConfig(every=4, keep_last=5)),
    )  # fmt: skip
    assert result.skipped_steps == 1
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-000004", "step-000008"]


def test_a_stop_signal_on_a_skipped_step_still_stops_with_a_checkpoint(chat_file, tmp_path):
    import signal

    tokenizer = build_tokenizer()
    model = lora_model(len(tokenizer), 1)
    calls = {"n": 0}

    def nan_and_terminate_on_step_3(module, args, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGTERM)
                return output * float("nan")
        return None

    model.get_input_embeddings().register_forward_hook(nan_and_terminate_on_step_3)
    settings = TrainConfig(**(SETTINGS | {"grad_accum": 1, "on_nonfinite": "skip"}))
    with pytest.raises(TrainingInterrupted) as stop:
        fit(
            model, examples_for(chat_file, tokenizer), settings, tokenizer.pad_token_id,
            session=Session(run_dir=tmp_path, checkpoint=CheckpointConfig(every=100)),
        )  # fmt: skip
    assert stop.value.step == 3
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-000003"]
