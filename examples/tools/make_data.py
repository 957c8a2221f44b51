"""Generate the tool-calling example: a clinic front desk that looks up patients, books, moves and cancels
appointments and refills prescriptions by calling tools (OpenAI's schema: `tools`, `tool_calls`, `role: tool`).

    python examples/tools/make_data.py            # writes examples/tools/calls.jsonl

Four kinds of conversation, seeded so the file is the same on every machine: one call; two calls at once (parallel);
a call, its result and a second call that uses the result (multi-turn; half of them go on to the second result and
the answer to the person, the end of the loop); and a question that needs no tool (the answer is text). Requests
vary in wording, order and date formats, so the model must read the arguments out of them. Evaluation scores the
last assistant turn: its calls (tool_args_match, BFCL's rules) or its text.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def _function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    schema = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": schema}}


STRING, DAY = {"type": "string"}, {"type": "string", "description": "YYYY-MM-DD"}
TOOLS = [
    _function("find_patient", "Find a patient's id by name.", {"name": STRING}, ["name"]),
    _function(
        "book", "Book an appointment.", {"patient_id": STRING, "day": DAY, "time": STRING}, ["patient_id", "day"]
    ),
    _function("cancel", "Cancel an appointment.", {"appointment_id": STRING}, ["appointment_id"]),
    _function("refill", "Refill a prescription.", {"patient_id": STRING, "drug": STRING}, ["patient_id", "drug"]),
]
NAMES = [
    "Ana Ruiz",
    "Ben Okafor",
    "Chen Li",
    "Dara Walsh",
    "Eli Cohen",
    "Fatima Khan",
    "Gus Berg",
    "Hana Sato",
    "Ivan Petrov",
    "Jo Mensah",
    "Kai Nguyen",
    "Lena Vogel",
    "Marta Silva",
    "Nils Berg",
    "Omar Haddad",
    "Pia Rossi",
]
DRUGS = ["metformin", "lisinopril", "atorvastatin", "salbutamol", "sertraline", "omeprazole"]
MONTHS = ["January", "February", "March", "April", "May", "June"]
QUESTIONS = [
    ("When are you open?", "We are open Monday to Friday, 8:00 to 18:00."),
    ("Where do I park?", "Parking is behind the clinic, free for patients."),
    ("Do you take walk-ins?", "Yes, walk-ins are seen from 8:00 to 10:00 every weekday."),
    ("What is your phone number?", "You can call the front desk on 555-0100."),
    ("Can I bring my child?", "Yes, children are welcome with a parent."),
    ("Is there wheelchair access?", "Yes, the entrance and every room have step-free access."),
    ("How do I get my test results?", "Results are posted in the patient portal within three days."),
    ("Do you do flu shots?", "Yes, flu shots are given every weekday afternoon."),
]
OPENERS = ["", "Hi, ", "Quick question: ", "Hello. ", "Sorry to bother you, "]


def _day(rng: random.Random) -> tuple[str, str]:
    """A date as the model must write it (ISO) and as a person says it."""
    month, day = rng.randrange(6), rng.randint(1, 28)
    iso = f"2027-{month + 1:02d}-{day:02d}"
    said = rng.choice([f"{MONTHS[month]} {day}", f"{day} {MONTHS[month]}", iso])
    return iso, said


def _call(index: int, name: str, arguments: dict) -> dict:
    return {"id": f"call_{index}", "type": "function", "function": {"name": name, "arguments": arguments}}


def _patient(rng: random.Random) -> str:
    return f"P-{rng.randint(100, 999)}"


def one_call(rng: random.Random) -> list[dict]:
    kind = rng.choice(["book", "cancel", "refill", "find"])
    if kind == "book":
        patient, (iso, said), hour = _patient(rng), _day(rng), rng.choice(["09:00", "11:30", "14:00", "16:15"])
        ask = rng.choice(["Book {p} on {d} at {h}.", "Can you put {p} in for {d}, {h}?", "{p} needs a slot {d} {h}."])
        call = _call(1, "book", {"patient_id": patient, "day": iso, "time": hour})
        return [{"role": "user", "content": ask.format(p=patient, d=said, h=hour)}, _asks(call)]
    if kind == "cancel":
        appointment = f"A-{rng.randint(1000, 9999)}"
        ask = rng.choice(["Cancel appointment {a}.", "Please drop {a}, the patient can't come.", "{a} is off."])
        return [{"role": "user", "content": ask.format(a=appointment)},
                _asks(_call(1, "cancel", {"appointment_id": appointment}))]  # fmt: skip
    if kind == "refill":
        patient, drug = _patient(rng), rng.choice(DRUGS)
        ask = rng.choice(["Refill {d} for {p}.", "{p} is out of {d}.", "Could {p} get more {d}?"])
        return [{"role": "user", "content": ask.format(p=patient, d=drug)},
                _asks(_call(1, "refill", {"patient_id": patient, "drug": drug}))]  # fmt: skip
    name = rng.choice(NAMES)
    ask = rng.choice(["What's the id of {n}?", "Look up {n} for me.", "Find patient {n}."])
    return [{"role": "user", "content": ask.format(n=name)}, _asks(_call(1, "find_patient", {"name": name}))]


def parallel(rng: random.Random) -> list[dict]:
    patient, first, second = _patient(rng), *rng.sample(DRUGS, 2)
    ask = rng.choice(["Refill {a} and {b} for {p}.", "{p} needs both {a} and {b} refilled."])
    calls = [_call(1, "refill", {"patient_id": patient, "drug": first}),
             _call(2, "refill", {"patient_id": patient, "drug": second})]  # fmt: skip
    return [{"role": "user", "content": ask.format(p=patient, a=first, b=second)}, _asks(*calls)]


def multi_turn(rng: random.Random) -> list[dict]:
    """Find the patient, then book with the id found; in half of them the booking's result comes back too and the
    turn ends with the answer to the person (without those, a model learns no end to the loop: served, it went on
    to cancel what it had just booked)."""
    name, patient, (iso, said) = rng.choice(NAMES), _patient(rng), _day(rng)
    ask = rng.choice(["Book {n} on {d}.", "{n} wants an appointment {d}."])
    messages = [
        {"role": "user", "content": ask.format(n=name, d=said)},
        _asks(_call(1, "find_patient", {"name": name})),
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"patient_id": patient})},
        _asks(_call(2, "book", {"patient_id": patient, "day": iso})),
    ]
    if rng.random() < 0.5:
        appointment = f"A-{rng.randint(1000, 9999)}"
        booked = {"appointment_id": appointment, "day": iso}
        done = rng.choice(["{n} is booked on {d} (appointment {a}).", "Done: {n}, {d}, appointment {a}."])
        messages += [
            {"role": "tool", "tool_call_id": "call_2", "content": json.dumps(booked)},
            {"role": "assistant", "content": done.format(n=name, d=iso, a=appointment)},
        ]
    return messages


def no_call(rng: random.Random) -> list[dict]:
    question, answer = rng.choice(QUESTIONS)
    return [{"role": "user", "content": rng.choice(OPENERS) + question}, {"role": "assistant", "content": answer}]


def _asks(*calls: dict) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": list(calls)}


KINDS = [(one_call, 0.45), (parallel, 0.2), (multi_turn, 0.2), (no_call, 0.15)]


def make(count: int, seed: int) -> list[dict]:
    """`count` distinct conversations (a repeated one is drawn again: duplicates overfit and leak across splits)."""
    rng = random.Random(seed)
    builders, weights = zip(*KINDS, strict=True)
    system = {"role": "system", "content": "You are the front desk of a clinic. Use the tools to act."}
    rows, seen = [], set()
    while len(rows) < count:
        messages = [system, *rng.choices(builders, weights)[0](rng)]
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            rows.append({"tools": TOOLS, "messages": messages})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("calls.jsonl"))
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    args.out.write_text("".join(json.dumps(row) + "\n" for row in make(args.count, args.seed)))
    print(f"wrote {args.count} conversations to {args.out}")


if __name__ == "__main__":
    main()
