"""Child rows for soft-deleted parents (issue 13): every value written into a foreign key
whose parent table the policy soft-deletes is checked by ``guardproxy.live_parent`` in
the same statement; what cannot be checked is refused (no database; the effect through
the real proxy is in tests/integration/test_policy_names_live.py)."""

from __future__ import annotations

from pathlib import Path

import pglast
import pytest
from _policy_helpers import copy_policies, judge, write

from guardproxy.analysis import Catalog
from guardproxy.analysis.catalog import FOREIGN_KEYS_QUERY, ForeignKey
from guardproxy.policy import Decision, PolicyError, PolicySet, SessionContext, load_policy_set

RULE = "tables.order_state_log.soft_deleted_parents"


def checked(value: str, agent: str = "support") -> str:
    return (
        f"guardproxy.live_parent({value}, 'public.orders', 'id', 'deleted_at', '{agent}', "
        f"'order_state_log.order_id', '{RULE}')"
    )


OPS = """\
agents: ["ops-*"]
upstream_role: guard_ops
statements: [read, write]
tables:
  orders:
    ops: [select, insert, update, delete]
    soft_delete: true
  customers:
    ops: [select]
  order_state_log:
    ops: [select, insert, update]
  payments:
    ops: [select, insert, update]
    soft_deleted_parents: allow
"""


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    directory = copy_policies(tmp_path_factory.mktemp("parents"))
    write(directory, "ops.yaml", OPS)
    return load_policy_set(directory)


def ops(policies: PolicySet, sql: str) -> Decision:
    return judge("ops-1", sql, ctx=SessionContext(agent_id="ops-1"), policies=policies)


def rewritten(decision: Decision) -> str:
    assert (decision.action, decision.rule) == ("rewrite", RULE), decision
    assert not decision.cacheable
    assert f"(policy {decision.reason.split()[-2]}" in decision.reason or RULE in decision.reason
    pglast.parse_sql(decision.sql)
    return decision.sql


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (
            # a number keeps its type; a string, NULL or parameter takes the column's
            "INSERT INTO order_state_log (order_id, new_status, changed_by) "
            "VALUES (6, 'a', 'b'), ('5', 'a', 'b'), ($1, 'a', 'b'), (NULL, 'a', 'b')",
            "INSERT INTO order_state_log (order_id, new_status, changed_by) "
            f"VALUES ({checked('6', 'ops')}, 'a', 'b'), "
            f"({checked('CAST(' + chr(39) + '5' + chr(39) + ' AS bigint)', 'ops')}, 'a', 'b'), "
            f"({checked('CAST($1 AS bigint)', 'ops')}, 'a', 'b'), "
            f"({checked('CAST(NULL AS bigint)', 'ops')}, 'a', 'b')",
        ),
        (
            "INSERT INTO order_state_log (order_id, new_status, changed_by) "
            "VALUES (DEFAULT, 'a', 'b')",
            None,  # DEFAULT is not a value the agent chose
        ),
        (
            "INSERT INTO order_state_log VALUES (DEFAULT, 6, 'a', 'b', 'c')",
            f"INSERT INTO order_state_log VALUES (DEFAULT, {checked('6', 'ops')}, 'a', 'b', 'c')",
        ),
        (
            "INSERT INTO order_state_log (new_status, order_id, changed_by) "
            "SELECT 'x', o.id + 0, 'y' FROM customers c JOIN orders o ON o.customer_id = c.id",
            "INSERT INTO order_state_log (new_status, order_id, changed_by) "
            f"SELECT 'x', {checked('o.id + 0', 'ops')}, 'y' FROM customers AS c "
            "INNER JOIN orders AS o ON o.customer_id = c.id AND o.deleted_at IS NULL",
        ),
        (
            "UPDATE order_state_log SET order_id = 6 WHERE id = 1",
            f"UPDATE order_state_log SET order_id = {checked('6', 'ops')} WHERE id = 1",
        ),
        (
            "UPDATE order_state_log SET order_id = DEFAULT WHERE id = 1",
            None,
        ),
        (
            "INSERT INTO order_state_log (id, order_id, new_status, changed_by) "
            "VALUES (1, 2, 'a', 'b') ON CONFLICT (id) DO UPDATE SET order_id = excluded.order_id",
            "INSERT INTO order_state_log (id, order_id, new_status, changed_by) "
            f"VALUES (1, {checked('2', 'ops')}, 'a', 'b') ON CONFLICT (id) DO UPDATE SET "
            f"order_id = {checked('excluded.order_id', 'ops')}",
        ),
        (
            "MERGE INTO order_state_log l USING (SELECT 6 AS o) s ON l.order_id = s.o "
            "WHEN MATCHED THEN UPDATE SET order_id = s.o "
            "WHEN NOT MATCHED THEN INSERT (order_id, new_status, changed_by) VALUES (s.o, 'a', 'b')",
            "MERGE INTO order_state_log AS l USING (SELECT 6 AS o) AS s ON l.order_id = s.o "
            f"WHEN MATCHED THEN UPDATE SET order_id = {checked('s.o', 'ops')} "
            "WHEN NOT MATCHED THEN INSERT (order_id, new_status, changed_by) "
            f"VALUES ({checked('s.o', 'ops')}, 'a', 'b')",
        ),
        (
            "COPY order_state_log (order_id, new_status, changed_by) FROM STDIN WITH (FORMAT csv)",
            "COPY order_state_log (order_id, new_status, changed_by) FROM STDIN WITH (FORMAT csv) "
            f"WHERE {checked('order_id', 'ops')} IS NOT DISTINCT FROM order_id",
        ),
        (
            "PREPARE p AS INSERT INTO order_state_log (order_id, new_status, changed_by) "
            "VALUES ($1, 'a', 'b')",
            "PREPARE p AS INSERT INTO order_state_log (order_id, new_status, changed_by) "
            f"VALUES ({checked('CAST($1 AS bigint)', 'ops')}, 'a', 'b')",
        ),
        (
            "WITH w AS (INSERT INTO order_state_log (order_id, new_status, changed_by) "
            "VALUES (6, 'a', 'b') RETURNING id) SELECT id FROM w",
            "WITH w AS (INSERT INTO order_state_log (order_id, new_status, changed_by) "
            f"VALUES ({checked('6', 'ops')}, 'a', 'b') RETURNING id) SELECT id FROM w",
        ),
        (
            "EXPLAIN ANALYZE INSERT INTO order_state_log (order_id, new_status, changed_by) "
            "VALUES (6, 'a', 'b')",
            "EXPLAIN (analyze) INSERT INTO order_state_log (order_id, new_status, changed_by) "
            f"VALUES ({checked('6', 'ops')}, 'a', 'b')",
        ),
    ],
)
def test_each_value_of_a_checked_key_is_wrapped(
    policies: PolicySet, sql: str, expected: str | None
) -> None:
    decision = ops(policies, sql)
    if expected is None:
        assert decision.action in ("allow", "rewrite"), decision
        assert "live_parent" not in decision.sql
        return
    assert rewritten(decision) == expected


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        (
            "INSERT INTO order_state_log (order_id, new_status, changed_by) "
            "SELECT * FROM (VALUES (6, 'a', 'b')) v",
            "a set operation or a SELECT with *",
        ),
        (
            "INSERT INTO order_state_log (order_id, new_status, changed_by) "
            "SELECT 6, 'a', 'b' UNION ALL SELECT 5, 'a', 'b'",
            "a set operation or a SELECT with *",
        ),
        (
            "UPDATE order_state_log SET (order_id, reason) = (SELECT 6, 'x') WHERE id = 1",
            "order_id is set from a row",
        ),
    ],
)
def test_a_value_that_cannot_be_found_is_refused(policies: PolicySet, sql: str, words: str) -> None:
    decision = ops(policies, sql)
    assert (decision.action, decision.rule, decision.sqlstate) == ("deny", RULE, "0A000")
    assert words in decision.reason
    assert f"(policy ops, {RULE})" in decision.reason
    assert "INSERT ... VALUES" in decision.hint  # ops may insert into order_state_log


def test_other_writes_are_left_alone(policies: PolicySet) -> None:
    for sql in (
        "UPDATE order_state_log SET reason = 'x' WHERE id = 1",
        # customers is not soft-deleted by this policy
        "INSERT INTO orders (customer_id) VALUES (1)",
        # payments has soft_deleted_parents: allow
        "INSERT INTO payments (order_id, amount, card_last4) VALUES (6, 1, '0000')",
        "UPDATE payments SET order_id = 6 WHERE id = 1",
    ):
        decision = ops(policies, sql)
        assert decision.allowed and "live_parent" not in decision.sql, (sql, decision)


def test_support_logging_a_state_change_is_checked() -> None:
    sql = (
        "INSERT INTO order_state_log (order_id, previous_status, new_status, changed_by, reason, "
        "idempotency_key) VALUES (6, 'cancelled', 'returned', 'support-3', 'x', 'k-1')"
    )
    decision = judge("support", sql)
    assert rewritten(decision) == sql.replace("VALUES (6,", f"VALUES ({checked('6')},")
    assert decision.reason == (
        "guardproxy checks that the rows this write refers to are not soft-deleted "
        f"(policy support, {RULE})"
    )


def test_a_key_of_several_columns_to_a_soft_delete_parent_is_refused(tmp_path: Path) -> None:
    write(
        tmp_path,
        "multi.yaml",
        "agents: [m-*]\nupstream_role: m\nstatements: [read, write]\ntables:\n"
        "  shipments: {ops: [select], soft_delete: true}\n"
        "  parcels: {ops: [insert]}\n",
    )
    catalog = Catalog.from_ddl(
        "CREATE TABLE shipments (a int, b int, deleted_at timestamptz, deleted_by text, "
        "delete_reason text, PRIMARY KEY (a, b));"
        "CREATE TABLE parcels (id int, a int, b int, FOREIGN KEY (a, b) REFERENCES shipments);"
    )
    policies = load_policy_set(tmp_path)
    policy = policies.match("m-1")
    assert policy is not None
    from guardproxy.policy import Judge

    engine = Judge(policies, catalog)
    decision = engine.judge(
        policy, "INSERT INTO parcels (id, a, b) VALUES (1, 2, 3)", SessionContext(agent_id="m-1")
    )
    assert decision.action == "deny" and decision.rule == "tables.parcels.soft_deleted_parents"
    assert "foreign key of several columns" in decision.reason
    fine = engine.judge(
        policy, "INSERT INTO parcels (id) VALUES (1)", SessionContext(agent_id="m-1")
    )
    assert fine.action == "allow"


def test_the_switch_is_validated_and_shown(tmp_path: Path) -> None:
    directory = copy_policies(tmp_path)
    path = directory / "support.yaml"
    text = path.read_text()
    path.write_text(
        text.replace(
            "    append_only: true\n", "    append_only: true\n    soft_deleted_parents: allow\n"
        )
    )
    support = load_policy_set(directory).get("support")
    assert support is not None
    assert "may refer to soft-deleted parents" in support.summary()
    sql = "INSERT INTO order_state_log (order_id, new_status, changed_by) VALUES (6, 'a', 'b')"
    decision = judge("support", sql, policies=load_policy_set(directory))
    assert (decision.action, decision.sql) == ("allow", sql)
    path.write_text(
        text.replace(
            "    append_only: true\n", "    append_only: true\n    soft_deleted_parents: maybe\n"
        )
    )
    with pytest.raises(PolicyError, match="soft_deleted_parents"):
        load_policy_set(directory)
    path.write_text(
        text.replace(
            "  customers:\n    ops: [select]\n",
            "  customers:\n    ops: [select]\n    soft_deleted_parents: allow\n",
        )
    )
    with pytest.raises(PolicyError, match="neither 'insert' nor 'update'"):
        load_policy_set(directory)


def test_the_catalog_knows_foreign_keys() -> None:
    rows = [
        ("public", "l", "l_fk", 1, "o", "bigint", "public", "orders", "id"),
        ("public", "p", "p_fk", "2", "b", "integer", "s", "t", "y"),
        ("public", "p", "p_fk", "1", "a", "text", "s", "t", "x"),
    ]
    catalog = Catalog.from_rows([("public", "l", "o")], foreign_keys=rows)
    assert catalog.references("public", "l") == (
        ForeignKey("l_fk", ("o",), ("bigint",), ("public", "orders"), ("id",)),
    )
    assert catalog.references("public", "p")[0].columns == ("a", "b")
    assert catalog.references("public", "p")[0].parent_columns == ("x", "y")
    assert catalog.references("public", "nothing") == ()
    assert catalog.version != Catalog.from_rows([("public", "l", "o")]).version
    ddl = Catalog.from_ddl(
        "CREATE TABLE orders (id bigint PRIMARY KEY, deleted_at timestamptz);"
        "CREATE TABLE log (id int, order_id bigint REFERENCES orders, note varchar(20));"
    )
    assert ddl.references("public", "log") == (
        ForeignKey("log_fkey1", ("order_id",), ("bigint",), ("public", "orders"), ("id",)),
    )
    pglast.parse_sql(FOREIGN_KEYS_QUERY)


def test_a_policy_checking_parents_uses_the_guard_schema(policies: PolicySet) -> None:
    policy = policies.get("ops")
    assert policy is not None and policy.uses_guard_schema
    fulfillment = policies.get("fulfillment")
    assert fulfillment is not None and not fulfillment.uses_guard_schema
