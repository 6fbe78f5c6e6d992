"""The write-safety keys of a policy (soft_delete, append_only, capture_deleted_rows,
max_rows_affected, limits, idempotency, budgets, audit), the catalog's primary keys,
the tools built on them and idempotency keys (no database)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pglast
import pytest
from _policy_helpers import SCHEMA, example_catalog, example_policies, write

from guardproxy.analysis import CATALOG_QUERY, Catalog
from guardproxy.policy import PolicyError, SoftDelete, load_policy_set
from guardproxy.policy.idempotency import canonical_text, derive_key, idempotency_key
from guardproxy.policy.tools import check_report, roles_sql, soft_delete_sql

HEAD = "agents: [a-*]\nupstream_role: r_a\nstatements: [read, write]\n"


def load(tmp_path: Path, text: str) -> list[str]:
    """The errors of a one-file policy set ([] when it loads)."""
    write(tmp_path, "a.yaml", HEAD + text)
    try:
        load_policy_set(tmp_path)
    except PolicyError as exc:
        return [e.split(": ", 1)[1] for e in exc.errors]
    return []


# -- keys ---------------------------------------------------------------------------------


def test_example_policies_expose_the_write_safety_keys() -> None:
    policies = example_policies()
    support, analytics, fulfillment = (
        policies.get("support"),
        policies.get("analytics"),
        policies.get("fulfillment"),
    )
    assert support is not None and analytics is not None and fulfillment is not None
    tables = {t.name: t for t in support.tables}
    assert tables["orders"].soft_delete == SoftDelete("deleted_at", "deleted_by", "delete_reason")
    assert tables["orders"].max_rows_affected == 100
    assert tables["order_state_log"].append_only
    assert not tables["customers"].capture_deleted_rows
    assert (support.idempotency_mode, support.idempotency_ttl) == ("derived", timedelta(hours=24))
    assert (support.max_writes_per_task, support.max_statements_per_task) == (500, 1000)
    assert (support.audit_on_loss, support.audit_fail_closed) == ("count", False)
    assert support.max_rows_affected is None and support.max_rows_returned is None
    assert support.uses_guard_schema
    assert (analytics.max_rows_returned, analytics.on_rows_returned_over) == (1000, "truncate")
    assert analytics.max_plan_cost is None and analytics.max_plan_rows is None
    assert not analytics.uses_guard_schema and analytics.idempotency_mode == "off"
    assert (fulfillment.max_rows_affected, fulfillment.idempotency_mode) == (50, "explicit")
    assert fulfillment.cap_for(None) == (50, "limits.max_rows_affected")
    assert support.cap_for(tables["orders"]) == (100, "tables.orders.max_rows_affected")
    assert support.cap_for(tables["customers"]) == (None, "")


def test_check_report_shows_them() -> None:
    code, text = check_report(Path(__file__).resolve().parents[2] / "policies")
    assert code == 0
    assert (
        "  table orders: delete, select, update; update fulfillment_status; "
        "soft delete (deleted_at, deleted_by, delete_reason); at most 100 rows per write"
    ) in text
    assert "  table order_state_log: insert, select; append-only" in text
    assert "  idempotency: derived, keys kept 24h" in text
    assert "  budgets: max_writes_per_task 500, max_statements_per_task 1000" in text
    assert "max_rows_returned 1000, on_rows_returned_over truncate" in text


def test_all_keys_with_their_values(tmp_path: Path) -> None:
    assert (
        load(
            tmp_path,
            "tables:\n"
            "  t:\n"
            "    ops: [select, delete]\n"
            "    soft_delete: {deleted_at: gone_at, deleted_by: gone_by, reason: why}\n"
            "    max_rows_affected: 10\n"
            "  u:\n    ops: [select, delete]\n    capture_deleted_rows: true\n"
            "  v:\n    ops: [select, insert]\n    append_only: true\n"
            "limits:\n  max_rows_affected: 5\n  max_rows_returned: 200\n"
            "  on_rows_returned_over: error\n  max_plan_cost: 1e6\n  max_plan_rows: 100000\n"
            "idempotency: {mode: explicit, ttl: 2h}\n"
            "budgets: {max_writes_per_task: 10, max_statements_per_task: 20}\n"
            "audit: {on_loss: fail_closed}\n",
        )
        == []
    )
    policy = load_policy_set(tmp_path).get("a")
    assert policy is not None
    t = {r.name: r for r in policy.tables}
    assert t["t"].soft_delete == SoftDelete("gone_at", "gone_by", "why")
    assert t["u"].capture_deleted_rows and t["v"].append_only
    assert (policy.max_plan_cost, policy.max_plan_rows) == (1e6, 100000)
    assert policy.on_rows_returned_over == "error"
    assert policy.idempotency_ttl == timedelta(hours=2) and policy.audit_fail_closed
    soft = load(tmp_path, "tables:\n  t:\n    ops: [select, delete]\n    soft_delete: true\n")
    assert soft == []
    policy = load_policy_set(tmp_path).get("a")
    assert policy is not None and policy.tables[0].soft_delete == SoftDelete()
    off = load(tmp_path, "tables:\n  t:\n    ops: [select]\n    soft_delete: false\n")
    assert off == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "tables:\n  t:\n    soft_delete: yes please\n",
            "tables.t.soft_delete: expected true, or a mapping naming the columns",
        ),
        (
            "tables:\n  t:\n    soft_delete: {delete_at: x}\n",
            "tables.t.soft_delete.delete_at: unknown key; expected one of: deleted_at, "
            "deleted_by, reason",
        ),
        (
            "tables:\n  t:\n    soft_delete: {deleted_at: x, reason: x}\n",
            "tables.t.soft_delete: deleted_at, deleted_by and reason must be three different",
        ),
        (
            "tables:\n  t:\n    soft_delete: {deleted_at: 'a b'}\n",
            "tables.t.soft_delete.deleted_at: expected a column name",
        ),
        (
            "tables:\n  t:\n    ops: [select, insert, update]\n    append_only: true\n",
            "tables.t.ops: update on an append_only table: remove it from ops",
        ),
        (
            "tables:\n  t:\n    ops: [insert]\n    append_only: true\n    soft_delete: true\n",
            "tables.t.soft_delete: an append_only table is never deleted from",
        ),
        (
            "tables:\n  t:\n    ops: [delete]\n    soft_delete: true\n    capture_deleted_rows: true\n",
            "tables.t.capture_deleted_rows: is for tables without soft_delete",
        ),
        (
            "tables:\n  t:\n    ops: [select]\n    capture_deleted_rows: true\n",
            "tables.t.capture_deleted_rows: is set but ops does not include 'delete'",
        ),
        (
            "tables:\n  t:\n    ops: [select]\n    max_rows_affected: 5\n",
            "tables.t.max_rows_affected: is set but ops includes no write",
        ),
        (
            "tables:\n  t:\n    ops: [select, update]\n    update_columns: [a, deleted_at]\n"
            "    soft_delete: true\n",
            "tables.t.update_columns: deleted_at: only guardproxy writes the soft-delete columns",
        ),
        (
            "tables:\n  guardproxy.deleted_rows:\n    ops: [select]\n",
            "the guardproxy schema is guardproxy's own",
        ),
        (
            "tables:\n  t:\n    ops: [update]\n    max_rows_affected: 0\n",
            "tables.t.max_rows_affected: input should be greater than or equal to 1",
        ),
        ("limits:\n  max_rows_returned: 0\n", "limits.max_rows_returned: input should be greater"),
        (
            "limits:\n  on_rows_returned_over: cut\n",
            "limits.on_rows_returned_over: expected one of truncate, error; got 'cut'",
        ),
        ("limits:\n  max_plan_cost: -1\n", "limits.max_plan_cost: input should be greater than 0"),
        (
            "idempotency: {mode: always}\n",
            "idempotency.mode: expected one of off, explicit, derived; got 'always'",
        ),
        ("idempotency: {ttl: 24}\n", "idempotency.ttl: expected a duration with a unit"),
        ("idempotency: {mode: derived, key: x}\n", "idempotency.key: unknown key"),
        ("budgets: {max_writes_per_task: 0}\n", "budgets.max_writes_per_task: input should be"),
        ("budgets: {max_rows: 5}\n", "budgets.max_rows: unknown key; expected one of"),
        (
            "audit: {on_loss: drop}\n",
            "audit.on_loss: expected one of count, fail_closed; got 'drop'",
        ),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    errors = load(tmp_path, text)
    assert any(expected in error for error in errors), errors


# -- the catalog's primary keys -----------------------------------------------------------


def test_catalog_primary_keys_from_rows_and_ddl() -> None:
    rows = [
        ("s", "t", "a", "2"),  # text, as the simple protocol returns it
        ("s", "t", "b", None),
        ("s", "t", "c", 1),
        ("s", "v", "x", None),
    ]
    catalog = Catalog.from_rows(rows)
    assert catalog.primary_key("s", "t") == ("c", "a")
    assert catalog.primary_key("s", "v") is None
    assert catalog.columns("s", "t") == ("a", "b", "c")
    # three values per row, as before: columns only
    old = Catalog.from_rows([r[:3] for r in rows])  # type: ignore[misc]
    assert old.primary_keys == {} and old.columns("s", "t") == ("a", "b", "c")
    assert old.version != catalog.version
    assert example_catalog().primary_key("public", "orders") == ("id",)
    ddl = Catalog.from_ddl("CREATE TABLE t (a int, b int, c int, PRIMARY KEY (c, a));")
    assert ddl.primary_key("public", "t") == ("c", "a")
    query = pglast.parse_sql(CATALOG_QUERY)[0].stmt
    assert len(query.targetList) == 4  # schema, table, column, primary key position


# -- tools ----------------------------------------------------------------------------------


def test_soft_delete_sql() -> None:
    text = soft_delete_sql("orders")
    statements = pglast.parse_sql(text)
    assert [type(s.stmt).__name__ for s in statements] == ["AlterTableStmt", "IndexStmt", "DoStmt"]
    assert "ALTER TABLE orders\n    ADD COLUMN IF NOT EXISTS deleted_at timestamptz," in text
    assert "    ADD COLUMN IF NOT EXISTS delete_reason text;" in text
    assert "CREATE INDEX IF NOT EXISTS orders_deleted_at_idx ON orders (deleted_at);" in text
    assert "WHERE %I IS NULL" in text and "'orders_live_idx', 'orders', keys, 'deleted_at'" in text
    keyed = soft_delete_sql('sales."Order Items"', SoftDelete("gone", "by", "why"), key=["id"])
    pglast.parse_sql(keyed)
    assert (
        'ALTER TABLE sales."Order Items"\n    ADD COLUMN IF NOT EXISTS gone timestamptz,' in keyed
    )
    assert (
        'CREATE INDEX IF NOT EXISTS "Order Items_live_idx" ON sales."Order Items" (id) '
        "WHERE gone IS NULL;"
    ) in keyed
    long = soft_delete_sql("t" * 63)
    assert f" {'t' * 48}_deleted_at_idx ON " in long  # cut to 63 bytes, like Postgres
    with pytest.raises(ValueError, match="expected a table name"):
        soft_delete_sql("orders; DROP TABLE x")


def test_roles_sql_grants_what_the_rewrites_need() -> None:
    text = roles_sql(example_policies(), Catalog.from_ddl(SCHEMA.read_text()))
    pglast.parse_sql(text)
    assert "schema need it to exist first (`guardproxy db\n-- upgrade`)" in text
    support = text[text.index("-- support (") :]
    assert (
        "GRANT UPDATE (deleted_at, deleted_by, delete_reason) ON public.orders TO guard_support;"
        in support
    )
    for grant in (
        "GRANT USAGE ON SCHEMA guardproxy TO guard_support;",
        "GRANT INSERT ON guardproxy.deleted_rows TO guard_support;",
        "GRANT USAGE ON SEQUENCE guardproxy.deleted_rows_id_seq TO guard_support;",
        "GRANT EXECUTE ON FUNCTION guardproxy.refuse_soft_deleted(timestamptz, text) TO guard_support;",
    ):
        assert f"        {grant}\n" in support
    assert "IF to_regclass('guardproxy.deleted_rows') IS NOT NULL THEN" in support
    analytics = text[text.index("-- analytics (") : text.index("-- fulfillment (")]
    assert "REVOKE ALL ON SCHEMA guardproxy FROM guard_analytics;" in analytics
    assert "GRANT" not in analytics.split("nothing to do in the guardproxy schema")[1]


# -- idempotency keys -----------------------------------------------------------------------


def test_derived_keys() -> None:
    sql = "UPDATE orders SET fulfillment_status = 'packed' WHERE id = 4"
    key = derive_key("support", "T-1", "s1", sql)
    assert key is not None and key.startswith("derived:") and len(key) == 8 + 64
    # a retry with another context comment or layout is the same write
    assert derive_key("support", "T-1", "s1", f"/* step='s1' */ {sql}\n") == key
    assert canonical_text("SELECT 1 /* x */ , 'a  b' -- y") == "SELECT 1 , 'a  b'"
    # another literal, parameter, step, task or type is another write
    others = [
        derive_key("support", "T-1", "s1", sql.replace("4", "5")),
        derive_key("support", "T-1", "s2", sql),
        derive_key("support", "T-2", "s1", sql),
        derive_key("fulfillment", "T-1", "s1", sql),
        derive_key("support", "T-1", "s1", sql, [b"4"]),
        derive_key("support", "T-1", "s1", sql, [None]),
        derive_key("support", "T-1", "s1", sql, [b""]),
        derive_key("support", "T-1", "s1", sql, agent_id="support-2"),
    ]
    assert len({key, *others}) == 1 + len(others)
    assert derive_key("support", None, "s1", sql) is None
    # without a step nothing tells a retry from a deliberate repeat: no key
    assert derive_key("support", "T-1", None, sql) is None


def test_idempotency_key_by_mode() -> None:
    policies = example_policies()
    support, fulfillment, analytics = (
        policies.get("support"),
        policies.get("fulfillment"),
        policies.get("analytics"),
    )
    assert support is not None and fulfillment is not None and analytics is not None
    sql = "UPDATE orders SET tracking_number = $1 WHERE id = $2"
    tagged = {"idempotency_key": "k-17"}
    assert (
        idempotency_key(fulfillment, tagged, "T", None, sql, agent_id="f-1")
        == "explicit:fulfillment:3:f-1:k-17"
    )
    assert idempotency_key(fulfillment, {}, "T", None, sql) is None
    # one key of two agents: two ledger entries
    assert idempotency_key(support, tagged, "T", None, sql, agent_id="s-1") != idempotency_key(
        support, tagged, "T", None, sql, agent_id="s-2"
    )
    assert idempotency_key(support, {}, "T", "s", sql, [b"x", b"3"]) == derive_key(
        "support", "T", "s", sql, [b"x", b"3"]
    )
    assert idempotency_key(support, {}, None, None, sql) is None
    assert idempotency_key(analytics, tagged, "T", None, sql) is None
