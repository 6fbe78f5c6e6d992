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

from diffwire import Script

Matcher = Callable[[Any, Script, Any], bool]  # (Difference, script, Postgres' Normalized)


@dataclass(frozen=True)
class KnownBug:
    tests: tuple[str, ...]  # its strict-xfail tests in tests/integration/test_differential.py
    summary: str
    matches: Matcher


# None open: every bug the differential runs found is fixed, and its regression test
# in tests/integration/test_differential.py passes. A new one goes here with a narrow
# matcher of its own signature, and its test is marked strict xfail until it is fixed.
KNOWN_BUGS: dict[str, KnownBug] = {}

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
