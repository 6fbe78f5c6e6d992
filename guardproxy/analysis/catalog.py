"""The upstream database's tables and columns, as plain data.

The statement alone cannot tell which table an unqualified column belongs to, which
columns ``*`` stands for, or which schema an unqualified table name resolves to. The
proxy fills a `Catalog` from the upstream database (`CATALOG_QUERY`: the system
catalogs list every table to any role; `SEARCH_PATH_QUERY` run as the agent type's
upstream role, whose search path is the one its statements use) and refreshes it
after DDL and on reload; the analyzer and the policy engine only read it.

`version` changes whenever the content changes; caches of decisions made with a
catalog must be keyed on it (the `Judge` does this).

Foreign keys (`FOREIGN_KEYS_QUERY`, one row per column of each key, with the
child column's type) let the judge refuse child rows for soft-deleted parents
(`guardproxy.policy.parents`).

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
from pglast.stream import RawStream

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

#: Rows of (schema, table, constraint, position, column, column type, parent schema,
#: parent table, parent column): one per column of every foreign key of a user table,
#: in key order (pg_constraint and pg_attribute are readable by every role).
FOREIGN_KEYS_QUERY = """\
SELECT n.nspname, c.relname, con.conname, k.i, a.attname,
       pg_catalog.format_type(a.atttypid, a.atttypmod), rn.nspname, rc.relname, ra.attname
FROM pg_catalog.pg_constraint con
JOIN pg_catalog.pg_class c ON c.oid = con.conrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_class rc ON rc.oid = con.confrelid
JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace
CROSS JOIN LATERAL ROWS FROM (pg_catalog.unnest(con.conkey), pg_catalog.unnest(con.confkey))
     WITH ORDINALITY AS k(attnum, refnum, i)
JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
JOIN pg_catalog.pg_attribute ra ON ra.attrelid = con.confrelid AND ra.attnum = k.refnum
WHERE con.contype = 'f'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
  AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast_temp%'
ORDER BY 1, 2, 3, 4"""

SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})


CatalogRow = tuple[str, str, str] | tuple[str, str, str, int | str | None]
#: A `FOREIGN_KEYS_QUERY` row (values as text or int, as drivers return them).
ForeignKeyRow = tuple[str, str, str, int | str, str, str, str, str, str]


@dataclass(frozen=True)
class ForeignKey:
    """A foreign key of a table: its columns (with their types) and what they reference."""

    name: str
    columns: tuple[str, ...]
    types: tuple[str, ...]  # format_type() of each column, e.g. "bigint"
    parent: tuple[str, str]  # (schema, table) referenced
    parent_columns: tuple[str, ...]


@dataclass(frozen=True)
class Catalog:
    """Tables (and views) of the upstream database with their ordered columns, and the
    primary key columns of those that have one (`primary_keys`, in key order)."""

    tables: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    search_path: tuple[str, ...] = ("public",)
    version: int = 0
    primary_keys: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    foreign_keys: Mapping[tuple[str, str], tuple[ForeignKey, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Frozen means frozen: nobody may change the mapping behind the cache's back.
        object.__setattr__(self, "tables", MappingProxyType(dict(self.tables)))
        object.__setattr__(self, "primary_keys", MappingProxyType(dict(self.primary_keys)))
        object.__setattr__(self, "foreign_keys", MappingProxyType(dict(self.foreign_keys)))
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
        foreign_keys: Iterable[ForeignKeyRow] = (),
    ) -> Catalog:
        """Build from `CATALOG_QUERY` rows in column order: (schema, table, column) or
        (schema, table, column, primary key position), the position an int, its text
        (as the simple protocol returns it) or None; and `FOREIGN_KEYS_QUERY` rows.

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
        references = _foreign_keys(foreign_keys)
        if version is None:
            content: tuple[object, ...] = (sorted(frozen.items()), path)
            if primary:
                content = (*content, sorted(primary.items()))
            if references:
                content = (*content, sorted(references.items()))
            version = zlib.crc32(repr(content).encode())
        return cls(
            tables=frozen,
            search_path=path,
            version=version,
            primary_keys=primary,
            foreign_keys=references,
        )

    @classmethod
    def from_ddl(cls, sql: str, search_path: Iterable[str] = ("public",)) -> Catalog:
        """Build from the CREATE TABLE / CREATE VIEW statements of a schema script.

        Meant for tools and tests (``sql/example_schema.sql``); views contribute the
        columns they name explicitly. Other statements are ignored.
        """
        path = tuple(search_path) or ("public",)
        rows: list[CatalogRow] = []
        references: list[tuple[tuple[str, str], ast.CreateStmt]] = []
        for raw in pglast.parse_sql(sql):
            stmt = raw.stmt
            if isinstance(stmt, ast.CreateStmt) and stmt.relation is not None:
                rel = stmt.relation
                schema = rel.schemaname or path[0]
                key = _primary_key(stmt)
                references.append(((schema, rel.relname or ""), stmt))
                for elt in stmt.tableElts or ():
                    if isinstance(elt, ast.ColumnDef) and elt.colname:
                        position = key.index(elt.colname) + 1 if elt.colname in key else None
                        rows.append((schema, rel.relname or "", elt.colname, position))
            elif isinstance(stmt, ast.ViewStmt) and stmt.view is not None:
                rel = stmt.view
                schema = rel.schemaname or path[0]
                rows.extend((schema, rel.relname or "", name) for name in _view_columns(stmt))
        keys = cls.from_rows(rows, search_path=path)
        fk_rows = [r for table, stmt in references for r in _ddl_foreign_keys(table, stmt, keys)]
        return cls.from_rows(rows, search_path=path, foreign_keys=fk_rows)

    def columns(self, schema: str, name: str) -> tuple[str, ...] | None:
        """The ordered columns of a relation, or None when the catalog does not know it."""
        return self.tables.get((schema, name))

    def references(self, schema: str, name: str) -> tuple[ForeignKey, ...]:
        """The foreign keys of a table (empty when unknown or none)."""
        return self.foreign_keys.get((schema, name), ())

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


def _foreign_keys(rows: Iterable[ForeignKeyRow]) -> dict[tuple[str, str], tuple[ForeignKey, ...]]:
    """Group `FOREIGN_KEYS_QUERY` rows (already in key order) into `ForeignKey`s."""
    parts: dict[tuple[str, str, str], list[tuple[int, str, str, tuple[str, str], str]]] = {}
    for row in rows:
        schema, table, name, position, column, kind, p_schema, p_table, p_column = row
        parts.setdefault((str(schema), str(table), str(name)), []).append(
            (int(position), str(column), str(kind), (str(p_schema), str(p_table)), str(p_column))
        )
    out: dict[tuple[str, str], list[ForeignKey]] = {}
    for (schema, table, name), columns in parts.items():
        columns.sort()
        out.setdefault((schema, table), []).append(
            ForeignKey(
                name=name,
                columns=tuple(c[1] for c in columns),
                types=tuple(c[2] for c in columns),
                parent=columns[0][3],
                parent_columns=tuple(c[4] for c in columns),
            )
        )
    return {key: tuple(fks) for key, fks in out.items()}


def _ddl_foreign_keys(
    table: tuple[str, str], stmt: ast.CreateStmt, known: Catalog
) -> list[ForeignKeyRow]:
    """`FOREIGN_KEYS_QUERY`-like rows for the REFERENCES / FOREIGN KEY clauses of a
    CREATE TABLE (a key without referenced columns references the primary key)."""
    types: dict[str, str] = {}
    found: list[tuple[list[str], ast.Constraint]] = []
    for elt in stmt.tableElts or ():
        if isinstance(elt, ast.ColumnDef) and elt.colname:
            types[elt.colname] = RawStream()(elt.typeName) if elt.typeName is not None else ""
            for constraint in elt.constraints or ():
                if (
                    isinstance(constraint, ast.Constraint)
                    and constraint.contype == ConstrType.CONSTR_FOREIGN
                ):
                    found.append(([elt.colname], constraint))
        elif isinstance(elt, ast.Constraint) and elt.contype == ConstrType.CONSTR_FOREIGN:
            found.append(([_sval(k) for k in elt.fk_attrs or ()], elt))
    rows: list[ForeignKeyRow] = []
    for number, (columns, constraint) in enumerate(found, start=1):
        target = constraint.pktable
        if target is None:
            continue
        parent = (target.schemaname or table[0], target.relname or "")
        parent_columns = [_sval(k) for k in constraint.pk_attrs or ()] or list(
            known.primary_key(*parent) or ()
        )
        name = constraint.conname or f"{table[1]}_fkey{number}"
        for position, (column, referenced) in enumerate(zip(columns, parent_columns, strict=False)):
            rows.append(
                (
                    table[0],
                    table[1],
                    name,
                    position + 1,
                    column,
                    types.get(column, ""),
                    *parent,
                    referenced,
                )
            )
    return rows


def _sval(node: ast.Node) -> str:
    return (node.sval or "") if isinstance(node, ast.String) else ""
