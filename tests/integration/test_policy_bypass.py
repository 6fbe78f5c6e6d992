"""Every bypass class of DESIGN.md section 4, tried by the example agents through the real proxy.

Each attempt goes through ``guardproxy serve`` with the example policies in front of
a real Postgres 15 holding the shop schema (``shop.py``). An attempt passes only if

* it is refused with the right SQLSTATE, and the message names the agent type, the
  rule (``(policy analytics, statements)``) and the object;
* its effect did not happen: the four tables, the sequences and every object an
  attack could plant (relations, functions, rules, triggers, large objects, schemas,
  role settings) are the same before and after, read as superuser straight from
  Postgres; files and programs outside the database did not appear;
* nothing secret came back: no customer email, card_last4 or payment amount appears
  in any byte the client received, error messages included;
* the session is still usable afterwards (outside a transaction), or its transaction
  is aborted exactly as a Postgres error leaves it (inside one).

The agents: ``analytics`` (read-only; customers without email, orders), ``support``
(reads orders and customers, updates orders.fulfillment_status, inserts into
order_state_log, deletes orders) and ``fulfillment`` (reads orders, updates three
shipping columns). None may touch payments.

Sections follow DESIGN.md section 4: stacked statements; read-only and timeout
escapes (BEGIN READ WRITE, SET, set_config, startup parameters and ``options``);
writable CTEs; EXPLAIN ANALYZE; side-effect functions anywhere in the tree; COPY to
and from programs and files, DO, CALL and user-defined code; lexical tricks; SQL-level
PREPARE / EXECUTE; the extended protocol across server connections; SET ROLE /
SESSION AUTHORIZATION / search_path; planting rules, triggers, functions, views;
locks and resources; identity; then require_where, reads hidden in writes,
transactions, unparseable SQL and monitor mode.
"""

from __future__ import annotations

import contextlib
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import shop
import yaml
from psycopg import errors
from psycopg.pq import ExecStatus
from shop import (
    ANALYTICS,
    POLICIES,
    SUPPORT,
    RawAgent,
    Reply,
    ShopProxy,
    assert_names,
    assert_no_secret,
    launch_proxy,
    snapshot,
)

pytestmark = pytest.mark.timeout(60)

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline

# Files an attack would create on the server's machine if it got through.
MARKER = Path("/tmp/guardproxy-bypass-program-marker")
COPY_FILE = Path("/tmp/guardproxy-bypass-copy-file")
LO_FILE = Path("/tmp/guardproxy-bypass-lo-export")
OUTSIDE_FILES = (MARKER, COPY_FILE, LO_FILE)


@pytest.fixture(scope="module")
def proxy(shop_db, tmp_path_factory) -> Iterator[ShopProxy]:
    with launch_proxy(shop_db, tmp_path_factory.mktemp("bypass") / "guardproxy.log") as handle:
        yield handle


@pytest.fixture(autouse=True)
def _each_test(request, proxy, shop_db, shop_baseline) -> Iterator[None]:
    """Log on failure; whatever a failed test let through is undone for the next one."""
    since = len(proxy.log())
    for path in OUTSIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    yield
    shop.dump_log_on_failure(request, proxy, since)
    if snapshot(shop_db) != shop_baseline:
        shop.restore_shop(shop_db)


def agent_id(kind: str) -> str:
    return shop.AGENT_OF[kind]


def check_denial(reply: Reply, sqlstate: str, kind: str, rule: str, obj: str) -> None:
    err = reply.error
    assert err.get("C") == sqlstate, err
    assert err.get("S") == "ERROR", err
    assert_names(err.get("M", ""), kind, rule, obj)
    assert err.get("H"), f"a denial says what is allowed instead (HINT): {err}"
    assert_no_secret(reply.text)


def attempt(
    proxy: ShopProxy, pg, kind: str, sql: str
) -> tuple[Reply, dict[str, Any], dict[str, Any]]:
    """Runs ``sql`` as one simple Query of a new session of ``kind``; checks the session
    is still usable afterwards; returns the reply and the shop before / after."""
    before = snapshot(pg)
    with RawAgent(proxy.port, agent_id(kind)) as agent:
        reply = agent.query(sql)
        after_reply = agent.query("select 1")
        assert after_reply.rows == [["1"]], f"session unusable after a denial: {after_reply}"
        assert after_reply.status == "I"
    return reply, before, snapshot(pg)


def assert_denied(
    proxy: ShopProxy, pg, kind: str, sql: str, rule: str, obj: str, sqlstate: str = "42501"
) -> Reply:
    reply, before, after = attempt(proxy, pg, kind, sql)
    check_denial(reply, sqlstate, kind, rule, obj)
    assert reply.tags == [] and reply.rows == [], (
        f"part of the message ran: {reply.tags} {reply.rows}"
    )
    assert reply.status == "I"
    assert after == before, "the denied statement changed the database"
    return reply


def case(kind: str, sql: str, rule: str, obj: str, id: str, sqlstate: str = "42501") -> Any:
    return pytest.param(kind, sql, rule, obj, sqlstate, id=id)


CASE = ("kind", "sql", "rule", "obj", "sqlstate")


# ---------------------------------------------------------------- stacked statements

STACKED = [
    case("analytics", "select 1; delete from orders", "statements", "orders", "select-then-delete"),
    case(
        "analytics",
        "select id from orders where id = 1; delete from orders where id = 6",
        "statements",
        "orders",
        "read-then-delete-one",
    ),
    case(
        "support",
        "select id from orders where id = 1; delete from payments where id = 1",
        "tables",
        "payments",
        "support-read-then-payments",
    ),
    case("support", "commit; drop table payments", "statements", "payments", "commit-drop"),
    case(
        "analytics",
        "begin; select 1; update orders set fulfillment_status = 'cancelled' where id = 4; commit",
        "statements",
        "orders",
        "whole-transaction",
    ),
    case(
        "fulfillment",
        "update orders set tracking_number = 'X' where id = 3; delete from orders where id = 3",
        "tables.orders.ops",
        "orders",
        "allowed-update-then-delete",
    ),
]


@pytest.mark.parametrize(CASE, STACKED)
def test_stacked_statements_none_runs(proxy, shop_db, kind, sql, rule, obj, sqlstate) -> None:
    assert_denied(proxy, shop_db, kind, sql, rule, obj, sqlstate)


# ---------------------------------------------------------------- read-only escapes

READ_WRITE = [
    case(
        "analytics", "BEGIN READ WRITE", "statements", "transaction_read_only", "begin-read-write"
    ),
    case(
        "analytics",
        "start transaction isolation level serializable, read write",
        "statements",
        "transaction_read_only",
        "start-transaction-read-write",
    ),
    case(
        "analytics",
        "begin; set transaction read write; delete from orders where id = 6; commit",
        "statements",
        "transaction_read_only",
        "set-transaction-read-write",
    ),
    case(
        "analytics",
        "SET default_transaction_read_only = off",
        "statements",
        "default_transaction_read_only",
        "set-default-off",
    ),
    case(
        "analytics",
        "set default_transaction_read_only = 'of'",
        "statements",
        "default_transaction_read_only",
        "set-default-of-prefix",
    ),
    case(
        "analytics",
        "set session characteristics as transaction read write",
        "statements",
        "default_transaction_read_only",
        "session-characteristics",
    ),
    case(
        "analytics",
        "select set_config('default_transaction_read_only', 'off', false)",
        "statements",
        "default_transaction_read_only",
        "set-config",
    ),
    case(
        "analytics",
        "select * from set_config('transaction_read_only', 'off', true)",
        "statements",
        "transaction_read_only",
        "set-config-in-from",
    ),
    case(
        "analytics",
        "select set_config('default_transaction_read_only', 'of' || 'f', false)",
        "settings.default_transaction_read_only",
        "default_transaction_read_only",
        "set-config-computed-value",
        sqlstate="22023",
    ),
    case(
        "analytics",
        "select set_config(name, 'off', false) from pg_settings "
        "where name = 'default_transaction_read_only'",
        "settings",
        "setting",
        "set-config-computed-name",
    ),
    case(
        "analytics",
        "set statement_timeout = 0",
        "timeouts.statement_timeout",
        "statement_timeout",
        "disable-statement-timeout",
    ),
    case(
        "analytics",
        "select set_config('statement_timeout', '1h', false)",
        "timeouts.statement_timeout",
        "statement_timeout",
        "raise-statement-timeout",
    ),
    case(
        "support",
        "set idle_in_transaction_session_timeout = 0",
        "timeouts.idle_in_transaction_timeout",
        "idle_in_transaction_session_timeout",
        "disable-idle-timeout",
    ),
]


@pytest.mark.parametrize(CASE, READ_WRITE)
def test_read_only_and_timeouts_cannot_be_turned_off(
    proxy, shop_db, kind, sql, rule, obj, sqlstate
) -> None:
    assert_denied(proxy, shop_db, kind, sql, rule, obj, sqlstate)


def test_after_those_attempts_the_session_is_still_read_only_and_limited(proxy, shop_db) -> None:
    before = snapshot(shop_db)
    with RawAgent(proxy.port, ANALYTICS) as agent:
        for sql in (
            "set default_transaction_read_only = off",
            "select set_config('default_transaction_read_only', 'off', false)",
            "set statement_timeout = 0",
            # allowed: they return to the policy's values, never below them
            "reset default_transaction_read_only",
            "reset statement_timeout",
            "reset all",
            "discard all",
        ):
            agent.query(sql)
        assert agent.scalar("show default_transaction_read_only") == "on"
        assert agent.scalar("show statement_timeout") == "5s"
        begin = agent.query("begin")
        assert not begin.errors
        assert agent.scalar("show transaction_read_only") == "on"
        assert agent.scalar("select current_user") == "guard_analytics"
        agent.query("rollback")
    assert snapshot(shop_db) == before


STARTUP = [
    pytest.param(
        "analytics",
        {"client_encoding": "SJIS"},
        "settings.client_encoding",
        "client_encoding",
        id="startup-client-encoding-sjis",
    ),
    pytest.param(
        "support",
        {"options": "-c standard_conforming_strings=off"},
        "settings.standard_conforming_strings",
        "standard_conforming_strings",
        id="options-non-standard-strings",
    ),
    pytest.param(
        "analytics",
        {"options": "-c default_transaction_read_only=off"},
        "statements",
        "default_transaction_read_only",
        id="options-read-only-off",
    ),
    pytest.param(
        "analytics",
        {"options": "-c default_transaction_read_only=on -c default_transaction_read_only=off"},
        "statements",
        "default_transaction_read_only",
        id="options-last-one-wins",
    ),
    pytest.param(
        "analytics",
        {"options": "-c transaction_read_only=off"},
        "statements",
        "transaction_read_only",
        id="options-transaction-read-only",
    ),
    pytest.param(
        "analytics",
        {"default_transaction_read_only": "off"},
        "statements",
        "default_transaction_read_only",
        id="startup-parameter",
    ),
    pytest.param(
        "analytics",
        {"options": "-c statement_timeout=0"},
        "timeouts.statement_timeout",
        "statement_timeout",
        id="options-statement-timeout",
    ),
    pytest.param(
        "analytics", {"options": "-c role=app_owner"}, "settings.role", "role", id="options-role"
    ),
    pytest.param(
        "support",
        {"options": "--search_path=pg_temp,public"},
        "settings.search_path",
        "search_path",
        id="options-search-path",
    ),
    pytest.param(
        "analytics",
        {"options": "-c session_authorization=postgres"},
        "settings.session_authorization",
        "session_authorization",
        id="options-session-authorization",
    ),
]


@pytest.mark.parametrize(("kind", "params", "rule", "obj"), STARTUP)
def test_startup_parameters_cannot_loosen_the_policy(
    proxy, shop_db, kind, params, rule, obj
) -> None:
    agent = RawAgent(proxy.port, agent_id(kind), **params)
    try:
        err = agent.login.error
        assert err.get("S") == "FATAL", err
        assert err.get("C") == "42501", err
        assert_names(err.get("M", ""), kind, rule, obj)
        assert agent.login.status == "", "the login went on after the refusal"
    finally:
        agent.close()
    # libpq's own `options` parameter is refused the same way
    if "options" in params:
        with pytest.raises(psycopg.OperationalError) as exc:
            psycopg.connect(
                proxy.dsn(agent_id(kind)), options=params["options"], connect_timeout=10
            )
        assert f"(policy {kind}, {rule}" in str(exc.value)
    # and a plain session of the type is still limited
    with RawAgent(proxy.port, agent_id(kind)) as plain:
        assert plain.scalar("select current_user") == f"guard_{kind}"
        if kind == "analytics":
            assert plain.scalar("show default_transaction_read_only") == "on"
            assert plain.scalar("show statement_timeout") == "5s"


# Ways to write several ``-c`` switches in one options string that a reader splitting on
# ASCII whitespace with shell-like quoting sees as one harmless application_name, and
# a reader splitting on any whitespace (Postgres' isspace, Python's str.split) does not.
OPTION_TRICKS = [
    pytest.param("\x0c", id="form-feed"),
    pytest.param("\x0b", id="vertical-tab"),
    pytest.param("\u00a0", id="no-break-space"),
    pytest.param("quote", id="backslash-quote"),
]


def options_with(trick: str, settings: list[str]) -> str:
    if trick == "quote":
        return (
            "-c application_name=a\\' "
            + " ".join(f"-c {s}" for s in settings)
            + (" -c application_name=b\\'")
        )
    return trick.join(["-c application_name=report", *(f"-c{trick}{s}" for s in settings)])


def login_or_refusal(port: int, agent: str, options: str) -> RawAgent | None:
    """A session with these startup options, or None if the proxy refused it (FATAL 42501)."""
    client = RawAgent(port, agent, options=options)
    if client.login.errors:
        err = client.login.errors[0]
        client.close()
        assert err.get("S") == "FATAL" and err.get("C") == "42501", err
        return None
    return client


@pytest.mark.parametrize("trick", OPTION_TRICKS)
def test_startup_options_are_judged_as_they_are_applied(small_pools, shop_db, trick) -> None:
    """The options string is split once for judging and once for applying: both must
    agree, whatever the whitespace between the switches."""
    options = options_with(
        trick, ["statement_timeout=0", "default_transaction_read_only=off", "role=app_owner"]
    )
    limited = ("guard_analytics", "5s", "on")
    probe = (
        "select current_user, current_setting('statement_timeout'), "
        "current_setting('default_transaction_read_only')"
    )
    seen = {}
    client = login_or_refusal(small_pools.port, ANALYTICS, options)
    if client is not None:
        with client:
            seen["the session itself"] = tuple(client.query(probe).rows[0])
    # analytics has one server connection here: a clean session gets the same one
    with RawAgent(small_pools.port, "analytics-clean") as clean:
        seen["the next session on that server"] = tuple(clean.query(probe).rows[0])
    assert seen == dict.fromkeys(seen, limited)


@pytest.mark.parametrize("trick", OPTION_TRICKS)
def test_client_encoding_cannot_be_changed_to_hide_a_statement(proxy, shop_db, trick) -> None:
    """In SJIS, 0x95 0x5c is one character: a backslash the proxy reads as escaping a quote
    would end the string on the server, and what follows would run unjudged."""
    before = snapshot(shop_db)
    options = options_with(trick, ["client_encoding=SJIS"])
    client = login_or_refusal(proxy.port, SUPPORT, options)
    if client is not None:
        with client:
            reply = client.send(
                b"Q",
                b"select E'\x95\\'; update orders set fulfillment_status = $$cancelled$$; --'\x00",
            )
            assert "UPDATE" not in " ".join(reply.tags), reply
    assert snapshot(shop_db) == before


@pytest.mark.parametrize("trick", OPTION_TRICKS)
def test_read_only_agent_cannot_reach_payments_through_startup_options(
    proxy, shop_db, trick
) -> None:
    """The two above together: analytics as the tables' owner, in SJIS, read-write."""
    before = snapshot(shop_db)
    options = options_with(
        trick, ["client_encoding=SJIS", "role=app_owner", "default_transaction_read_only=off"]
    )
    client = login_or_refusal(proxy.port, ANALYTICS, options)
    if client is not None:
        with client:
            reply = client.send(
                b"Q",
                b"set application_name = E'\x95\\'; select card_last4, amount from payments; "
                b"delete from payments where id = 4; --'\x00",
            )
            assert_no_secret(reply.text)
            assert "DELETE" not in " ".join(reply.tags), reply
    assert snapshot(shop_db) == before


# ---------------------------------------------------------------- writable CTEs

WRITABLE_CTE = [
    case(
        "analytics",
        "with d as (delete from orders where id = 6 returning *) select count(*) from d",
        "statements",
        "orders",
        "analytics-delete",
    ),
    case(
        "support",
        "with p as (delete from payments where id = 4 returning card_last4) select * from p",
        "tables",
        "payments",
        "support-delete-payments",
    ),
    case(
        "support",
        "with u as (update orders set requires_signature = true where id = 4 returning id) "
        "select id from u",
        "tables.orders.update_columns",
        "requires_signature",
        "support-update-other-column",
    ),
    case(
        "fulfillment",
        "with i as (insert into order_state_log (order_id, new_status, changed_by) "
        "values (1, 'x', 'y') returning id) select * from i",
        "tables",
        "order_state_log",
        "fulfillment-insert",
    ),
    case(
        "support",
        "with x as (select 1), d as (delete from orders returning id) select * from x",
        "require_where",
        "orders",
        "support-delete-all-unused-cte",
    ),
    case(
        "analytics",
        "with recursive r(n) as (select 1 union all select n + 1 from r where n < 3), "
        "d as (update orders set fulfillment_status = 'cancelled' where id in (select n from r) "
        "returning id) select * from d",
        "statements",
        "orders",
        "analytics-recursive-update",
    ),
]


@pytest.mark.parametrize(CASE, WRITABLE_CTE)
def test_writable_ctes_are_writes(proxy, shop_db, kind, sql, rule, obj, sqlstate) -> None:
    assert_denied(proxy, shop_db, kind, sql, rule, obj, sqlstate)


# ---------------------------------------------------------------- EXPLAIN ANALYZE

EXPLAIN_ANALYZE = [
    case(
        "analytics",
        "explain analyze delete from orders where id = 6",
        "statements",
        "orders",
        "analytics-delete",
    ),
    case(
        "analytics",
        "explain (analyze, buffers, format json) update orders set fulfillment_status = 'cancelled' "
        "where id = 4",
        "statements",
        "orders",
        "analytics-update-json",
    ),
    case(
        "support",
        "explain (analyze) update payments set amount = 0 where id = 1",
        "tables",
        "payments",
        "support-payments",
    ),
    case(
        "fulfillment",
        "explain analyze delete from orders where id = 6",
        "tables.orders.ops",
        "orders",
        "fulfillment-delete",
    ),
    case(
        "support",
        "explain analyze insert into order_state_log select * from order_state_log",
        "tables.order_state_log.insert_columns",
        "order_state_log",
        "support-insert-without-columns",
    ),
    case(
        "support",
        "explain analyze select card_last4 from payments",
        "tables",
        "payments",
        "support-read-payments",
    ),
]


@pytest.mark.parametrize(CASE, EXPLAIN_ANALYZE)
def test_explain_analyze_is_judged_as_what_it_runs(
    proxy, shop_db, kind, sql, rule, obj, sqlstate
) -> None:
    assert_denied(proxy, shop_db, kind, sql, rule, obj, sqlstate)


# ---------------------------------------------------------------- side-effect functions

FUNCTIONS = [
    case(
        "analytics", "select pg_read_file('/etc/passwd')", "functions", "pg_read_file", "read-file"
    ),
    case(
        "analytics",
        "select * from pg_read_file('/etc/passwd') as f",
        "functions",
        "pg_read_file",
        "read-file-in-from",
    ),
    case(
        "analytics",
        "select pg_catalog.pg_read_binary_file('/etc/passwd')",
        "functions",
        "pg_read_binary_file",
        "read-binary-file-qualified",
    ),
    case(
        "analytics",
        "select \"pg_read_file\"('/etc/passwd')",
        "functions",
        "pg_read_file",
        "read-file-quoted",
    ),
    case(
        "analytics",
        "select U&\"pg\\005fread\\005ffile\"('/etc/passwd')",
        "functions",
        "pg_read_file",
        "read-file-unicode-name",
    ),
    case("analytics", "select * from pg_ls_dir('.')", "functions", "pg_ls_dir", "ls-dir"),
    case("support", "select lo_import('/etc/passwd')", "functions", "lo_import", "lo-import"),
    case(
        "support",
        f"select lo_export(lo_from_bytea(0, 'x'), '{LO_FILE}')",
        "functions",
        "lo_",
        "lo-export",
    ),
    case(
        "analytics",
        "select pg_terminate_backend(pid) from pg_locks where pid <> pg_backend_pid()",
        "functions",
        "pg_terminate_backend",
        "terminate-backends",
    ),
    case(
        "analytics",
        "select id from orders where id = (select pg_cancel_backend(pg_backend_pid())::int)",
        "functions",
        "pg_cancel_backend",
        "cancel-in-subquery",
    ),
    case("analytics", "select nextval('orders_id_seq')", "functions", "nextval", "nextval"),
    case(
        "analytics",
        "with s as (select nextval('customers_id_seq') as n) select n from s",
        "functions",
        "nextval",
        "nextval-in-cte",
    ),
    case("support", "select setval('orders_id_seq', 1)", "functions", "setval", "setval"),
    case("analytics", "select pg_sleep(1)", "functions", "pg_sleep", "sleep"),
    case(
        "analytics",
        "select o.id from orders o, lateral (select pg_sleep(1)) s where o.id = 1",
        "functions",
        "pg_sleep",
        "sleep-in-lateral",
    ),
    case("analytics", "select pg_sleep_for('1 second')", "functions", "pg_sleep_for", "sleep-for"),
    case("support", "select pg_notify('orders', 'x')", "functions", "pg_notify", "notify"),
    case(
        "analytics",
        "select dblink_exec('dbname=shop', 'delete from orders')",
        "functions",
        "dblink_exec",
        "dblink-exec",
    ),
    case(
        "analytics",
        "select * from dblink('dbname=shop', 'select card_last4 from payments') as t(card text)",
        "functions",
        "dblink",
        "dblink-in-from",
    ),
    case(
        "analytics",
        "select query_to_xml('select card_last4 from payments', true, false, '')",
        "functions",
        "query_to_xml",
        "sql-in-a-string",
    ),
    case(
        "support",
        "select table_to_xml('payments', true, false, '')",
        "functions",
        "table_to_xml",
        "table-to-xml",
    ),
    case("support", "select pg_reload_conf()", "functions", "pg_reload_conf", "reload-conf"),
    case("analytics", "select pg_stat_reset()", "functions", "pg_stat_reset", "stat-reset"),
    case(
        "analytics",
        "select * from rows from (pg_read_file('/etc/passwd'), generate_series(1, 2))",
        "functions",
        "pg_read_file",
        "rows-from",
    ),
    case(
        "analytics",
        "select row_number() over (partition by pg_read_file('/etc/passwd')) from orders",
        "functions",
        "pg_read_file",
        "window-partition",
    ),
    case(
        "support",
        "update orders set fulfillment_status = 'packed' where id = 4 "
        "returning pg_read_file('/etc/passwd')",
        "functions",
        "pg_read_file",
        "returning",
    ),
    case(
        "support",
        "insert into order_state_log (order_id, new_status, changed_by) "
        "values (nextval('orders_id_seq'), 'x', 'y')",
        "functions",
        "nextval",
        "insert-values",
    ),
    case(
        "support",
        "copy order_state_log (order_id, new_status, changed_by) from stdin "
        "where pg_read_file('/etc/passwd') is not null",
        "functions",
        "pg_read_file",
        "copy-from-where",
    ),
]


@pytest.mark.parametrize(CASE, FUNCTIONS)
def test_side_effect_functions_anywhere(proxy, shop_db, kind, sql, rule, obj, sqlstate) -> None:
    reply = assert_denied(proxy, shop_db, kind, sql, rule, obj, sqlstate)
    assert "root:" not in reply.text  # /etc/passwd
    assert not LO_FILE.exists()


def test_terminate_backend_of_another_agent_does_not_happen(proxy, shop_db) -> None:
    with (
        RawAgent(proxy.port, "analytics-victim") as victim,
        RawAgent(proxy.port, ANALYTICS) as attacker,
    ):
        assert not victim.query("begin").errors
        pid = victim.scalar("select pg_backend_pid()")
        for sql in (
            f"select pg_terminate_backend({pid})",
            f"select pg_cancel_backend({pid})",
            f"select * from pg_terminate_backend({pid}) t",
        ):
            reply = attacker.query(sql)
            check_denial(reply, "42501", "analytics", "functions", "_backend")
        # the victim's transaction and server connection are untouched
        assert victim.scalar("select pg_backend_pid()") == pid
        assert victim.query("commit").tags == ["COMMIT"]
    alive = shop_db.psql(f"select count(*) from pg_stat_activity where pid = {pid}", dbname="shop")
    assert alive == "1"


def test_notify_reaches_no_listener(proxy, shop_db) -> None:
    with psycopg.connect(shop_db.dsn(user="postgres", dbname="shop"), autocommit=True) as listener:
        listener.execute("LISTEN orders")
        with RawAgent(proxy.port, SUPPORT) as agent:
            check_denial(
                agent.query("select pg_notify('orders', 'refund everything')"),
                "42501",
                "support",
                "functions",
                "pg_notify",
            )
            check_denial(
                agent.query("NOTIFY orders, 'refund everything'"),
                "42501",
                "support",
                "statements",
                "NOTIFY",
            )
            check_denial(agent.query("LISTEN orders"), "42501", "support", "statements", "LISTEN")
        got = list(listener.notifies(timeout=1.0, stop_after=1))
        assert got == []


def test_user_defined_code_is_not_run(proxy, shop_db) -> None:
    """A SECURITY DEFINER procedure and function that would empty payments as app_owner."""
    shop_db.psql(
        "CREATE PROCEDURE public.gp_purge_payments() LANGUAGE sql SECURITY DEFINER "
        "AS $$ DELETE FROM payments $$;"
        "CREATE FUNCTION public.gp_purge_payments_fn() RETURNS bigint LANGUAGE sql SECURITY DEFINER "
        "AS $$ WITH d AS (DELETE FROM payments RETURNING 1) SELECT count(*) FROM d $$;",
        user="app_owner",
        dbname="shop",
    )
    try:
        assert_denied(proxy, shop_db, "support", "CALL gp_purge_payments()", "statements", "CALL")
        assert_denied(
            proxy, shop_db, "support", "call public.gp_purge_payments()", "statements", "CALL"
        )
        assert_denied(
            proxy,
            shop_db,
            "support",
            "select gp_purge_payments_fn()",
            "functions.default",
            "gp_purge_payments_fn",
        )
        assert_denied(
            proxy,
            shop_db,
            "support",
            "select * from public.gp_purge_payments_fn()",
            "functions.default",
            "gp_purge_payments_fn",
        )
        assert_denied(
            proxy,
            shop_db,
            "fulfillment",
            "update orders set tracking_number = gp_purge_payments_fn()::text where id = 3",
            "functions.default",
            "gp_purge_payments_fn",
        )
    finally:
        shop_db.psql(
            "DROP PROCEDURE public.gp_purge_payments(); DROP FUNCTION public.gp_purge_payments_fn()",
            dbname="shop",
        )
    assert len(shop.table_rows(shop_db, "payments")) == 4


# ---------------------------------------------------------------- COPY, DO

COPY_AND_CODE = [
    case(
        "support",
        f"copy orders to program 'touch {MARKER}'",
        "statements",
        "COPY",
        "copy-to-program",
    ),
    case(
        "support",
        "copy order_state_log (order_id, new_status, changed_by) from program 'echo 1,x,y'",
        "statements",
        "COPY",
        "copy-from-program",
    ),
    case(
        "support",
        f"copy (select id from orders) to '{COPY_FILE}'",
        "statements",
        "COPY",
        "copy-to-file",
    ),
    case(
        "support",
        "copy order_state_log from '/etc/passwd'",
        "statements",
        "COPY",
        "copy-from-file",
    ),
    case(
        "support",
        "copy (select card_last4 from payments) to stdout",
        "tables",
        "payments",
        "copy-payments-to-stdout",
    ),
    case(
        "analytics",
        "copy customers to stdout",
        "tables.customers.deny_columns",
        "customers",
        "copy-customers-with-email",
    ),
    case(
        "analytics",
        "copy customers (id, email) to stdout",
        "tables.customers.deny_columns",
        "customers.email",
        "copy-email-column",
    ),
    case("analytics", "copy orders from stdin", "statements", "orders", "analytics-copy-in"),
    case(
        "fulfillment",
        "copy orders (customer_id) from stdin",
        "tables.orders.ops",
        "orders",
        "fulfillment-copy-in",
    ),
    case(
        "support",
        "do $$ begin delete from orders where id = 6; end $$",
        "statements",
        "DO",
        "do-delete",
    ),
    case(
        "support",
        "do $$ begin execute 'delete from pay' || 'ments'; end $$",
        "statements",
        "DO",
        "do-dynamic-sql",
    ),
    case(
        "analytics",
        "DO LANGUAGE plpgsql $x$ BEGIN PERFORM pg_sleep(0); END $x$",
        "statements",
        "DO",
        "analytics-do",
    ),
]


@pytest.mark.parametrize(CASE, COPY_AND_CODE)
def test_copy_program_files_and_code_blocks(proxy, shop_db, kind, sql, rule, obj, sqlstate) -> None:
    assert_denied(proxy, shop_db, kind, sql, rule, obj, sqlstate)
    for path in OUTSIDE_FILES:
        assert not path.exists(), f"{path} was created on the server's machine"


# ---------------------------------------------------------------- lexical tricks

LEXICAL = [
    case(
        "analytics",
        "DELETE/**/FROM/**/orders WHERE id = 6",
        "statements",
        "orders",
        "comments-between-keywords",
    ),
    case(
        "analytics",
        "/* select */ delete from orders where id = 6",
        "statements",
        "orders",
        "leading-comment",
    ),
    case(
        "analytics",
        "select 1 -- harmless\n; delete from orders where id = 6",
        "statements",
        "orders",
        "line-comment-then-stacked",
    ),
    case(
        "analytics",
        'select "email" from customers where id = 1',
        "tables.customers.deny_columns",
        "customers.email",
        "quoted-column",
    ),
    case(
        "analytics",
        'select U&"em\\0061il" from customers',
        "tables.customers.deny_columns",
        "customers.email",
        "unicode-column",
    ),
    case(
        "analytics",
        "select U&\"!0065mail\" UESCAPE '!' from customers",
        "tables.customers.deny_columns",
        "customers.email",
        "unicode-uescape-column",
    ),
    case(
        "analytics",
        'select card_last4 from "payments"',
        "tables",
        "payments",
        "quoted-table",
    ),
    case(
        "analytics",
        'select card_last4 from U&"p\\0061yments"',
        "tables",
        "payments",
        "unicode-table",
    ),
    case("analytics", "select card_last4 from PAYMENTS", "tables", "payments", "upper-case-table"),
    case(
        "analytics",
        "select CARD_LAST4 from PUBLIC.Payments",
        "tables",
        "payments",
        "schema-qualified-mixed-case",
    ),
    case(
        "analytics",
        'select card_last4 from "public"."payments"',
        "tables",
        "payments",
        "schema-qualified-quoted",
    ),
    case(
        "analytics",
        "select card_last4 from shop.public.payments",
        "tables",
        "payments",
        "catalog-qualified",
    ),
    case(
        "support",
        "select amount from public.payments where id = 1",
        "tables",
        "payments",
        "support-schema-qualified",
    ),
    case(
        "analytics",
        "select $$;$$ as x; delete from orders where id = 6",
        "statements",
        "orders",
        "dollar-quote-then-stacked",
    ),
    case(
        "analytics",
        "select $a$ $$ $a$; delete from orders where id = 6; select $b$;$b$",
        "statements",
        "orders",
        "nested-dollar-tags",
    ),
    case(
        "analytics",
        "select '\\'; delete from orders where id = 6; --'",
        "statements",
        "orders",
        "backslash-in-standard-string",
    ),
    case(
        "analytics",
        "select e'\\''; delete from orders where id = 6; --'",
        "statements",
        "orders",
        "escape-string-quote",
    ),
    case(
        "analytics",
        "select x from customers as c(a, b, x)",
        "tables.customers.deny_columns",
        "customers.email",
        "column-alias-list",
    ),
    case(
        "analytics",
        "select id from customers where email like 'a%'",
        "tables.customers.deny_columns",
        "customers.email",
        "email-in-where",
    ),
    case(
        "analytics",
        "select id from customers order by email",
        "tables.customers.deny_columns",
        "customers.email",
        "email-in-order-by",
    ),
    case(
        "analytics",
        "select string_agg(lower(email), ',') from customers",
        "tables.customers.deny_columns",
        "customers.email",
        "email-in-function",
    ),
    case(
        "analytics",
        "select c from customers c",
        "tables.customers.deny_columns",
        "customers",
        "whole-row",
    ),
    case(
        "analytics",
        "select row_to_json(c) from customers c",
        "tables.customers.deny_columns",
        "customers",
        "row-to-json",
    ),
    case(
        "analytics",
        "select (c).email from customers c",
        "tables.customers.deny_columns",
        "customers",
        "field-of-whole-row",
    ),
    case(
        "analytics", "table customers", "tables.customers.deny_columns", "customers", "table-stmt"
    ),
    case(
        "analytics",
        "select * from customers",
        "tables.customers.deny_columns",
        "customers",
        "star",
    ),
    case(
        "analytics",
        "with customers as (select * from customers) select email from customers",
        "tables.customers.deny_columns",
        "customers",
        "cte-named-like-the-table",
    ),
    case(
        "analytics",
        "select email from (select * from customers) s",
        "tables.customers.deny_columns",
        "customers",
        "star-in-subquery",
    ),
    case(
        "analytics",
        "select o.id, p.card_last4 from orders o left join payments p on p.order_id = o.id",
        "tables",
        "payments",
        "payments-in-outer-join",
    ),
    case(
        "fulfillment",
        "select id from orders where customer_id in (select id from customers where name like 'A%')",
        "tables",
        "customers",
        "fulfillment-customers-in-subquery",
    ),
    case(
        "analytics",
        "declare c cursor for select card_last4 from payments",
        "tables",
        "payments",
        "cursor",
    ),
]


@pytest.mark.parametrize(CASE, LEXICAL)
def test_lexical_tricks_and_hidden_reads(proxy, shop_db, kind, sql, rule, obj, sqlstate) -> None:
    assert_denied(proxy, shop_db, kind, sql, rule, obj, sqlstate)


def test_a_dollar_quoted_string_with_a_semicolon_is_just_a_string(proxy, shop_db) -> None:
    before = snapshot(shop_db)
    with RawAgent(proxy.port, ANALYTICS) as agent:
        reply = agent.query("select $tag$ x; delete from orders where id = 6; $tag$ as s")
        assert not reply.errors, reply.errors
        assert reply.rows == [[" x; delete from orders where id = 6; "]]
    assert snapshot(shop_db) == before


def test_a_comment_inside_a_keyword_is_a_syntax_error_as_in_postgres(proxy, shop_db) -> None:
    reply, before, after = attempt(proxy, shop_db, "support", "DEL/**/ETE FROM orders WHERE id = 6")
    assert reply.error["C"] == "42601", reply.error
    assert "syntax error" in reply.error["M"]
    assert reply.tags == []
    assert after == before


@pytest.mark.parametrize(
    "sql",
    [
        "selec id from orders",
        "select from from",
        "select 'unterminated",
        "select 1; delete from",
        "delete from orders where id = 6; selec 1",
        "select $$ never closed",
    ],
)
def test_unparseable_sql_is_denied_with_42601(proxy, shop_db, sql) -> None:
    reply, before, after = attempt(proxy, shop_db, "analytics", sql)
    assert reply.error["C"] == "42601", reply.error
    assert reply.tags == [] and reply.rows == []
    assert after == before


# ---------------------------------------------------------------- PREPARE / EXECUTE


def test_sql_prepare_of_a_denied_statement_cannot_be_executed_later(proxy, shop_db) -> None:
    before = snapshot(shop_db)
    with RawAgent(proxy.port, ANALYTICS) as agent:
        check_denial(
            agent.query("PREPARE p AS DELETE FROM orders WHERE id = $1"),
            "42501",
            "analytics",
            "statements",
            "orders",
        )
        for _ in range(3):
            reply = agent.query("EXECUTE p(6)")
            assert reply.error["C"] == "26000", reply.error
            assert_names(reply.error["M"], "analytics", "prepared statements", "p")
        reply = agent.query("explain analyze execute p(6)")
        assert reply.errors and reply.tags == []
    assert snapshot(shop_db) == before


def test_sql_prepare_replaced_after_deallocate_is_judged_again(proxy, shop_db) -> None:
    with RawAgent(proxy.port, ANALYTICS) as agent:
        assert not agent.query("PREPARE q AS SELECT id FROM orders WHERE id = $1").errors
        assert agent.query("EXECUTE q(1)").rows == [["1"]]
        assert agent.query("DEALLOCATE q").tags == ["DEALLOCATE"]
        check_denial(
            agent.query("PREPARE q AS SELECT email FROM customers WHERE id = $1"),
            "42501",
            "analytics",
            "tables.customers.deny_columns",
            "customers.email",
        )
        reply = agent.query("EXECUTE q(1)")
        assert reply.error["C"] == "26000", reply.error
        assert reply.rows == []
        assert_no_secret(reply.text)
        # one message with both: refused whole (each must be a message of its own), so
        # the DEALLOCATE before the PREPARE does not happen either
        assert not agent.query("PREPARE s AS SELECT id FROM orders WHERE id = 2").errors
        reply = agent.query("DEALLOCATE s; PREPARE s AS SELECT email FROM customers")
        check_denial(reply, "0A000", "analytics", "prepared statements", "DEALLOCATE")
        assert agent.query("EXECUTE s").rows == [["2"]]


def test_execute_of_a_statement_prepared_by_another_session(proxy, shop_db) -> None:
    before = snapshot(shop_db)
    with RawAgent(proxy.port, SUPPORT) as owner, RawAgent(proxy.port, "support-2") as other:
        assert not owner.query("PREPARE purge AS DELETE FROM orders WHERE id = $1").errors
        for agent, kind in ((other, "support"),):
            reply = agent.query("EXECUTE purge(6)")
            assert reply.error["C"] == "26000", reply.error
            assert_names(reply.error["M"], kind, "prepared statements", "purge")
        with RawAgent(proxy.port, ANALYTICS) as analytics:
            reply = analytics.query("EXECUTE purge(6)")
            assert reply.error["C"] == "26000", reply.error
    assert snapshot(shop_db) == before


def test_a_support_statement_cannot_be_bound_by_analytics(small_pools, shop_db) -> None:
    """Statements prepared on the servers of one agent type are out of reach of another."""
    proxy = small_pools
    before = snapshot(shop_db)
    with proxy.connect(SUPPORT, autocommit=True) as support:
        with support.transaction():
            support.execute("delete from orders where id = %s", [999], prepare=True)
            # the server-side names the proxy gave support's statements on this server
            names = [
                r[0]
                for r in support.execute(
                    "select name from pg_prepared_statements where not from_sql"
                )
            ]
        assert names, (
            "support's statement was not prepared on its server",
            support.execute("select name, statement from pg_prepared_statements").fetchall(),
        )
        with proxy.connect(ANALYTICS, autocommit=True) as analytics:
            for name in names:
                for _ in range(2):
                    res = analytics.pgconn.exec_prepared(name.encode(), [b"6"])
                    assert res.status == ExecStatus.FATAL_ERROR, res.status
                    sqlstate = res.error_field(psycopg.pq.DiagnosticField.SQLSTATE)
                    assert sqlstate == b"26000", (name, res.error_message)
                with pytest.raises(psycopg.Error) as exc:
                    analytics.execute(f"EXECUTE {name}(6)")
                assert exc.value.sqlstate == "26000"
    assert snapshot(shop_db) == before


# ---------------------------------------------------------------- extended protocol across servers


@pytest.fixture(scope="module")
def small_pools(shop_db, tmp_path_factory) -> Iterator[ShopProxy]:
    """The example policies with one server connection for analytics and two for support,
    and pg_prepared_statements readable (it is not by default) so that the tests can
    find the server-side names of other agents' statements, as an attacker would try to."""
    directory = tmp_path_factory.mktemp("small-pools") / "policies"
    directory.mkdir()
    for source in POLICIES.glob("*.yaml"):
        doc = yaml.safe_load(source.read_text())
        doc["tables"]["pg_catalog.pg_prepared_statements"] = {"ops": ["select"]}
        if doc["upstream_role"] == "guard_analytics":
            doc["limits"]["max_server_connections"] = 1
        elif doc["upstream_role"] == "guard_support":
            doc["limits"]["max_server_connections"] = 2
        (directory / source.name).write_text(yaml.safe_dump(doc))
    log = directory.parent / "guardproxy.log"
    with launch_proxy(shop_db, log, policies=directory) as handle:
        yield handle


def _pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("select pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def test_denied_parse_stays_denied_on_a_shared_server(small_pools, shop_db) -> None:
    """Two analytics agents on one server connection: one prepares an allowed statement,
    the other a denied one; Parse is judged once, Bind/Execute many times."""
    before = snapshot(shop_db)
    with (
        small_pools.connect("analytics-a", autocommit=True) as a,
        small_pools.connect("analytics-b", autocommit=True) as b,
    ):
        pids = set()
        for _ in range(3):
            with a.transaction():
                pids.add(_pid(a))
                rows = a.execute(
                    "select id, name from customers where id = %s", [1], prepare=True
                ).fetchall()
                assert rows == [(1, "Ada Lovelace")]
            with b.transaction():
                pids.add(_pid(b))
            with pytest.raises(errors.InsufficientPrivilege) as exc:
                b.execute("select email from customers where id = %s", [1], prepare=True)
            assert_names(
                str(exc.value), "analytics", "tables.customers.deny_columns", "customers.email"
            )
            assert_no_secret(str(exc.value) + str(exc.value.diag.message_hint))
        assert len(pids) == 1, f"expected one shared server connection, saw {pids}"
        # low level: a denied Parse, then Bind/Execute of that name, again and again
        res = b.pgconn.prepare(b"steal", b"select email from customers where id = $1")
        assert res.status == ExecStatus.FATAL_ERROR
        assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"42501"
        for _ in range(3):
            assert b.pgconn.exec_(b"BEGIN").status == ExecStatus.COMMAND_OK
            res = b.pgconn.exec_prepared(b"steal", [b"1"])
            assert res.status == ExecStatus.FATAL_ERROR
            assert res.ntuples == 0
            assert_no_secret((res.error_message or b"").decode(errors="replace"))
            assert b.pgconn.transaction_status == psycopg.pq.TransactionStatus.INERROR
            assert b.pgconn.exec_(b"ROLLBACK").status == ExecStatus.COMMAND_OK
            # a's statement names are a's: b cannot bind them either
            res = b.pgconn.exec_prepared(b"_pg3_0", [b"1"])
            assert res.status == ExecStatus.FATAL_ERROR
            assert res.ntuples == 0
        # and a's prepared statement keeps working on the same server
        assert a.execute(
            "select id, name from customers where id = %s", [2], prepare=True
        ).fetchall() == [(2, "Grace Hopper")]
    assert snapshot(shop_db) == before


def test_an_agent_cannot_run_a_statement_another_agent_prepared(small_pools, shop_db) -> None:
    """On a shared server connection, a client runs only the statements it prepared
    itself, as with Postgres directly: a statement judged for another agent's session
    (its context, its row filters) is not reachable by its server-side name."""
    with (
        small_pools.connect("analytics-a", autocommit=True) as a,
        small_pools.connect("analytics-b", autocommit=True) as b,
    ):
        a.execute(
            "/* task='T-a',principals='42' */ select id, name from customers where id = %s",
            [1],
            prepare=True,
        )
        names = [
            r[0] for r in b.execute("select name from pg_prepared_statements where not from_sql")
        ]
        assert names, "a's statement is not on the shared server connection"
        for name in names:
            res = b.pgconn.exec_prepared(name.encode(), [b"2"])
            assert res.status == ExecStatus.FATAL_ERROR, (name, res.status, res.ntuples)
            assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"26000"
        assert a.execute(
            "/* task='T-a',principals='42' */ select id, name from customers where id = %s",
            [3],
            prepare=True,
        ).fetchall() == [(3, "Edsger Dijkstra")]


def test_prepared_statements_follow_the_client_to_every_server(small_pools, shop_db) -> None:
    """support has two server connections; its prepared statements (allowed and denied)
    behave the same on both."""
    with (
        small_pools.connect("support-a", autocommit=True) as a,
        small_pools.connect("support-b", autocommit=True) as holder,
    ):
        pids = []
        statuses = ["packed", "shipped", "delivered", "returned"]
        for i, status in enumerate(statuses):
            hold = i % 2 == 1
            if hold:  # the other agent holds a server, so a runs on the other one
                holder.execute("BEGIN")
                _pid(holder)
            with a.transaction():
                pids.append(_pid(a))
                cur = a.execute(
                    "update orders set fulfillment_status = %s where id = %s",
                    [status, 4],
                    prepare=True,
                )
                assert cur.rowcount == 1
            with pytest.raises(errors.InsufficientPrivilege) as exc:
                a.execute(
                    "update orders set requires_signature = %s where id = %s",
                    [True, 4],
                    prepare=True,
                )
            assert_names(
                str(exc.value),
                "support",
                "tables.orders.update_columns",
                "orders.requires_signature",
            )
            if hold:
                holder.execute("COMMIT")
            got = shop_db.psql(
                "select fulfillment_status || ',' || requires_signature from orders where id = 4",
                dbname="shop",
            )
            assert got == f"{status},false"
        assert len(set(pids)) == 2, f"expected runs on two server connections, saw {pids}"


def test_a_denial_in_a_pipeline_rolls_back_what_came_before_it(proxy, shop_db) -> None:
    """Statements up to a Sync form one implicit transaction: a denied one takes the
    earlier ones down with it and skips the later ones, as a Postgres error would."""
    before = snapshot(shop_db)
    with proxy.connect(SUPPORT, autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege) as exc, conn.pipeline():
            conn.execute("update orders set fulfillment_status = %s where id = %s", ["packed", 4])
            conn.execute("delete from payments where id = %s", [4])
            conn.execute(
                "insert into order_state_log (order_id, new_status, changed_by) values (%s, %s, %s)",
                [4, "packed", SUPPORT],
            )
        assert_names(str(exc.value), "support", "tables", "payments")
        with pytest.raises(errors.InsufficientPrivilege), conn.pipeline():
            conn.execute("select card_last4 from payments where id = %s", [1])
            conn.execute("update orders set fulfillment_status = %s where id = %s", ["packed", 5])
        assert conn.execute("select count(*) from orders").fetchone() == (6,)
    after = snapshot(shop_db)
    for table in shop.TABLES:
        assert after[table] == before[table], table


def test_the_function_call_message_is_refused(proxy, shop_db) -> None:
    """The legacy FunctionCall message calls any function by oid, around any SQL text."""
    oids = shop_db.psql(
        "select 'pg_catalog.pg_read_file(text)'::regprocedure::oid || ',' || "
        "'pg_catalog.lo_import(text)'::regprocedure::oid",
        dbname="shop",
    )
    before = snapshot(shop_db)
    for oid in (int(x) for x in oids.split(",")):
        with RawAgent(proxy.port, SUPPORT) as agent:
            arg = b"/etc/passwd"
            payload = struct.pack("!ihhhi", oid, 1, 0, 1, len(arg)) + arg + struct.pack("!h", 0)
            reply = agent.send(b"F", payload)
            assert reply.errors, f"FunctionCall was answered without an error: {reply}"
            assert "root:" not in reply.text
    after = snapshot(shop_db)
    assert after == before


# ---------------------------------------------------------------- role and search_path

ROLE_AND_PATH = [
    case("analytics", "set role app_owner", "settings.role", "role", "set-role"),
    case("analytics", "set role none", "settings.role", "role", "set-role-none"),
    case("analytics", "set local role postgres", "settings.role", "role", "set-local-role"),
    case(
        "analytics",
        "set session authorization app_owner",
        "settings.session_authorization",
        "session_authorization",
        "session-authorization",
    ),
    case(
        "support",
        "select set_config('role', 'app_owner', false)",
        "settings.role",
        "role",
        "set-config-role",
    ),
    case(
        "analytics",
        "select set_config('session_authorization', 'postgres', false)",
        "settings.session_authorization",
        "session_authorization",
        "set-config-session-authorization",
    ),
    case(
        "support",
        "reset role; set role app_owner",
        "settings.role",
        "role",
        "reset-then-set-role",
    ),
    case(
        "support",
        "set search_path = pg_catalog, public",
        "settings.search_path",
        "search_path",
        "search-path",
    ),
    case(
        "analytics",
        "set search_path to evil, public",
        "settings.search_path",
        "search_path",
        "search-path-evil",
    ),
    case(
        "support",
        "select set_config('search_path', 'pg_temp, public', false)",
        "settings.search_path",
        "search_path",
        "set-config-search-path",
    ),
    case(
        "support",
        "set session_replication_role = replica",
        "settings.session_replication_role",
        "session_replication_role",
        "replication-role",
    ),
    case(
        "support",
        "set standard_conforming_strings = off",
        "settings.standard_conforming_strings",
        "standard_conforming_strings",
        "non-standard-strings",
    ),
    case(
        "support",
        "set client_encoding = 'SJIS'",
        "settings.client_encoding",
        "client_encoding",
        "client-encoding",
    ),
    case(
        "support",
        "create temp table customers (id int, email text)",
        "statements",
        "CREATE TABLE",
        "temp-table-shadowing",
    ),
    case("support", "create schema evil", "statements", "CREATE SCHEMA", "create-schema"),
]


@pytest.mark.parametrize(CASE, ROLE_AND_PATH)
def test_role_and_search_path_cannot_be_changed(
    proxy, shop_db, kind, sql, rule, obj, sqlstate
) -> None:
    assert_denied(proxy, shop_db, kind, sql, rule, obj, sqlstate)


def test_search_path_games_leave_names_resolved_as_before(proxy, shop_db) -> None:
    with RawAgent(proxy.port, ANALYTICS) as agent:
        path = agent.scalar("show search_path")
        check_denial(
            agent.query("set search_path = pg_catalog, public"),
            "42501",
            "analytics",
            "settings.search_path",
            "search_path",
        )
        check_denial(
            agent.query("select card_last4 from payments"),
            "42501",
            "analytics",
            "tables",
            "payments",
        )
        assert agent.scalar("show search_path") == path
        # the role cannot be left either: RESET and DISCARD return to the agent type's role
        for sql in (
            "reset role",
            "reset session authorization",
            "set session authorization default",
            "discard all",
        ):
            assert not agent.query(sql).errors
            assert agent.scalar("select current_user") == "guard_analytics"
            assert agent.scalar("show default_transaction_read_only") == "on"


# ---------------------------------------------------------------- planting later side effects

PLANTING = [
    case(
        "support",
        "create rule r as on insert to order_state_log do also delete from payments",
        "statements",
        "order_state_log",
        "rule",
    ),
    case(
        "support",
        "create function public.f() returns trigger language plpgsql as "
        "$$ begin delete from payments; return new; end $$",
        "statements",
        "CREATE FUNCTION",
        "function",
    ),
    case(
        "support",
        "create trigger t after insert on order_state_log for each row "
        "execute function suppress_redundant_updates_trigger()",
        "statements",
        "order_state_log",
        "trigger",
    ),
    case(
        "analytics",
        "create view v as select email from customers",
        "statements",
        "CREATE VIEW",
        "view",
    ),
    case(
        "support",
        "create or replace view open_orders as select id from orders",
        "statements",
        "CREATE VIEW",
        "view-of-allowed-table",
    ),
    case(
        "support",
        "create materialized view mv as select id from orders",
        "statements",
        "CREATE MATERIALIZED VIEW",
        "materialized-view",
    ),
    case("support", "select id into leaked from orders", "statements", "SELECT", "select-into"),
    case(
        "support",
        "create table leaked as select id, name from customers",
        "statements",
        "CREATE TABLE",
        "create-table-as",
    ),
    case(
        "support",
        "grant select on payments to guard_support",
        "statements",
        "payments",
        "grant",
    ),
    case(
        "support",
        "alter role guard_support set statement_timeout = 0",
        "statements",
        "ALTER ROLE",
        "alter-role",
    ),
    case("support", "alter table orders add column x int", "statements", "orders", "alter-table"),
    case("support", "create index on payments (card_last4)", "statements", "payments", "index"),
    case(
        "support",
        "alter default privileges grant select on tables to guard_support",
        "statements",
        "ALTER DEFAULT PRIVILEGES",
        "default-privileges",
    ),
]


@pytest.mark.parametrize(CASE, PLANTING)
def test_nothing_can_be_planted_for_later(proxy, shop_db, kind, sql, rule, obj, sqlstate) -> None:
    assert_denied(proxy, shop_db, kind, sql, rule, obj, sqlstate)


# ---------------------------------------------------------------- locks and resources

LOCKS = [
    case(
        "analytics",
        "select id from orders where id = 1 for update",
        "allow_locking",
        "FOR UPDATE",
        "for-update",
    ),
    case(
        "support",
        "select id from orders where id = 1 for no key update",
        "allow_locking",
        "FOR NO KEY UPDATE",
        "for-no-key-update",
    ),
    case(
        "support",
        "select id from orders where id = 1 for share",
        "allow_locking",
        "FOR SHARE",
        "for-share",
    ),
    case(
        "fulfillment",
        "select id from orders where id = 1 for key share nowait",
        "allow_locking",
        "FOR KEY SHARE",
        "for-key-share",
    ),
    case(
        "support",
        "select id from orders where id in (select id from orders where id = 1 for update)",
        "allow_locking",
        "FOR UPDATE",
        "for-update-in-subquery",
    ),
    case(
        "support",
        "lock table orders in access exclusive mode",
        "allow_locking",
        "orders",
        "lock-table",
    ),
    # LOCK without a mode takes ACCESS EXCLUSIVE: a write-class lock for a read-only type
    case("analytics", "lock orders", "statements", "orders", "analytics-lock"),
    case(
        "analytics",
        "lock table orders in access share mode",
        "allow_locking",
        "orders",
        "analytics-lock-access-share",
    ),
    case("analytics", "select pg_advisory_lock(42)", "functions", "pg_advisory_lock", "advisory"),
    case(
        "support",
        "select pg_try_advisory_lock(42)",
        "functions",
        "pg_try_advisory_lock",
        "try-advisory",
    ),
    case(
        "fulfillment",
        "select pg_advisory_xact_lock(42)",
        "functions",
        "pg_advisory_xact_lock",
        "advisory-xact",
    ),
]


@pytest.mark.parametrize(CASE, LOCKS)
def test_locks_are_denied(proxy, shop_db, kind, sql, rule, obj, sqlstate) -> None:
    assert_denied(proxy, shop_db, kind, sql, rule, obj, sqlstate)


def test_denied_locks_are_not_held(proxy, shop_db) -> None:
    """Attackers keep their sessions (and an open transaction) while a direct session
    takes every lock they tried to take."""
    with (
        RawAgent(proxy.port, SUPPORT) as table_locker,
        RawAgent(proxy.port, "support-2") as row_locker,
        RawAgent(proxy.port, ANALYTICS) as advisory,
    ):
        assert not table_locker.query("begin").errors
        check_denial(
            table_locker.query("lock table orders in access exclusive mode"),
            "42501",
            "support",
            "allow_locking",
            "orders",
        )
        assert not row_locker.query("begin").errors
        check_denial(
            row_locker.query("select id from orders where id = 1 for update"),
            "42501",
            "support",
            "allow_locking",
            "FOR UPDATE",
        )
        check_denial(
            advisory.query("select pg_advisory_lock(42)"),
            "42501",
            "analytics",
            "functions",
            "pg_advisory_lock",
        )
        with psycopg.connect(shop_db.dsn(user="postgres", dbname="shop")) as direct:
            direct.execute("SET lock_timeout = '3s'")
            direct.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
            direct.rollback()
            direct.execute("SET lock_timeout = '3s'")
            assert direct.execute(
                "select id from orders where id = 1 for update nowait"
            ).fetchall() == [(1,)]
            assert direct.execute("select pg_try_advisory_xact_lock(42)").fetchone() == (True,)
            held = direct.execute(
                "select count(*) from pg_locks l join pg_stat_activity a using (pid) "
                "where a.usename = 'app_owner' "
                "and (l.locktype = 'advisory' or l.relation = 'public.orders'::regclass) "
                "and a.pid <> pg_backend_pid()"
            ).fetchone()
            assert held == (0,)
            direct.rollback()
        table_locker.query("rollback")
        row_locker.query("rollback")


def test_a_huge_query_is_cut_by_the_policy_statement_timeout(proxy, shop_db) -> None:
    with RawAgent(proxy.port, ANALYTICS) as agent:
        reply = agent.query(
            "select count(*) from generate_series(1, 100000000000) a, orders o where o.id = 1"
        )
        assert reply.error["C"] == "57014", reply.error
        assert "statement_timeout" in reply.error["M"] and reply.error.get("H")
        assert agent.scalar("select 1") == "1"


REQUIRE_WHERE = [
    case(
        "support",
        "update orders set fulfillment_status = 'cancelled'",
        "require_where",
        "orders",
        "update-without-where",
    ),
    case(
        "support", "delete from orders where 1 = 1", "require_where", "orders", "delete-where-1-1"
    ),
    case(
        "fulfillment",
        "update orders set tracking_number = 'X' where true",
        "require_where",
        "orders",
        "update-where-true",
    ),
    case(
        "support",
        "merge into orders o using (select 1) s on true "
        "when matched then update set fulfillment_status = 'cancelled'",
        "require_where",
        "orders",
        "merge-on-true-update",
    ),
    case(
        "fulfillment",
        "merge into orders o using (select 1) s on true when matched then "
        "update set tracking_number = 'X'",
        "require_where",
        "orders",
        "fulfillment-merge-on-true",
    ),
]


@pytest.mark.parametrize(CASE, REQUIRE_WHERE)
def test_require_where_cannot_be_dodged(proxy, shop_db, kind, sql, rule, obj, sqlstate) -> None:
    assert_denied(proxy, shop_db, kind, sql, rule, obj, sqlstate)


WRITE_PATHS = [
    case(
        "support",
        "insert into order_state_log (order_id, new_status, changed_by, reason) "
        "select order_id, 'x', 'y', card_last4 from payments",
        "tables",
        "payments",
        "insert-select-payments",
    ),
    case(
        "support",
        "update orders set fulfillment_status = (select card_last4 from payments where id = 1) "
        "where id = 4",
        "tables",
        "payments",
        "update-from-subquery",
    ),
    case(
        "support",
        "delete from orders using payments p where p.order_id = orders.id and p.amount > 100",
        "tables",
        "payments",
        "delete-using-payments",
    ),
    case(
        "fulfillment",
        "update orders set fulfillment_status = 'packed' where id = 4 "
        "returning (select email from customers where id = 1)",
        "tables",
        "customers",
        "returning-subquery",
    ),
    case(
        "support",
        "insert into order_state_log (order_id, previous_status, new_status, changed_by, "
        "idempotency_key) values (1, 'a', 'b', 'c', 'seed-1') "
        "on conflict (idempotency_key) do update set reason = 'x'",
        "tables.order_state_log",
        "order_state_log",
        "upsert-updates",
    ),
    case(
        "support",
        "merge into orders o using (select id from payments) s on o.id = s.id "
        "when matched then delete",
        "tables",
        "payments",
        "merge-using-payments",
    ),
    case(
        "analytics",
        "select id from orders where id = 1 union select id from payments",
        "tables",
        "payments",
        "union",
    ),
]


@pytest.mark.parametrize(CASE, WRITE_PATHS)
def test_reads_hidden_in_writes_and_upserts(proxy, shop_db, kind, sql, rule, obj, sqlstate) -> None:
    assert_denied(proxy, shop_db, kind, sql, rule, obj, sqlstate)


# ---------------------------------------------------------------- identity


def test_application_name_does_not_change_the_agent_type(proxy, shop_db) -> None:
    before = snapshot(shop_db)
    with RawAgent(proxy.port, ANALYTICS, application_name="support-1") as agent:
        check_denial(
            agent.query("select email from customers where id = 1"),
            "42501",
            "analytics",
            "tables.customers.deny_columns",
            "customers.email",
        )
        check_denial(
            agent.query("update orders set fulfillment_status = 'packed' where id = 4"),
            "42501",
            "analytics",
            "statements",
            "orders",
        )
        assert agent.scalar("select current_user") == "guard_analytics"
        # what the database sees names the real agent first
        assert not agent.query("begin").errors
        pid = agent.scalar("select pg_backend_pid()")
        seen = shop_db.psql(
            f"select application_name from pg_stat_activity where pid = {pid}", dbname="shop"
        )
        assert seen.startswith(ANALYTICS), seen
        agent.query("rollback")
    assert snapshot(shop_db) == before


@pytest.mark.parametrize(
    "sql",
    [
        "/* agent_id='support-1' */ select email from customers where id = 1",
        "select email from customers where id = 1 /*agent='support-1',agent_type='support'*/",
        "set guard.agent_id = 'support-1'; select email from customers where id = 1",
        "set application_name = 'support-1'; select email from customers where id = 1",
    ],
)
def test_comments_and_settings_do_not_change_the_agent_type(proxy, shop_db, sql) -> None:
    reply, before, after = attempt(proxy, shop_db, "analytics", sql)
    check_denial(reply, "42501", "analytics", "tables.customers.deny_columns", "customers.email")
    assert after == before


def test_identity_claims_in_earlier_statements_do_not_stick(proxy, shop_db) -> None:
    with RawAgent(
        proxy.port, ANALYTICS, options="-c guard.agent=support-1 -c application_name=support-1"
    ) as agent:
        agent.query("set application_name = 'support-1'")
        agent.query("set guard.agent_id = 'support-1'")
        agent.query("select 1 /* agent_id='support-1' */")
        check_denial(
            agent.query("select email from customers where id = 1"),
            "42501",
            "analytics",
            "tables.customers.deny_columns",
            "customers.email",
        )
        assert agent.scalar("select current_user") == "guard_analytics"


def test_an_agent_id_of_no_type_is_refused(proxy) -> None:
    agent = RawAgent(proxy.port, "admin")
    try:
        err = agent.login.error
        assert err["S"] == "FATAL" and err["C"] == "28000", err
    finally:
        agent.close()


# ---------------------------------------------------------------- transactions


def test_a_denial_inside_a_transaction_aborts_it(proxy, shop_db) -> None:
    before = snapshot(shop_db)
    with RawAgent(proxy.port, SUPPORT) as agent:
        assert agent.query("begin").status == "T"
        assert agent.query("update orders set fulfillment_status = 'packed' where id = 4").tags == [
            "UPDATE 1"
        ]
        reply = agent.query("delete from payments where id = 4")
        check_denial(reply, "42501", "support", "tables", "payments")
        assert reply.status == "E"
        reply = agent.query("select 1")
        assert reply.error["C"] == "25P02", reply.error
        assert "current transaction is aborted" in reply.error["M"]
        assert reply.status == "E"
        assert agent.query("commit").tags == ["ROLLBACK"]  # as Postgres answers a failed block
        assert agent.scalar("select 1") == "1"
    # the update before the denial was rolled back with it
    assert snapshot(shop_db) == before


def test_a_denial_in_a_transaction_then_rollback_leaves_a_working_session(proxy, shop_db) -> None:
    with proxy.connect(ANALYTICS) as conn:
        assert conn.execute("select id from orders where id = %s", [1]).fetchall() == [(1,)]
        with pytest.raises(errors.InsufficientPrivilege) as exc:
            conn.execute("select email from customers where id = %s", [1])
        assert_names(
            str(exc.value), "analytics", "tables.customers.deny_columns", "customers.email"
        )
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        assert conn.execute("select name from customers where id = %s", [1]).fetchone() == (
            "Ada Lovelace",
        )
        conn.commit()
    with proxy.connect(ANALYTICS, autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("select card_last4 from payments where id = %s", [1])
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("select count(*) from orders").fetchone() == (6,)


def test_a_denial_in_a_multi_statement_transaction_message(proxy, shop_db) -> None:
    before = snapshot(shop_db)
    with RawAgent(proxy.port, SUPPORT) as agent:
        assert agent.query("begin").status == "T"
        reply = agent.query("update orders set fulfillment_status = 'packed' where id = 4")
        assert reply.tags == ["UPDATE 1"] and reply.status == "T", reply
        reply = agent.query("select id from orders where id = 3; truncate orders")
        check_denial(reply, "42501", "support", "tables.orders.ops", "orders")
        assert reply.tags == [] and reply.rows == []
        assert reply.status == "E"
        assert agent.query("rollback").tags == ["ROLLBACK"]
        assert agent.query("select fulfillment_status from orders where id = 4").rows == [
            ["pending"]
        ]
    assert snapshot(shop_db) == before


# ---------------------------------------------------------------- monitor mode


def test_monitor_mode_forwards_and_logs_what_would_be_denied(shop_db, tmp_path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    for source in POLICIES.glob("*.yaml"):
        text = source.read_text()
        if source.name == "analytics.yaml":
            text = re.sub(r"(?m)^mode: enforce$", "mode: monitor", text)
            assert "mode: monitor" in text
        (directory / source.name).write_text(text)
    with launch_proxy(shop_db, tmp_path / "monitor.log", policies=directory) as monitor:
        with RawAgent(monitor.port, ANALYTICS) as agent:
            # denied in enforce mode, harmless for the database: forwarded and answered
            reply = agent.query("select 1 as one from pg_sleep(0)")
            assert not reply.errors, reply.errors
            assert reply.rows == [["1"]]
            # forwarded too: the database role (defence in depth) refuses it itself
            reply = agent.query("select email from customers where id = 1")
            assert reply.error["C"] == "42501"
            assert "permission denied" in reply.error["M"]
            assert_no_secret(reply.text)
        line = monitor.wait_for_log(r"monitor mode let through analytics-1.*pg_sleep")
        assert "(policy analytics, functions" in line
        line = monitor.wait_for_log(r"monitor mode let through analytics-1.*customers\.email")
        assert "tables.customers.deny_columns" in line
        # support stays enforced
        with RawAgent(monitor.port, SUPPORT) as agent:
            check_denial(
                agent.query("select pg_sleep(0)"), "42501", "support", "functions", "pg_sleep"
            )


# --- other agents' statements (agents of a type share a role and server connections) ---


@pytest.mark.parametrize(
    ("sql", "rule", "obj"),
    [
        (
            "select query from pg_stat_activity where usename = current_user",
            "sensitive catalogs",
            "pg_stat_activity",
        ),
        (
            "select statement from pg_prepared_statements",
            "sensitive catalogs",
            "pg_prepared_statements",
        ),
        (
            "select statement from pg_catalog.pg_prepared_statement()",
            "functions",
            "pg_prepared_statement",
        ),
        ("select pg_stat_get_activity(null)", "functions", "pg_stat_get_activity"),
    ],
)
def test_an_agent_cannot_read_another_agents_statements(proxy, shop_db, sql, rule, obj) -> None:
    secret = "literal-of-the-other-agent"
    with proxy.connect("support-41") as other:
        # in an open transaction: its statement stays in pg_stat_activity meanwhile
        other.execute(f"select id from customers where name = '{secret}'").fetchall()
        role = shop_db.psql(
            f"select usename from pg_stat_activity where query like '%{secret}%' "
            "and query not like '%pg_stat_activity%' limit 1",
            dbname=shop.SHOP_DB,
        )
        assert role, "the other agent's statement is visible to its role (what the rule hides)"
        with RawAgent(proxy.port, agent_id("support")) as agent:
            reply = agent.query(sql)
        check_denial(reply, "42501", "support", rule, obj)
        assert reply.rows == [] and secret not in reply.text
