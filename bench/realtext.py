"""Build a real-text chat file offline: questions about Python's standard library answered with its docstrings.

    python bench/realtext.py out.jsonl [--n 6000] [--seed 0]

Real English with the traits that trip near-duplicate detection: prompts from a few shared templates, and
many answers a word apart ("Return True if ... lowercase" / "... uppercase"). Only what this Python ships
is read (its modules' docstrings and pydoc's topic texts), so the file depends on the Python version only.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import warnings
from pathlib import Path

MODULES = (
    "builtins abc argparse array ast asyncio base64 binascii bisect bz2 calendar cmath codecs collections "
    "colorsys configparser contextlib copy csv dataclasses datetime decimal difflib dis email enum fnmatch "
    "fractions ftplib functools gc gettext glob gzip hashlib heapq hmac html html.parser http.client imaplib "
    "inspect io ipaddress itertools json locale logging lzma mailbox math mimetypes mmap numbers operator os "
    "os.path pathlib pickle platform pprint queue random re reprlib sched secrets selectors shelve shutil signal "
    "smtplib socket sqlite3 statistics string struct subprocess sysconfig tarfile tempfile textwrap threading "
    "time tomllib traceback typing unittest urllib.parse uuid warnings wave weakref xml.etree.ElementTree "
    "zipfile zlib"
).split()
TEMPLATES = (
    "What does `{name}` do?",
    "Explain `{name}` from the Python standard library.",
    "In one paragraph, describe `{name}`.",
    "Describe what the Python object `{name}` is for.",
)
MIN_WORDS, MAX_WORDS = 5, 250


def first_paragraph(doc: object) -> str | None:
    if not isinstance(doc, str) or not doc:
        return None
    paragraph = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    return paragraph if MIN_WORDS <= len(paragraph.split()) <= MAX_WORDS else None


def documented() -> list[tuple[str, str]]:
    """(qualified name, first docstring paragraph) of public module members and their methods, in a fixed order."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in MODULES:
            module = importlib.import_module(module_name)
            for name, member in sorted(vars(module).items()):
                if name.startswith("_") or inspect.ismodule(member):
                    continue
                found.append((f"{module_name}.{name}", first_paragraph(getattr(member, "__doc__", None))))
                if inspect.isclass(member):
                    for attr, value in sorted(vars(member).items()):
                        if not attr.startswith("_"):
                            found.append(
                                (f"{module_name}.{name}.{attr}", first_paragraph(getattr(value, "__doc__", None)))
                            )
    from pydoc_data.topics import topics

    for topic, text in sorted(topics.items()):
        for part, paragraph in enumerate(text.split("\n\n")):
            found.append((f"pydoc {topic} (part {part + 1})", first_paragraph(paragraph)))
    return [(name, doc) for name, doc in found if doc and not doc.startswith(("Initialize self", "Return repr"))]


def build(path: Path, n: int = 6000, seed: int = 0) -> int:
    """Write up to n chat records to path (seeded choice and templates); returns how many."""
    rng = random.Random(seed)
    pairs = documented()
    rng.shuffle(pairs)
    records = [
        {
            "messages": [
                {"role": "user", "content": rng.choice(TEMPLATES).format(name=name)},
                {"role": "assistant", "content": doc},
            ]
        }
        for name, doc in pairs[:n]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="JSONL file to write.")
    parser.add_argument("--n", type=int, default=6000, help="Most records to write [default: 6000].")
    parser.add_argument("--seed", type=int, default=0, help="Choice and template seed [default: 0].")
    args = parser.parse_args()
    print(f"{build(args.out, args.n, args.seed)} records written to {args.out}")


if __name__ == "__main__":
    main()
