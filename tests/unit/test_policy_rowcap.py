"""Row caps of reads (``limits.max_rows_returned``) and plan limits: every query whose rows
reach the client gets LIMIT at most N + 1, cached by shape when the edit is a suffix
(no database)."""

from __future__ import annotations

from pathlib import Path

import pglast
import pytest
from _policy_helpers import copy_policies, example_catalog, example_policies, judge
from pglast import ast
from pglast.enums import LimitOption

from guardproxy.policy import (
    Decision,
    Judge,
    PolicyError,
    PolicySet,
    SessionContext,
    load_policy_set,
)
from guardproxy.policy.plans import (
    PlanEstimate,
    explain_statements,
    plan_estimate,
    plan_violation,
)
from guardproxy.policy.rowcap import append_limits


def capped(sql: str, **kw: object) -> Decision:
    decision = judge("analytics", sql, **kw)  # type: ignore[arg-type]
    assert decision.action in ("allow", "rewrite"), decision
    assert decision.max_rows_returned == 1000
    assert decision.rows_over_cap == "truncate"
    pglast.parse_sql(decision.sql)
    return decision


def limit_of(sql: str, index: int = 0) -> ast.Node | None:
    stmt = pglast.parse_sql(sql)[index].stmt
    if isinstance(stmt, ast.DeclareCursorStmt | ast.PrepareStmt | ast.CopyStmt):
        stmt = stmt.query
    assert isinstance(stmt, ast.SelectStmt)
    return stmt.limitCount


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id FROM orders",
        "SELECT id FROM orders WHERE id > 3 ORDER BY id",
        "SELECT id FROM orders UNION SELECT id FROM customers ORDER BY 1",
        "VALUES (1), (2)",
        "TABLE orders",
        "SELECT id FROM orders OFFSET 5",
        "WITH r(n) AS (SELECT 1) SELECT n FROM r",
        "DECLARE c CURSOR WITH HOLD FOR SELECT id FROM orders",
        "SELECT id FROM orders -- trailing comment",
        "SELECT id FROM orders /* task='T-1' */",
    ],
)
def test_a_read_without_limit_gets_one_appended(sql: str) -> None:
    decision = capped(sql)
    assert (decision.action, decision.rule) == ("rewrite", "limits.max_rows_returned")
    assert decision.sql == sql + "\nLIMIT 1001"
    assert decision.cacheable  # the edit depends on the shape alone
    count = limit_of(decision.sql)
    assert isinstance(count, ast.A_Const) and count.val.ival == 1001
    assert "at most 1000 rows (policy analytics, limits.max_rows_returned)" in decision.reason


def test_several_statements_each_get_their_cap() -> None:
    sql = "SELECT 1; SET application_name = 'x'; SELECT id FROM orders;"
    decision = capped(sql)
    assert decision.sql == (
        "SELECT 1\nLIMIT 1001; SET application_name = 'x'; SELECT id FROM orders\nLIMIT 1001;"
    )


def test_the_cache_appends_the_cap_to_each_message() -> None:
    policies = example_policies()
    engine = Judge(policies, example_catalog())
    analytics = policies.get("analytics")
    assert analytics is not None
    ctx = SessionContext(agent_id="analytics-7")
    texts = [f"SELECT name FROM customers WHERE id = {n} /* step='{n}' */" for n in range(3)]
    out = [engine.judge(analytics, text, ctx) for text in texts]
    assert engine.cache_info() == {"hits": 2, "misses": 1, "size": 1}
    assert [d.sql for d in out] == [text + "\nLIMIT 1001" for text in texts]
    assert all(d.max_rows_returned == 1000 for d in out)
    assert append_limits("SELECT 'é'; SELECT 2", [1], 9) == "SELECT 'é'; SELECT 2\nLIMIT 10"


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT id FROM orders LIMIT 10", "SELECT id FROM orders LIMIT 10"),
        ("SELECT id FROM orders LIMIT 1000", "SELECT id FROM orders LIMIT 1000"),
        ("SELECT id FROM orders LIMIT 5000", "SELECT id FROM orders LIMIT 1001"),
        ("SELECT id FROM orders LIMIT $1", "SELECT id FROM orders LIMIT LEAST($1, 1001)"),
        ("SELECT id FROM orders LIMIT ALL", "SELECT id FROM orders LIMIT LEAST(NULL, 1001)"),
        (
            "SELECT id FROM orders ORDER BY id FETCH FIRST 2000 ROWS ONLY",
            "SELECT id FROM orders ORDER BY id LIMIT 1001",
        ),
        (
            "SELECT id FROM orders ORDER BY id FETCH FIRST 5000 ROWS WITH TIES",
            "SELECT * FROM (SELECT id FROM orders ORDER BY id FETCH FIRST 5000 ROWS WITH TIES ) "
            "AS guardproxy_capped LIMIT 1001",
        ),
        (
            "(SELECT id FROM orders LIMIT 5) UNION ALL (SELECT id FROM customers) LIMIT $1 + 1",
            "(SELECT id FROM orders LIMIT 5) UNION ALL SELECT id FROM customers "
            "LIMIT LEAST($1 + 1, 1001)",
        ),
    ],
)
def test_an_existing_limit_is_kept_or_lowered(sql: str, expected: str) -> None:
    decision = capped(sql)
    assert not decision.cacheable  # a LIMIT constant decided it
    if expected == sql:
        assert decision.action == "allow" and decision.sql == sql
    else:
        assert decision.rule == "limits.max_rows_returned"
        assert decision.sql.rstrip() == expected


WITH_TIES = [
    # ORDER BY a constant: every row ties with the first
    (
        "SELECT id FROM orders ORDER BY length('x') FETCH FIRST 1 ROWS WITH TIES",
        "SELECT * FROM (SELECT id FROM orders ORDER BY length('x') FETCH FIRST 1 ROWS WITH TIES ) "
        "AS guardproxy_capped LIMIT 1001",
    ),
    (
        "SELECT id FROM orders ORDER BY 1 OFFSET 2 ROWS FETCH NEXT $1 ROWS WITH TIES",
        "SELECT * FROM (SELECT id FROM orders ORDER BY 1 FETCH FIRST $1 ROWS WITH TIES OFFSET 2) "
        "AS guardproxy_capped LIMIT 1001",
    ),
    # a NULL count (pglast would print ALL, which is not SQL): a typed NULL
    (
        "SELECT id FROM orders ORDER BY 1 FETCH FIRST NULL ROWS WITH TIES",
        "SELECT * FROM (SELECT id FROM orders ORDER BY 1 FETCH FIRST CAST(NULL AS bigint) ROWS "
        "WITH TIES ) AS guardproxy_capped LIMIT 1001",
    ),
    # the WITH list moves out, so that a writable CTE stays at the top level
    (
        "WITH d AS (SELECT id FROM orders) SELECT id FROM d ORDER BY 1 FETCH FIRST 3 ROWS WITH TIES",
        "WITH d AS (SELECT id FROM orders) SELECT * FROM (SELECT id FROM d ORDER BY 1 FETCH "
        "FIRST 3 ROWS WITH TIES ) AS guardproxy_capped LIMIT 1001",
    ),
    (
        "(SELECT id FROM orders) UNION (SELECT id FROM customers) ORDER BY 1 "
        "FETCH FIRST 2 ROWS WITH TIES",
        "SELECT * FROM (SELECT id FROM orders UNION SELECT id FROM customers ORDER BY 1 FETCH "
        "FIRST 2 ROWS WITH TIES ) AS guardproxy_capped LIMIT 1001",
    ),
    (
        "DECLARE c CURSOR FOR SELECT id FROM orders ORDER BY 1 FETCH FIRST 2 ROWS WITH TIES",
        "DECLARE c CURSOR FOR SELECT * FROM (SELECT id FROM orders ORDER BY 1 FETCH FIRST 2 ROWS "
        "WITH TIES ) AS guardproxy_capped LIMIT 1001",
    ),
    (
        "COPY (SELECT id FROM orders ORDER BY 1 FETCH FIRST 2 ROWS WITH TIES) TO STDOUT",
        "COPY (SELECT * FROM (SELECT id FROM orders ORDER BY 1 FETCH FIRST 2 ROWS WITH TIES ) "
        "AS guardproxy_capped LIMIT 1001) TO STDOUT",
    ),
    (
        "PREPARE p AS SELECT id FROM orders ORDER BY 1 FETCH FIRST 2 ROWS WITH TIES",
        "PREPARE p AS SELECT * FROM (SELECT id FROM orders ORDER BY 1 FETCH FIRST 2 ROWS WITH "
        "TIES ) AS guardproxy_capped LIMIT 1001",
    ),
]


@pytest.mark.parametrize(("sql", "expected"), WITH_TIES)
def test_with_ties_is_wrapped_under_a_plain_limit(sql: str, expected: str) -> None:
    """WITH TIES returns every row tied with the last one, however many: even a small
    count is no bound, so the query is kept and capped from outside."""
    decision = judge("analytics", sql)
    assert (decision.action, decision.rule) == ("rewrite", "limits.max_rows_returned"), decision
    assert decision.sql.rstrip() == expected
    assert not decision.cacheable
    outer = pglast.parse_sql(decision.sql)[0].stmt
    if isinstance(outer, ast.DeclareCursorStmt | ast.PrepareStmt | ast.CopyStmt):
        outer = outer.query
    assert isinstance(outer, ast.SelectStmt)
    assert outer.limitOption == LimitOption.LIMIT_OPTION_COUNT
    assert isinstance(outer.limitCount, ast.A_Const) and outer.limitCount.val.ival == 1001


def test_a_null_with_ties_count_prints_as_sql_without_a_cap() -> None:
    # support has no row cap, but its soft-delete filter makes the judge print the tree
    sql = "SELECT id FROM orders ORDER BY 1 FETCH FIRST NULL ROWS WITH TIES"
    decision = judge("support", sql)
    assert decision.action == "rewrite"
    assert "FETCH FIRST CAST(NULL AS bigint) ROWS WITH TIES" in decision.sql
    pglast.parse_sql(decision.sql)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (
            "PREPARE p AS SELECT id FROM orders WHERE id > $1",
            "PREPARE p AS SELECT id FROM orders WHERE id > $1 LIMIT 1001",
        ),
        (
            "COPY customers (id, name) TO STDOUT WITH (FORMAT csv)",
            "COPY (SELECT id, name FROM customers LIMIT 1001) TO STDOUT WITH (FORMAT csv)",
        ),
        (
            "COPY (SELECT id FROM orders) TO STDOUT",
            "COPY (SELECT id FROM orders LIMIT 1001) TO STDOUT",
        ),
    ],
)
def test_prepared_and_copied_queries_are_capped_on_the_tree(sql: str, expected: str) -> None:
    decision = judge("analytics", sql)
    assert (decision.action, decision.sql) == ("rewrite", expected)
    # the rows come with COPY; those of a prepared statement with its EXECUTE
    assert decision.max_rows_returned == (None if sql.startswith("PREPARE") else 1000)


def test_what_returns_no_query_rows_is_left_alone() -> None:
    for sql in ("EXPLAIN SELECT id FROM orders", "SHOW statement_timeout", "BEGIN"):
        decision = judge("analytics", sql)
        assert (decision.action, decision.sql, decision.max_rows_returned) == ("allow", sql, None)
    fetch = judge("analytics", "FETCH 5000 FROM c")
    assert (fetch.action, fetch.max_rows_returned) == ("allow", 1000)
    execute_ctx = SessionContext(
        agent_id="analytics-7", prepared={"p": "SELECT id FROM orders WHERE id > $1"}
    )
    execute = judge("analytics", "EXECUTE p(1)", ctx=execute_ctx)
    assert (execute.action, execute.sql, execute.max_rows_returned) == (
        "allow",
        "EXECUTE p(1)",
        1000,
    )
    other = judge("fulfillment", "SELECT id FROM orders")
    assert (other.action, other.max_rows_returned) == ("allow", None)


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    directory = copy_policies(tmp_path_factory.mktemp("rowcap"))
    path = directory / "support.yaml"
    path.write_text(
        path.read_text().replace(
            "  max_client_sessions: 100\n",
            "  max_client_sessions: 100\n  max_rows_returned: 50\n  on_rows_returned_over: error\n"
            "  max_plan_cost: 10000\n  max_plan_rows: 100000\n",
        )
    )
    return load_policy_set(directory)


def test_cap_together_with_the_soft_delete_filter(strict: PolicySet) -> None:
    decision = judge("support", "SELECT id FROM orders WHERE id > 2", policies=strict)
    assert decision.rule == "tables.orders.soft_delete"
    assert decision.sql == (
        "SELECT id FROM orders WHERE id > 2 AND orders.deleted_at IS NULL LIMIT 51"
    )
    assert (decision.max_rows_returned, decision.rows_over_cap) == (50, "error")
    assert decision.plan_check
    write = judge(
        "support", "UPDATE orders SET fulfillment_status = 'x' WHERE id = 1", policies=strict
    )
    assert (write.max_rows_returned, write.plan_check) == (None, False)


# -- plan limits ----------------------------------------------------------------------------


def test_explain_statements_lists_the_reads() -> None:
    assert explain_statements(
        "BEGIN; SELECT 1; DECLARE c CURSOR FOR SELECT 2 -- x\n; UPDATE t SET a = 1; EXECUTE p"
    ) == (
        "EXPLAIN (FORMAT JSON) SELECT 1\n",
        "EXPLAIN (FORMAT JSON) DECLARE c CURSOR FOR SELECT 2 -- x\n",
        "EXPLAIN (FORMAT JSON) EXECUTE p\n",
    )


PLAN = """[{"Plan": {"Node Type": "Limit", "Total Cost": 25000.5, "Plan Rows": 51,
  "Plans": [{"Node Type": "Hash Join", "Total Cost": 250000.0, "Plan Rows": 2000000}]}}]"""


def test_plan_estimate_and_violation(strict: PolicySet) -> None:
    estimate = plan_estimate(PLAN)
    assert estimate == PlanEstimate(total_cost=25000.5, rows=2000000.0)
    assert plan_estimate([{"Plan": {"Total Cost": 1, "Plan Rows": 2}}]) == PlanEstimate(1.0, 2.0)
    with pytest.raises(ValueError, match="EXPLAIN"):
        plan_estimate("{}")
    support = strict.get("support")
    assert support is not None
    cost = plan_violation(support, estimate)
    assert cost is not None and cost.rule == "limits.max_plan_cost" and cost.sqlstate == "54000"
    assert "estimated to cost 25000, more than max_plan_cost = 10000" in cost.reason
    rows = plan_violation(support, PlanEstimate(total_cost=5, rows=2_000_000))
    assert rows is not None and rows.rule == "limits.max_plan_rows"
    assert "2000000 rows, more than max_plan_rows = 100000 (policy support" in rows.reason
    assert plan_violation(support, PlanEstimate(total_cost=5, rows=5)) is None


def test_no_plan_check_without_plan_limits() -> None:
    assert not judge("analytics", "SELECT 1").plan_check


def test_rows_over_cap_error(tmp_path: Path) -> None:
    directory = copy_policies(tmp_path)
    path = directory / "analytics.yaml"
    path.write_text(
        path.read_text().replace("on_rows_returned_over: truncate", "on_rows_returned_over: error")
    )
    decision = judge("analytics", "SELECT 1", policies=load_policy_set(directory))
    assert decision.rows_over_cap == "error"


# -- byte caps --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_capped(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    directory = copy_policies(tmp_path_factory.mktemp("bytecap"))
    for name, extra in (("analytics", "  max_bytes_returned: 65536\n"), ("support", "")):
        path = directory / f"{name}.yaml"
        text = path.read_text()
        if name == "support":
            text = text.replace(
                "  max_client_sessions: 100\n",
                "  max_client_sessions: 100\n  max_bytes_returned: 4096\n"
                "  on_rows_returned_over: error\n",
            )
        else:
            text = text.replace(
                "  on_rows_returned_over: truncate\n", extra + "  on_rows_returned_over: truncate\n"
            )
        path.write_text(text)
    return load_policy_set(directory)


def test_the_byte_cap_is_announced_on_every_result(byte_capped: PolicySet) -> None:
    for sql in (
        "SELECT json_agg(o) FROM orders o",
        "SHOW statement_timeout",
        "COPY (SELECT id FROM orders) TO STDOUT",
        "EXPLAIN SELECT id FROM orders",
    ):
        decision = judge("analytics", sql, policies=byte_capped)
        assert decision.allowed, decision
        assert decision.max_bytes_returned == 65536, sql
        assert decision.rows_over_cap == "truncate"
    # an agent type with a byte cap and no row cap: RETURNING rows are bounded too
    write = judge(
        "support",
        "UPDATE orders SET fulfillment_status = 'packed' WHERE id = 3 RETURNING *",
        policies=byte_capped,
    )
    assert (write.max_bytes_returned, write.max_rows_returned) == (4096, None)
    assert write.rows_over_cap == "error"
    # a cursor is counted over all its FETCHes for the byte cap alone too
    fetch = judge("support", "FETCH 10 FROM c", policies=byte_capped)
    assert fetch.cursor == ("fetch", "c") and fetch.max_bytes_returned == 4096
    # without the key: no byte cap
    assert judge("analytics", "SELECT 1").max_bytes_returned is None


def test_no_byte_cap_in_monitor_mode(tmp_path: Path) -> None:
    directory = copy_policies(tmp_path)
    path = directory / "analytics.yaml"
    path.write_text(
        path.read_text()
        .replace("mode: enforce", "mode: monitor")
        .replace("  on_rows_returned_over: truncate\n", "  max_bytes_returned: 10\n")
    )
    decision = judge("analytics", "SELECT 1", policies=load_policy_set(directory))
    assert decision.max_bytes_returned is None


def test_the_byte_cap_must_be_positive(tmp_path: Path) -> None:
    directory = copy_policies(tmp_path)
    path = directory / "analytics.yaml"
    path.write_text(
        path.read_text().replace("  on_rows_returned_over: truncate\n", "  max_bytes_returned: 0\n")
    )
    with pytest.raises(PolicyError, match="max_bytes_returned"):
        load_policy_set(directory)


@pytest.mark.parametrize(
    ("sql", "limit"),
    [
        ("SELECT id FROM orders LIMIT NULL", "LIMIT LEAST(NULL, 1001)"),
        ("SELECT id FROM orders FETCH FIRST NULL ROWS ONLY", "LIMIT LEAST(NULL, 1001)"),
        ("SELECT id FROM orders LIMIT (SELECT 100000)", "LIMIT LEAST((SELECT 100000), 1001)"),
        ("SELECT id FROM orders OFFSET 5 LIMIT ALL", "LIMIT LEAST(NULL, 1001) OFFSET 5"),
        ("SELECT generate_series(1, 10000000)", "\nLIMIT 1001"),
        ("SELECT * FROM (SELECT id FROM orders LIMIT 100000) s", "\nLIMIT 1001"),
        ("DECLARE c CURSOR FOR SELECT id FROM orders LIMIT ALL", "LIMIT LEAST(NULL, 1001)"),
    ],
)
def test_no_clause_widens_the_cap(sql: str, limit: str) -> None:
    """LIMIT ALL / NULL, a subquery as count, a set-returning function, a subquery's own
    LIMIT: the root query ends with a LIMIT of at most N + 1 all the same."""
    decision = capped(sql)
    assert decision.sql.endswith(limit), decision.sql


def test_each_cursor_statement_of_a_message_is_named() -> None:
    """Two FETCHes in one message are counted against one cursor total, not per result."""
    decision = capped("FETCH 600 FROM c; FETCH 600 FROM c")
    assert decision.cursor is None
    assert decision.cursors == (("fetch", "c"), ("fetch", "c"))
    mixed = capped("DECLARE k CURSOR FOR SELECT id FROM orders; SELECT 1; FETCH ALL FROM k")
    assert mixed.cursors == (("declare", "k"), None, ("fetch", "k"))
    single = capped("FETCH 10 FROM c")
    assert (single.cursor, single.cursors) == (("fetch", "c"), (("fetch", "c"),))
    assert capped("SELECT 1; SELECT 2").cursors == ()
