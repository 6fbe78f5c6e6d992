"""The code examples of ``docs/*.md``, and how each is checked.

`blocks()` yields every fenced code block with the HTML comment marker on the line
just above it, if any. A block is checked by how it is marked:

``<!-- run: offline [env NAME=VALUE ...] -->``
    lines ``$ guardproxy ...`` are run (no database) and their output (stdout and
    stderr) must equal the lines that follow, where a line ``...`` stands for any
    number of lines and a line ending in `` ...`` for any line starting so.
``<!-- run: live -->``
    the same, against the test database (`tests/integration/test_docs_live.py`):
    ``DSN`` in a command stands for a DSN of it.
``<!-- excerpt of: guardproxy ARGS -->``
    the command is run offline; each line of the block (but ``...``) must be a
    line of its output, in the same order.
``<!-- denial: [--policies DIR] [--schema FILE] [--principals P] --agent ID SQL -->``
    ``guardproxy explain`` of the SQL must deny (or rewrite) with exactly the
    block's message (an ``ERROR:`` prefix allowed) and ``HINT:`` line, if any.
``<!-- checked-by: tests/PATH.py -->``
    a test of that file checks the block (it names the doc file).
``<!-- not-run: WHY -->``
    not run, for the reason given (a cluster, a container, minutes of benchmark).

Unmarked blocks are checked by their language: ``yaml`` is loaded and validated as
what it is (a policy or part of one, settings, or another tool's file, parsed);
``sql`` is parsed with the Postgres parser; ``sh`` lines that run ``guardproxy`` must
name an existing command and existing options. A block without a language must be
marked: it is the output of something, and says what.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
_MARKER = re.compile(r"^<!--\s*([a-z][a-z -]*?):\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence
    lang: str
    body: list[str]
    marker: str  # run, excerpt of, denial, checked-by, not-run or ""
    argument: str

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks(docs: list[Path] | None = None) -> Iterator[Block]:
    for doc in docs or DOCS:
        lines = doc.read_text(encoding="utf-8").split("\n")
        i = 0
        while i < len(lines):
            if lines[i].startswith("```"):
                lang = lines[i][3:].strip()
                j = i + 1
                while j < len(lines) and not lines[j].startswith("```"):
                    j += 1
                marker, argument = "", ""
                above = lines[i - 1] if i > 0 else ""
                match = _MARKER.match(above)
                if match:
                    marker, argument = match.group(1), match.group(2)
                yield Block(doc, i + 1, lang, lines[i + 1 : j], marker, argument)
                i = j + 1
            else:
                i += 1


@dataclass(frozen=True)
class Session:
    """One ``$ command`` of a run block and the output shown after it."""

    argv: list[str]
    expected: list[str]


def sessions(block: Block) -> list[Session]:
    out: list[Session] = []
    for line in block.body:
        if line.startswith("$ "):
            out.append(Session(shlex.split(line[2:]), []))
        elif out:
            out[-1].expected.append(line.rstrip())
    return out


def matches(expected: list[str], actual: list[str]) -> bool:
    """Do the actual lines fit the expected ones (``...`` = any lines, ``x ...`` = a line
    starting with x)?"""
    if not expected:
        return not actual
    head, rest = expected[0], expected[1:]
    if head == "...":
        return any(matches(rest, actual[k:]) for k in range(len(actual) + 1))
    if not actual:
        return False
    line = actual[0].rstrip()
    fits = line.startswith(head[:-4]) if head.endswith(" ...") else line == head
    return fits and matches(rest, actual[1:])


def in_order(wanted: list[str], actual: list[str]) -> list[str]:
    """The wanted lines (but ``...``) not found in `actual` in the same order
    (indentation aside)."""
    missing = []
    position = 0
    stripped = [a.strip() for a in actual]
    for line in wanted:
        if line.strip() in ("", "..."):
            continue
        try:
            position = stripped.index(line.strip(), position) + 1
        except ValueError:
            missing.append(line)
    return missing


def block_starting(doc_name: str, first_line: str) -> Block:
    """The block of docs/`doc_name` whose first line starts with `first_line`."""
    for block in blocks([ROOT / "docs" / doc_name]):
        if block.body and block.body[0].startswith(first_line):
            return block
    raise AssertionError(f"docs/{doc_name} has no block starting with {first_line!r}")
