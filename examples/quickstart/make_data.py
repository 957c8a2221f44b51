"""Generate the quickstart dataset: free-text clinical intake notes -> one fixed JSON record each.

    python examples/quickstart/make_data.py            # writes examples/quickstart/notes.jsonl

The task is the kind tunesmith exists for: a fixed output format that a base model does not produce
from a prompt alone. Notes vary in wording, order, abbreviations and units so that the model must
read them, not copy a template. Seeded, so the file is the same on every machine.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

COMPLAINTS = {
    "chest pain": ["chest pain", "pain in the chest", "chest tightness"],
    "shortness of breath": ["shortness of breath", "SOB", "difficulty breathing"],
    "headache": ["headache", "head pain", "a throbbing headache"],
    "abdominal pain": ["abdominal pain", "stomach pain", "pain in the belly"],
    "cough": ["cough", "a persistent cough", "productive cough"],
    "fever": ["fever", "high temperature", "febrile episodes"],
    "back pain": ["back pain", "lower back pain", "pain in the lower back"],
    "dizziness": ["dizziness", "lightheadedness", "vertigo"],
    "rash": ["rash", "a skin rash", "itchy rash"],
    "sore throat": ["sore throat", "throat pain", "painful swallowing"],
    "fatigue": ["fatigue", "tiredness", "low energy"],
    "nausea": ["nausea", "feeling sick", "queasiness"],
}
MEDICATIONS = [
    "metformin",
    "lisinopril",
    "atorvastatin",
    "amlodipine",
    "omeprazole",
    "levothyroxine",
    "salbutamol",
    "sertraline",
    "ibuprofen",
    "warfarin",
    "insulin",
    "aspirin",
]
SEX_WORDS = {"F": ["female", "woman", "F", "lady"], "M": ["male", "man", "M", "gentleman"]}
UNITS = {"days": 1, "weeks": 7}


def duration_phrase(rng: random.Random) -> tuple[str, int]:
    unit = rng.choice(["days", "days", "weeks"])
    count = rng.randint(1, 6) if unit == "weeks" else rng.randint(1, 13)
    days = count * UNITS[unit]
    word = unit if count > 1 else unit[:-1]
    phrase = rng.choice(
        [f"for {count} {word}", f"x{count} {word}", f"over the last {count} {word}", f"since {count} {word} ago"]
    )
    return phrase, days


def medication_phrase(rng: random.Random, meds: list[str]) -> str:
    if not meds:
        return rng.choice(["No regular medications.", "Takes no medication.", "Meds: none.", "Not on any meds."])
    listed = ", ".join(meds[:-1]) + (" and " if len(meds) > 1 else "") + meds[-1]
    return rng.choice([f"Current meds: {listed}.", f"Takes {listed}.", f"On {listed}.", f"Medications: {listed}."])


def smoker_phrase(rng: random.Random, smoker: bool) -> str:
    yes = ["Smoker.", "Smokes 10 a day.", "Current smoker.", "Reports daily smoking."]
    no = ["Non-smoker.", "Never smoked.", "Does not smoke.", "No tobacco use."]
    return rng.choice(yes if smoker else no)


def make_example(rng: random.Random) -> dict:
    age = rng.randint(18, 92)
    sex = rng.choice(["F", "M"])
    complaint = rng.choice(sorted(COMPLAINTS))
    duration, days = duration_phrase(rng)
    meds = sorted(rng.sample(MEDICATIONS, rng.choice([0, 1, 1, 2, 2, 3])))
    smoker = rng.random() < 0.3
    who = rng.choice(
        [
            f"{age} y/o {rng.choice(SEX_WORDS[sex])}",
            f"{age}-year-old {rng.choice(SEX_WORDS[sex])}",
            f"Pt {age}{sex}",
            f"{rng.choice(SEX_WORDS[sex]).capitalize()}, aged {age},",
        ]
    )
    symptom = rng.choice(COMPLAINTS[complaint])
    presenting = rng.choice(
        [
            f"{who} presents with {symptom} {duration}.",
            f"{who} c/o {symptom} {duration}.",
            f"{who} reports {symptom} {duration}.",
        ]
    )
    parts = [presenting, medication_phrase(rng, meds), smoker_phrase(rng, smoker)]
    rng.shuffle(parts[1:])
    note = " ".join(parts)
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
    parser.add_argument("--seed", type=int, default=7, help="Random seed [default: 7].")
    parser.add_argument("--out", default=str(Path(__file__).with_name("notes.jsonl")), help="Output JSONL file.")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seen: set[str] = set()
    examples = []
    while len(examples) < args.n:
        example = make_example(rng)
        key = example["messages"][0]["content"]
        if key not in seen:  # no exact duplicates: they overfit and leak into the test split
            seen.add(key)
            examples.append(example)
    Path(args.out).write_text("".join(json.dumps(e) + "\n" for e in examples))
    print(f"wrote {len(examples)} examples to {args.out}")


if __name__ == "__main__":
    main()
