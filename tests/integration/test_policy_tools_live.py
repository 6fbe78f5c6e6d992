"""The tools for people who write policies, run for real: ``guardproxy check``,
``guardproxy explain``, ``guardproxy roles`` applied to Postgres, and SIGHUP reloads
of a running proxy.

``roles``: its SQL is applied to the shop database after every privilege of the
agent roles was revoked, then a *direct* connection as each role (not through the
proxy) shows the database enforcing the same limits on its own.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import shop
import yaml
from psycopg import errors
from shop import ANALYTICS, POLICIES, ROOT, SCHEMA_FILE, RawAgent, launch_proxy, snapshot

pytestmark = pytest.mark.timeout(60)

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline

ROLE_PASSWORD = "role_pw_for_tests"


def guardproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guardproxy", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def copy_policies(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    return target


def edit_policy(directory: Path, name: str, change: Any) -> None:
    path = directory / f"{name}.yaml"
    doc = yaml.safe_load(path.read_text())
    change(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


# ---------------------------------------------------------------- check


def test_check_accepts_the_example_policies() -> None:
    out = guardproxy("check", "--policies", "policies")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "3 agent types in policies: OK"
    for kind in ("analytics", "support", "fulfillment"):
        assert any(
            line.startswith(f"{kind} ({kind}.yaml): agents {kind}-* as role guard_{kind}")
            for line in lines
        ), out.stdout
    assert "  table customers: select; deny email" in lines


def test_check_lists_every_error_with_file_and_key(tmp_path) -> None:
    directory = copy_policies(tmp_path)
    edit_policy(directory, "analytics", lambda d: d["tables"]["customers"].update(opz=["select"]))
    edit_policy(directory, "support", lambda d: d.update(mode="enforcing"))
    edit_policy(directory, "fulfillment", lambda d: d["timeouts"].update(statement_timeout=5))
    out = guardproxy("check", "--policies", str(directory))
    assert out.returncode == 1, (out.stdout, out.stderr)
    text = out.stderr
    assert text.splitlines()[0] == "policy check failed: 3 errors", text
    for file, key in (
        ("analytics.yaml", "tables.customers.opz"),
        ("support.yaml", "mode"),
        ("fulfillment.yaml", "timeouts.statement_timeout"),
    ):
        assert any(file in line and f"{key}:" in line for line in text.splitlines()), (
            f"no error naming {file} and {key}:\n{text}"
        )


def test_check_rejects_overlapping_agent_patterns(tmp_path) -> None:
    directory = copy_policies(tmp_path)
    edit_policy(directory, "support", lambda d: d.update(agents=["support-*", "analytics-admin"]))
    out = guardproxy("check", "--policies", str(directory))
    assert out.returncode == 1
    assert "support.yaml" in out.stderr and "agents" in out.stderr
    assert "analytics-admin" in out.stderr


# ---------------------------------------------------------------- explain


def explain_json(*args: str) -> tuple[int, dict[str, Any]]:
    out = guardproxy("explain", "--json", *args)
    assert out.returncode in (0, 1), out.stderr
    assert out.stdout.strip(), f"no JSON on stdout (exit {out.returncode}):\n{out.stderr}"
    doc = json.loads(out.stdout)
    assert set(doc) == {"decision", "rule", "reason", "hint", "sql", "notices"}, doc
    return out.returncode, doc


def test_explain_allowed_and_denied() -> None:
    code, doc = explain_json(
        "--agent", "analytics-7", "select id, name from customers where id = 1"
    )
    assert code == 0
    # analytics reads are capped (limits.max_rows_returned 1000): the proxy adds LIMIT 1001
    assert doc["decision"] == "rewrite"
    assert doc["sql"] == "select id, name from customers where id = 1\nLIMIT 1001"

    code, doc = explain_json("--agent", "analytics-7", "select email from customers")
    assert code == 1
    assert doc["decision"] == "deny"
    assert doc["rule"] == "tables.customers.deny_columns"
    assert "analytics" in doc["reason"] and "customers.email" in doc["reason"]
    assert doc["sql"] is None

    code, doc = explain_json("--agent", "support-3", "select 1; delete from payments where id = 1")
    assert code == 1 and doc["decision"] == "deny" and "payments" in doc["reason"]

    code, doc = explain_json("--agent", "nobody", "select 1")
    assert code == 1 and doc["decision"] == "deny" and doc["rule"] == "agents"

    out = guardproxy("explain", "--agent", "fulfillment-2", "delete from orders where id = 1")
    assert out.returncode == 1
    assert "decision: deny" in out.stdout and "tables.orders.ops" in out.stdout


def test_explain_with_the_catalog_from_upstream_or_a_schema_file(shop_db) -> None:
    upstream = shop_db.dsn(dbname="shop")
    for source in (["--upstream", upstream], ["--schema", str(SCHEMA_FILE)]):
        code, doc = explain_json(*source, "--agent", "analytics-7", "select * from customers")
        assert code == 1 and doc["rule"] == "tables.customers.deny_columns", doc
        code, doc = explain_json(*source, "--agent", "fulfillment-1", "select * from orders")
        # allowed, possibly rewritten by a later policy feature (soft-delete filter, row cap)
        assert code == 0 and doc["decision"] in ("allow", "rewrite"), doc


def test_explain_says_what_the_proxy_does(shop_db, tmp_path) -> None:
    statements = [
        ("analytics-1", "select id, name from customers order by id"),
        ("analytics-1", "select * from customers"),
        ("analytics-1", "select card_last4 from payments"),
        ("support-1", "select id, email from customers where id = 1"),
        ("support-1", "update orders set requires_signature = true where id = 1"),
        ("fulfillment-1", "select o.id from orders o where o.id = 2"),
        ("fulfillment-1", "select pg_sleep(0)"),
    ]
    with launch_proxy(shop_db, tmp_path / "guardproxy.log") as proxy:
        for agent, sql in statements:
            code, doc = explain_json("--schema", str(SCHEMA_FILE), "--agent", agent, sql)
            with RawAgent(proxy.port, agent) as client:
                reply = client.query(sql)
            if code == 0:
                assert not reply.errors, (sql, reply.errors)
            else:
                assert reply.errors and reply.errors[0]["M"] == doc["reason"], (
                    sql,
                    reply.errors,
                    doc,
                )


# ---------------------------------------------------------------- roles


@pytest.fixture
def roles_applied_by_the_cli(shop_db, shop_baseline) -> Iterator[str]:
    """Every privilege of the agent roles revoked, then ``guardproxy roles`` applied."""
    roles = ", ".join(shop.AGENT_ROLES)
    shop_db.psql(
        f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {roles};"
        f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {roles};"
        f"REVOKE ALL ON SCHEMA public FROM {roles};"
        + "".join(f"ALTER ROLE {r} RESET ALL;" for r in shop.AGENT_ROLES),
        dbname="shop",
    )
    out = guardproxy("roles", "--schema", str(SCHEMA_FILE))
    assert out.returncode == 0, out.stderr
    shop_db.psql(out.stdout, dbname="shop")
    shop_db.psql(
        "".join(f"ALTER ROLE {r} PASSWORD '{ROLE_PASSWORD}';" for r in shop.AGENT_ROLES),
        dbname="shop",
    )
    try:
        yield out.stdout
    finally:
        shop_db.psql(
            "".join(f"ALTER ROLE {r} PASSWORD NULL;" for r in shop.AGENT_ROLES), dbname="shop"
        )
        if snapshot(shop_db) != shop_baseline:
            shop.restore_shop(shop_db)


def direct_as(pg, role: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        pg.dsn(user=role, dbname="shop", password=ROLE_PASSWORD), connect_timeout=10
    )


def test_roles_sql_gives_the_database_the_same_limits(shop_db, roles_applied_by_the_cli) -> None:
    sql = roles_applied_by_the_cli
    assert "GRANT SELECT (id, name, created_at) ON public.customers TO guard_analytics;" in sql
    before = snapshot(shop_db)
    with direct_as(shop_db, "guard_analytics") as conn:
        assert conn.execute("show statement_timeout").fetchone() == ("5s",)
        assert conn.execute("show idle_in_transaction_session_timeout").fetchone() == ("30s",)
        assert conn.execute("show default_transaction_read_only").fetchone() == ("on",)
        assert conn.execute("select count(*) from orders").fetchone() == (6,)
        assert conn.execute("select id, name, created_at from customers where id = 1").fetchone()
        conn.rollback()
        for denied in (
            "select card_last4 from payments",
            "select email from customers",
            "select * from customers",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(denied)
            conn.rollback()
        with pytest.raises(errors.ReadOnlySqlTransaction):
            conn.execute("update orders set fulfillment_status = 'packed' where id = 4")
        conn.rollback()
        conn.execute("begin read write")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("update orders set fulfillment_status = 'packed' where id = 4")
        conn.rollback()
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("set role app_owner")
        conn.rollback()
    assert snapshot(shop_db) == before


def rows_of_the_tables(pg) -> dict[str, Any]:
    state = snapshot(pg)
    return {table: state[table] for table in shop.TABLES}


def test_roles_sql_limits_support_and_fulfillment(shop_db, roles_applied_by_the_cli) -> None:
    before = rows_of_the_tables(shop_db)  # a rolled back INSERT still uses a sequence value
    with direct_as(shop_db, "guard_support") as conn:
        assert conn.execute("show statement_timeout").fetchone() == ("10s",)
        assert conn.execute("show default_transaction_read_only").fetchone() == ("off",)
        assert conn.execute("select email from customers where id = 1").fetchone() == (
            "ada@example.com",
        )
        assert (
            conn.execute("update orders set fulfillment_status = 'packed' where id = 4").rowcount
            == 1
        )
        conn.execute(
            "insert into order_state_log (order_id, new_status, changed_by) values (4, 'packed', 'x')"
        )
        conn.rollback()
        for denied in (
            # support's deletes of orders are soft (guardproxy's UPDATEs): around the
            # proxy its role cannot hard-delete them
            "delete from orders where id = 5",
            "select card_last4 from payments",
            "update orders set requires_signature = true where id = 4",
            "insert into order_state_log (order_id, new_status, changed_by, changed_at) "
            "values (4, 'x', 'y', now())",
            "update order_state_log set reason = 'x' where id = 1",
            "truncate orders",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(denied)
            conn.rollback()
    with direct_as(shop_db, "guard_fulfillment") as conn:
        assert (
            conn.execute(
                "update orders set fulfillment_status = 'shipped', shipped_at = now(), "
                "tracking_number = 'T' where id = 3"
            ).rowcount
            == 1
        )
        conn.rollback()
        for denied in (
            "select id from customers",
            "select card_last4 from payments",
            "update orders set customer_id = 1 where id = 3",
            "delete from orders where id = 5",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(denied)
            conn.rollback()
    limits = shop_db.psql(
        "select string_agg(rolname || '=' || rolconnlimit, ',' order by rolname) from pg_roles "
        "where rolname like 'guard\\_%'",
        dbname="shop",
    )
    assert limits == "guard_analytics=4,guard_fulfillment=4,guard_support=6"
    assert rows_of_the_tables(shop_db) == before


def test_set_role_from_the_proxy_login_is_limited_too(shop_db, roles_applied_by_the_cli) -> None:
    with psycopg.connect(shop_db.dsn(dbname="shop"), connect_timeout=10) as conn:
        conn.execute("set role guard_analytics")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("select card_last4 from payments")
        conn.rollback()
        conn.execute("set role guard_analytics")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("select email from customers")
        conn.rollback()


# ---------------------------------------------------------------- SIGHUP


@pytest.fixture
def payments_readable_by_analytics_role(shop_db) -> Iterator[None]:
    """So that a policy allowing analytics to read payments can show its effect."""
    shop_db.psql("GRANT SELECT ON payments TO guard_analytics", dbname="shop")
    try:
        yield
    finally:
        shop_db.psql("REVOKE SELECT ON payments FROM guard_analytics", dbname="shop")


def test_sighup_reloads_and_a_broken_file_keeps_the_old_set(
    shop_db, tmp_path, payments_readable_by_analytics_role
) -> None:
    directory = copy_policies(tmp_path)
    with (
        launch_proxy(shop_db, tmp_path / "guardproxy.log", policies=directory) as proxy,
        RawAgent(proxy.port, ANALYTICS) as before_reload,
    ):
        reply = before_reload.query("select card_last4 from payments where id = 3")
        assert reply.error["C"] == "42501"
        assert "(policy analytics, tables)" in reply.error["M"]

        edit_policy(
            directory, "analytics", lambda d: d["tables"].update(payments={"ops": ["select"]})
        )
        mark = len(proxy.log())
        proxy.proc.send_signal(signal.SIGHUP)
        proxy.wait_for_log(r"policies reloaded", after=mark)

        # new statements of an existing session and of a new one follow the new set
        assert before_reload.scalar("select card_last4 from payments where id = 3") == "1881"
        with RawAgent(proxy.port, "analytics-2") as fresh:
            assert fresh.scalar("select card_last4 from payments where id = 3") == "1881"
            reply = fresh.query("select email from customers")
            assert reply.error["C"] == "42501"

        # a broken file: the reload is refused, the set in force stays, the log says why
        path = directory / "analytics.yaml"
        path.write_text(path.read_text() + "tabels:\n  orders: {ops: [select]}\n")
        mark = len(proxy.log())
        proxy.proc.send_signal(signal.SIGHUP)
        proxy.wait_for_log(r"reload refused", after=mark)
        why = proxy.log()[mark:]
        assert "analytics.yaml" in why and "tabels" in why, why
        assert proxy.proc.poll() is None
        assert before_reload.scalar("select card_last4 from payments where id = 3") == "1881"
        with RawAgent(proxy.port, "analytics-3") as fresh:
            assert fresh.scalar("select card_last4 from payments where id = 3") == "1881"
            assert fresh.query("select email from customers").error["C"] == "42501"
            assert fresh.query("delete from orders where id = 6").error["M"].startswith("analytics")


def test_sighup_applies_a_lower_statement_timeout(shop_db, tmp_path) -> None:
    directory = copy_policies(tmp_path)
    with launch_proxy(shop_db, tmp_path / "guardproxy.log", policies=directory) as proxy:
        with RawAgent(proxy.port, ANALYTICS) as agent:
            assert agent.scalar("show statement_timeout") == "5s"
        edit_policy(directory, "analytics", lambda d: d["timeouts"].update(statement_timeout="2s"))
        mark = len(proxy.log())
        proxy.proc.send_signal(signal.SIGHUP)
        proxy.wait_for_log(r"policies reloaded", after=mark)
        with RawAgent(proxy.port, ANALYTICS) as agent:
            # the judge knows the new limit...
            reply = agent.query("set statement_timeout = '3s'")
            assert reply.error["C"] == "42501"
            assert "timeouts.statement_timeout" in reply.error["M"]
            # ...and the upstream sessions of the type run with it
            assert agent.scalar("show statement_timeout") == "2s"
