"""Which user code this process may run: only what the person at the command line asked for.

A run folder is copied, shared and downloaded, so a config read back from one (`compare RUN`, `eval RUN`, the UI's
Resume) may name code nobody here chose: a custom metric `file.py:fn` or `module:fn`, an lm-eval include folder
(its task YAML can hold `!function`). Such code runs only when this command line named it: in a config file passed
here that is not a run folder's own, in a flag, or under --allow-code. Every hook that runs user code asks
`require` first. This module must stay light (no torch, no config import): the CLI calls it before any work.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError

# Set by `tunesmith ui` for the processes it launches: a click in a browser is not a command line.
LAUNCHED_BY_UI = "TUNESMITH_LAUNCHED_BY_UI"

# The config fields whose values can name code, and how to tell a code entry from a built-in name.
CODE_FIELDS = ("eval.metrics", "validation.metrics", "eval.lm_eval_include_path", "rl.rewards")

_granted: set[str] = set()
_everything = False


def is_code(field: str, value: Any) -> bool:
    if field == "rl.rewards":  # a list of reward entries; {code: file.py:fn} is code
        return isinstance(value, Mapping) and bool(value.get("code"))
    if field.endswith(".metrics"):
        return isinstance(value, str) and ":" in value  # built-in metric names never hold a colon
    return bool(value)


def code_entries(tree: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, value) of every entry of a config tree (plain dict or a dumped RunConfig) that names code."""
    found = []
    for field in CODE_FIELDS:
        node: Any = tree
        for key in field.split("."):
            node = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(node, str) and field.endswith(".metrics"):
            node = node.split(",")  # a list given as one flag value: "exact_match,file.py:fn"
        values = node if isinstance(node, list) else [node]
        found += [(field, _named(value)) for value in values if value is not None and is_code(field, value)]
    return found


def _named(value: Any) -> str:
    """The code an entry names: the entry itself, or a reward entry's `code`."""
    return str(value["code"] if isinstance(value, Mapping) else value).strip()


def in_run_folder(config_file: str | Path) -> bool:
    """True for a run's own config.yaml (a run folder holds a manifest or tunesmith's marker beside it)."""
    from tunesmith.files import MARKER
    from tunesmith.rundir import RunDir

    folder = Path(config_file).expanduser().resolve().parent
    return RunDir(folder).manifest.is_file() or (folder / MARKER).is_file()


def grant(values: Iterable[str] = (), everything: bool = False) -> None:
    """Allow these code entries (or, with `everything`, any) for the rest of this process."""
    global _everything
    if os.environ.get(LAUNCHED_BY_UI):
        return  # nothing a launched process is told can widen what it may run
    _granted.update(values)
    _everything = _everything or everything


def reset() -> None:
    """Forget every grant (tests; a long-lived process serving several command lines)."""
    global _everything
    _granted.clear()
    _everything = False


def allowed(value: str) -> bool:
    return not os.environ.get(LAUNCHED_BY_UI) and (_everything or value in _granted)


def require(field: str, value: str) -> None:
    """Raise unless this command line allowed the code entry `value` of config field `field`."""
    if allowed(value):
        return
    if os.environ.get(LAUNCHED_BY_UI):
        fix = "tunesmith ui never runs code named in a config; run this from a terminal with --allow-code"
    else:
        fix = (
            "it was read back from a run folder (which anyone may have written), not named on this command line. "
            "If you trust it, pass --allow-code"
        )
    raise TunesmithError(f"{field} names code to run ({value!r}): {fix}; or remove the entry from the config.")


def require_all(tree: Mapping[str, Any], skipped: tuple[str, ...] = ()) -> None:
    """Refuse before any work when a config names code this command line did not allow; the `skipped` fields'
    code is left to the caller, which skips what it may not run and says so."""
    for field, value in code_entries(tree):
        if field not in skipped:
            require(field, value)
