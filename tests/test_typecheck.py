"""tools/typecheck.py's rule: a new mypy error fails, a fixed one only asks to lower the baseline."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

SPEC = importlib.util.spec_from_file_location("typecheck", Path(__file__).parent.parent / "tools" / "typecheck.py")
typecheck = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(typecheck)


def test_a_new_error_grows_past_the_baseline_and_a_fix_shrinks_it():
    allowed = {"src/a.py [arg-type]": 2, "src/b.py [attr-defined]": 1}
    grew, shrank = typecheck.compare(Counter({"src/a.py [arg-type]": 2, "src/c.py [index]": 1}), allowed)
    assert grew == ["src/c.py [index]: 1 (baseline 0)"] and shrank == ["src/b.py [attr-defined]: 0 (baseline 1)"]
    assert typecheck.compare(Counter(allowed), allowed) == ([], [])


def test_the_baseline_names_files_that_exist():
    import json

    baseline = json.loads(typecheck.BASELINE.read_text())
    assert baseline and all((typecheck.ROOT / key.split(" [")[0]).is_file() for key in baseline)
