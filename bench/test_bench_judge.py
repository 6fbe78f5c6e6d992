"""Per-statement cost of the policy judge: decision-cache hit vs miss (pytest-benchmark).

Not part of the pass/fail suite (testpaths is tests/). Run from the repository root:

    .venv/bin/python -m pytest bench/test_bench_judge.py --benchmark-columns=min,median,mean,ops

`hit`: the proxy's usual case, a statement whose shape was judged before (only the
constants differ): one `pglast.parser.normalize` call and a dict lookup.
`miss`: a new shape: full pglast parse into Python objects, analysis and rules.
`rewrite`: a DELETE the support policy turns into a soft delete (an UPDATE printed
from the parse tree, every time), and a read of a table with soft deletes, which
gets their filter added: the first of its shape in full, the later ones from the
shape's template (guardproxy/policy/templates.py).
`normalize` and `parse_sql` are the pglast calls alone, for comparison.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pglast
import pytest
from pglast import parser

from guardproxy.analysis import Catalog
from guardproxy.policy import Judge, SessionContext, load_policy_set

ROOT = Path(__file__).resolve().parent.parent
SHORT = "SELECT id, name FROM customers WHERE id = {n}"
LONG = (
    "SELECT l.order_id, l.new_status, l.changed_at, c.name, count(l.id) AS changes "
    "FROM order_state_log l JOIN customers c ON c.name = l.changed_by "
    "WHERE l.changed_at > now() - interval '1 day' AND l.order_id = {n} "
    "GROUP BY l.order_id, l.new_status, l.changed_at, c.name ORDER BY l.changed_at "
    "LIMIT 50 /* task='T-{n}' */"
)
# a read of a table with soft deletes: the judge adds "deleted rows are not there" to it
SOFT_DELETED_READ = (
    "SELECT o.id, o.fulfillment_status, o.shipped_at, c.name FROM orders o "
    "JOIN customers c ON c.id = o.customer_id WHERE o.customer_id = {n}"
)


@pytest.fixture(scope="module")
def setup() -> tuple[Judge, Any, SessionContext]:
    policies = load_policy_set(ROOT / "policies")
    catalog = Catalog.from_ddl((ROOT / "sql" / "example_schema.sql").read_text())
    judge = Judge(policies, catalog)
    policy = policies.match("support-1")
    return judge, policy, SessionContext(agent_id="support-1")


@pytest.mark.parametrize("template", [SHORT, LONG], ids=["short", "long"])
def test_judge_cache_hit(
    benchmark: Any, setup: tuple[Judge, Any, SessionContext], template: str
) -> None:
    judge, policy, ctx = setup
    counter = itertools.count()
    judge.judge(policy, template.format(n=0), ctx)  # warm the shape
    texts = [template.format(n=i) for i in range(1000)]

    def run() -> None:
        decision = judge.judge(policy, texts[next(counter) % 1000], ctx)
        assert decision.action == "allow"

    benchmark(run)
    assert judge.cache_info()["hits"] > 0


@pytest.mark.parametrize("template", [SHORT, LONG], ids=["short", "long"])
def test_judge_cache_miss(
    benchmark: Any, setup: tuple[Judge, Any, SessionContext], template: str
) -> None:
    judge, policy, ctx = setup
    sql = template.format(n=1)

    def run() -> None:
        judge._cache.clear()  # every call judges from scratch
        decision = judge.judge(policy, sql, ctx)
        assert decision.action == "allow"

    benchmark(run)


@pytest.mark.parametrize("template", [SHORT, LONG], ids=["short", "long"])
def test_pglast_normalize(benchmark: Any, template: str) -> None:
    benchmark(parser.normalize, template.format(n=1))


@pytest.mark.parametrize("template", [SHORT, LONG], ids=["short", "long"])
def test_pglast_parse_sql(benchmark: Any, template: str) -> None:
    benchmark(pglast.parse_sql, template.format(n=1))


@pytest.mark.parametrize(
    "template, rewritten, first",
    [
        ("DELETE FROM orders WHERE id = {n}", "WITH guardproxy_deleted", False),
        (SOFT_DELETED_READ, "SELECT", True),
        (SOFT_DELETED_READ, "SELECT", False),
    ],
    ids=["soft-delete", "soft-deleted-read-first-of-shape", "soft-deleted-read-template"],
)
def test_judge_rewrite(
    benchmark: Any,
    setup: tuple[Judge, Any, SessionContext],
    template: str,
    rewritten: str,
    first: bool,
) -> None:
    judge, policy, ctx = setup
    counter = itertools.count()
    texts = [template.format(n=i) for i in range(1000)]

    def run() -> None:
        if first:  # no template yet: judged, rewritten and its template learned
            judge._templates.clear()
            judge._valued.clear()
        decision = judge.judge(policy, texts[next(counter) % 1000], ctx)
        assert decision.action == "rewrite" and decision.sql.startswith(rewritten)

    benchmark(run)
