"""Column references resolved to what they read, or reported as unresolved (fail closed).

`ColumnResolver.resolve(node, links)` says what one `ColumnRef` reads. Every reference
ends in exactly one of:

* reads of relation columns (``(entry, column)``; column None: every column, for
  ``t.*``, a whole-row ``t`` or a call ``t.f`` in functional notation), which the
  policy then checks;
* a column of a derived entry (subquery, CTE, function, VALUES): nothing to charge
  here, the expressions its values come from are charged where they are written;
* an output column name (ORDER BY, DISTINCT ON, GROUP BY), whose expression is charged;
* **unresolved**: a name guardproxy cannot trace to any of those. The statement is
  denied with that name; Postgres would mostly reject it too, and a name the analysis
  does not understand must never be let through unjudged.

Postgres' rules, as applied here:

* ``t.x`` where ``t`` is a relation without a column ``x`` is the call ``x(t)``
  (functional notation: ``c.row_to_json`` is ``row_to_json(c)``): a whole-row read
  and a call of ``x``. On a derived entry whose columns are known, it is a call of
  ``x`` on a row whose values are charged already. Where the columns are not known
  (a relation missing from the catalog, a function of unknown result), ``x`` is
  charged as a column, built-in functions that take a row are charged as whole-row
  reads, and ``x`` is reported in `possible_calls` for the function rules.
* A bare name is a column of the innermost query level that has it, else of an
  outer level; if no level has it, a whole-row reference to an entry of that name.
  In ORDER BY and DISTINCT ON an output column name comes first; in GROUP BY after
  the input columns. With a catalog, a bare name is charged only to the relations
  that have it; a relation the catalog does not know might have it, so it is
  charged there too (without a catalog: to every relation in scope).
* ``JOIN ... USING (k) AS j``: ``j.k`` reads ``k`` of both sides; ``j`` and ``j.*``
  read every join column. Join aliases renaming columns, ``(a JOIN b ...) AS j(x, y)``,
  charge every column of the join for a renamed name.
* System columns (``ctid``, ``xmin``, ``tableoid``...) are columns of every table: they
  are charged by name and judged like any column.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pglast import ast
from pglast.enums import SetOperation

from .catalog import Catalog
from .model import FunctionRef
from .outputs import EntryColumns, figure_name
from .scope import Link, RangeEntry, ScopeResolver

#: Columns every table has besides its own.
SYSTEM_COLUMNS = frozenset({"ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"})

#: Built-in functions that take a whole row as their one argument (so ``t.f`` is
#: ``f(t)``), from ``pg_proc``: one required argument of type record, any, anyelement,
#: anycompatible, anynonarray or anycompatiblenonarray.
ROW_FUNCTIONS = frozenset(
    {
        "array_agg", "concat", "count", "cume_dist", "dense_rank", "hash_record",
        "json_agg", "json_build_array", "json_build_object", "jsonb_agg",
        "jsonb_build_array", "jsonb_build_object", "mode", "num_nonnulls", "num_nulls",
        "percent_rank", "pg_collation_for", "pg_column_compression", "pg_column_size",
        "pg_typeof", "quote_literal", "quote_nullable", "rank", "record_out",
        "record_send", "row_to_json", "to_json", "to_jsonb", "any_out", "anyelement_out",
        "anynonarray_out", "anycompatible_out", "anycompatiblenonarray_out",
    }
)  # fmt: skip

Read = tuple[RangeEntry, str | None]


@dataclass(slots=True)
class Resolution:
    """What one column reference reads (see the module docstring)."""

    reads: list[Read] = field(default_factory=list)
    calls: list[FunctionRef] = field(default_factory=list)  # t.f in functional notation
    possible_calls: list[FunctionRef] = field(default_factory=list)  # column or call
    unresolved: str | None = None  # why the reference could not be resolved


@dataclass(slots=True)
class _Found:
    """Where a name comes from, over one or more entries."""

    reads: list[Read] = field(default_factory=list)
    certain: bool = False  # a relation the catalog knows, or a derived entry, has it
    maybe: bool = False  # an entry whose columns are unknown might have it

    def merge(self, other: _Found) -> None:
        self.reads.extend(other.reads)
        self.certain = self.certain or other.certain
        self.maybe = self.maybe or other.maybe


class ColumnResolver:
    """Resolves the column references of one statement tree."""

    def __init__(self, catalog: Catalog, scopes: ScopeResolver) -> None:
        self.catalog = catalog
        self.scopes = scopes
        self.columns = EntryColumns(catalog, scopes)

    def resolve(self, node: ast.ColumnRef, links: list[Link]) -> Resolution | None:
        """What `node` reads; None when it is outside any query (DDL expressions)."""
        levels = self.scopes.query_levels(links)
        if not levels:
            return None
        out = Resolution()
        fields = node.fields or ()
        names = [f.sval or "" for f in fields if isinstance(f, ast.String)]
        star = bool(fields) and isinstance(fields[-1], ast.A_Star)
        if star and not names:
            for each in levels[0]:
                if each.kind != "using":
                    out.reads.extend(self.whole_row(each))
            return out
        if len(names) == 1 and not star:
            self._bare(links, levels, names[0], out)
            return out
        qualifier = names if star else names[:-1]
        column = None if star else names[-1]
        entry = _find(levels, qualifier)
        if entry is None and column is not None and len(names) >= 3:
            # a.b.c may also be column b of table a with field c of a composite value.
            entry, column = _find(levels, names[:1]), names[1]
        if entry is None:
            shown = ".".join(names) + (".*" if star else "")
            out.unresolved = (
                f"{shown} (no table, alias or FROM item named {'.'.join(qualifier)} is in scope)"
            )
            return out
        if column is None:
            out.reads.extend(self.whole_row(entry))
        else:
            self._qualified(entry, column, out)
        return out

    # -- what an entry offers ------------------------------------------------------

    def lookup(self, entry: RangeEntry, name: str) -> _Found:
        """Where `name` comes from if it is a column of `entry`."""
        found = _Found()
        if entry.kind == "relation":
            columns = self.columns.of(entry)
            if columns is None:
                found.reads.append((entry, name))
                found.maybe = True
            elif name in columns or name in entry.colaliases or name in SYSTEM_COLUMNS:
                found.reads.append((entry, name))
                found.certain = True
            return found
        if entry.kind == "derived":
            columns = self.columns.of(entry)
            if columns is None or (name not in columns and None in columns):
                found.maybe = True
            elif name in columns:
                found.certain = True
            return found
        if entry.kind == "using" and name not in entry.using:
            return found
        if entry.kind == "join" and name in entry.colaliases:
            # renamed join columns: which member's column it is, is not worked out
            found.reads.extend(self.whole_row(entry))
            found.certain = True
            return found
        for child in entry.children:
            found.merge(self.lookup(child, name))
        return found

    def whole_row(self, entry: RangeEntry) -> list[Read]:
        """The reads of every column of an entry (``t.*``, ``t``)."""
        if entry.kind == "relation":
            return [(entry, None)]
        if entry.kind == "join":
            return [read for child in entry.children for read in self.whole_row(child)]
        if entry.kind == "using":
            return [read for name in entry.using for read in self.lookup(entry, name).reads]
        return []

    # -- qualified and bare names ------------------------------------------------------

    def _qualified(self, entry: RangeEntry, column: str, out: Resolution) -> None:
        found = self.lookup(entry, column)
        out.reads.extend(found.reads)
        if found.certain:
            return
        call = FunctionRef(schema=None, name=column)
        if not found.maybe:
            # Not a column of the entry: Postgres reads it as column(entry).
            out.reads.extend(self.whole_row(entry))
            out.calls.append(call)
            return
        if column in ROW_FUNCTIONS:
            out.reads.extend(self.whole_row(entry))
            out.calls.append(call)
        else:
            out.possible_calls.append(call)

    def _bare(
        self, links: list[Link], levels: list[tuple[RangeEntry, ...]], name: str, out: Resolution
    ) -> None:
        context = _output_context(links)
        if context is not None and context[0] == "output first" and _is_output(context[1], name):
            return
        maybe = False
        for level in levels:
            found = _Found()
            for entry in level:
                if entry.kind == "using":
                    continue  # its columns are those of the join's sides, looked at already
                found.merge(self.lookup(entry, name))
            out.reads.extend(found.reads)
            maybe = maybe or found.maybe
            if found.certain:
                return
        if context is not None and _is_output(context[1], name):
            return  # GROUP BY an output column name
        row = _find(levels, [name])
        if row is not None:
            out.reads.extend(self.whole_row(row))  # `SELECT c FROM customers c`
            return
        if not maybe:
            out.unresolved = f"{name} (no table or FROM item in scope has a column of that name)"


def _find(levels: list[tuple[RangeEntry, ...]], qualifier: list[str]) -> RangeEntry | None:
    """The entry a qualifier names, innermost level first."""
    if len(qualifier) == 1:
        for level in levels:
            for entry in level:
                if entry.refname == qualifier[0]:
                    return entry
        return None
    schema, name = qualifier[-2], qualifier[-1]
    for level in levels:
        for entry in level:
            if entry.kind == "relation" and not entry.aliased and entry.relation == (schema, name):
                return entry
    return None


def _output_context(links: list[Link]) -> tuple[str, ast.SelectStmt] | None:
    """Where a bare name may name an output column: ("output first", select) in ORDER BY
    and DISTINCT ON, ("input first", select) in GROUP BY; None elsewhere."""
    if not links:
        return None
    first, first_attr, _ = links[0]
    if isinstance(first, ast.SortBy) and first_attr == "node" and len(links) > 1:
        second, second_attr, _ = links[1]
        if isinstance(second, ast.SelectStmt) and second_attr == "sortClause":
            return "output first", second
        return None
    if isinstance(first, ast.SelectStmt) and first_attr == "distinctClause":
        return "output first", first
    for owner, attr, _ in links:
        if isinstance(owner, ast.SelectStmt) and attr == "groupClause":
            return "input first", owner
        if not isinstance(owner, ast.GroupingSet | ast.RowExpr):
            return None
    return None


def _is_output(select: ast.SelectStmt, name: str) -> bool:
    if select.op is not None and select.op != SetOperation.SETOP_NONE:
        return True  # ORDER BY of a UNION can only name output columns
    for target in select.targetList or ():
        if isinstance(target, ast.ResTarget) and (target.name or figure_name(target.val)) == name:
            return True
    return False
