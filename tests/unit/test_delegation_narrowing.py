"""A token's narrowing applied to a policy (guardproxy/delegation/narrowing.py): the result
is never wider than the policy, checked on the rules and on the judge's decisions."""

from __future__ import annotations

from pathlib import Path

from _policy_helpers import copy_policies, example_catalog, example_policies
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.analysis.model import Op, StatementClass
from guardproxy.delegation.claims import Narrowing, TableNarrowing
from guardproxy.delegation.narrowing import narrow_policy, narrowing_notes
from guardproxy.policy import AgentPolicy, Judge, SessionContext, load_policy_set

ROW_FILTERED = """\
agents: ["support-*"]
upstream_role: guard_support
statements: [read, write]
delegation: required
tables:
  customers: {ops: [select, update], update_columns: [name]}
  orders:
    ops: [select, update, delete]
    update_columns: [fulfillment_status]
    soft_delete: true
  order_state_log: {ops: [select, insert], append_only: true}
row_filters:
  orders: "customer_id = ANY({principals})"
  customers: "id = ANY({principals})"
"""


def support() -> AgentPolicy:
    policy = example_policies().match("support-1")
    assert policy is not None
    return policy


def table(key: str, *ops: str) -> TableNarrowing:
    schema, _, name = key.rpartition(".")
    return TableNarrowing(key, schema or None, name, frozenset(Op(o) for o in ops) if ops else None)


def test_no_narrowing_is_the_policy_itself() -> None:
    assert narrow_policy(support(), None) is support()


def test_tables_and_operations_are_intersected() -> None:
    narrowing = Narrowing(tables=(table("orders", "select", "delete", "truncate"),))
    narrowed = narrow_policy(support(), narrowing)
    assert [(t.key, t.ops) for t in narrowed.tables] == [
        ("orders", frozenset({Op.SELECT, Op.DELETE}))
    ]
    orders = next(t for t in support().tables if t.key == "orders")
    assert narrowed.tables[0].soft_delete == orders.soft_delete  # the rest stays the policy's
    assert narrowed.tables[0].update_columns == orders.update_columns
    assert (narrowed.name, narrowed.upstream_role, narrowed.functions) == (
        "support",
        "guard_support",
        support().functions,
    )
    assert narrowing_notes(support(), narrowing) == [
        "table orders: truncate not allowed by policy support, not granted"
    ]


def test_statement_classes_remove_the_operations_that_need_them() -> None:
    narrowed = narrow_policy(support(), Narrowing(statements=frozenset({StatementClass.READ})))
    assert narrowed.statements == frozenset({StatementClass.READ})
    assert {t.key: t.ops for t in narrowed.tables} == {
        "customers": frozenset({Op.SELECT}),
        "orders": frozenset({Op.SELECT}),
        "order_state_log": frozenset({Op.SELECT}),
    }
    assert narrowed.read_only
    wider = Narrowing(statements=frozenset({StatementClass.READ, StatementClass.DDL}))
    assert narrow_policy(support(), wider).statements == frozenset({StatementClass.READ})
    assert narrowing_notes(support(), wider) == [
        "statements ddl: not allowed by policy support, not granted"
    ]


def test_a_table_the_policy_does_not_list_is_not_granted() -> None:
    narrowing = Narrowing(tables=(table("payments"), table("public.orders")))
    narrowed = narrow_policy(support(), narrowing)
    assert narrowed.tables == ()  # public.orders is not the policy's key "orders"
    notes = narrowing_notes(support(), narrowing)
    assert notes[0].startswith("table payments: not in the tables of policy support")
    assert notes[1].startswith("table public.orders: not in the tables")


def test_row_filters_stay_on_the_tables_that_remain(tmp_path: Path) -> None:
    directory = copy_policies(tmp_path)
    (directory / "support.yaml").write_text(ROW_FILTERED)
    policy = load_policy_set(directory).match("support-1")
    assert policy is not None and policy.document.delegation == "required"
    narrowed = narrow_policy(policy, Narrowing(tables=(table("orders", "select"),)))
    assert [(rule.key, f.source) for rule, f in narrowed.row_filters] == [
        ("orders", "customer_id = ANY({principals})")
    ]
    assert narrowed.row_filters[0][0] is narrowed.tables[0]


def test_the_same_narrowing_gives_the_same_policy_object() -> None:
    narrowing = Narrowing(tables=(table("orders", "select"),))
    again = Narrowing(tables=(table("orders", "select"),))
    assert narrow_policy(support(), narrowing) is narrow_policy(support(), again)


def test_the_judge_refuses_what_the_narrowing_removed() -> None:
    narrowed = narrow_policy(
        support(), Narrowing(tables=(table("orders", "select"), table("customers")))
    )
    engine = Judge(example_policies(), example_catalog())
    ctx = SessionContext(agent_id="support-1")
    update = "UPDATE orders SET fulfillment_status = 'packed' WHERE id = 1"
    assert engine.judge(support(), update, ctx).action in ("allow", "rewrite")
    denied = engine.judge(narrowed, update, ctx)
    assert denied.action == "deny" and denied.rule == "tables.orders.ops"
    log = "SELECT new_status FROM order_state_log WHERE order_id = 1"
    assert engine.judge(narrowed, log, ctx).action == "deny"
    assert engine.judge(narrowed, "SELECT name FROM customers WHERE id = 1", ctx).action == "allow"
    # the base policy's decisions are not served to the narrowed one from the cache
    assert engine.judge(support(), log, ctx).action == "allow"
    assert engine.judge(narrowed, log, ctx).action == "deny"


# -- never wider, whatever the token asks --------------------------------------------

CORPUS = [
    "SELECT id, fulfillment_status FROM orders WHERE id = 1",
    "SELECT name FROM customers WHERE id = 2",
    "SELECT new_status FROM order_state_log WHERE order_id = 1",
    "SELECT card_last4 FROM payments WHERE id = 1",
    "UPDATE orders SET fulfillment_status = 'packed' WHERE id = 1",
    "DELETE FROM orders WHERE id = 3",
    "INSERT INTO order_state_log (order_id, new_status, changed_by) VALUES (1, 'packed', 'a')",
    "TRUNCATE orders",
    "UPDATE customers SET name = 'x' WHERE id = 1",
    "CREATE TABLE t (id int)",
    "SELECT o.id FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.id = 1",
]
NAMES = ["orders", "customers", "order_state_log", "payments", "public.orders", "Orders"]
ops = st.frozensets(st.sampled_from(list(Op)), max_size=4)
narrowings = st.builds(
    Narrowing,
    tables=st.none()
    | st.lists(
        st.tuples(st.sampled_from(NAMES), st.none() | ops), max_size=4, unique_by=lambda x: x[0]
    ).map(lambda items: tuple(table(name, *(o.value for o in (ops or ()))) for name, ops in items)),
    statements=st.none() | st.frozensets(st.sampled_from(list(StatementClass))),
)


@settings(max_examples=150, deadline=None)
@given(narrowing=narrowings)
def test_a_narrowed_policy_is_never_wider(narrowing: Narrowing) -> None:
    policy = support()
    narrowed = narrow_policy(policy, narrowing)
    assert narrowed.statements <= policy.statements
    base = {(t.schema, t.name): t for t in policy.tables}
    for rule in narrowed.tables:
        original = base[(rule.schema, rule.name)]
        assert rule.ops and rule.ops <= original.ops
        assert rule.columns == original.columns and rule.deny_columns == original.deny_columns
        assert (rule.update_columns, rule.insert_columns) == (
            original.update_columns,
            original.insert_columns,
        )
        assert (rule.soft_delete, rule.append_only, rule.max_rows_affected) == (
            original.soft_delete,
            original.append_only,
            original.max_rows_affected,
        )
    for field in ("functions", "require_where", "allow_locking", "denied_settings", "document"):
        assert getattr(narrowed, field) == getattr(policy, field)
    assert narrowed.upstream_role == policy.upstream_role and narrowed.mode == policy.mode


@settings(max_examples=60, deadline=None)
@given(narrowing=narrowings)
def test_the_judge_allows_nothing_to_a_narrowed_policy_it_refuses_to_the_policy(
    narrowing: Narrowing,
) -> None:
    policy = support()
    narrowed = narrow_policy(policy, narrowing)
    engine = Judge(example_policies(), example_catalog())
    ctx = SessionContext(agent_id="support-1", principals=("42",))
    for sql in CORPUS:
        if engine.judge(narrowed, sql, ctx).action != "deny":
            assert engine.judge(policy, sql, ctx).action != "deny", sql
