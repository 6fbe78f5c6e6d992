"""Relay bugs the differential tests found and that are not fixed yet.

Each entry names the strict-xfail regression test that reproduces it
(``tests/integration/test_differential.py``) and matches the differences it causes,
so that the differential runs report them as known instead of failing on them,
and keep failing on anything else. Whoever fixes a bug removes its xfail marker
(the test then passes) and its entry here (the runs then fail if it comes back).
A matcher is narrow on purpose: it recognises the bug's own signature, never "some
difference in a script that also does X".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffwire import Bind, Describe, Script

Matcher = Callable[[Any, Script, Any], bool]  # (Difference, script, Postgres' Normalized)


@dataclass(frozen=True)
class KnownBug:
    tests: tuple[str, ...]  # its strict-xfail tests in tests/integration/test_differential.py
    summary: str
    matches: Matcher


# Open bugs; the fixed ones left with their fix (their regression tests in
# tests/integration/test_differential.py pass). A new one goes here with a narrow
# matcher of its own signature, and its test is marked strict xfail until it is fixed.
def _errors(messages: list[Any]) -> list[dict[str, str]]:
    return [m[1] for m in messages if m[0] == "E"]


def _unnamed_in_aborted_transaction(diff: Any, script: Script, postgres: Any) -> bool:
    """A Bind or Describe of the unnamed statement, in a transaction an error aborted,
    that Postgres answers (or refuses with 25P02) and the proxy refuses otherwise."""
    if not diff.where.startswith("answer") or not isinstance(diff.expected, tuple):
        return False
    batch, step, expected = diff.expected
    got = diff.got[2] if isinstance(diff.got, tuple) else []
    sent = script[batch][step]
    unnamed = (isinstance(sent, Describe) and sent.target == "S" and not sent.name) or (
        isinstance(sent, Bind) and not sent.statement
    )
    if not unnamed or not _errors(got):
        return False
    codes = {e.get("C") for e in _errors(got)}
    wanted = {e.get("C") for e in _errors(expected)}
    return codes <= {"25P02", "26000"} and wanted <= {"25P02"}


KNOWN_BUGS: dict[str, KnownBug] = {
    "unnamed statement in an aborted transaction": KnownBug(
        ("test_an_unnamed_parse_the_server_skipped_leaves_the_one_before",),
        "in a transaction an error aborted, the relay can lose track of which client "
        "statement is the server's unnamed one (an unnamed Parse of a text auto-prepared "
        "on the servers, skipped after the error): a later Describe or Bind of the unnamed "
        "statement gets 26000, or 25P02 from the proxy's own Parse of it, where Postgres "
        "answers it (the client's ROLLBACK ends it; found by the 20,000-script run)",
        _unnamed_in_aborted_transaction,
    ),
}

# (diffpolicy.py): matchers of (problem, script, the proxy's transcript)
KNOWN_POLICY_BUGS: dict[str, KnownBug] = {}


def known_policy_bug(problem: str, script: Script, transcript: Any) -> str | None:
    for name, bug in KNOWN_POLICY_BUGS.items():
        if bug.matches(problem, script, transcript):
            return name
    return None


def known_bug(diff: Any, script: Script, postgres: Any) -> str | None:
    """The name of the known bug that explains ``diff``, if one does."""
    for name, bug in KNOWN_BUGS.items():
        if bug.matches(diff, script, postgres):
            return name
    return None


def classify(
    diffs: list[Any],
    script: Script,
    postgres: Any,
    documented: Callable[[Any, Script, Any], str | None],
) -> list[tuple[str | None, Any]]:
    """Each difference of one target with what explains it: a documented difference
    (``documented`` names it) or a known bug; None when nothing does.

    Only the first difference in the answers is compared; the rows left behind and the
    state of the pool after it follow from it, so they go with its explanation when it
    has one and nothing explains them on their own."""
    out: list[tuple[str | None, Any]] = [
        (documented(d, script, postgres) or known_bug(d, script, postgres), d) for d in diffs
    ]
    first = next((bug for bug, d in out if d.where.startswith("answer") and bug), None)
    return [(bug or (first if not d.where.startswith("answer") else None), d) for bug, d in out]
