"""The examples of docs/policies.md and docs/write-safety.md for issue 13's judge
features, run: each printed decision, denial or rewrite is what the judge produces.
(The error Postgres raises for a soft-deleted parent is checked against the docs by
tests/integration/test_policy_names_live.py.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from _policy_helpers import example_catalog, example_policies, judge

from guardproxy.policy.tools import explain, explain_text

DOCS = Path(__file__).resolve().parents[2] / "docs"


def blocks(name: str) -> list[str]:
    """The fenced code blocks of a docs page."""
    return re.findall(r"```[a-z]*\n(.*?)```", (DOCS / name).read_text(), flags=re.S)


def test_explain_examples_show_what_explain_prints() -> None:
    found = 0
    for block in blocks("policies.md"):
        lines = [line.strip() for line in block.strip().splitlines()]
        if (
            not lines
            or not lines[0].startswith("$ guardproxy explain")
            or "soft_deleted" not in block
        ):
            continue
        args = shlex.split(lines[0][2:])
        agent = args[args.index("--agent") + 1]
        sql = args[-1]
        printed = explain_text(explain(example_policies(), agent, sql, example_catalog()))
        for line in lines[1:]:
            assert line in printed.splitlines(), (line, printed)
        found += 1
    assert found == 1


def test_the_unresolved_denial_example() -> None:
    (block,) = [b for b in blocks("policies.md") if "(policy analytics, unresolved)" in b]
    error, hint = (line.strip() for line in block.strip().splitlines())
    decision = judge("analytics", "SELECT x.id FROM customers")
    assert error == f"ERROR:  {decision.reason}"
    assert hint == f"HINT:  {decision.hint}"


def test_the_rewrite_shown_in_write_safety() -> None:
    (block,) = [b for b in blocks("write-safety.md") if "guardproxy.live_parent(6" in b]
    decision = judge(
        "support",
        "INSERT INTO order_state_log (order_id, new_status, changed_by) "
        "VALUES (6, 'returned', 'support-3')",
    )
    assert " ".join(block.split()) == " ".join(decision.sql.split()).replace("( ", "(")
