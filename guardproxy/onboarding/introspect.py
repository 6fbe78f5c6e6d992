"""Reads a `DbSchema` from a live database (psycopg, synchronous, read-only).

Every query reads the system catalogs, which any role may read: the login of the
DSN needs no privilege on the tables. System schemas, guardproxy's own schema and
extension-owned objects are left out (they are not the application's).
"""

from __future__ import annotations

from typing import Any

import psycopg

from ..analysis.catalog import SEARCH_PATH_QUERY
from .schema import Column, DbSchema, Table, sequence_of_default

_KINDS = {
    "r": "table",
    "p": "partitioned table",
    "v": "view",
    "m": "materialized view",
    "f": "foreign table",
}

_NOT_OURS = """
  n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', 'guardproxy')
  AND n.nspname NOT LIKE 'pg\\_temp%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp%'"""

COLUMNS_QUERY = f"""
SELECT n.nspname, c.relname, c.relkind::text, a.attname,
       pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_catalog.pg_get_expr(d.adbin, d.adrelid), a.attidentity <> '',
       (SELECT k.n FROM pg_catalog.unnest(i.indkey::pg_catalog.int2[]) WITH ORDINALITY AS k(attnum, n)
        WHERE k.attnum = a.attnum),
       (SELECT pg_catalog.quote_ident(sn.nspname) || '.' || pg_catalog.quote_ident(s.relname)
        FROM pg_catalog.pg_depend dd
        JOIN pg_catalog.pg_class s ON s.oid = dd.refobjid AND s.relkind = 'S'
        JOIN pg_catalog.pg_namespace sn ON sn.oid = s.relnamespace
        WHERE dd.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass AND dd.objid = d.oid
        LIMIT 1)
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
LEFT JOIN pg_catalog.pg_index i ON i.indrelid = c.oid AND i.indisprimary
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND {_NOT_OURS}
  AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend e
                  WHERE e.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                    AND e.objid = c.oid AND e.deptype = 'e')
ORDER BY n.nspname, c.relname, a.attnum"""

FUNCTIONS_QUERY = f"""
SELECT DISTINCT n.nspname, p.proname
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE {_NOT_OURS}
  AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend e
                  WHERE e.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                    AND e.objid = p.oid AND e.deptype = 'e')"""


def schema_from_rows(
    columns: list[tuple[Any, ...]],
    functions: list[tuple[Any, ...]],
    search_path: list[str],
) -> DbSchema:
    """Build a `DbSchema` from the rows of `COLUMNS_QUERY` (the sequence of a ``nextval``
    default qualified, from the default's dependency) and `FUNCTIONS_QUERY`."""
    tables: dict[tuple[str, str], tuple[str, list[Column], list[tuple[int, str]]]] = {}
    for schema, name, kind, col, type_, not_null, default, identity, pk, seq in columns:
        entry = tables.setdefault((schema, name), (_KINDS.get(kind, "table"), [], []))
        sequence = seq or (sequence_of_default(default) if default else None)
        entry[1].append(Column(col, type_, bool(not_null), default, bool(identity), sequence))
        if pk is not None:
            entry[2].append((int(pk), col))
    built = tuple(
        Table(key[0], key[1], tuple(cols), tuple(c for _, c in sorted(pk)), kind)
        for key, (kind, cols, pk) in tables.items()
    )
    return DbSchema(
        built,
        frozenset((str(s), str(f)) for s, f in functions),
        tuple(search_path) or ("public",),
    )


def read_schema(dsn: str) -> DbSchema:
    """The schema of the database `dsn` names, with the login's search path."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        columns = conn.execute(COLUMNS_QUERY).fetchall()
        functions = conn.execute(FUNCTIONS_QUERY).fetchall()
        path_row = conn.execute(SEARCH_PATH_QUERY).fetchone()
    path = list(path_row[0]) if path_row and path_row[0] else ["public"]
    return schema_from_rows(columns, functions, path)
