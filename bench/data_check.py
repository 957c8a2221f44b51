"""Benchmark `tunesmith data check`: near-duplicate recall and precision by length, false clusters, speed.

    python bench/data_check.py [--n 100000] [--pairs 200] [--seed 0]

1. Planted pairs, seeded, from the sentences of Python's own docstrings (bench/realtext.py), in five
   length bands (words of prompt and answer together). Near duplicates: one word of the prompt replaced,
   inserted or deleted (the answer kept); 1-3 typos (an interior letter of a word of four or more letters,
   anywhere); two clauses of the prompt swapped; a sentence appended to the prompt. Different examples
   that share a template: another number or another word in both prompt and answer (another age, another
   medication), or a one-word-edited prompt with another label. Recall per kind; precision per band over
   all pairs the check joins (exact or near) that start in the band.
2. False clusters, where answers differ after case and sentence punctuation are dropped, on the quickstart
   data and on the real-text file of bench/realtext.py.
3. Time of check_data (no tokenizer) on N varied chat examples with 1% planted exact and 1% near
   duplicates. Target: 100,000 examples in under 2 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from collections import defaultdict
from itertools import combinations
from pathlib import Path

from tunesmith.data.check import answer_text, check_data
from tunesmith.data.formats import parse_file

sys.path.insert(0, str(Path(__file__).parent))
from realtext import build, documented  # noqa: E402

WORDS = [f"w{i}" for i in range(5000)]
BANDS = ((5, 14), (15, 29), (30, 60), (61, 120), (121, 250))
SAME = ("one_word", "typos", "reordered", "appended")
DIFFERENT = ("another_number", "another_word", "another_label")
LABELS = ("positive", "negative", "neutral", "spam", "billing", "refund")
QUICKSTART = Path(__file__).parent.parent / "examples" / "quickstart" / "notes.jsonl"


def chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


class Planter:
    """Base examples and their edited twins from real sentences, all from one seeded generator."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        text = " ".join(doc for _, doc in documented())
        self.sentences = [s.split() for s in re.split(r"(?<=[.!?])\s+", text) if 4 <= len(s.split()) <= 30]
        self.vocab = sorted({w for s in self.sentences for w in s if w.isalpha() and len(w) >= 3})

    def words(self, n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            out += self.rng.choice(self.sentences)
        return out[:n]

    def clauses(self, prompt: list[str]) -> list[str]:
        parts = [p for p in re.split(r"(?<=[,.;])\s+", " ".join(prompt)) if p]
        if len(parts) < 2:
            half = len(prompt) // 2
            parts = [" ".join(prompt[:half]), " ".join(prompt[half:])]
        i, j = self.rng.sample(range(len(parts)), 2)
        parts[i], parts[j] = parts[j], parts[i]
        return " ".join(parts).split()

    def typo(self, word: str) -> str:
        i = self.rng.randrange(1, len(word) - 1)
        kind = self.rng.choice(("swap", "drop", "double", "replace"))
        if kind == "swap" and i < len(word) - 2:
            return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        if kind == "drop":
            return word[:i] + word[i + 1 :]
        if kind == "double":
            return word[:i] + word[i] + word[i:]
        return word[:i] + self.rng.choice([c for c in "aeiourstnl" if c != word[i]]) + word[i + 1 :]

    def pair(self, total: int, kind: str) -> tuple[dict, dict]:
        rng = self.rng
        if kind == "another_label":
            prompt = self.words(total - 1)
            edited = list(prompt)
            edited[rng.randrange(len(edited))] = rng.choice(self.vocab)
            first, second = rng.sample(LABELS, 2)
            return chat(" ".join(prompt), first), chat(" ".join(edited), second)
        answer = self.words(max(2, total // 3))
        prompt = self.words(max(2, total - len(answer)))
        if kind in ("another_number", "another_word"):
            values = rng.sample(range(2, 99), 2) if kind == "another_number" else rng.sample(self.vocab, 2)
            at_p, at_a = rng.randrange(len(prompt) + 1), rng.randrange(len(answer) + 1)
            made = []
            for value in values:
                p, a = list(prompt), list(answer)
                p.insert(at_p, str(value))
                a.insert(at_a, str(value))
                made.append(chat(" ".join(p), " ".join(a)))
            return made[0], made[1]
        p, a = list(prompt), list(answer)
        if kind == "one_word":
            edit, at = rng.choice(("replace", "insert", "delete")), rng.randrange(len(p))
            if edit == "replace":
                p[at] = rng.choice([w for w in self.vocab[:500] if w != p[at]])
            elif edit == "insert":
                p.insert(at, rng.choice(self.vocab))
            else:
                del p[at]
        elif kind == "typos":
            both = [(p, i) for i in range(len(p))] + [(a, i) for i in range(len(a))]
            long = [(seq, i) for seq, i in both if seq[i].isalpha() and len(seq[i]) >= 4]
            for seq, i in rng.sample(long, min(len(long), rng.randint(1, 3))):
                seq[i] = self.typo(seq[i])
        elif kind == "reordered":
            p = self.clauses(p)
        else:
            p += rng.choice(self.sentences)[:15]
        return chat(" ".join(prompt), " ".join(answer)), chat(" ".join(p), " ".join(a))


def planted(path: Path, per_kind: int, seed: int) -> dict:
    """Recall per band and kind, precision per band, false joins per band and negative kind."""
    planter = Planter(seed)
    records, owner = [], {}
    for band in BANDS:
        for kind in SAME + DIFFERENT:
            for number in range(per_kind):
                for record in planter.pair(planter.rng.randint(*band), kind):
                    owner[len(records) + 1] = (band, kind, number)
                    records.append(record)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    report = check_data(path)
    joined = {pair for cluster in report.exact_duplicates + report.near_duplicates for pair in combinations(cluster, 2)}
    found = defaultdict(int)
    by_band = defaultdict(lambda: [0, 0])
    for a, b in joined:
        band, kind, number = owner[a]
        same = owner[b] == (band, kind, number)
        found[band, kind] += same
        by_band[band][0] += same and kind in SAME
        by_band[band][1] += 1
    return {"found": found, "by_band": by_band, "per_kind": per_kind}


def false_clusters(path: Path) -> tuple[int, int, list[list[str]]]:
    """Near-duplicate clusters, how many join answers that differ, and the first few of those."""
    report = check_data(path)
    answers = {c.line: answer_text(c) for c in parse_file(path).conversations}

    def key(text: str) -> str:
        return " ".join(re.sub(r"[.,;:!?'\"]", " ", text.lower()).split())

    false = [g for g in report.near_duplicates if len({key(answers[line]) for line in g}) > 1]
    return len(report.near_duplicates), len(false), [[answers[line][:90] for line in g] for g in false[:3]]


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
        records.append(chat(prompt, answer))
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="Examples to time [default: 100000].")
    parser.add_argument("--pairs", type=int, default=200, help="Planted pairs per band and kind [default: 200].")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the planted pairs and files [default: 0].")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = planted(Path(tmp) / "planted.jsonl", args.pairs, args.seed)
        print(f"planted pairs: {args.pairs} per band and kind; recall of near duplicates, false joins of different")
        print(
            f"{'words':>9} "
            + " ".join(f"{k:>10}" for k in SAME)
            + "  precision "
            + " ".join(f"{k:>14}" for k in DIFFERENT)
        )
        for band in BANDS:
            recall = " ".join(f"{result['found'][band, k] / args.pairs:>10.3f}" for k in SAME)
            true, joined = result["by_band"][band]
            wrong = " ".join(f"{result['found'][band, k]:>14d}" for k in DIFFERENT)
            print(f"{band[0]:>4}-{band[1]:<4} {recall}  {true / max(1, joined):>9.3f} {wrong}")
        for name, path in (("quickstart", QUICKSTART), ("real text", Path(tmp) / "real.jsonl")):
            if name == "real text":
                build(path, seed=args.seed)
            clusters, false, shown = false_clusters(path)
            print(
                f"{name:<11} {clusters} near-duplicate cluster(s), {false} false" + "".join(f"\n  {s}" for s in shown)
            )
        path = Path(tmp) / "bench.jsonl"
        make_file(path, args.n, args.seed)
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
