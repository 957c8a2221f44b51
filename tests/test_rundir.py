"""RunDir keeps its promise: it names every file a run holds (LAYOUT), a real run holds nothing LAYOUT does not
describe, and no other module spells a run file's name (it asks RunDir for the path)."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import tunesmith
from tunesmith.files import MARKER
from tunesmith.rundir import LAYOUT

SOURCE = Path(tunesmith.__file__).parent
# The names only rundir.py may spell: each LAYOUT entry's last part (glob stars aside), and a checkpoint's folder.
OWNED = {key.rstrip("/").rsplit("/", 1)[-1] for key in LAYOUT} - {"*", "step-*", "data", "model", "adapter"}
# Also ordinary words (a tracker is called tensorboard or wandb; a model folder holds its own tokenizer/):
OWNED -= {"tokenizer", "eval", "export", "serve", "checkpoints", "tensorboard", "wandb"}
OWNED |= {"step-", "eval-", "predictions-", "parity-"}  # the starts of names RunDir builds from their parts
ELSEWHERE = {MARKER: "files.py"}  # the marker of every folder tunesmith made, runs and exports alike


def _spelled(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants that look like a file name (no spaces), with their line; f-string parts included."""
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value and " " not in node.value
    ]


def _names_a_run_file(text: str) -> str | None:
    last = text.rstrip("/").rsplit("/", 1)[-1]
    if last in OWNED or last.startswith("step-") or last.startswith(".tmp-step-"):
        return last
    return None


def test_no_module_but_rundir_spells_a_run_file():
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        if path.name == "rundir.py":
            continue
        for line, text in _spelled(ast.parse(path.read_text(encoding="utf-8"))):
            name = _names_a_run_file(text)
            if name and ELSEWHERE.get(name) != path.name:
                found.append(f"{path.relative_to(SOURCE)}:{line}: {text!r}")
    assert found == [], "run-file names spelled outside rundir.py (use a RunDir property):\n" + "\n".join(found)


def test_the_check_itself_sees_a_spelled_name():
    tree = ast.parse('target = run / "metrics.jsonl"\nstep = f"step-{n:06d}"\nhelp_text = "see metrics.jsonl"\n')
    assert [name for _, text in _spelled(tree) if (name := _names_a_run_file(text))] == ["metrics.jsonl", "step-"]


def _described(relative: str, folder: bool) -> bool:
    patterns = [key for key in LAYOUT if key.endswith("/") == folder]
    return any(fnmatch.fnmatch(relative + ("/" if folder else ""), pattern) for pattern in patterns)


def test_a_finished_run_holds_only_what_layout_describes(lora_run):
    strays = [
        str(path.relative_to(lora_run))
        for path in sorted(lora_run.rglob("*"))
        if not _described(str(path.relative_to(lora_run)), path.is_dir())
    ]
    assert strays == []
    for key in ("manifest.json", "config.yaml", "data/train.jsonl", "metrics.jsonl", "train_summary.json"):
        assert (lora_run / key).is_file()
