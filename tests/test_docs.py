"""The docs stay true to the code: the run-directory layout is rundir.LAYOUT, every documented `tunesmith` command
parses, and every relative link resolves.

Nothing here runs a command, loads a model or reaches the network; it reads README.md and docs/*.md.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tunesmith.cli import build_parser
from tunesmith.rundir import LAYOUT

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Shell code blocks, and plain ``` blocks (they show commands too).
SHELL_BLOCKS = {"bash", "sh", "shell", "console", ""}
# A command ends at a pipe or a redirection; `;`, `&&`, `||` and `&` start another one.
COMMAND_ENDS = {"|", "|&", ">", ">>", "<", "<<", "&>", ">&", ">|"}
COMMAND_SEPARATORS = {";", "&&", "||", "&", ";;"}
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def shell_lines(path: Path) -> list[tuple[int, str]]:
    """Each logical line of the shell code blocks of a markdown file (continuation lines joined), with the
    number of the line it starts on."""
    lines: list[tuple[int, str]] = []
    fence: str | None = None
    shell = False
    pending: tuple[int, str] | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence, shell = match.group(1), match.group(2).lower() in SHELL_BLOCKS
            continue
        if match and line.strip() == fence:
            fence = None
            continue
        if not shell:
            continue
        start, text = pending if pending else (number, "")
        text += line
        if line.endswith("\\"):
            pending = (start, text[:-1] + " ")
            continue
        pending = None
        lines.append((start, text))
    return lines


def without_comment(line: str) -> str:
    """The line up to its `#` comment, as the shell reads one: a `#` that starts a word outside quotes."""
    quote = None
    escaped = False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1] in " \t;|&<>"):
            return line[:index]
    return line


def tunesmith_commands(line: str) -> list[str]:
    """The `tunesmith ...` commands of one shell line, each cut at its first pipe or redirection, without the
    `$ ` prompt of a console block and without its comment."""
    text = line.strip()
    if text.startswith("$ "):
        text = text[2:].lstrip()
    if not text.startswith("tunesmith "):
        return []
    text = re.sub(r"(?<=\s)\d+(?=[<>])", " ", without_comment(text))  # a redirection's descriptor: 2>&1
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    commands: list[list[str]] = [[]]
    ended = False
    try:
        tokens = list(lexer)
    except ValueError:  # an unclosed quote: shown as it is, so that the parse test fails on it
        return [text]
    for token in tokens:
        if token in COMMAND_SEPARATORS:
            commands.append([])
            ended = False
        elif token in COMMAND_ENDS or (token and set(token) <= set("|&<>;")):
            ended = True
        elif not ended:
            commands[-1].append(token)
    return [shlex.join(words) for words in commands if words and words[0] == "tunesmith"]


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for number, line in shell_lines(path):
            found += [(f"{_rel(path)}:{number}", command) for command in tunesmith_commands(line)]
    return found


def test_the_documented_run_directory_layout_is_rundir_layout():
    text = (ROOT / "docs" / "run-directory.md").read_text(encoding="utf-8")
    section = re.search(r"^## Layout\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, "docs/run-directory.md has no '## Layout' section"
    documented = []
    for row in section.group(1).splitlines():
        if not row.lstrip().startswith("|"):
            continue
        first_cell = row.strip().strip("|").split("|")[0]
        key = re.search(r"`([^`]+)`", first_cell)
        if key:
            documented.append(key.group(1))
    assert len(documented) == len(set(documented)), "a path is listed twice under '## Layout'"
    assert set(documented) - set(LAYOUT) == set(), "documented but not in rundir.LAYOUT"
    assert set(LAYOUT) - set(documented) == set(), "in rundir.LAYOUT but not documented in docs/run-directory.md"


def test_the_docs_show_tunesmith_commands():
    where = {place.split(":")[0] for place, _ in documented_commands()}
    assert "README.md" in where and len(where) > 3


@pytest.mark.parametrize(("place", "command"), documented_commands(), ids=lambda value: value)
def test_every_documented_command_parses(place, command):
    try:
        build_parser().parse_args(shlex.split(command)[1:])
    except ValueError as exc:
        pytest.fail(f"{place}: `{command}` is not a shell command line ({exc})")
    except SystemExit as exc:
        if exc.code == 0:  # --help: it parsed
            return
        pytest.fail(f"{place}: `{command}` does not parse (argparse exit {exc.code})")


def relative_links(path: Path) -> list[tuple[int, str]]:
    """The relative link targets of a markdown file outside its code blocks and code spans, with line numbers."""
    links = []
    fence: str | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            continue
        if fence is not None:
            if match and line.strip() == fence:
                fence = None
            continue
        for target in LINK.findall(re.sub(r"`[^`]*`", "``", line)):
            if not re.match(r"^(https?:|mailto:|#)", target):
                links.append((number, target))
    return links


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    anchors: set[str] = set()
    fence: str | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None:
            fence = None if match and line.strip() == fence else fence
        elif heading := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            anchor, n = slug, 1
            while anchor in anchors:
                anchor, n = f"{slug}-{n}", n + 1
            anchors.add(anchor)
    return anchors


def test_the_docs_have_relative_links():
    assert relative_links(ROOT / "README.md")


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_relative_link_points_to_a_file_that_exists(doc):
    missing = []
    for number, target in relative_links(doc):
        file, _, anchor = target.partition("#")
        path = doc.parent / file
        if not path.exists():
            missing.append(f"{_rel(doc)}:{number}: {target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path):
            missing.append(f"{_rel(doc)}:{number}: {target} (no such heading in {file})")
    assert missing == []
