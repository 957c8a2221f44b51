"""Type-check src/ with mypy against a baseline that may only shrink: `make test` runs it.

The baseline (tools/typecheck-baseline.json) counts today's mypy errors per file and error code. A run fails when
any file has more errors of a code than the baseline allows (a new error), and says so when a count fell (fixed:
lower the baseline with --update, so it never grows back). Line numbers are not compared: editing a file moves them.

    python tools/typecheck.py            check
    python tools/typecheck.py --update   rewrite the baseline from this tree (only ever to lower it)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "tools" / "typecheck-baseline.json"
ERROR = re.compile(r"^(?P<file>[^:]+):\d+: error: .*\[(?P<code>[a-z0-9-]+)\]$")


def mypy_errors() -> Counter[str]:
    """'file [code]' -> how many errors mypy finds there (its settings: [tool.mypy] in pyproject.toml)."""
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "src/tunesmith", "--no-error-summary", "--hide-error-context",
         "--no-pretty", "--show-error-codes"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode not in (0, 1) or "error: " not in done.stdout and done.returncode:
        sys.exit(f"mypy did not run (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    found: Counter[str] = Counter()
    for line in done.stdout.splitlines():
        if match := ERROR.match(line.strip()):
            found[f"{Path(match['file']).as_posix()} [{match['code']}]"] += 1
    return found


def compare(found: Counter[str], allowed: dict[str, int]) -> tuple[list[str], list[str]]:
    """(what grew: new errors, what shrank: fixes not yet in the baseline)."""
    grew = [f"{key}: {count} (baseline {allowed.get(key, 0)})" for key, count in sorted(found.items())
            if count > allowed.get(key, 0)]  # fmt: skip
    shrank = [f"{key}: {found.get(key, 0)} (baseline {count})" for key, count in sorted(allowed.items())
              if found.get(key, 0) < count]  # fmt: skip
    return grew, shrank


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", action="store_true", help="Rewrite the baseline from this tree.")
    args = parser.parse_args()
    found = mypy_errors()
    if args.update:
        BASELINE.write_text(json.dumps(dict(sorted(found.items())), indent=2) + "\n")
        print(f"typecheck: baseline written, {sum(found.values())} errors in {len(found)} file/code pairs")
        return 0
    grew, shrank = compare(found, json.loads(BASELINE.read_text()))
    for line in shrank:
        print(f"typecheck: fewer errors than the baseline, {line}; run `python tools/typecheck.py --update`")
    if grew:
        print("typecheck: new mypy errors (fix them; the baseline never grows):\n  " + "\n  ".join(grew))
        print("Run `python -m mypy src/tunesmith` to see them with their lines.")
        return 1
    print(f"typecheck: {sum(found.values())} errors, none beyond the baseline")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
