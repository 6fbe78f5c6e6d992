"""The pure functions behind `guardproxy check / explain / roles` (no database)."""

from __future__ import annotations

import json
from pathlib import Path

import pglast
from _policy_helpers import POLICIES, copy_policies, example_catalog, example_policies

from guardproxy.policy.tools import check_report, explain, explain_text, roles_sql


def test_check_report_ok() -> None:
    code, text = check_report(POLICIES)
    assert code == 0
    assert text.splitlines()[0] == f"3 agent types in {POLICIES}: OK"
    assert (
        "analytics (analytics.yaml): agents analytics-* as role guard_analytics, mode enforce"
        in text
    )
    assert "  table customers: select; deny email" in text
    assert "  table orders: delete, select, update; update fulfillment_status" in text


def test_check_report_lists_every_error(tmp_path: Path) -> None:
    directory = copy_policies(tmp_path)
    (directory / "analytics.yaml").write_text("agents: []\nupstream_role: x\nbogus: 1\n")
    code, text = check_report(directory)
    assert code == 1
    lines = text.splitlines()
    assert lines[0] == "policy check failed: 2 errors"
    assert any("analytics.yaml: agents: list should have at least 1 item" in line for line in lines)
    assert any("analytics.yaml: bogus: unknown key" in line for line in lines)


def test_explain_keys_and_values() -> None:
    policies = example_policies()
    result = explain(policies, "analytics-1", "SELECT email FROM customers")
    assert set(result) >= {"decision", "rule", "reason", "sql"}
    assert result["decision"] == "deny" and result["sql"] is None
    assert result["rule"] == "tables.customers.deny_columns"
    json.dumps(result)  # the CLI prints it with --json
    ok = explain(policies, "fulfillment-1", "SELECT id FROM orders WHERE id = 1")
    assert (ok["decision"], ok["sql"]) == ("allow", "SELECT id FROM orders WHERE id = 1")
    assert "decision: allow" in explain_text(ok)
    capped = explain(policies, "analytics-1", "SELECT name FROM customers WHERE id = 1")
    assert (capped["decision"], capped["rule"]) == ("rewrite", "limits.max_rows_returned")
    assert capped["sql"] == "SELECT name FROM customers WHERE id = 1\nLIMIT 1001"
    nobody = explain(policies, "intruder", "SELECT 1")
    assert (nobody["decision"], nobody["rule"], nobody["agent_type"]) == ("deny", "agents", None)


def test_roles_sql_with_catalog_grants_exactly_the_policy() -> None:
    text = roles_sql(example_policies(), example_catalog())
    pglast.parse_sql(text)  # valid SQL as a whole
    assert "GRANT SELECT (id, name, created_at) ON public.customers TO guard_analytics;" in text
    assert "GRANT SELECT ON public.orders TO guard_analytics;" in text
    assert "payments" not in text
    assert "GRANT UPDATE (fulfillment_status) ON public.orders TO guard_support;" in text
    # support's deletes of orders are soft: UPDATEs, so no DELETE (nothing could hard-delete)
    assert "GRANT DELETE ON public.orders TO guard_support;" not in text
    assert "-- no DELETE on public.orders: support's deletes are soft" in text
    assert (
        "GRANT UPDATE (fulfillment_status, shipped_at, tracking_number) ON public.orders TO guard_fulfillment;"
        in text
    )
    assert "ALTER ROLE guard_analytics SET statement_timeout = '5000ms';" in text
    assert "ALTER ROLE guard_analytics SET idle_in_transaction_session_timeout = '30000ms';" in text
    assert "ALTER ROLE guard_analytics SET default_transaction_read_only = on;" in text
    assert "guard_support SET default_transaction_read_only" not in text
    assert "CONNECTION LIMIT 4;" in text
    assert text.index(
        "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM guard_analytics;"
    ) < text.index("GRANT SELECT ON public.orders TO guard_analytics;")
    assert "UPDATE (" in text and "GRANT UPDATE ON" not in text


def test_roles_sql_without_catalog_grants_less_never_more() -> None:
    text = roles_sql(example_policies())
    pglast.parse_sql(text)
    assert "GRANT SELECT ON customers TO guard_analytics" not in text
    assert "-- SELECT on customers: every column except email; needs the catalog" in text
    assert "GRANT SELECT ON orders TO guard_analytics;" in text
