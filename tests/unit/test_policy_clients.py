"""The queries psycopg, asyncpg and SQLAlchemy send on their own pass for every example
agent type. The texts come from the installed libraries themselves, so a library
upgrade that changes them is noticed here (no database)."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any, cast

import pytest
from _policy_helpers import AGENTS, assert_passes, judge


def _dollar_params(text: str) -> str:
    """Driver placeholders (%(name)s, %s, SQLAlchemy POSTCOMPILE) as $n, like the wire."""
    counter = iter(range(1, 1000))
    text = re.sub(r"\(__\[POSTCOMPILE_\w+\]\)", lambda _m: f"(${next(counter)})", text)
    return re.sub(r"%\(\w+\)s|%s", lambda _m: f"${next(counter)}", text)


def asyncpg_queries() -> list[str]:
    from asyncpg import connection, introspection

    stub = SimpleNamespace(
        _reset_query=None,
        _server_caps=SimpleNamespace(
            advisory_locks=True,
            sql_close_all=True,
            notifications=True,
            plpgsql=True,
            sql_reset=True,
        ),
    )
    reset = connection.Connection.get_reset_query(stub)
    return [
        introspection.INTRO_LOOKUP_TYPES,
        introspection.INTRO_LOOKUP_TYPES_13,
        introspection.TYPE_BY_NAME,
        reset,
        # Connection._introspect_types toggles JIT around the introspection query.
        "SELECT current_setting('jit') AS cur, set_config('jit', 'off', false) AS new",
        "SELECT set_config('jit', $1, false)",
    ]


def sqlalchemy_queries() -> list[str]:
    from sqlalchemy.dialects.postgresql import psycopg
    from sqlalchemy.engine.reflection import ObjectKind, ObjectScope

    dialect: Any = psycopg.dialect()  # type: ignore[no-untyped-call]
    dialect.server_version_info = (15, 0)
    compiled = [
        dialect._has_multi_table_query(None),
        dialect._columns_query(None, True, ObjectScope.DEFAULT, ObjectKind.TABLE),
    ]
    return [
        # first connect (dialect.initialize) and isolation level handling
        "select pg_catalog.version()",
        "select current_schema()",
        "show standard_conforming_strings",
        "show transaction isolation level",
        "SELECT 1",
        *(_dollar_params(str(q.compile(dialect=dialect))) for q in compiled),
    ]


CLIENT_QUERIES = {
    "asyncpg": asyncpg_queries,
    "sqlalchemy": sqlalchemy_queries,
}


@pytest.mark.parametrize("agent_type", sorted(AGENTS))
@pytest.mark.parametrize("client", sorted(CLIENT_QUERIES))
def test_client_introspection_passes(client: str, agent_type: str) -> None:
    for sql in CLIENT_QUERIES[client]():
        assert_passes(judge(agent_type, sql), sql)
        assert_passes(judge(agent_type, sql, catalog=False), sql)


@pytest.mark.parametrize("agent_type", sorted(AGENTS))
def test_psycopg_type_info_queries_pass(agent_type: str) -> None:
    from psycopg.types import TypeInfo
    from psycopg.types.composite import CompositeInfo
    from psycopg.types.enum import EnumInfo
    from psycopg.types.multirange import MultirangeInfo
    from psycopg.types.range import RangeInfo

    conn: Any = SimpleNamespace(info=SimpleNamespace(vendor="PostgreSQL", server_version=150000))
    infos = (TypeInfo, RangeInfo, MultirangeInfo, CompositeInfo, EnumInfo)
    queries = [cast(Any, info._get_info_query(conn)).as_string() for info in infos]
    assert len(queries) == 5
    for text in queries:
        sql = _dollar_params(text)
        assert_passes(judge(agent_type, sql), sql)


@pytest.mark.parametrize("agent_type", sorted(AGENTS))
@pytest.mark.parametrize(
    "sql",
    [
        # psql's \d and friends, and what Text-to-SQL agents ask first
        "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_namespace n "
        "ON n.oid = c.relnamespace WHERE c.relkind IN ('r','p','v','m','S','f','') "
        "AND n.nspname <> 'pg_catalog' AND pg_catalog.pg_table_is_visible(c.oid) ORDER BY 1,2",
        "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), "
        "(SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid, true) FROM pg_catalog.pg_attrdef d "
        "WHERE d.adrelid = a.attrelid AND d.adnum = a.attnum AND a.atthasdef), a.attnotnull "
        "FROM pg_catalog.pg_attribute a WHERE a.attrelid = 'orders'::regclass AND a.attnum > 0 "
        "AND NOT a.attisdropped ORDER BY a.attnum",
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'orders'::regclass",
        "SELECT obj_description('orders'::regclass, 'pg_class')",
        "SELECT current_database(), current_user, session_user, version(), inet_server_port()",
        "SELECT name, setting FROM pg_settings WHERE name LIKE 'statement%'",
    ],
)
def test_schema_introspection_passes(agent_type: str, sql: str) -> None:
    assert_passes(judge(agent_type, sql), sql)


@pytest.mark.parametrize("agent_type", sorted(AGENTS))
@pytest.mark.parametrize(
    ("sql", "rule"),
    [
        # agents of a type share a role and server connections: these show one agent
        # the statements (literals, task, principals) of another
        ("SELECT pid, state, query FROM pg_stat_activity WHERE usename = current_user", "catalogs"),
        ("SELECT name, statement FROM pg_prepared_statements", "catalogs"),
        ("SELECT query FROM pg_stat_statements", "tables"),  # an extension, in public
        ("SELECT * FROM pg_catalog.pg_prepared_statement()", "functions"),
        ("SELECT pg_stat_get_backend_activity(1)", "functions"),
    ],
)
def test_other_sessions_statement_text_is_not_readable(
    agent_type: str, sql: str, rule: str
) -> None:
    decision = judge(agent_type, sql)
    assert not decision.allowed and decision.rule == rule, (sql, decision)
    assert agent_type in decision.reason
    assert rule == "tables" or "other" in decision.reason, decision.reason
