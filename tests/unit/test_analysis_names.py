"""Every column reference resolves to what it reads, or the statement is denied (issue 13).

Each variant below is a way a name can reach a column: join aliases, ``JOIN ... USING``
and its alias, ``NATURAL JOIN``, functional notation (``c.row_to_json`` is
``row_to_json(c)``), derived tables, CTEs, functions and VALUES in FROM, LATERAL,
output column names, system columns, RETURNING, ON CONFLICT, MERGE, COPY and cursors.
The analytics agent may read customers but never ``customers.email``: each variant that
would put an email (or a test of one) in front of it must be denied, and each ordinary
query must still pass. No database: see tests/integration/test_policy_names_live.py
for the same through the real proxy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _policy_helpers import assert_passes, example_catalog, judge, write

from guardproxy.analysis import Catalog, Op, RelationAccess, StatementInfo, analyze
from guardproxy.analysis.model import FunctionRef
from guardproxy.policy import load_policy_set


def one(sql: str, catalog: Catalog | None = None) -> StatementInfo:
    infos = analyze(sql, catalog if catalog is not None else example_catalog())
    assert len(infos) == 1, infos
    return infos[0]


def read(info: StatementInfo, name: str) -> RelationAccess:
    for access in info.relations:
        if access.name == name and access.op is Op.SELECT:
            return access
    raise AssertionError(f"no read of {name} in {info.relations}")


# -- what each form reads -------------------------------------------------------------


def test_join_using_alias_reads_the_join_column_of_both_sides() -> None:
    info = one(
        "SELECT j.email FROM customers a JOIN orders o ON true JOIN customers b USING (email) AS j"
    )
    assert "email" in read(info, "customers").columns
    whole = one("SELECT j FROM customers a JOIN customers b USING (email) AS j")
    assert read(whole, "customers").columns == {"email"}
    assert whole.unresolved == ()


def test_using_and_natural_join_keys_are_reads() -> None:
    using = one("SELECT a.id FROM customers a JOIN customers b USING (email)")
    assert read(using, "customers").columns == {"id", "email"}
    natural = one("SELECT o.id FROM orders o NATURAL JOIN payments p")
    # orders and payments have only `id` in common
    assert read(natural, "payments").columns == {"id"}
    assert read(natural, "orders").columns == {"id"}
    derived = one("SELECT a.id FROM customers a NATURAL JOIN (SELECT 'x' AS email) b")
    assert "email" in read(derived, "customers").columns
    declared = one("SELECT a.id FROM customers a NATURAL JOIN json_to_recordset('[]') AS b(k text)")
    assert read(declared, "customers").columns == {"id"}  # no column in common
    unknown = one("SELECT a.id FROM customers a NATURAL JOIN mystery_rows() b")
    assert read(unknown, "customers").all_columns


def test_natural_join_with_a_side_of_unknown_columns_reads_whole_rows() -> None:
    info = one("SELECT 1 FROM customers a NATURAL JOIN (SELECT * FROM mystery) m")
    assert read(info, "customers").all_columns


def test_on_conflict_keys_are_reads_and_excluded_is_the_target() -> None:
    info = one(
        "INSERT INTO customers (name, email) VALUES ('x', 'y') "
        "ON CONFLICT (email) DO UPDATE SET name = excluded.created_at::text"
    )
    assert read(info, "customers").columns == {"email", "created_at"}


def test_functional_notation_is_a_whole_row_read_and_a_call() -> None:
    for sql in (
        "SELECT c.row_to_json FROM customers c",
        "SELECT customers.to_jsonb FROM customers",
        "SELECT c.my_udf FROM customers c",
        "SELECT j.row_to_json FROM (customers a JOIN orders o ON o.customer_id = a.id) AS j",
    ):
        info = one(sql)
        assert read(info, "customers").all_columns, sql
        assert info.functions, sql
    assert {f.name for f in one("SELECT c.my_udf FROM customers c").functions} == {"my_udf"}


def test_functional_notation_on_relations_the_catalog_lacks() -> None:
    info = one("SELECT c.row_to_json, c.nickname FROM customers c", Catalog())
    assert read(info, "customers").all_columns  # a built-in that takes a row
    assert FunctionRef(None, "nickname") in info.possible_calls  # column or call: unknown
    assert FunctionRef(None, "row_to_json") in info.functions


def test_functional_notation_on_derived_rows_is_a_call() -> None:
    info = one("SELECT s.evil FROM (SELECT 1 AS a) s")
    assert FunctionRef(None, "evil") in info.functions
    assert info.unresolved == ()
    known = one("SELECT s.a FROM (SELECT 1 AS a) s")
    assert known.functions == () and known.possible_calls == ()


def test_renamed_join_columns_read_the_whole_join() -> None:
    info = one("SELECT j.c FROM (customers a JOIN orders o ON o.customer_id = a.id) AS j(x, y, c)")
    assert read(info, "customers").all_columns and read(info, "orders").all_columns


def test_on_clause_of_an_aliased_join_sees_its_members() -> None:
    info = one("SELECT j.name FROM (customers a JOIN orders o ON a.email = o.tracking_number) AS j")
    assert read(info, "customers").columns == {"name", "email"}
    assert info.unresolved == ()


def test_system_columns_are_columns() -> None:
    info = one("SELECT ctid, c.xmin FROM customers c")
    assert read(info, "customers").columns == {"ctid", "xmin"}
    assert info.unresolved == ()


def test_output_names_in_order_by_group_by_and_distinct_on() -> None:
    for sql in (
        "SELECT name AS email FROM customers ORDER BY email",
        "SELECT name AS x FROM customers GROUP BY x",
        "SELECT name AS x FROM customers GROUP BY ROLLUP (x)",
        "SELECT DISTINCT ON (x) name AS x FROM customers",
        "SELECT lower(name) FROM customers GROUP BY lower",
    ):
        info = one(sql)
        assert read(info, "customers").columns == {"name"}, sql
        assert info.unresolved == (), sql
    # GROUP BY prefers the input column, and a window's ORDER BY never sees outputs
    assert (
        "email"
        in read(one("SELECT name AS email FROM customers GROUP BY email"), "customers").columns
    )
    window = one("SELECT name AS email, rank() OVER (ORDER BY email) FROM customers")
    assert "email" in read(window, "customers").columns


def test_derived_columns_resolve_without_charging() -> None:
    for sql in (
        "SELECT x.n FROM (SELECT name AS n FROM customers) x",
        "SELECT n FROM (SELECT name AS n FROM customers) x",
        "WITH x(n) AS (SELECT name FROM customers) SELECT n, x.n FROM x",
        "SELECT g, g.g FROM generate_series(1, 3) g",
        "SELECT generate_series FROM generate_series(1, 3)",
        "SELECT column1, v.column1 FROM (VALUES (1)) v",
        "SELECT a, t.a FROM (VALUES (1)) t(a)",
        "SELECT key, value FROM customers c, jsonb_each(to_jsonb(c.name)) e",
        "SELECT s.count FROM (SELECT count(*) FROM customers) s",
        "SELECT s.n FROM (SELECT * FROM (SELECT 1 AS n) a) s",
        "SELECT jt.a FROM json_table('[1]', '$[*]' COLUMNS (a int PATH '$')) jt",
        "SELECT x.a, x.n FROM xmltable('/r' PASSING '<r/>' COLUMNS a int PATH 'a', n FOR ORDINALITY) x",
        "WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r WHERE n < 3) "
        "SEARCH DEPTH FIRST BY n SET ord SELECT r.n, ord FROM r",
        "SELECT o.id, x.i FROM orders o, LATERAL (SELECT o.id AS i) x",
        "SELECT e.value FROM json_array_elements('[1]') e",
        "WITH d AS (DELETE FROM orders WHERE id = 0 RETURNING id) SELECT d.id FROM d",
    ):
        info = one(sql)
        assert info.unresolved == (), (sql, info.unresolved)
        assert info.functions == () or all(f.name != "n" for f in info.functions), sql
        assert info.possible_calls == (), (sql, info.possible_calls)


@pytest.mark.parametrize(
    ("sql", "unresolved"),
    [
        ("SELECT nope FROM customers", "nope (no table or FROM item"),
        ("SELECT x.id FROM customers", "x.id (no table, alias or FROM item named x"),
        ("SELECT customers.id FROM customers c", "customers.id (no table, alias"),
        ("SELECT a.id FROM (customers a JOIN orders o ON true) AS j", "a.id (no table, alias"),
        ("VALUES (email)", "email (no table or FROM item"),
        ("SELECT x.* FROM customers c", "x.* (no table, alias"),
        ("UPDATE orders SET tracking_number = 'x' WHERE id = 1 RETURNING n.id", "n.id (no"),
        ("EXECUTE p(email)", "email (a column reference outside of any query)"),
        ("SELECT xmin FROM (SELECT 1) s", "xmin (no table or FROM item"),
    ],
)
def test_unresolved_names_are_reported(sql: str, unresolved: str) -> None:
    info = one(sql)
    assert info.unresolved and info.unresolved[0].startswith(unresolved), info.unresolved


def test_ordinary_column_names_resolve() -> None:
    sql = (
        "SELECT c.name, o.id, count(*) AS n FROM customers c JOIN orders o ON o.customer_id = c.id "
        "WHERE o.fulfillment_status = 'pending' GROUP BY c.name, o.id HAVING count(*) > 0 "
        "ORDER BY n DESC, 1"
    )
    assert one(sql).unresolved == ()


def test_sql_function_bodies_name_parameters_like_columns() -> None:
    info = one("CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT x + 1; END")
    assert info.unresolved == ()


# -- the analytics agent through the judge ----------------------------------------------

EMAIL_LEAKS = [
    "SELECT j.email FROM customers a JOIN customers b USING (email) AS j",
    "SELECT j FROM customers a JOIN customers b USING (email) AS j",
    "SELECT j.* FROM customers a JOIN customers b USING (email) AS j",
    "SELECT row_to_json(j) FROM customers a JOIN customers b USING (email) AS j",
    "SELECT k.email FROM ((customers a JOIN customers b USING (email) AS u) JOIN orders o ON true) AS k",
    "SELECT u.email FROM (customers a JOIN customers b USING (email) AS u) JOIN orders o ON true",
    "SELECT a.id FROM customers a JOIN customers b USING (email)",
    "SELECT a.id FROM customers a JOIN (SELECT 'ada@example.com' AS email) b USING (email)",
    "SELECT a.id FROM customers a NATURAL JOIN (SELECT 'ada@example.com' AS email) b",
    "SELECT a.id FROM customers a NATURAL JOIN customers b",
    "SELECT c.row_to_json FROM customers c",
    "SELECT c.to_jsonb FROM customers c",
    "SELECT c.concat FROM customers c",
    "SELECT c.array_agg FROM customers c",
    "SELECT c.quote_nullable FROM customers c",
    "SELECT customers.row_to_json FROM customers",
    "SELECT j.c FROM (customers a JOIN orders o ON o.customer_id = a.id) AS j(x, y, c)",
    "SELECT j.email FROM (customers a JOIN orders o ON o.customer_id = a.id) AS j",
    "SELECT j.row_to_json FROM (customers a JOIN orders o ON o.customer_id = a.id) AS j",
    "SELECT j FROM (customers a JOIN orders o ON o.customer_id = a.id) AS j",
    "SELECT j.id FROM (customers a JOIN orders o ON a.email LIKE 'a%') AS j",
    "SELECT x.e FROM (SELECT email AS e FROM customers) x",
    "SELECT x FROM (SELECT email FROM customers) x",
    "WITH x AS (SELECT email FROM customers) SELECT x.email FROM x",
    "SELECT l.e FROM customers c, LATERAL (SELECT c.email AS e) l",
    "SELECT f.x FROM customers c, LATERAL to_jsonb(c) AS f(x)",
    "SELECT x.e FROM customers c, xmltable('/r' PASSING xmlelement(name r, c.email) "
    "COLUMNS e text PATH '.') x",
    "SELECT t.c FROM customers t(a, b, c)",
    "SELECT (SELECT c.email) FROM customers c",
    "SELECT name FROM customers ORDER BY email",
    "SELECT name FROM customers GROUP BY ROLLUP (email, name)",
    "SELECT DISTINCT ON (email) name FROM customers",
    "SELECT name, rank() OVER w FROM customers WINDOW w AS (ORDER BY email)",
    "SELECT count(*) FROM customers WHERE email LIKE 'a%'",
    "SELECT name FROM customers ORDER BY customers",
    "COPY (SELECT j.email FROM customers a JOIN customers b USING (email) AS j) TO STDOUT",
    "DECLARE cur CURSOR FOR SELECT c.row_to_json FROM customers c",
    "EXPLAIN SELECT a.id FROM customers a JOIN customers b USING (email)",
    "PREPARE p AS SELECT c.to_json FROM customers c",
]


@pytest.mark.parametrize("sql", EMAIL_LEAKS)
def test_no_form_reads_a_denied_column(sql: str) -> None:
    decision = judge("analytics", sql)
    assert decision.action == "deny", (sql, decision)
    assert decision.rule == "tables.customers.deny_columns", (sql, decision.reason)
    assert "(policy analytics, tables.customers.deny_columns)" in decision.reason
    assert decision.hint.startswith("analytics may read customers.id, customers.name") or (
        "name the columns instead" in decision.hint
    ), decision.hint


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT nope FROM customers",
        "SELECT x.id FROM customers",
        "SELECT customers.name FROM customers c",
        "SELECT a.name FROM (customers a JOIN orders o ON true) AS j",
    ],
)
def test_unresolved_names_are_denied_with_a_hint(sql: str) -> None:
    decision = judge("analytics", sql)
    assert decision.action == "deny" and decision.rule == "unresolved", decision
    assert decision.sqlstate == "42501"
    assert "(policy analytics, unresolved)" in decision.reason
    assert "cannot trace to a table column" in decision.reason
    assert "qualify each column" in decision.hint and "customers (select)" in decision.hint


ORDINARY = [
    "SELECT j.name FROM (customers a JOIN orders o ON o.customer_id = a.id) AS j",
    "SELECT j.id, j.name FROM customers a JOIN customers b USING (id) AS j",
    "SELECT o.id FROM orders o JOIN customers c USING (id)",
    "SELECT a.name FROM (SELECT id, name FROM customers) a NATURAL JOIN (SELECT id FROM orders) b",
    "SELECT x.name FROM (SELECT name FROM customers) x",
    "SELECT g.g FROM generate_series(1, 3) g",
    "SELECT v.a FROM (VALUES (1)) v(a)",
    "WITH x(n) AS (SELECT name FROM customers) SELECT n FROM x",
    "SELECT ctid, xmin, tableoid FROM customers",
    "SELECT name AS email FROM customers ORDER BY email",
    "SELECT name AS x FROM customers GROUP BY x",
    "SELECT DISTINCT ON (x) name AS x FROM customers",
    "SELECT name FROM customers ORDER BY 1",
    "SELECT name FROM customers UNION SELECT fulfillment_status FROM orders ORDER BY name",
    "SELECT s.count FROM (SELECT count(*) FROM orders) s",
    "SELECT row(c.name, c.id) FROM customers c",
    "SELECT jt.a FROM json_table('[1]', '$[*]' COLUMNS (a int PATH '$')) jt",
]


@pytest.mark.parametrize("sql", ORDINARY)
def test_ordinary_names_pass(sql: str) -> None:
    assert_passes(judge("analytics", sql), sql)


def test_possible_calls_meet_the_deny_list(tmp_path: Path) -> None:
    write(
        tmp_path,
        "reporting.yaml",
        "agents: [rep-*]\nupstream_role: r\ntables:\n  things: {ops: [select]}\n"
        "functions:\n  deny: [leak_row]\n",
    )
    policies = load_policy_set(tmp_path)
    decision = judge("rep-1", "SELECT t.leak_row FROM things t", policies=policies)
    assert decision.action == "deny" and decision.rule == "functions.deny", decision
    sql = "SELECT t.label FROM things t"
    assert_passes(judge("rep-1", sql, policies=policies), sql)


def test_allow_listed_columns_cover_system_columns(tmp_path: Path) -> None:
    write(
        tmp_path,
        "narrow.yaml",
        "agents: [narrow-*]\nupstream_role: r\ntables:\n"
        "  customers: {ops: [select], columns: [id, name]}\n",
    )
    policies = load_policy_set(tmp_path)
    decision = judge("narrow-1", "SELECT ctid FROM customers", policies=policies)
    assert decision.action == "deny" and decision.rule == "tables.customers.columns", decision
