"""Split one data file into train, validation and test without leakage.

Exact and near-duplicate clusters are kept inside one split (group-aware), and so are all the preference
pairs or KTO rows of one prompt (a prompt seen in training is no test of the preference), classes keep their
proportions (stratified), and the same seed gives the same split. The leakage between the written
splits is measured and stored with them.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.check import CheckOptions, answer_text, full_text, labels_of, prompt_text
from tunesmith.data.formats import Conversation, Problems, iter_raw_records, parse_file
from tunesmith.data.similarity import (
    UnionFind,
    exact_clusters,
    near_duplicate_pairs,
    near_duplicates_across,
    normalise_text,
    text_hash,
)
from tunesmith.errors import TunesmithError
from tunesmith.files import check_file_target, write_file_atomic

SPLITS = ("train", "val", "test")


@dataclass
class SplitResult:
    out: str
    counts: dict[str, int]
    class_counts: dict[str, dict[str, int]] | None
    groups_kept_together: int
    leakage: dict[str, dict[str, int]]


def group_indices(
    texts: list[str],
    threshold: float,
    near_pairs: list[tuple[int, int]] | None = None,
    answers: list[str] | None = None,
    prompts: list[str] | None = None,
) -> list[list[int]]:
    """Groups of indices that must share a split: exact and near duplicates, transitively (`near_pairs`: the
    near-duplicate pairs when already computed for these texts, e.g. by the data check; `answers`: each text's
    answer, which near duplicates must agree on; `prompts`: texts whose prompts are equal after normalisation
    also share a split, as the pairs or KTO rows of one prompt do)."""
    union = UnionFind(len(texts))
    for cluster in exact_clusters(texts) + exact_clusters(prompts or []):
        for other in cluster[1:]:
            union.union(cluster[0], other)
    for a, b in near_duplicate_pairs(texts, threshold, answers) if near_pairs is None else near_pairs:
        union.union(a, b)
    return union.groups()


def assign_groups(
    groups: list[list[int]], labels: list[str | None], fractions: dict[str, float], seed: int
) -> dict[str, list[int]]:
    """Place whole groups into splits so each split's size and class mix follow the fractions.

    Within each class (the majority label of a group), groups are shuffled with the seed and the
    smaller splits are filled up to (never past) their share of that class; the rest go to train.
    """
    rng = random.Random(seed)
    by_class: dict[str, list[list[int]]] = defaultdict(list)
    for group in groups:
        majority = Counter(labels[i] for i in group).most_common(1)[0][0]
        by_class[str(majority)].append(group)
    assigned: dict[str, list[int]] = {name: [] for name in SPLITS}
    seen = 0
    given = {"test": 0, "val": 0}
    for name in sorted(by_class):
        class_groups = by_class[name]
        rng.shuffle(class_groups)
        seen += sum(len(g) for g in class_groups)
        # Cumulative rounding: each class gets its share within one example, and the totals stay exact.
        targets = {split: round(seen * fractions[split]) - given[split] for split in ("test", "val")}
        filled = {"test": 0, "val": 0}
        for group in class_groups:
            split = next((s for s in ("test", "val") if filled[s] + len(group) <= targets[s]), "train")
            if split != "train":
                filled[split] += len(group)
            assigned[split].extend(group)
        for split in filled:
            given[split] += filled[split]
    return {name: sorted(indices) for name, indices in assigned.items()}


def _leakage(splits: dict[str, list[Conversation]], threshold: float) -> dict[str, dict[str, int]]:
    train_texts = [full_text(c) for c in splits["train"]]
    train_answers = [answer_text(c) for c in splits["train"]]
    train_keys = {normalise_text(t) for t in train_texts}
    report = {}
    for name in ("val", "test"):
        texts, answers = [full_text(c) for c in splits[name]], [answer_text(c) for c in splits[name]]
        near = near_duplicates_across(texts, train_texts, threshold, answers, train_answers)
        report[name] = {
            "exact": sum(normalise_text(t) in train_keys for t in texts),
            "near_duplicate": len({i for i, _ in near}),
        }
    return report


def split_conversations(
    conversations: list[Conversation],
    val: float,
    test: float,
    seed: int,
    labels: dict[int, str] | None = None,
    threshold: float = 0.8,
    near_pairs: list[tuple[int, int]] | None = None,
) -> tuple[dict[str, list[Conversation]], int]:
    """Train/val/test Conversations and how many multi-example groups were kept together."""
    if val < 0 or test < 0 or val + test >= 1:
        raise TunesmithError(f"--val {val} and --test {test} must be >= 0 and add up to less than 1.")
    texts = [full_text(c) for c in conversations]
    preference = any(c.kind != "sft" for c in conversations)
    prompts = [prompt_text(c) for c in conversations] if preference else None
    groups = group_indices(texts, threshold, near_pairs, [answer_text(c) for c in conversations], prompts)
    label_list = [labels.get(c.line) if labels else None for c in conversations]
    assigned = assign_groups(groups, label_list, {"val": val, "test": test}, seed)
    splits = {name: [conversations[i] for i in indices] for name, indices in assigned.items()}
    return splits, sum(1 for g in groups if len(g) > 1)


def split_file(
    path: str | Path,
    out: str | Path,
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 42,
    stratify: str | None = None,
    fmt: str = "auto",
    threshold: float = 0.8,
    overwrite: bool = False,
) -> SplitResult:
    """Write train.jsonl, val.jsonl, test.jsonl (the original records) and split.json to out."""
    path, out = Path(path), Path(out)
    written = [out / f"{name}.jsonl" for name in SPLITS] + [out / "split.json"]
    if any(p.exists() for p in written) and not overwrite:
        raise TunesmithError(f"{out} already holds a split. Choose another --out, or pass --overwrite.")
    for target in written:  # all checked before any is replaced: never half an old split and half a new one
        check_file_target(target, overwrite, "a split file")
    parsed = parse_file(path, fmt)
    parsed.problems.raise_if_any()
    conversations = parsed.conversations
    labels = labels_of(path, conversations, CheckOptions(label_field=stratify))
    if stratify and not labels:
        raise TunesmithError(f"{path}: no record has the field '{stratify}' given to --stratify.")
    splits, together = split_conversations(conversations, val, test, seed, labels, threshold)
    raw = {line: record for line, record in iter_raw_records(path, Problems(path))}
    for name in SPLITS:
        lines = "".join(json.dumps(raw.get(c.line, c.to_record()), ensure_ascii=False) + "\n" for c in splits[name])
        write_file_atomic(
            out / f"{name}.jsonl", lambda tmp, text=lines: tmp.write_text(text, encoding="utf-8"), True, "a split file"
        )
    class_counts = (
        {name: dict(Counter(labels[c.line] for c in splits[name] if c.line in labels)) for name in SPLITS}
        if labels
        else None
    )
    result = SplitResult(
        out=str(out),
        counts={name: len(splits[name]) for name in SPLITS},
        class_counts=class_counts,
        groups_kept_together=together,
        leakage=_leakage(splits, threshold),
    )
    summary: dict[str, Any] = asdict(result) | {
        "source": str(path),
        "seed": seed,
        "fractions": {"val": val, "test": test},
        "row_hashes": {name: [text_hash(full_text(c)) for c in splits[name]] for name in SPLITS},
    }
    text = json.dumps(summary, indent=2)
    write_file_atomic(out / "split.json", lambda tmp: tmp.write_text(text, encoding="utf-8"), True, "a split file")
    return result
