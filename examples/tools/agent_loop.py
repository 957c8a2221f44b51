"""The openai client's tool-calling loop against the served tools run: a two-step task (find the patient by name,
then book with the id the first tool returned), as an application would run it.

    tunesmith serve runs/tools --api-key secret &          # the run `tunesmith run examples/tools/config.yaml` made
    python examples/tools/agent_loop.py --api-key secret   # [--base-url http://127.0.0.1:8000/v1] [--tasks 8]

Each task is a request such as "Book Hana Sato on May 14." The loop sends it with the clinic's tools, runs every
call the model makes with the fake clinic below, sends the results back, and stops when the model answers without
a call (or after --rounds). A task is complete when the model called find_patient with the name and then book with
the id that find_patient returned and the day in ISO form. Prints each exchange and how many tasks completed;
exits 1 when one did not.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_data import MONTHS, NAMES, TOOLS  # noqa: E402  (the tools the run was trained with)

SYSTEM = "You are the front desk of a clinic. Use the tools to act."  # as in the training data


class Clinic:
    """The tools' side: a patient id per name, an appointment per booking, every call recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.ids = {name: f"P-{300 + index * 37}" for index, name in enumerate(NAMES)}

    def run(self, name: str, arguments: dict) -> dict:
        self.calls.append((name, arguments))
        if name == "find_patient":
            found = self.ids.get(str(arguments.get("name", "")))
            return {"patient_id": found} if found else {"error": "no such patient"}
        if name == "book":
            return {"appointment_id": f"A-{1000 + len(self.calls)}", "day": arguments.get("day")}
        if name in ("cancel", "refill"):
            return {"ok": True}
        return {"error": f"unknown tool {name}"}


def task(rng: random.Random) -> tuple[str, str, str]:
    """A request, the patient's name and the day it asks for (ISO)."""
    name, month, day = rng.choice(NAMES), rng.randrange(6), rng.randint(1, 28)
    said = rng.choice([f"{MONTHS[month]} {day}", f"{day} {MONTHS[month]}"])
    ask = rng.choice(["Book {n} on {d}.", "{n} wants an appointment {d}."])
    return ask.format(n=name, d=said), name, f"2027-{month + 1:02d}-{day:02d}"


def complete(clinic: Clinic, name: str, day: str) -> bool:
    """find_patient with the name, then book with the id it returned and the day."""
    found = clinic.ids.get(name)
    calls = clinic.calls
    looked_up = [i for i, (tool, args) in enumerate(calls) if tool == "find_patient" and args.get("name") == name]
    booked = [
        i for i, (tool, args) in enumerate(calls)
        if tool == "book" and args.get("patient_id") == found and args.get("day") == day
    ]  # fmt: skip
    return bool(looked_up and booked and looked_up[0] < booked[-1])


def converse(client: OpenAI, model: str, request: str, clinic: Clinic, rounds: int) -> None:
    messages: list[dict] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": request}]
    print(f"user: {request}")
    for _ in range(rounds):
        reply = client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=96
        ).choices[0]
        message = reply.message
        if not message.tool_calls:
            print(f"  assistant: {message.content!r} ({reply.finish_reason})")
            return
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            arguments = json.loads(call.function.arguments)  # a JSON string on the wire, an object once parsed
            result = clinic.run(call.function.name, arguments)
            print(f"  call {call.function.name}({json.dumps(arguments)}) -> {json.dumps(result)}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    print(f"  (stopped after {rounds} rounds)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="The server's OpenAI API root.")
    parser.add_argument("--api-key", default="none", help="The key `tunesmith serve` was started with.")
    parser.add_argument("--tasks", type=int, default=8, help="Two-step tasks to run [default: 8].")
    parser.add_argument("--rounds", type=int, default=3, help="Model turns per task at most [default: 3].")
    parser.add_argument("--seed", type=int, default=7, help="Seed of the tasks drawn [default: 7].")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    rng, done = random.Random(args.seed), 0
    for _ in range(args.tasks):
        request, name, day = task(rng)
        clinic = Clinic()
        converse(client, model, request, clinic, args.rounds)
        ok = complete(clinic, name, day)
        done += ok
        print(f"  -> {'complete' if ok else 'NOT complete'}")
    print(f"{done} of {args.tasks} two-step tasks completed")
    return 0 if done == args.tasks else 1


if __name__ == "__main__":
    sys.exit(main())
