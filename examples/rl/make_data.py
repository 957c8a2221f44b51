"""Generate the RL example's dataset: harder clinical intake notes -> the quickstart's JSON record, field for field.

    python examples/rl/make_data.py            # writes examples/rl/notes.jsonl

The quickstart's notes name 0-3 medications, one smoking phrase and a duration in days or weeks; its SFT run reads
them well. These notes are the ones it still gets wrong: three to five current medications, often with doses and
split over two sentences, beside ones the patient stopped, a relative takes or is allergic to (none of which are
the patient's medications); negated or past smoking ("denies smoking", "ex-smoker, quit 2015" -> not a smoker);
durations in mixed units and shorthand ("2 wks", "3/7", "a fortnight", "a month and a half", "1 week and 3 days",
counted with a month as 30 days); and a complaint the patient denies beside the one they have. Relative dates
("since Monday") are left out: the note carries no date to count from. The record's keys, types and vocabularies
are the quickstart's (imported from its generator), so the quickstart's SFT run is the starting point of the RL
run. Seeded, so the file is the same on every machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path
from types import ModuleType


def _quickstart() -> ModuleType:
    """The quickstart's generator, for its vocabularies (both scripts are called make_data.py, so not by name)."""
    path = Path(__file__).resolve().parent.parent / "quickstart" / "make_data.py"
    spec = importlib.util.spec_from_file_location("quickstart_make_data", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


QUICKSTART = _quickstart()
COMPLAINTS: dict[str, list[str]] = QUICKSTART.COMPLAINTS
MEDICATIONS: list[str] = QUICKSTART.MEDICATIONS
SEX_WORDS: dict[str, list[str]] = QUICKSTART.SEX_WORDS

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]
DOSES = {
    "metformin": "500 mg bd",
    "lisinopril": "10 mg od",
    "atorvastatin": "20mg nocte",
    "amlodipine": "5 mg daily",
    "omeprazole": "20 mg",
    "levothyroxine": "100 mcg",
    "salbutamol": "2 puffs prn",
    "sertraline": "50mg",
    "ibuprofen": "400 mg tds",
    "warfarin": "as per INR",
    "insulin": "10 units bd",
    "aspirin": "75mg od",
}
RELATIVES = ["Mother", "Father", "Husband", "Wife", "Partner", "Sister", "Son"]
MONTH = 30  # days in "a month": the convention the records are counted in


def duration_phrase(rng: random.Random) -> tuple[str, int]:
    """A duration in one of many spellings, and its length in days."""
    kind = rng.choice(["days", "days", "weeks", "shorthand", "mixed", "month", "hours", "fortnight"])
    if kind == "days":
        n = rng.randint(2, 11)
        count = NUMBER_WORDS[n] if rng.random() < 0.4 else str(n)
        return rng.choice([f"for {count} days", f"x {count} days", f"over {count} days", f"{count}d"]), n
    if kind == "weeks":
        n = rng.randint(1, 6)
        unit = rng.choice(["wks", "wk", "weeks" if n > 1 else "week", "/52"])
        text = f"{n}/52" if unit == "/52" else f"{n} {unit}"
        return rng.choice([f"for {text}", f"x {text}", f"over the past {text}"]), 7 * n
    if kind == "shorthand":  # clinical shorthand: 3/7 is three days
        n = rng.randint(1, 6)
        return rng.choice([f"for {n}/7", f"x {n}/7", f"x{n}/7"]), n
    if kind == "mixed":
        weeks, days = rng.randint(1, 3), rng.randint(1, 6)
        first = "a week" if weeks == 1 and rng.random() < 0.5 else f"{weeks} week" + "s" * (weeks > 1)
        then = f"{days} day" + "s" * (days > 1)
        return rng.choice([f"for {first} and {then}", f"for {weeks}w {days}d"]), 7 * weeks + days
    if kind == "month":
        phrase, days = rng.choice(
            [("a month", MONTH), ("a month and a half", MONTH + MONTH // 2), ("two months", 2 * MONTH),
             ("1 month", MONTH), ("6 weeks", 42)]
        )  # fmt: skip
        return rng.choice([f"for {phrase}", f"for about {phrase}", f"over the last {phrase}"]), days
    if kind == "hours":
        n = rng.choice([2, 3, 4])
        return rng.choice([f"for {24 * n} hours", f"x {24 * n} hrs", f"for the past {24 * n}h"]), n
    return rng.choice(["for a fortnight", "for two weeks", "for 2/52"]), 14


def listed(names: list[str]) -> str:
    return ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1]


def current_medication_phrase(rng: random.Random, meds: list[str]) -> str:
    """The current medications in one sentence or two, some with doses (the record holds the names only)."""
    named = [f"{m} {DOSES[m]}" if rng.random() < 0.35 else m for m in meds]
    rng.shuffle(named)
    if rng.random() < 0.35:  # split over two sentences
        cut = rng.randint(1, len(named) - 1)
        first, second = named[:cut], named[cut:]
        opening = rng.choice([f"Takes {listed(first)}.", f"On {listed(first)}.", f"Regular meds: {listed(first)}."])
        more = rng.choice([f"Also on {listed(second)}.", f"Also takes {listed(second)}.", f"Plus {listed(second)}."])
        return f"{opening} {more}"
    return rng.choice(
        [f"Current meds: {listed(named)}.", f"DH: {', '.join(named)}.", f"Takes {listed(named)}.",
         f"Medications: {listed(named)}.", f"Regular medications include {listed(named)}."]
    )  # fmt: skip


def stopped_phrase(rng: random.Random, med: str) -> str:
    return rng.choice(
        [f"No longer takes {med}.", f"Stopped {med} last month.", f"{med.capitalize()} discontinued in March.",
         f"Was on {med} until 2022.", f"Previously on {med}, now off it.", f"Came off {med} a year ago."]
    )  # fmt: skip


def smoker_phrase(rng: random.Random, smoker: bool) -> str:
    yes = ["Smokes 20/day.", "Current smoker, 15 pack-years.", "1 ppd smoker.", "Smokes about 10 cigarettes daily.",
           "Restarted smoking last year.", "SH: smoker."]  # fmt: skip
    no = ["Denies smoking.", "Ex-smoker, quit 2015.", "Quit smoking 5 years ago.", "Never smoked.",
          "SH: non-smoker.", "Denies tobacco use.", "Stopped smoking in 2019.", "No longer smokes."]  # fmt: skip
    return rng.choice(yes if smoker else no)


def make_example(rng: random.Random) -> dict:
    age = rng.randint(18, 92)
    sex = rng.choice(["F", "M"])
    complaint = rng.choice(sorted(COMPLAINTS))
    duration, days = duration_phrase(rng)
    pool = list(MEDICATIONS)
    rng.shuffle(pool)
    taken = rng.choice([3, 3, 4, 4, 5])
    meds, rest = sorted(pool[:taken]), pool[taken:]
    stopped, rest = rest[: rng.choice([0, 1, 1, 2])], rest[2:]
    smoker = rng.random() < 0.35
    word = rng.choice(SEX_WORDS[sex])
    who = rng.choice(
        [f"{age} y/o {word}", f"{age}yo {word}", f"{age}-year-old {word}", f"Pt {age}{sex}",
         f"{word.capitalize()}, aged {age},", f"{age} yrs, {sex},"]
    )  # fmt: skip
    symptom = rng.choice(COMPLAINTS[complaint])
    verb = rng.choice(["presents with", "c/o", "reports", "complains of", "attends with"])
    parts = [current_medication_phrase(rng, meds), *(stopped_phrase(rng, m) for m in stopped)]
    parts.append(smoker_phrase(rng, smoker))
    if rng.random() < 0.4:  # a complaint the patient denies
        denied = rng.choice(sorted(set(COMPLAINTS) - {complaint}))
        parts.append(rng.choice([f"Denies {denied}.", f"No {denied}.", f"{denied.capitalize()}: denies."]))
    if rng.random() < 0.25:  # someone else's medication
        parts.append(f"{rng.choice(RELATIVES)} takes {rest[0]}.")
    elif rng.random() < 0.2:  # an allergy, not a medication taken
        parts.append(rng.choice([f"Allergic to {rest[0]}.", f"Allergy: {rest[0]} (rash)."]))
    rng.shuffle(parts)
    note = " ".join([f"{who} {verb} {symptom} {duration}.", *parts])
    record = {
        "age": age,
        "sex": sex,
        "complaint": complaint,
        "duration_days": days,
        "medications": meds,
        "smoker": smoker,
    }
    return {
        "messages": [
            {"role": "user", "content": f"Extract the intake record as JSON.\nNote: {note}"},
            {"role": "assistant", "content": json.dumps(record)},
        ]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=700, help="Number of examples [default: 700].")
    parser.add_argument("--seed", type=int, default=11, help="Random seed [default: 11].")
    parser.add_argument("--out", default=str(Path(__file__).with_name("notes.jsonl")), help="Output JSONL file.")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seen: set[str] = set()
    examples = []
    while len(examples) < args.n:
        example = make_example(rng)
        key = example["messages"][0]["content"]
        if key not in seen:  # no exact duplicates: they leak into the test split
            seen.add(key)
            examples.append(example)
    Path(args.out).write_text("".join(json.dumps(e) + "\n" for e in examples))
    print(f"wrote {len(examples)} examples to {args.out}")


if __name__ == "__main__":
    main()
