"""Human review of a data sample: accept, reject or edit each example, resumable, stored beside the data.

Verdicts are appended to `<data>.review.jsonl` (the last verdict for an example wins), so a review can
stop and resume at any point and never touches the data file itself. `apply_review` writes the cleaned
copy to a new file; a spreadsheet export/import lets someone else do the review.
"""

from __future__ import annotations

import csv
import json
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.check import CheckOptions, answer_text, full_text, labels_of, prompt_text
from tunesmith.data.formats import Conversation, Problems, iter_csv_records, iter_raw_records, parse_file, read_text
from tunesmith.data.similarity import text_hash
from tunesmith.errors import TunesmithError
from tunesmith.files import append_text, check_file_target, write_file_atomic

VERDICTS = ("accept", "reject", "edit")
KEYS_HELP = (
    "keys: a = accept | r = reject | e = edit the answer (type it, end with an empty line) | s = skip | "
    "q = quit and resume later | text after the key is kept as a note, e.g. 'r wrong units'"
)
SHEET_COLUMNS = ["line", "hash", "label", "prompt", "answer", "verdict", "note", "edited_answer"]
# What a spreadsheet may run as a formula when a cell starts with it (OWASP's CSV injection list), after
# any quotes: sheet_cell escapes those too so that the escaping can be undone exactly.
FORMULA_START = re.compile(r"'*[=+\-@\t\r]")


@dataclass
class ReviewItem:
    conversation: Conversation
    hash: str
    label: str | None


@dataclass
class ReviewSummary:
    data: str
    sampled: int
    reviewed: int
    remaining: int
    verdicts: dict[str, int]
    acceptance_by_class: dict[str, float]
    written: str | None = None


def verdict_path(data: Path) -> Path:
    return data.with_name(data.stem + ".review.jsonl")


def load_verdicts(data: Path) -> dict[str, dict[str, Any]]:
    """Latest verdict per example hash."""
    path = verdict_path(data)
    verdicts: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for number, raw in enumerate(read_text(path).split("\n"), start=1):
            if raw.strip():
                try:
                    entry = json.loads(raw)
                except (ValueError, RecursionError):
                    entry = None
                if (
                    not isinstance(entry, dict)
                    or not isinstance(entry.get("hash"), str)
                    or entry.get("verdict") not in VERDICTS
                ):
                    raise TunesmithError(
                        f"{path}:{number}: not a verdict written by tunesmith; fix or delete that line."
                    )
                verdicts[entry["hash"]] = entry
    return verdicts


def record_verdict(data: Path, item: ReviewItem, verdict: str, note: str = "", edited: str | None = None) -> None:
    if verdict not in VERDICTS:
        raise TunesmithError(f"unknown verdict {verdict!r}; use one of {', '.join(VERDICTS)}.")
    entry = {
        "hash": item.hash,
        "line": item.conversation.line,
        "label": item.label,
        "verdict": verdict,
        "note": note,
        "edited_answer": edited,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    append_text(verdict_path(data), json.dumps(entry, ensure_ascii=False) + "\n")


def sample_items(data: Path, size: int, seed: int, label_field: str | None = None) -> list[ReviewItem]:
    """A seeded sample stratified by class: each class in proportion, at least one example each."""
    parsed = parse_file(data)
    parsed.problems.raise_if_any()
    labels = labels_of(data, parsed.conversations, CheckOptions(label_field=label_field)) or {}
    by_class: dict[str, list[Conversation]] = defaultdict(list)
    for c in parsed.conversations:
        by_class[labels.get(c.line, "")].append(c)
    rng = random.Random(seed)
    total = len(parsed.conversations)
    chosen: list[Conversation] = []
    for name in sorted(by_class):
        members = by_class[name][:]
        rng.shuffle(members)
        chosen.extend(members[: max(1, round(size * len(members) / total))])
    rng.shuffle(chosen)
    return [ReviewItem(c, text_hash(full_text(c)), labels.get(c.line)) for c in chosen[:size]]


def review(
    data: Path,
    items: list[ReviewItem],
    read_line: Callable[[str], str],
    show: Callable[[ReviewItem, int, int], None],
    say: Callable[[str], None],
) -> int:
    """Ask for a verdict on each unreviewed item; returns how many were recorded. Stops at 'q' or end of input."""
    done = load_verdicts(data)
    pending = [item for item in items if item.hash not in done]
    say(KEYS_HELP)
    recorded = 0
    for position, item in enumerate(pending, start=1):
        show(item, position, len(pending))
        while True:
            try:
                answer = read_line("verdict> ").strip()
            except EOFError:
                return recorded
            key, _, note = answer.partition(" ")
            if key == "q":
                return recorded
            if key in ("a", "r"):
                record_verdict(data, item, "accept" if key == "a" else "reject", note)
            elif key == "e":
                lines = []
                while True:
                    try:
                        line = read_line("new answer> ")
                    except EOFError:
                        break
                    if not line.strip():
                        break
                    lines.append(line)
                if not lines:
                    say("No new answer typed; the example is unchanged. Choose again.")
                    continue
                record_verdict(data, item, "edit", note, "\n".join(lines))
            elif key != "s":
                say(KEYS_HELP)
                continue
            recorded += key != "s"
            break
    return recorded


# The field of a raw record that holds the answer a reviewer edits, per format (preference: the chosen one).
ANSWER_FIELD = {
    "chat": "messages",
    "sharegpt": "conversations",
    "alpaca": "output",
    "prompt_completion": "completion",
    "text": "text",
    "preference": "chosen",
    "kto": "completion",
}


def with_answer(record: dict[str, Any], fmt: str, answer: str) -> dict[str, Any]:
    """A copy of a raw record whose (last) answer is replaced, in the record's own format.

    A field may hold the answer as text or as chat turns (chat, ShareGPT, and preference/KTO answers written as
    conversations or as one assistant turn); in turns, the last assistant turn is the answer.
    """
    record = json.loads(json.dumps(record))
    key = ANSWER_FIELD[fmt]
    value = record[key]
    if isinstance(value, list):
        role_key, content_key = ("from", "value") if fmt == "sharegpt" else ("role", "content")
        last = max(i for i, t in enumerate(value) if t.get(role_key) in ("assistant", "gpt"))
        value[last][content_key] = answer
    else:
        record[key] = answer
    return record


def summarise(data: Path, items: list[ReviewItem]) -> ReviewSummary:
    verdicts = load_verdicts(data)
    sampled = {item.hash for item in items}
    counts = Counter(v["verdict"] for h, v in verdicts.items() if h in sampled)
    per_class: dict[str, list[bool]] = defaultdict(list)
    for h, v in verdicts.items():
        if h in sampled:
            per_class[str(v.get("label") or "all")].append(v["verdict"] != "reject")
    return ReviewSummary(
        data=str(data),
        sampled=len(items),
        reviewed=sum(counts.values()),
        remaining=len(sampled - set(verdicts)),
        verdicts=dict(counts),
        acceptance_by_class={k: round(sum(v) / len(v), 4) for k, v in sorted(per_class.items())},
    )


def apply_review(data: Path, out: Path | None = None, overwrite: bool = False) -> ReviewSummary:
    """Write the data without rejected examples and with edits applied, plus a summary beside it."""
    out = out or data.with_name(data.stem + ".reviewed.jsonl")
    if out.resolve() == data.resolve():
        raise TunesmithError("--apply never writes over the data file; choose another --out.")
    summary_path = out.with_name(out.stem + ".summary.json")
    for target in (out, summary_path):  # both checked before either is written
        check_file_target(target, overwrite, "a reviewed data file")
    parsed = parse_file(data)
    parsed.problems.raise_if_any()
    verdicts = load_verdicts(data)
    raw = dict(iter_raw_records(data, Problems(data)))
    lines = []
    for c in parsed.conversations:
        verdict = verdicts.get(text_hash(full_text(c)), {})
        if verdict.get("verdict") == "reject":
            continue
        record = raw[c.line]
        if verdict.get("verdict") == "edit":
            record = with_answer(record, parsed.format, verdict["edited_answer"])
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    kept = len(lines)
    write_file_atomic(
        out, lambda tmp: tmp.write_text("".join(lines), encoding="utf-8"), overwrite, "a reviewed data file"
    )
    items = [
        ReviewItem(c, text_hash(full_text(c)), v.get("label"))
        for c in parsed.conversations
        if (v := verdicts.get(text_hash(full_text(c))))
    ]
    summary = summarise(data, items)
    summary.written = str(out)
    text = json.dumps(summary.__dict__ | {"kept": kept, "source_examples": len(parsed.conversations)}, indent=2)
    write_file_atomic(summary_path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite, "a review summary")
    return summary


def sheet_cell(value: str) -> str:
    """A cell a spreadsheet shows as text instead of running it as a formula.

    A quote goes in front of =, +, -, @, tab or CR, and in front of quotes already there before one of
    them, so that sheet_value can tell its own quote from the user's.
    """
    return "'" + value if FORMULA_START.match(value) else value


def sheet_value(cell: str) -> str:
    """The text sheet_cell was given: exactly its one added quote removed."""
    return cell[1:] if cell.startswith("'") and FORMULA_START.match(cell, 1) else cell


def export_sheet(data: Path, items: list[ReviewItem], sheet: Path, overwrite: bool = False) -> int:
    """Write the sampled items and their verdicts so far to a CSV sheet; returns how many were written.

    An existing sheet is replaced only with --overwrite, and only as tunesmith wrote it: one a reviewer
    has filled in since is never lost to a second export.
    """
    if sheet.resolve() in (data.resolve(), verdict_path(data).resolve()):
        raise TunesmithError(f"--export {sheet} would overwrite the data or its verdicts; choose another file.")
    verdicts = load_verdicts(data)
    rows = []
    for item in items:
        v = verdicts.get(item.hash, {})
        row = {
            "line": str(item.conversation.line),
            "hash": item.hash,
            "label": item.label or "",
            "prompt": prompt_text(item.conversation),
            "answer": answer_text(item.conversation),
            "verdict": v.get("verdict", ""),
            "note": v.get("note", ""),
            "edited_answer": v.get("edited_answer") or "",
        }
        rows.append({key: sheet_cell(value) for key, value in row.items()})

    def write(path: Path) -> None:
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=SHEET_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    write_file_atomic(sheet, write, overwrite, "a review sheet")
    return len(rows)


def import_sheet(data: Path, sheet: Path) -> int:
    """Record the verdicts filled in a spreadsheet exported by export_sheet; blank verdicts are skipped."""
    if not sheet.is_file():
        raise TunesmithError(f"Sheet {sheet} not found. Export one first with --export {sheet}.")
    parsed = parse_file(data)
    by_hash = {text_hash(full_text(c)): c for c in parsed.conversations}
    problems = Problems(sheet)
    # Spreadsheet programs save with a byte-order mark and CRLF line ends; the data reader takes both.
    rows = [(line, {key: sheet_value(c) for key, c in row.items()}) for line, row in iter_csv_records(sheet, problems)]
    problems.raise_if_any()
    missing = set(SHEET_COLUMNS) - set(rows[0][1]) if rows else set()
    if missing:
        raise TunesmithError(
            f"{sheet}: missing column(s) {', '.join(sorted(missing))}; import a sheet written by --export, "
            "saved as comma-separated CSV."
        )
    # Every row is checked before any verdict is recorded: a sheet with a mistake imports nothing.
    filled = []
    for line, row in rows:
        verdict = row["verdict"].strip().lower()
        if not verdict:
            continue
        if verdict not in VERDICTS:
            raise TunesmithError(f"{sheet}:{line}: verdict {verdict!r}; use accept, reject or edit.")
        conversation = by_hash.get(row["hash"])
        if conversation is None:
            raise TunesmithError(
                f"{sheet}:{line}: no example of {data} has this hash; the data changed since the export."
            )
        if verdict == "edit" and not row["edited_answer"].strip():
            raise TunesmithError(f"{sheet}:{line}: verdict edit needs an edited_answer.")
        filled.append((ReviewItem(conversation, row["hash"], row["label"] or None), verdict, row))
    for item, verdict, row in filled:
        record_verdict(data, item, verdict, row["note"], row["edited_answer"] if verdict == "edit" else None)
    return len(filled)
