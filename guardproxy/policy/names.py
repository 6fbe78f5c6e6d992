"""SQL names written in policy files, read the way Postgres reads them.

A policy names tables and columns as SQL would: ``customers`` and ``Customers`` are
the same table (unquoted names fold to lower case), ``'"Customers"'`` is another one,
``sales.orders`` is schema-qualified, and ``U&"..."`` works too. The names are parsed
with the same parser as statements, so a policy and a statement can never disagree
about what a name means.
"""

from __future__ import annotations

import re

import pglast
from pglast import ast, parser

_SIMPLE = re.compile(r"^[a-z_][a-z0-9_$]*$")


def parse_relation_name(text: str) -> tuple[str | None, str]:
    """``[schema.]name`` -> (schema or None, name); ValueError if it is not a name."""
    try:
        tree = pglast.parse_sql(f"SELECT FROM {text}")
    except parser.ParseError:
        tree = ()
    if len(tree) == 1:
        stmt = tree[0].stmt
        if (
            isinstance(stmt, ast.SelectStmt)
            and stmt.fromClause
            and len(stmt.fromClause) == 1
            and isinstance(stmt.fromClause[0], ast.RangeVar)
            and stmt.fromClause[0].alias is None
            and stmt.whereClause is None
            and not stmt.fromClause[0].catalogname
        ):
            rv = stmt.fromClause[0]
            if rv.relname:
                return rv.schemaname, rv.relname
    raise ValueError(f"expected a table name such as customers or sales.orders; got {text!r}")


_GLOB_PART = re.compile(r"^[a-z0-9_$*?\[\]!-]+$")


def is_table_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def parse_table_glob(text: str) -> tuple[str | None, str]:
    """``[schema.]name`` where either part may be a glob (``reporting.*``, ``audit_*``):
    (schema pattern or None, name pattern); ValueError if it is not one. Patterns match
    names as Postgres stores them, so they are written in lower case, unquoted."""
    parts = text.strip().split(".")
    if len(parts) > 2 or not all(_GLOB_PART.match(p) for p in parts):
        raise ValueError(
            "expected a table name such as customers or sales.orders, or a glob such as "
            f"reporting.* or audit_* (lower case, unquoted; * ? [abc]); got {text!r}"
        )
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def parse_table_key(text: str) -> tuple[str | None, str, bool]:
    """A key of ``tables``: (schema, name, is a glob)."""
    if is_table_glob(text):
        return (*parse_table_glob(text), True)
    return (*parse_relation_name(text), False)


def parse_column_name(text: str) -> str:
    """A single column name; ValueError otherwise."""
    try:
        tree = pglast.parse_sql(f"SELECT {text}")
    except parser.ParseError:
        tree = ()
    if len(tree) == 1:
        stmt = tree[0].stmt
        if isinstance(stmt, ast.SelectStmt) and stmt.targetList and len(stmt.targetList) == 1:
            target = stmt.targetList[0]
            val = target.val if isinstance(target, ast.ResTarget) and target.name is None else None
            fields = val.fields if isinstance(val, ast.ColumnRef) else None
            if fields and len(fields) == 1 and isinstance(fields[0], ast.String) and fields[0].sval:
                return str(fields[0].sval)
    raise ValueError(f"expected a column name such as email; got {text!r}")


def quote_ident(name: str) -> str:
    """Quote a name for SQL text unless it is a plain lower-case identifier."""
    if _SIMPLE.match(name) and not _is_reserved(name):
        return name
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str | None, name: str) -> str:
    return quote_ident(name) if schema is None else f"{quote_ident(schema)}.{quote_ident(name)}"


def quote_literal(value: str) -> str:
    """A SQL string literal that means `value` whatever standard_conforming_strings is."""
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def _is_reserved(name: str) -> bool:
    from pglast.keywords import RESERVED_KEYWORDS, TYPE_FUNC_NAME_KEYWORDS

    return name in RESERVED_KEYWORDS or name in TYPE_FUNC_NAME_KEYWORDS
