"""The upstream database's tables and columns, as plain data.

The statement alone cannot tell which table an unqualified column belongs to, which
columns ``*`` stands for, or which schema an unqualified table name resolves to. The
proxy fills a `Catalog` from the upstream database (`CATALOG_QUERY`: the system
catalogs list every table to any role; `SEARCH_PATH_QUERY` run as the agent type's
upstream role, whose search path is the one its statements use) and refreshes it
after DDL and on reload; the analyzer and the policy engine only read it.

`version` changes whenever the content changes; caches of decisions made with a
catalog must be keyed on it (the `Judge` does this).

Resolution follows Postgres: an unqualified relation name is looked up in
``pg_catalog`` first (unless the search path lists ``pg_catalog`` explicitly), then
in each schema of the search path in order. A name found nowhere resolves to the
first schema of the search path, where Postgres would create it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import pglast
from pglast import ast
from pglast.enums import ConstrType

from .pg_builtins import INFORMATION_SCHEMA_RELATIONS, PG_CATALOG_RELATIONS

#: Rows of (schema, table, column, primary key position) for every user relation and
#: its live columns, in column order (pg_attribute and pg_index are readable by every
#: role). The fourth value is the column's 1-based position in the table's primary
#: key, NULL when it is not part of it. `Catalog.from_rows` also takes the first three
#: values alone (the catalog then knows no primary keys).
CATALOG_QUERY = """\
SELECT n.nspname, c.relname, a.attname,
       (SELECT k.n FROM pg_catalog.unnest(i.indkey::pg_catalog.int2[]) WITH ORDINALITY AS k(attnum, n)
        WHERE k.attnum = a.attnum) AS pk_position
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
LEFT JOIN pg_catalog.pg_index i ON i.indrelid = c.oid AND i.indisprimary
WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f')
  AND a.attnum > 0 AND NOT a.attisdropped
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
  AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast_temp%'
ORDER BY n.nspname, c.relname, a.attnum"""

#: The effective search path of the current upstream session, as a text[].
SEARCH_PATH_QUERY = "SELECT pg_catalog.current_schemas(false)"

SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})


CatalogRow = tuple[str, str, str] | tuple[str, str, str, int | str | None]


@dataclass(frozen=True)
class Catalog:
    """Tables (and views) of the upstream database with their ordered columns, and the
    primary key columns of those that have one (`primary_keys`, in key order)."""

    tables: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    search_path: tuple[str, ...] = ("public",)
    version: int = 0
    primary_keys: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Frozen means frozen: nobody may change the mapping behind the cache's back.
        object.__setattr__(self, "tables", MappingProxyType(dict(self.tables)))
        object.__setattr__(self, "primary_keys", MappingProxyType(dict(self.primary_keys)))
        path = tuple(s for s in self.search_path if s and s != "$user")
        object.__setattr__(self, "search_path", path)

    def __hash__(self) -> int:
        return hash((self.version, self.search_path, len(self.tables)))

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[CatalogRow],
        search_path: Iterable[str] = ("public",),
        version: int | None = None,
    ) -> Catalog:
        """Build from `CATALOG_QUERY` rows in column order: (schema, table, column) or
        (schema, table, column, primary key position), the position an int, its text
        (as the simple protocol returns it) or None.

        Without an explicit `version`, the version is a checksum of the content, so
        two catalogs with the same content have the same version.
        """
        tables: dict[tuple[str, str], list[str]] = {}
        keys: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for row in rows:
            schema, table, column = str(row[0]), str(row[1]), str(row[2])
            tables.setdefault((schema, table), []).append(column)
            position = row[3] if len(row) > 3 else None
            if position is not None and str(position).strip():
                keys.setdefault((schema, table), []).append((int(position), column))
        path = tuple(search_path)
        frozen = {key: tuple(cols) for key, cols in tables.items()}
        primary = {key: tuple(c for _, c in sorted(cols)) for key, cols in keys.items()}
        if version is None:
            content: tuple[object, ...] = (sorted(frozen.items()), path)
            if primary:
                content = (*content, sorted(primary.items()))
            version = zlib.crc32(repr(content).encode())
        return cls(tables=frozen, search_path=path, version=version, primary_keys=primary)

    @classmethod
    def from_ddl(cls, sql: str, search_path: Iterable[str] = ("public",)) -> Catalog:
        """Build from the CREATE TABLE / CREATE VIEW statements of a schema script.

        Meant for tools and tests (``sql/example_schema.sql``); views contribute the
        columns they name explicitly. Other statements are ignored.
        """
        path = tuple(search_path) or ("public",)
        rows: list[CatalogRow] = []
        for raw in pglast.parse_sql(sql):
            stmt = raw.stmt
            if isinstance(stmt, ast.CreateStmt) and stmt.relation is not None:
                rel = stmt.relation
                schema = rel.schemaname or path[0]
                key = _primary_key(stmt)
                for elt in stmt.tableElts or ():
                    if isinstance(elt, ast.ColumnDef) and elt.colname:
                        position = key.index(elt.colname) + 1 if elt.colname in key else None
                        rows.append((schema, rel.relname or "", elt.colname, position))
            elif isinstance(stmt, ast.ViewStmt) and stmt.view is not None:
                rel = stmt.view
                schema = rel.schemaname or path[0]
                rows.extend((schema, rel.relname or "", name) for name in _view_columns(stmt))
        return cls.from_rows(rows, search_path=path)

    def columns(self, schema: str, name: str) -> tuple[str, ...] | None:
        """The ordered columns of a relation, or None when the catalog does not know it."""
        return self.tables.get((schema, name))

    def primary_key(self, schema: str, name: str) -> tuple[str, ...] | None:
        """The primary key columns of a table in key order; None when unknown or none."""
        return self.primary_keys.get((schema, name))

    def resolve(self, schema: str | None, name: str) -> tuple[str, str]:
        """The (schema, name) Postgres would use for a possibly unqualified name."""
        if schema is not None:
            return schema, name
        path = self.search_path
        if "pg_catalog" not in path:
            path = ("pg_catalog", *path)
        for candidate in path:
            if (candidate, name) in self.tables:
                return candidate, name
            if candidate == "pg_catalog" and name in PG_CATALOG_RELATIONS:
                return candidate, name
            if candidate == "information_schema" and name in INFORMATION_SCHEMA_RELATIONS:
                return candidate, name
        for candidate in self.search_path:
            if candidate != "pg_catalog":
                return candidate, name
        return "public", name


#: Used when the proxy has no catalog: search path ``public``, no tables known.
EMPTY_CATALOG = Catalog()


def _primary_key(stmt: ast.CreateStmt) -> list[str]:
    """The PRIMARY KEY columns of a CREATE TABLE, column or table constraint."""
    for elt in stmt.tableElts or ():
        if isinstance(elt, ast.ColumnDef):
            for constraint in elt.constraints or ():
                if (
                    isinstance(constraint, ast.Constraint)
                    and constraint.contype == ConstrType.CONSTR_PRIMARY
                    and elt.colname
                ):
                    return [elt.colname]
        elif isinstance(elt, ast.Constraint) and elt.contype == ConstrType.CONSTR_PRIMARY:
            return [k.sval or "" for k in elt.keys or () if isinstance(k, ast.String)]
    return []


def _view_columns(stmt: ast.ViewStmt) -> list[str]:
    if stmt.aliases:
        return [a.sval for a in stmt.aliases if isinstance(a, ast.String) and a.sval]
    query = stmt.query
    names: list[str] = []
    if isinstance(query, ast.SelectStmt):
        for target in query.targetList or ():
            if not isinstance(target, ast.ResTarget):
                continue
            if target.name:
                names.append(target.name)
            elif isinstance(target.val, ast.ColumnRef) and target.val.fields:
                last = target.val.fields[-1]
                if isinstance(last, ast.String) and last.sval:
                    names.append(last.sval)
    return names
