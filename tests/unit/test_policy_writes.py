"""Write safety in the judge: soft deletes, captured deletes, append-only tables, row caps,
the guardproxy schema and what `Decision.write` tells the runtime (no database)."""

from __future__ import annotations

from pathlib import Path

import pglast
import pytest
from _policy_helpers import copy_policies, example_catalog, example_policies, judge, write
from pglast import ast

from guardproxy.analysis import Catalog
from guardproxy.policy import (
    Decision,
    Judge,
    PolicySet,
    SessionContext,
    WriteEffects,
    load_policy_set,
)

# An agent type that exercises what the examples do not: soft delete without caps,
# captured hard deletes, every operation on a soft-delete table, append-only with insert.
OPS = """\
agents: ["ops-*"]
upstream_role: guard_ops
statements: [read, write]
tables:
  orders:
    ops: [select, insert, update, delete, truncate]
    soft_delete: true
  customers:
    ops: [select, delete]
    capture_deleted_rows: true
  order_state_log:
    ops: [select, insert]
    append_only: true
  payments:
    ops: [select, update]
"""

SUPPORT_CTX = SessionContext(
    agent_id="support-3", task="T-17", step="refund-2", tags={"reason": "customer asked"}
)
OPS_CTX = SessionContext(agent_id="ops-1", task="T-9")

LOGGED = (
    "guardproxy_logged AS (INSERT INTO guardproxy.deleted_rows (agent_id, task, step, reason, "
    "table_name, primary_key, row_image) SELECT {agent}, {task}, {step}, {reason}, "
    "'public.{table}', {key}, to_jsonb(guardproxy_deleted) FROM guardproxy_deleted)"
)


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    directory = copy_policies(tmp_path_factory.mktemp("writes"))
    write(directory, "ops.yaml", OPS)
    return load_policy_set(directory)


def ops(policies: PolicySet, sql: str, ctx: SessionContext = OPS_CTX, **kw: object) -> Decision:
    return judge("ops-1", sql, ctx=ctx, policies=policies, **kw)  # type: ignore[arg-type]


def rewritten(decision: Decision, rule: str) -> str:
    assert decision.action == "rewrite", decision
    assert decision.rule == rule, decision
    assert not decision.cacheable  # context values or literals are in the text
    pglast.parse_sql(decision.sql)
    return decision.sql


def denied(decision: Decision, rule: str, *words: str) -> str:
    assert decision.action == "deny", decision
    assert decision.rule == rule, decision
    assert decision.sql == "" and decision.sqlstate
    assert f"(policy {decision.reason.split()[0]}, {rule})" in decision.reason
    for word in words:
        assert word in decision.reason or word in decision.hint, (word, decision)
    return decision.reason


# -- soft delete: the DELETE --------------------------------------------------------------


def test_delete_becomes_an_update_that_records_every_row() -> None:
    decision = judge("support", "DELETE FROM orders WHERE id = 6", ctx=SUPPORT_CTX)
    sql = rewritten(decision, "tables.orders.soft_delete")
    assert sql == (
        "WITH guardproxy_deleted AS (UPDATE orders SET deleted_at = now(), "
        "deleted_by = 'support-3', delete_reason = 'customer asked' "
        "WHERE id = 6 AND orders.deleted_at IS NULL RETURNING orders.*), "
        + LOGGED.format(
            agent="'support-3'",
            task="'T-17'",
            step="'refund-2'",
            reason="'customer asked'",
            table="orders",
            key="jsonb_build_object('id', guardproxy_deleted.id)",
        )
        + " SELECT FROM guardproxy_deleted"
    )
    assert decision.write == WriteEffects(
        operation="delete",
        tables=("public.orders",),
        soft_delete=True,
        soft_delete_returning=False,
        max_rows_affected=100,
        cap_rule="tables.orders.max_rows_affected",
    )
    assert decision.writes == (decision.write,)
    assert "soft-deletes" in decision.reason and "(policy support, tables.orders.soft_delete)" in (
        decision.reason
    )


def test_delete_using_returning_keeps_its_meaning() -> None:
    sql = rewritten(
        judge(
            "support",
            "DELETE FROM orders o USING customers c WHERE c.id = o.customer_id "
            "AND c.name = $1 RETURNING o.id, o.fulfillment_status AS status",
            ctx=SUPPORT_CTX,
        ),
        "tables.orders.soft_delete",
    )
    (stmt,) = pglast.parse_sql(sql)
    select = stmt.stmt
    assert isinstance(select, ast.SelectStmt) and select.withClause is not None
    deleted, logged = select.withClause.ctes
    update = deleted.ctequery
    assert isinstance(update, ast.UpdateStmt)
    assert update.relation.relname == "orders" and update.relation.alias.aliasname == "o"
    assert [t.name for t in update.targetList] == ["deleted_at", "deleted_by", "delete_reason"]
    # USING became FROM; the original condition is kept whole, AND the live-row test
    assert "FROM customers AS c WHERE (c.id = o.customer_id AND c.name = $1) AND " in sql
    assert "o.deleted_at IS NULL RETURNING o.*" in sql
    assert isinstance(logged.ctequery, ast.InsertStmt)
    assert logged.ctequery.relation.schemaname == "guardproxy"
    # the client's RETURNING list, over the deleted rows under the same name
    assert sql.endswith("SELECT o.id, o.fulfillment_status AS status FROM guardproxy_deleted AS o")
    decision = judge("support", "DELETE FROM orders WHERE id = 1 RETURNING *", ctx=SUPPORT_CTX)
    assert decision.write is not None and decision.write.soft_delete_returning
    assert decision.sql.endswith("SELECT * FROM guardproxy_deleted AS orders")


def test_context_values_are_constants_whatever_they_hold() -> None:
    evil = "x'); DROP TABLE orders; --"
    ctx = SessionContext(agent_id="support-3", tags={"reason": evil})
    decision = judge("support", "DELETE FROM orders WHERE id = 6", ctx=ctx)
    sql = rewritten(decision, "tables.orders.soft_delete")
    (stmt,) = pglast.parse_sql(sql)  # still one statement
    update = stmt.stmt.withClause.ctes[0].ctequery
    reason = update.targetList[2].val
    assert isinstance(reason, ast.A_Const) and reason.val.sval == evil
    # no task, no step: NULL
    insert = stmt.stmt.withClause.ctes[1].ctequery
    values = [t.val for t in insert.selectStmt.targetList]
    assert [v.isnull for v in values[:4]] == [False, True, True, False]
    nul = SessionContext(agent_id="support-3", tags={"reason": "a\x00b"})
    assert judge("support", "DELETE FROM orders WHERE id = 6", ctx=nul).action == "deny"


def test_primary_key_comes_from_the_catalog_or_all_columns() -> None:
    composite = Catalog.from_rows(
        [("public", "orders", "shop", "2"), ("public", "orders", "no", "1")]
        + [("public", "orders", c, None) for c in ("deleted_at", "deleted_by", "delete_reason")]
    )
    policies = example_policies()
    support = policies.get("support")
    assert support is not None
    sql = (
        Judge(policies, composite)
        .judge(support, "DELETE FROM orders WHERE no = 1", SUPPORT_CTX)
        .sql
    )
    assert "jsonb_build_object('no', guardproxy_deleted.no, 'shop', guardproxy_deleted.shop)" in sql
    no_key = Catalog.from_rows(
        [("public", "orders", c) for c in ("id", "deleted_at", "deleted_by", "delete_reason")]
    )
    sql = Judge(policies, no_key).judge(support, "DELETE FROM orders WHERE id = 1", SUPPORT_CTX).sql
    assert "jsonb_build_object('id', guardproxy_deleted.id, 'deleted_at'," in sql
    unknown = judge("support", "DELETE FROM orders WHERE id = 1", catalog=False, ctx=SUPPORT_CTX)
    assert "'public.orders', to_jsonb(guardproxy_deleted), to_jsonb(guardproxy_deleted)" in (
        unknown.sql
    )


def test_a_table_without_the_soft_delete_columns_is_refused() -> None:
    catalog = Catalog.from_rows([("public", "orders", "id", 1), ("public", "orders", "x", None)])
    policies = example_policies()
    support = policies.get("support")
    assert support is not None
    decision = Judge(policies, catalog).judge(support, "SELECT id FROM orders", SUPPORT_CTX)
    denied(decision, "tables.orders.soft_delete", "no column deleted_at, deleted_by, delete_reason")
    assert "guardproxy soft-delete sql orders" in decision.hint
    assert decision.sqlstate == "0A000"


def test_delete_in_a_writable_cte_keeps_its_name(policies: PolicySet) -> None:
    decision = ops(
        policies,
        "WITH d AS (DELETE FROM orders WHERE id = 6 RETURNING id) SELECT * FROM d",
    )
    sql = rewritten(decision, "tables.orders.soft_delete")
    (stmt,) = pglast.parse_sql(sql)
    names = [c.ctename for c in stmt.stmt.withClause.ctes]
    assert names == ["guardproxy_deleted", "guardproxy_logged", "d"]
    assert "d AS (SELECT id FROM guardproxy_deleted AS orders) SELECT * FROM d" in sql
    # the statement's answer is the agent's SELECT: nothing to retag
    assert decision.write == WriteEffects(operation="delete", tables=("public.orders",))
    clash = ops(
        policies,
        "WITH guardproxy_deleted AS (SELECT 1) DELETE FROM orders WHERE id = 6",
    )
    assert "guardproxy_deleted_2 AS (UPDATE orders" in rewritten(clash, "tables.orders.soft_delete")


def test_prepare_explain_and_cursor_deletes(policies: PolicySet) -> None:
    prepared = ops(policies, "PREPARE wipe (bigint) AS DELETE FROM orders WHERE id = $1")
    sql = rewritten(prepared, "tables.orders.soft_delete")
    assert sql.startswith("PREPARE wipe(bigint) AS WITH guardproxy_deleted AS (UPDATE orders")
    assert prepared.write is None  # PREPARE writes nothing
    # EXECUTE runs the statement prepared (already rewritten upstream): retag its answer
    ctx = OPS_CTX.with_prepared("wipe", prepared.prepared["wipe"] or "")
    execute = ops(policies, "EXECUTE wipe(6)", ctx=ctx)
    assert execute.action == "allow" and execute.sql == "EXECUTE wipe(6)"
    assert execute.write is not None and execute.write.soft_delete
    analyzed = ops(policies, "EXPLAIN ANALYZE EXECUTE wipe(6)", ctx=ctx)
    assert analyzed.write is not None and not analyzed.write.soft_delete
    plain = ops(policies, "EXPLAIN DELETE FROM orders WHERE id = 6")
    assert rewritten(plain, "tables.orders.soft_delete").startswith(
        "EXPLAIN WITH guardproxy_deleted"
    )
    assert plain.write is None  # EXPLAIN does not run it
    current = ops(policies, "DELETE FROM orders WHERE CURRENT OF c")
    assert "WHERE CURRENT OF c RETURNING orders.*" in rewritten(
        current, "tables.orders.soft_delete"
    )


@pytest.mark.parametrize(
    ("sql", "problem"),
    [
        (
            "DELETE FROM orders o USING customers c WHERE c.id = o.customer_id RETURNING *",
            "RETURNING * of a DELETE ... USING includes the USING tables",
        ),
        (
            "DELETE FROM orders o USING customers c WHERE c.id = o.customer_id RETURNING c.name",
            "c.name is not a column of o",
        ),
        (
            "DELETE FROM orders o USING customers c WHERE c.id = o.customer_id RETURNING name",
            "name is not a column of o",
        ),
        ("DELETE FROM orders WHERE id = 1 RETURNING old.id", "old.id is not a column of orders"),
    ],
)
def test_returning_only_the_deleted_tables_columns(sql: str, problem: str) -> None:
    decision = judge("support", sql, ctx=SUPPORT_CTX)
    denied(decision, "tables.orders.soft_delete", problem)


def test_returning_a_name_of_no_table_is_unresolved() -> None:
    decision = judge("support", "DELETE FROM orders WHERE id = 1 RETURNING name", ctx=SUPPORT_CTX)
    denied(decision, "unresolved", "name (no table or FROM item in scope has a column")


# -- soft delete: everything else ---------------------------------------------------------


WRAPPED = (
    "(SELECT id, customer_id, fulfillment_status, requires_signature, shipped_at, "
    "tracking_number, last_modified_at, deleted_at, deleted_by, delete_reason "
    "FROM orders WHERE deleted_at IS NULL)"
)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT id FROM orders", "SELECT id FROM orders WHERE orders.deleted_at IS NULL"),
        (
            # a whole-row reference keeps the table's row type: filtered where it is
            "SELECT o FROM orders o WHERE id = 3",
            "SELECT o FROM orders AS o WHERE id = 3 AND o.deleted_at IS NULL",
        ),
        (
            "SELECT c.name FROM customers c JOIN orders o ON o.customer_id = c.id",
            "SELECT c.name FROM customers AS c INNER JOIN orders AS o "
            "ON o.customer_id = c.id AND o.deleted_at IS NULL",
        ),
        (
            "SELECT c.name FROM customers c LEFT JOIN orders o ON o.customer_id = c.id",
            "SELECT c.name FROM customers AS c LEFT JOIN orders AS o "
            "ON o.customer_id = c.id AND o.deleted_at IS NULL",
        ),
        (
            # the preserved side of an outer join: wrapped, or its deleted rows would stay
            "SELECT c.name FROM orders o LEFT JOIN customers c ON c.id = o.customer_id",
            f"SELECT c.name FROM {WRAPPED} AS o LEFT JOIN customers AS c ON c.id = o.customer_id",
        ),
        (
            "SELECT 1 FROM orders o FULL JOIN customers c ON c.id = o.customer_id",
            f"SELECT 1 FROM {WRAPPED} AS o FULL JOIN customers AS c ON c.id = o.customer_id",
        ),
        (
            "SELECT 1 FROM orders o JOIN customers c USING (id)",
            f"SELECT 1 FROM {WRAPPED} AS o INNER JOIN customers AS c USING (id)",
        ),
        (
            "SELECT x FROM orders AS o(x)",
            f"SELECT x FROM {WRAPPED} AS o (x)",
        ),
        (
            "SELECT name FROM customers c WHERE EXISTS "
            "(SELECT 1 FROM orders o WHERE o.customer_id = c.id)",
            "SELECT name FROM customers AS c WHERE EXISTS "
            "(SELECT 1 FROM orders AS o WHERE o.customer_id = c.id AND o.deleted_at IS NULL)",
        ),
        (
            "SELECT (SELECT count(*) FROM orders) AS n",
            "SELECT (SELECT count(*) FROM orders WHERE orders.deleted_at IS NULL) AS n",
        ),
        (
            "WITH mine AS (SELECT id FROM orders) SELECT id FROM mine",
            "WITH mine AS (SELECT id FROM orders WHERE orders.deleted_at IS NULL) "
            "SELECT id FROM mine",
        ),
        (
            "SELECT * FROM customers c, LATERAL (SELECT id FROM orders WHERE customer_id = c.id) o",
            "SELECT * FROM customers AS c, LATERAL (SELECT id FROM orders "
            "WHERE customer_id = c.id AND orders.deleted_at IS NULL) AS o",
        ),
        (
            "UPDATE payments SET amount = 1 WHERE id = 1 RETURNING (SELECT count(*) FROM orders)",
            "UPDATE payments SET amount = 1 WHERE id = 1 "
            "RETURNING (SELECT count(*) FROM orders WHERE orders.deleted_at IS NULL)",
        ),
        (
            "UPDATE payments p SET amount = 1 FROM orders o WHERE o.id = p.order_id",
            "UPDATE payments AS p SET amount = 1 FROM orders AS o "
            "WHERE o.id = p.order_id AND o.deleted_at IS NULL",
        ),
        (
            "DECLARE c CURSOR FOR SELECT id FROM orders",
            "DECLARE c CURSOR FOR SELECT id FROM orders WHERE orders.deleted_at IS NULL",
        ),
        (
            "COPY orders (id) TO STDOUT",
            f"COPY (SELECT id FROM {WRAPPED} AS orders) TO STDOUT",
        ),
        (
            "MERGE INTO payments p USING orders o ON o.id = p.order_id "
            "WHEN MATCHED THEN UPDATE SET amount = 0",
            f"MERGE INTO payments AS p USING {WRAPPED} AS o ON o.id = p.order_id "
            "WHEN MATCHED THEN UPDATE SET amount = 0",
        ),
    ],
)
def test_every_read_sees_only_live_rows(policies: PolicySet, sql: str, expected: str) -> None:
    decision = ops(policies, sql)
    assert rewritten(decision, "tables.orders.soft_delete") == expected


def test_a_child_row_read_from_orders_sees_live_rows_and_is_checked(policies: PolicySet) -> None:
    decision = ops(
        policies,
        "INSERT INTO order_state_log (order_id, new_status, changed_by) SELECT id, 'x', 'y' FROM orders",
    )
    assert rewritten(decision, "tables.order_state_log.soft_deleted_parents") == (
        "INSERT INTO order_state_log (order_id, new_status, changed_by) "
        "SELECT guardproxy.live_parent(id, 'public.orders', 'id', 'deleted_at', 'ops', "
        "'order_state_log.order_id', 'tables.order_state_log.soft_deleted_parents'), 'x', 'y' "
        "FROM orders WHERE orders.deleted_at IS NULL"
    )


def test_update_cannot_touch_deleted_rows_nor_the_marks(policies: PolicySet) -> None:
    decision = ops(policies, "UPDATE orders o SET tracking_number = $1 WHERE o.id = $2")
    assert rewritten(decision, "tables.orders.soft_delete") == (
        "UPDATE orders AS o SET tracking_number = $1 WHERE o.id = $2 AND o.deleted_at IS NULL"
    )
    assert decision.write == WriteEffects(operation="update", tables=("public.orders",))
    for sql in (
        "UPDATE orders SET deleted_at = NULL WHERE id = 1",
        "UPDATE orders SET (tracking_number, deleted_by) = ('x', 'me') WHERE id = 1",
    ):
        denied(ops(policies, sql), "tables.orders.soft_delete", "only guardproxy writes")
    # support's own column list says it first
    denied(
        judge("support", "UPDATE orders SET deleted_at = NULL WHERE id = 1"),
        "tables.orders.update_columns",
    )


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        ("TRUNCATE orders", ("TRUNCATE orders", "DELETE FROM orders WHERE")),
        (
            "MERGE INTO orders o USING (SELECT 1 AS id) s ON o.id = s.id "
            "WHEN MATCHED THEN UPDATE SET tracking_number = 'x'",
            ("MERGE into orders",),
        ),
        ("INSERT INTO orders VALUES (99, 1)", ("without a column list",)),
        (
            "INSERT INTO orders (id, customer_id, deleted_at) VALUES (99, 1, now())",
            ("orders.deleted_at",),
        ),
        (
            "INSERT INTO orders (id, customer_id) VALUES (1, 1) "
            "ON CONFLICT (id) DO UPDATE SET deleted_at = NULL",
            ("orders.deleted_at",),
        ),
        ("COPY orders FROM STDIN", ("without a column list",)),
        ("COPY orders (id, deleted_by) FROM STDIN", ("orders.deleted_by",)),
    ],
)
def test_no_way_around_the_soft_delete(policies: PolicySet, sql: str, words: tuple[str]) -> None:
    denied(ops(policies, sql), "tables.orders.soft_delete", *words)


def test_support_may_not_truncate_orders_at_all() -> None:
    denied(judge("support", "TRUNCATE orders"), "tables.orders.ops")


def test_upsert_refuses_to_resurrect_a_soft_deleted_row(policies: PolicySet) -> None:
    decision = ops(
        policies,
        "INSERT INTO orders AS o (id, customer_id) VALUES (6, 2) "
        "ON CONFLICT (id) DO UPDATE SET fulfillment_status = excluded.fulfillment_status "
        "WHERE o.id > 0",
    )
    assert rewritten(decision, "tables.orders.soft_delete").endswith(
        "DO UPDATE SET fulfillment_status = excluded.fulfillment_status "
        "WHERE o.id > 0 AND guardproxy.refuse_soft_deleted(o.deleted_at, 'public.orders')"
    )
    plain = ops(
        policies, "INSERT INTO orders (id, customer_id) VALUES (6, 2) ON CONFLICT DO NOTHING"
    )
    assert (plain.action, plain.sql) == (
        "allow",
        "INSERT INTO orders (id, customer_id) VALUES (6, 2) ON CONFLICT DO NOTHING",
    )
    assert ops(policies, "COPY orders (id, customer_id) FROM STDIN").action == "allow"


# -- captured hard deletes ------------------------------------------------------------------


def test_captured_delete_keeps_the_row_images(policies: PolicySet) -> None:
    decision = ops(policies, "DELETE FROM customers WHERE id = 5 RETURNING name")
    sql = rewritten(decision, "tables.customers.capture_deleted_rows")
    assert sql == (
        "WITH guardproxy_deleted AS (DELETE FROM customers WHERE id = 5 RETURNING customers.*), "
        + LOGGED.format(
            agent="'ops-1'",
            task="'T-9'",
            step="NULL",
            reason="NULL",
            table="customers",
            key="jsonb_build_object('id', guardproxy_deleted.id)",
        )
        + " SELECT name FROM guardproxy_deleted AS customers"
    )
    assert decision.write == WriteEffects(
        operation="delete",
        tables=("public.customers",),
        soft_delete=False,
        soft_delete_returning=True,
        captured=True,
    )
    # reads of customers are not filtered: the rows really are gone
    assert ops(policies, "SELECT id FROM customers").action == "allow"


# -- append-only ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "verb"),
    [
        ("UPDATE order_state_log SET reason = 'x' WHERE id = 1", "update"),
        ("DELETE FROM order_state_log WHERE id = 1", "delete from"),
        ("TRUNCATE order_state_log", "truncate"),
        (
            "INSERT INTO order_state_log (order_id, new_status, changed_by, idempotency_key) "
            "VALUES (1, 'a', 'b', 'seed-1') ON CONFLICT (idempotency_key) DO UPDATE SET reason = 'x'",
            "update",
        ),
        (
            "MERGE INTO order_state_log l USING (SELECT 1 AS id) s ON l.id = s.id "
            "WHEN NOT MATCHED THEN INSERT (order_id, new_status, changed_by) VALUES (1, 'a', 'b')",
            "MERGE into",
        ),
    ],
)
def test_append_only_tables_take_inserts_only(policies: PolicySet, sql: str, verb: str) -> None:
    for decision in (judge("support", sql), ops(policies, sql)):
        reason = denied(decision, "tables.order_state_log.append_only", "insert a new row")
        assert f"may not {verb} order_state_log: it is append-only" in reason


def test_append_only_allows_inserts() -> None:
    checked = (
        "guardproxy.live_parent(1, 'public.orders', 'id', 'deleted_at', 'support', "
        "'order_state_log.order_id', 'tables.order_state_log.soft_deleted_parents')"
    )
    for sql in (
        "INSERT INTO order_state_log (order_id, new_status, changed_by) VALUES (1, 'a', 'b')",
        "INSERT INTO order_state_log (order_id, new_status, changed_by, idempotency_key) "
        "VALUES (1, 'a', 'b', 'k') ON CONFLICT (idempotency_key) DO NOTHING",
    ):
        decision = judge("support", sql)
        # the order it refers to is checked (guardproxy/policy/parents.py)
        assert rewritten(decision, "tables.order_state_log.soft_deleted_parents") == sql.replace(
            "VALUES (1,", f"VALUES ({checked},"
        )
        assert decision.write == WriteEffects(
            operation="insert", tables=("public.order_state_log",)
        )


# -- row caps -----------------------------------------------------------------------------


def test_caps_per_table_and_policy_wide() -> None:
    update = judge("fulfillment", "UPDATE orders SET tracking_number = $1 WHERE id = $2")
    assert update.action == "allow"
    assert update.write == WriteEffects(
        operation="update",
        tables=("public.orders",),
        max_rows_affected=50,
        cap_rule="limits.max_rows_affected",
    )
    assert update.cacheable  # nothing in it depends on the context
    insert = judge(
        "support",
        "INSERT INTO order_state_log (order_id, new_status, changed_by) VALUES (1, 'a', 'b')",
    )
    assert insert.write is not None and insert.write.max_rows_affected is None
    read = judge("fulfillment", "SELECT id FROM orders WHERE id = 1")
    assert read.write is None and read.writes == ()


def test_smallest_cap_of_the_tables_written(tmp_path: Path) -> None:
    directory = copy_policies(tmp_path)
    path = directory / "support.yaml"
    path.write_text(
        path.read_text().replace(
            "  max_client_sessions: 100\n", "  max_client_sessions: 100\n  max_rows_affected: 20\n"
        )
    )
    policies = load_policy_set(directory)
    sql = (
        "INSERT INTO order_state_log (order_id, new_status, changed_by) VALUES (1, 'a', 'b'); "
        "UPDATE orders SET fulfillment_status = 'x' WHERE id = 1"
    )
    decision = judge("support", sql, policies=policies, ctx=SUPPORT_CTX)
    first, second = decision.writes
    assert first == WriteEffects(
        operation="insert",
        tables=("public.order_state_log",),
        max_rows_affected=20,
        cap_rule="limits.max_rows_affected",
    )
    assert second is not None and (second.max_rows_affected, second.cap_rule) == (
        100,
        "tables.orders.max_rows_affected",
    )
    assert decision.write == WriteEffects(
        operation="insert",
        tables=("public.order_state_log", "public.orders"),
        max_rows_affected=20,
        cap_rule="limits.max_rows_affected",
    )


def test_each_statement_of_a_message_has_its_effects() -> None:
    decision = judge("support", "BEGIN; DELETE FROM orders WHERE id = 6; COMMIT", ctx=SUPPORT_CTX)
    assert decision.action == "rewrite"
    assert [w is not None and w.soft_delete for w in decision.writes] == [False, True, False]
    assert decision.sql.startswith("BEGIN; WITH guardproxy_deleted AS (UPDATE orders")
    assert decision.sql.endswith("SELECT FROM guardproxy_deleted; COMMIT")


@pytest.mark.parametrize(
    ("agent", "sql", "rule", "why"),
    [
        (
            "support",
            "WITH moved AS (UPDATE orders SET fulfillment_status = 'returned' WHERE id = 1 "
            "RETURNING id) INSERT INTO order_state_log (order_id, new_status, changed_by) "
            "SELECT id, 'returned', 'support-3' FROM moved",
            "tables.orders.max_rows_affected",
            "a write in a WITH query is not counted",
        ),
        (
            "support",
            "WITH d AS (DELETE FROM orders WHERE id = 6 RETURNING id) SELECT * FROM d",
            "tables.orders.max_rows_affected",
            "a write in a WITH query is not counted",
        ),
        (
            "support",
            "EXPLAIN ANALYZE UPDATE orders SET fulfillment_status = 'x' WHERE id = 1",
            "tables.orders.max_rows_affected",
            "EXPLAIN ANALYZE runs the write",
        ),
        (
            "support",
            "WITH l AS (INSERT INTO order_state_log (order_id, new_status, changed_by) "
            "VALUES (1, 'a', 'b') RETURNING id) SELECT id FROM l",
            "budgets.max_writes_per_task",
            "max_writes_per_task = 500 cannot be enforced",
        ),
        (
            "fulfillment",
            "WITH u AS (UPDATE orders SET tracking_number = 'x' WHERE id = 1 RETURNING id) "
            "SELECT id FROM u",
            "limits.max_rows_affected",
            "max_rows_affected = 50 cannot be enforced",
        ),
    ],
)
def test_writes_the_row_count_cannot_see_are_refused_under_a_cap(
    agent: str, sql: str, rule: str, why: str
) -> None:
    denied(judge(agent, sql, ctx=SUPPORT_CTX), rule, why, "as a statement of its own")


def test_uncapped_writes_may_hide_in_ctes(policies: PolicySet) -> None:
    decision = ops(
        policies,
        "WITH u AS (UPDATE payments SET amount = 1 WHERE id = 1 RETURNING id) SELECT id FROM u",
    )
    assert decision.action == "allow"
    assert decision.write == WriteEffects(operation="update", tables=("public.payments",))
    assert ops(policies, "EXPLAIN UPDATE payments SET amount = 1 WHERE id = 1").write is None


def test_prepared_writes_are_capped_at_execute() -> None:
    prepared = judge(
        "fulfillment", "PREPARE ship AS UPDATE orders SET tracking_number = $1 WHERE id = $2"
    )
    ctx = SessionContext(agent_id="fulfillment-2").with_prepared(
        "ship", prepared.prepared["ship"] or ""
    )
    execute = judge("fulfillment", "EXECUTE ship('T', 3)", ctx=ctx)
    assert execute.write is not None and execute.write.max_rows_affected == 50
    explained = judge("fulfillment", "EXPLAIN ANALYZE EXECUTE ship('T', 3)", ctx=ctx)
    denied(
        explained, "limits.max_rows_affected", "EXPLAIN ANALYZE", "its rows would not be counted"
    )


# -- guardproxy's own schema ----------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM guardproxy.deleted_rows",
        "DELETE FROM guardproxy.deleted_rows WHERE id = 1",
        "SELECT guardproxy.refuse_soft_deleted(now(), 'x')",
        "UPDATE guardproxy.idempotency_keys SET response = NULL WHERE key = 'k'",
        "INSERT INTO guardproxy.task_budgets (task, agent_type) VALUES ('t', 'support')",
    ],
)
def test_agents_never_touch_the_guardproxy_schema(sql: str) -> None:
    for agent in ("support", "fulfillment", "analytics"):
        decision = judge(agent, sql)
        if decision.rule == "statements":
            continue  # analytics may not write at all; said first
        denied(decision, "guardproxy_schema", "guardproxy")


def test_guardproxy_schema_on_the_search_path_is_still_refused() -> None:
    catalog = Catalog.from_rows(
        [("guardproxy", "deleted_rows", "id", 1)], search_path=("guardproxy", "public")
    )
    policies = example_policies()
    support = policies.get("support")
    assert support is not None
    decision = Judge(policies, catalog).judge(
        support, "SELECT * FROM deleted_rows", SessionContext("support-1")
    )
    denied(decision, "guardproxy_schema")


# -- monitor mode, shape, cache -----------------------------------------------------------


def test_monitor_mode_rewrites_nothing_and_caps_nothing(tmp_path: Path) -> None:
    directory = copy_policies(tmp_path)
    path = directory / "support.yaml"
    path.write_text(path.read_text().replace("mode: enforce", "mode: monitor"))
    policies = load_policy_set(directory)
    sql = "DELETE FROM orders WHERE id = 6"
    decision = judge("support", sql, policies=policies, ctx=SUPPORT_CTX)
    assert (decision.action, decision.sql, decision.monitored) == ("allow", sql, True)
    assert decision.rule == "tables.orders.soft_delete"
    assert decision.write == WriteEffects(operation="delete", tables=("public.orders",))


def test_shape_is_the_cache_key_and_write_effects_survive_a_hit() -> None:
    policies = example_policies()
    engine = Judge(policies, example_catalog())
    fulfillment = policies.get("fulfillment")
    assert fulfillment is not None
    ctx = SessionContext(agent_id="fulfillment-2")
    first = engine.judge(fulfillment, "UPDATE orders SET tracking_number = 'A' WHERE id = 1", ctx)
    second = engine.judge(fulfillment, "UPDATE orders SET tracking_number = 'B' WHERE id = 2", ctx)
    assert engine.cache_info()["hits"] == 1
    assert first.shape == second.shape == "UPDATE orders SET tracking_number = $1 WHERE id = $2"
    assert second.sql == "UPDATE orders SET tracking_number = 'B' WHERE id = 2"
    assert second.write == first.write and second.write is not None
    assert judge("support", "selec 1").shape == ""


def test_soft_deletes_are_never_served_from_the_cache() -> None:
    policies = example_policies()
    engine = Judge(policies, example_catalog())
    support = policies.get("support")
    assert support is not None
    one = engine.judge(support, "DELETE FROM orders WHERE id = 1", SUPPORT_CTX)
    other = SessionContext(agent_id="support-9", tags={"reason": "duplicate"})
    two = engine.judge(support, "DELETE FROM orders WHERE id = 2", other)
    assert engine.cache_info()["hits"] == 0
    assert "'support-3'" in one.sql and "'support-9'" in two.sql and "'duplicate'" in two.sql


def test_copy_from_is_counted_like_a_statement() -> None:
    decision = judge(
        "support", "COPY order_state_log (order_id, new_status, changed_by) FROM STDIN"
    )
    assert decision.action == "rewrite"  # its rows' orders are checked (WHERE)
    assert decision.write == WriteEffects(operation="copy", tables=("public.order_state_log",))
    capped = judge("fulfillment", "UPDATE orders SET tracking_number = 'x' WHERE id = 1")
    assert capped.write is not None and capped.write.max_rows_affected == 50


@pytest.mark.parametrize(
    ("agent", "sql", "rule"),
    [
        (
            "fulfillment",
            "MERGE INTO orders o USING (SELECT 1) s ON true "
            "WHEN MATCHED THEN UPDATE SET tracking_number = 'X'",
            "require_where",
        ),
        (
            "support",
            "MERGE INTO orders o USING (SELECT 1) s ON true "
            "WHEN MATCHED THEN UPDATE SET fulfillment_status = 'cancelled'",
            "require_where",
        ),
        (
            "support",
            "MERGE INTO orders o USING (SELECT 1 AS id) s ON o.id = s.id "
            "WHEN MATCHED THEN UPDATE SET fulfillment_status = 'cancelled'",
            "tables.orders.soft_delete",
        ),
    ],
)
def test_merge_on_true_changes_every_row(agent: str, sql: str, rule: str) -> None:
    denied(judge(agent, sql), rule)


def test_merge_with_a_condition_is_capped_at_its_count() -> None:
    decision = judge(
        "fulfillment",
        "MERGE INTO orders o USING (SELECT 1 AS id) s ON true "
        "WHEN MATCHED AND o.id = s.id THEN UPDATE SET tracking_number = 'X'",
    )
    assert decision.action == "allow"
    assert decision.write == WriteEffects(
        operation="merge",
        tables=("public.orders",),
        max_rows_affected=50,
        cap_rule="limits.max_rows_affected",
    )
