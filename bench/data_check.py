"""Benchmark `tunesmith data check` on a large chat file (no tokenizer pass; near duplicates included).

    python bench/data_check.py --n 100000

Generates N varied chat examples (with 1% planted exact and 1% near duplicates), then times
check_data and prints the numbers. Target: 100,000 examples in under 2 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from tunesmith.data.check import check_data

WORDS = [f"w{i}" for i in range(5000)]


def make_file(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        if i % 100 == 1:
            records.append(records[-1])  # exact duplicate
            continue
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(20, 60)))
        answer = " ".join(rng.choices(WORDS, k=rng.randint(10, 40)))
        if i % 100 == 2:  # near duplicate: an earlier example with one word added
            earlier = records[-2]["messages"]
            prompt, answer = earlier[0]["content"] + " please", earlier[1]["content"]
        records.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="Examples to check [default: 100000].")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl"
        make_file(path, args.n)
        start = time.perf_counter()
        report = check_data(path)
        seconds = time.perf_counter() - start
    print(f"examples            {report.examples}")
    print(f"seconds             {seconds:.1f}")
    print(f"examples/s          {report.examples / seconds:,.0f}")
    print(f"exact dup clusters  {len(report.exact_duplicates)}")
    print(f"near dup clusters   {len(report.near_duplicates)}")
    print(f"target (<120 s)     {'met' if seconds < 120 else 'MISSED'}")


if __name__ == "__main__":
    main()
