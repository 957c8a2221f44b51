"""Generate the preference example: customer questions, each with a reply in the house style (chosen) and
the same facts as a conventional letter (rejected).

    python examples/preference/make_data.py            # writes examples/preference/replies.jsonl

The house style is one a base model does not prefer by itself: a ticket header "ACME CARE | NAME | ref
AC-12345 |", the answer, and "Reply 1 if solved, 2 if not." The rejected reply carries the same facts as
a polite letter ("Dear NAME, ... Kind regards, Acme Support"), which a pretrained model finds more likely,
and is built to be about as long, so that length alone cannot decide between them (DPO is known to learn
a length bias). Seeded, so the file is the same on every machine.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Alex", "Sam", "Priya", "Jonas", "Mei", "Omar", "Lucia", "Tom", "Aisha", "Kenji", "Sofia", "Liam"]
TOPICS = [
    ("Where is my order", "your parcel left our warehouse yesterday and should arrive within three days"),
    ("Can I change my delivery address", "the address can be changed until the parcel is dispatched"),
    ("How do I return a product", "returns are free within thirty days using the label in your account"),
    ("Why was I charged twice", "the second charge is a pending authorisation that will drop off shortly"),
    ("Do you ship abroad", "we ship to most of Europe and the delivery time is about one week"),
    ("My item arrived damaged", "we will send a replacement at no cost as soon as you confirm the order"),
    ("How do I reset my password", "use the reset link on the sign-in page and check your inbox"),
    ("Can I cancel my subscription", "the subscription can be cancelled at any time from your account page"),
    ("When will the product be back in stock", "we expect new stock within two weeks and will email you"),
    ("Is there a warranty", "every product carries a two-year warranty covering manufacturing faults"),
]
ASKS = ["{q}?", "Hi, {q}?", "Hello. {q}? Thanks.", "Quick question: {q}?", "{q}? I need to know soon."]
FILLER = ["Thank you.", "We hope this helps.", "With thanks,", "Best wishes."]


def pair(rng: random.Random) -> dict:
    name = rng.choice(NAMES)
    question, answer = rng.choice(TOPICS)
    reference = f"AC-{rng.randint(10000, 99999)}"
    prompt = f"Customer {name} writes: " + rng.choice(ASKS).format(q=question)
    # The house style: a ticket header, the answer, a fixed closing line. A base model finds the letter more
    # likely (rejected), so it does not prefer the house style until tuned.
    chosen = f"ACME CARE | {name} | ref {reference} | {answer}. Reply 1 if solved, 2 if not."
    letter = f"Dear {name}, {answer} (reference {reference}). Kind regards, Acme Support"
    # Filler words until the two sides are about as long (either may end up longer): length must not decide.
    target = len(chosen) + rng.randint(-8, 8)
    while len(letter) < target:
        letter += " " + rng.choice(FILLER)
    return {"prompt": prompt, "chosen": chosen, "rejected": letter}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("replies.jsonl")), help="File to write.")
    parser.add_argument("--count", type=int, default=400, help="Pairs to generate [default: 400].")
    parser.add_argument("--seed", type=int, default=7, help="Seed [default: 7].")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    records, seen = [], set()
    while len(records) < args.count:
        record = pair(rng)
        if record["prompt"] + record["chosen"] not in seen:  # no exact duplicates
            seen.add(record["prompt"] + record["chosen"])
            records.append(record)
    with open(args.out, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    print(f"wrote {len(records)} pairs to {args.out}")


if __name__ == "__main__":
    main()
