"""Denial hints never suggest what the agent's policy forbids (issues 13 and 15).

A hint is what the agent tries next. Every denial below is judged for several agent
types, and every statement form its hint proposes (``INSERT INTO t``, ``UPDATE t``,
``DELETE FROM t``, ``ON CONFLICT ... DO UPDATE``, ``MERGE``, ``TRUNCATE``, a ``WHERE``
column) is checked against that agent's policy: the table must allow the operation,
the statement class must be allowed, and append-only / soft-delete rules must not
refuse it in turn. No database.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _policy_helpers import example_catalog, example_policies, judge, write

from guardproxy.analysis.model import Op, StatementClass
from guardproxy.policy import AgentPolicy, Decision, PolicySet, load_policy_set

_FORMS = [
    (re.compile(r"\bINSERT INTO (\w+)"), Op.INSERT),
    (re.compile(r"\bUPDATE (\w+) SET"), Op.UPDATE),
    (re.compile(r"\bDELETE FROM (\w+)"), Op.DELETE),
    (re.compile(r"\bTRUNCATE (\w+)"), Op.TRUNCATE),
]


def check_hint(policy: AgentPolicy, decision: Decision) -> None:
    """Every form the hint proposes is one the policy allows."""
    hint = decision.hint
    assert hint, decision
    for pattern, op in _FORMS:
        for table in pattern.findall(hint):
            rule = next((t for t in policy.tables if t.key == table), None)
            assert rule is not None and op in rule.ops, (op, table, hint)
            if op in (Op.UPDATE, Op.DELETE, Op.TRUNCATE):
                assert not rule.append_only, (op, table, hint)
            assert StatementClass.WRITE in policy.statements, hint
    if "DO UPDATE" in hint:
        table = re.search(r"INSERT INTO (\w+) \.\.\. ON CONFLICT \(\.\.\.\) DO UPDATE", hint)
        assert table is not None, hint
        rule = next(t for t in policy.tables if t.key == table.group(1))
        assert Op.UPDATE in rule.ops and not rule.append_only, hint
    if "ON CONFLICT" in hint:
        assert any(Op.INSERT in t.ops for t in policy.tables), hint
    if re.search(r"\bMERGE\b", hint):
        assert any(
            t.ops & {Op.INSERT, Op.UPDATE, Op.DELETE} and not (t.append_only or t.soft_delete)
            for t in policy.tables
        ), hint
    if re.search(r"\bTRUNCATE\b", hint):
        assert any(Op.TRUNCATE in t.ops for t in policy.tables), hint
    for clause in ("INSERT", "UPDATE", "DELETE"):
        if re.search(rf"\b{clause}\b", hint):
            assert StatementClass.WRITE in policy.statements, hint
    example = re.search(r"WHERE (\w+) = \.\.\.", hint)
    if example is not None and "may use" not in hint:
        column = example.group(1)
        readable = {
            c
            for t in policy.tables
            for c in t.readable(example_catalog().columns("public", t.name) or ())
        }
        assert column in readable, hint


DENIED = [
    "MERGE INTO orders o USING customers c ON o.customer_id = c.id WHEN MATCHED THEN DELETE",
    "MERGE INTO order_state_log l USING orders o ON l.order_id = o.id "
    "WHEN NOT MATCHED THEN INSERT (order_id, new_status, changed_by) VALUES (o.id, 'x', 'y')",
    "TRUNCATE orders",
    "TRUNCATE order_state_log",
    "UPDATE order_state_log SET reason = 'x' WHERE id = 1",
    "DELETE FROM order_state_log WHERE id = 1",
    "INSERT INTO order_state_log (order_id, new_status, changed_by) VALUES (1, 'x', 'y') "
    "ON CONFLICT (idempotency_key) DO UPDATE SET reason = 'x'",
    "UPDATE orders SET deleted_at = now() WHERE id = 1",
    "INSERT INTO orders (customer_id, deleted_at) VALUES (1, now())",
    "DELETE FROM orders",
    "UPDATE orders SET fulfillment_status = 'x'",
    "DELETE FROM orders o USING customers c WHERE c.id = o.customer_id RETURNING c.name",
    "SELECT pg_sleep(1)",
    "DO $$ BEGIN END $$",
    "SELECT xmlelement(name a, id) FROM orders",
    "SELECT nope FROM orders",
    "DELETE FROM payments WHERE id = 1",
    "SELECT email FROM customers",
    "LOCK TABLE orders",
]


def _policies_for_hints(tmp: Path) -> PolicySet:
    """The example policies and types whose rules a careless hint would break."""
    write(
        tmp,
        "readonly_log.yaml",
        "agents: [ro-*]\nupstream_role: ro\nstatements: [read, write]\ntables:\n"
        "  order_state_log: {ops: [select], append_only: true}\n"
        "  orders: {ops: [select, delete], soft_delete: true}\n"
        "  customers: {ops: [select], columns: [id, name]}\n",
    )
    write(
        tmp,
        "inserter.yaml",
        "agents: [ins-*]\nupstream_role: ins\nstatements: [read, write]\ntables:\n"
        "  order_state_log: {ops: [insert], append_only: true}\n"
        "  orders: {ops: [select, update], soft_delete: true}\n",
    )
    for source in (Path(__file__).resolve().parents[2] / "policies").glob("*.yaml"):
        (tmp / source.name).write_text(source.read_text())
    return load_policy_set(tmp)


@pytest.mark.parametrize("sql", DENIED)
def test_hints_only_propose_what_the_policy_allows(sql: str, tmp_path: Path) -> None:
    policies = _policies_for_hints(tmp_path)
    for agent in ("analytics-1", "support-1", "fulfillment-1", "ro-1", "ins-1"):
        decision = judge(agent, sql, policies=policies)
        if decision.action != "deny":
            continue
        policy = policies.match(agent)
        assert policy is not None
        check_hint(policy, decision)


def test_append_only_without_insert_does_not_propose_inserting(tmp_path: Path) -> None:
    policies = _policies_for_hints(tmp_path)
    decision = judge(
        "ro-1", "UPDATE order_state_log SET reason = 'x' WHERE id = 1", policies=policies
    )
    assert decision.rule == "tables.order_state_log.append_only", decision
    assert "INSERT" not in decision.hint and "ON CONFLICT" not in decision.hint
    assert decision.hint == (
        "on order_state_log readonly_log may use: SELECT ... FROM order_state_log"
    )


def test_merge_on_a_soft_delete_table_proposes_only_allowed_writes(tmp_path: Path) -> None:
    policies = _policies_for_hints(tmp_path)
    merge = "MERGE INTO orders o USING customers c ON o.customer_id = c.id WHEN MATCHED THEN "
    decision = judge("ro-1", merge + "DELETE", policies=policies)
    assert decision.rule == "tables.orders.soft_delete", decision
    assert "ON CONFLICT" not in decision.hint and "UPDATE" not in decision.hint
    assert "DELETE FROM orders WHERE ... (it keeps the rows, marked deleted)" in decision.hint
    updater = judge(
        "ins-1",
        "MERGE INTO orders o USING (SELECT 1 AS id) s ON o.id = s.id "
        "WHEN MATCHED THEN UPDATE SET fulfillment_status = 'x'",
        policies=policies,
    )
    assert updater.rule == "tables.orders.soft_delete", updater
    assert "INSERT" not in updater.hint and "DELETE" not in updater.hint
    assert "UPDATE orders SET ... WHERE ..." in updater.hint


def test_support_merge_hint_names_its_own_forms() -> None:
    decision = judge(
        "support",
        "MERGE INTO orders o USING customers c ON o.customer_id = c.id WHEN MATCHED THEN DELETE",
    )
    assert decision.hint == (
        "on orders support may use: UPDATE orders SET fulfillment_status = ... WHERE ...; "
        "DELETE FROM orders WHERE ... (it keeps the rows, marked deleted)"
    )


def test_class_hints_list_only_writes_some_table_allows() -> None:
    policies = example_policies()
    decision = judge("support", "DO $$ BEGIN END $$", policies=policies)
    assert "write statements (INSERT, UPDATE, DELETE, COPY FROM)" in decision.hint
    assert "TRUNCATE" not in decision.hint and "MERGE" not in decision.hint


def test_unsupported_hint_names_only_allowed_statements(monkeypatch: pytest.MonkeyPatch) -> None:
    from guardproxy.analysis import statements

    monkeypatch.setattr(
        "guardproxy.analysis.collector.QUERY_NODES", statements.QUERY_NODES - {"XmlExpr"}
    )
    analytics = judge("analytics", "SELECT xmlelement(name a, id) FROM orders")
    assert analytics.rule == "unsupported"
    assert analytics.hint == "rewrite the statement with plain SELECT syntax"
    support = judge("support", "SELECT xmlelement(name a, id) FROM orders")
    assert (
        support.hint == "rewrite the statement with plain SELECT / INSERT / UPDATE / DELETE syntax"
    )


def test_where_example_names_a_readable_column(tmp_path: Path) -> None:
    policies = _policies_for_hints(tmp_path)
    write(
        tmp_path / "more",
        "noid.yaml",
        "agents: [noid-*]\nupstream_role: n\nstatements: [read, write]\ntables:\n"
        "  customers: {ops: [select, update], deny_columns: [id, email]}\n",
    )
    noid = load_policy_set(tmp_path / "more")
    decision = judge("noid-1", "UPDATE customers SET name = 'x'", policies=noid)
    assert decision.rule == "require_where"
    assert decision.hint.endswith("e.g. WHERE name = ...")
    assert judge("support", "DELETE FROM orders", policies=policies).hint.endswith(
        "e.g. WHERE id = ..."
    )


def test_side_effect_hint_under_default_deny() -> None:
    assert judge("analytics", "SELECT pg_sleep(1)").hint == (
        "built-in functions without side effects are allowed"
    )
