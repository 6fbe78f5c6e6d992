"""Row filters: the predicate reaches every read and write of the table, context values
cannot change its structure, and uses it cannot be added to are denied (no database)."""

from __future__ import annotations

from pathlib import Path

import pglast
import pytest
from _policy_helpers import copy_policies, judge

from guardproxy.analysis import Op, analyze
from guardproxy.policy import Decision, PolicySet, SessionContext, load_policy_set
from guardproxy.policy.rowfilter import compile_row_filter, principals_literal

FILTERS = """row_filters:
  orders: "customer_id = ANY({principals}) AND deleted_at IS NULL"
  customers: "id = ANY({principals})"
"""


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    directory = copy_policies(tmp_path_factory.mktemp("rowfilter"))
    path = directory / "support.yaml"
    path.write_text(path.read_text() + FILTERS)
    return load_policy_set(directory)


def run(
    policies: PolicySet, sql: str, principals: tuple[str, ...] = ("1", "2"), catalog: bool = False
) -> Decision:
    ctx = SessionContext(agent_id="support-3", principals=principals)
    return judge("support", sql, ctx=ctx, policies=policies, catalog=catalog)


def rewritten(policies: PolicySet, sql: str, **kw: object) -> str:
    decision = run(policies, sql, **kw)  # type: ignore[arg-type]
    assert decision.action == "rewrite", decision
    assert decision.rule.startswith("row_filters.")
    assert not decision.cacheable
    pglast.parse_sql(decision.sql)  # what goes upstream parses
    return decision.sql


def test_read_is_wrapped_in_a_filtered_subquery(policies: PolicySet) -> None:
    sql = rewritten(policies, "SELECT o.id FROM orders o WHERE o.id > $1")
    assert sql == (
        'SELECT o.id FROM (SELECT * FROM orders WHERE customer_id = ANY(\'{"1","2"}\') '
        "AND deleted_at IS NULL) AS o WHERE o.id > $1"
    )


def test_outer_join_keeps_its_meaning(policies: PolicySet) -> None:
    sql = rewritten(
        policies, "SELECT c.name, o.id FROM customers c LEFT JOIN orders o ON o.customer_id = c.id"
    )
    assert "LEFT JOIN (SELECT * FROM orders WHERE customer_id = ANY(" in sql
    assert "FROM (SELECT * FROM customers WHERE id = ANY(" in sql


def test_filter_reaches_subqueries_ctes_and_lateral(policies: PolicySet) -> None:
    sql = rewritten(
        policies,
        "WITH mine AS (SELECT id FROM orders) "
        "SELECT * FROM mine WHERE EXISTS (SELECT 1 FROM customers WHERE customers.id = 1)",
    )
    assert sql.count("= ANY(") == 2
    # Every reference to the filtered relations is a filtered subquery now.
    (info,) = analyze(sql)
    assert {r.qualified for r in info.relations if r.op is Op.SELECT} == {
        "public.orders",
        "public.customers",
    }


def test_catalog_lists_the_readable_columns(policies: PolicySet) -> None:
    sql = rewritten(policies, "SELECT * FROM customers", catalog=True)
    assert sql.startswith("SELECT * FROM (SELECT id, name, email, created_at FROM customers WHERE")


def test_update_and_delete_get_the_predicate_qualified(policies: PolicySet) -> None:
    update = rewritten(policies, "UPDATE orders SET fulfillment_status = 'x' WHERE id = 1")
    assert update.endswith(
        'WHERE id = 1 AND (orders.customer_id = ANY(\'{"1","2"}\') AND orders.deleted_at IS NULL)'
    )
    delete = rewritten(policies, "DELETE FROM orders AS o WHERE o.id = 1")
    assert "(o.customer_id = ANY(" in delete and "o.deleted_at IS NULL" in delete


def test_cursor_positioned_update_is_left_alone(policies: PolicySet) -> None:
    decision = run(policies, "UPDATE orders SET fulfillment_status = 'x' WHERE CURRENT OF c")
    assert decision.action == "rewrite"
    assert decision.sql.endswith("WHERE CURRENT OF c")


def test_copy_to_client_is_filtered(policies: PolicySet) -> None:
    sql = rewritten(policies, "COPY orders (id, fulfillment_status) TO STDOUT")
    assert sql.startswith("COPY (SELECT id, fulfillment_status FROM (SELECT * FROM orders WHERE")


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO orders (customer_id) SELECT 1",
        "SELECT * FROM orders TABLESAMPLE SYSTEM (10)",
    ],
)
def test_uses_the_filter_cannot_reach_are_denied(policies: PolicySet, sql: str) -> None:
    decision = run(policies, sql)
    assert decision.action == "deny"


def test_insert_into_a_filtered_table_is_denied(tmp_path: Path) -> None:
    directory = copy_policies(tmp_path)
    path = directory / "support.yaml"
    path.write_text(
        path.read_text() + 'row_filters:\n  order_state_log: "changed_by = {agent_id}"\n'
    )
    policies = load_policy_set(directory)
    decision = judge(
        "support",
        "INSERT INTO order_state_log (order_id, new_status, changed_by) VALUES (1, 'x', 'support-3')",
        policies=policies,
    )
    assert (decision.action, decision.rule) == ("deny", "row_filters.order_state_log")
    assert "INSERT into order_state_log is not possible with its row filter" in decision.reason
    read = judge("support", "SELECT * FROM order_state_log", policies=policies)
    assert read.action == "rewrite" and "changed_by = 'support-3'" in read.sql


def test_context_values_cannot_inject(policies: PolicySet) -> None:
    evil = ("1') OR true; DROP TABLE orders; --", 'a"}, {"b', "back\\slash")
    sql = rewritten(policies, "SELECT id FROM orders", principals=evil)
    statements = pglast.parse_sql(sql)
    assert len(statements) == 1
    (info,) = analyze(sql)
    assert not info.functions and {r.op for r in info.relations} == {Op.SELECT}
    # the values arrive as one array literal of three elements
    literal = principals_literal(evil)
    assert "'" + literal.replace("'", "''") + "'" in sql


def test_no_principals_matches_nothing_and_missing_task_is_null(
    tmp_path: Path, policies: PolicySet
) -> None:
    assert "ANY('{}')" in rewritten(policies, "SELECT id FROM orders", principals=())
    directory = copy_policies(tmp_path)
    path = directory / "support.yaml"
    path.write_text(path.read_text() + 'row_filters:\n  orders: "tracking_number = {task}"\n')
    decision = judge("support", "SELECT id FROM orders", policies=load_policy_set(directory))
    assert "tracking_number = NULL" in decision.sql


def test_nul_in_context_is_refused(policies: PolicySet) -> None:
    decision = run(policies, "SELECT id FROM orders", principals=("a\x00b",))
    assert decision.action == "deny"


def test_unfiltered_tables_are_untouched(policies: PolicySet) -> None:
    decision = run(policies, "SELECT id FROM order_state_log")
    assert decision.action == "allow" and decision.cacheable


def test_monitor_mode_reports_but_does_not_rewrite(tmp_path: Path) -> None:
    directory = copy_policies(tmp_path)
    path = directory / "support.yaml"
    path.write_text(path.read_text().replace("mode: enforce", "mode: monitor") + FILTERS)
    decision = judge("support", "SELECT id FROM orders", policies=load_policy_set(directory))
    assert decision.action == "allow" and decision.monitored
    assert decision.sql == "SELECT id FROM orders"
    assert decision.rule == "row_filters.orders"


def test_compile_row_filter() -> None:
    compiled = compile_row_filter(
        "t", "owner = {agent_id} AND (region = {tag.region} OR tags @> '{{vip}}')"
    )
    assert compiled.template == "owner = $1 AND (region = $2 OR tags @> '{vip}')"
    assert compiled.placeholders == ("agent_id", "tag.region")
    subquery = compile_row_filter(
        "t", "team IN (SELECT t.id FROM teams t WHERE t.lead = {agent_id})"
    )
    assert subquery.placeholders == ("agent_id",)
    with pytest.raises(ValueError, match="expected a single condition"):
        compile_row_filter("t", "true ORDER BY 1")
    with pytest.raises(ValueError, match="expected a single condition"):
        compile_row_filter("t", "true UNION SELECT")


def test_principals_literal() -> None:
    assert principals_literal(()) == "{}"
    assert principals_literal(("7", 'a"b', "c\\d")) == '{"7","a\\"b","c\\\\d"}'
