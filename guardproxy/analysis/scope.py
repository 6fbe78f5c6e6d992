"""Name scopes of a parse tree: which CTEs and range entries a name can refer to.

pglast's `Visitor` hands each node its *ancestry* (`Ancestor` chain). This module turns
that chain into the two scoping answers the collector needs:

* `visible_ctes()`: the CTE names an unqualified relation name may refer to at that
  point. Postgres rules: a CTE is visible in the body of its statement and in the
  *later* CTEs of the same WITH list; with ``WITH RECURSIVE`` every CTE of the list is
  visible in every CTE body. Getting this wrong in the permissive direction would let
  ``WITH customers AS (SELECT * FROM customers) ...`` hide a real table read, so the
  rule is applied exactly.
* `query_levels()`: the range entries (FROM items, UPDATE / DELETE / MERGE targets)
  a column reference can refer to, innermost level first, for column resolution.

Both are pure functions of the chain; range entries are memoized per statement node
by the `ScopeResolver` that owns them (one resolver per analyzed statement).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pglast import ast
from pglast.visitors import Ancestor

from .catalog import Catalog

#: (owner node, attribute of the owner leading down to the node, index in that attribute)
Link = tuple[ast.Node, str, int | None]

_STATEMENTS_WITH_CTES = (
    ast.SelectStmt,
    ast.InsertStmt,
    ast.UpdateStmt,
    ast.DeleteStmt,
    ast.MergeStmt,
)


def chain(ancestors: Ancestor) -> list[Link]:
    """The AST nodes above a visited node, nearest first, with the way down from each."""
    links: list[Link] = []
    index: int | None = None
    path: Ancestor | None = ancestors
    while path is not None and path.node is not None:
        node = path.node
        if isinstance(node, ast.Node):
            links.append((node, str(path.member), index))
            index = None
        elif isinstance(path.member, int):
            # Tuples nest (RangeFunction.functions is a tuple of tuples): the last index
            # seen before reaching the owner is the one in the owner's own attribute.
            index = path.member
        path = path.parent
    return links


def visible_ctes(links: list[Link]) -> set[str]:
    """CTE names visible at the bottom of `links` (see the module docstring)."""
    names: set[str] = set()
    for owner, attr, index in links:
        if isinstance(owner, ast.WithClause) and attr == "ctes":
            ctes = owner.ctes or ()
            visible = ctes if owner.recursive else ctes[: index or 0]
            names.update(c.ctename or "" for c in visible if isinstance(c, ast.CommonTableExpr))
        elif isinstance(owner, _STATEMENTS_WITH_CTES) and attr != "withClause":
            with_clause = owner.withClause
            if with_clause is not None:
                names.update(
                    c.ctename or ""
                    for c in with_clause.ctes or ()
                    if isinstance(c, ast.CommonTableExpr)
                )
    return names


@dataclass(frozen=True, slots=True)
class RangeEntry:
    """Something a column reference can be qualified with."""

    refname: str | None  # alias, or the relation name; None if it cannot qualify columns
    relation: tuple[str, str] | None = None  # resolved (schema, name) of a base relation
    written: str = ""
    schema_written: str | None = None  # schema as written (for `schema.table.column`)
    colaliases: tuple[str, ...] = ()  # FROM t AS x(a, b): renamed leading columns
    bases: tuple[RangeEntry, ...] = ()  # a join alias: the base entries under it
    aliased: bool = False  # True when `refname` is an alias (hides schema qualification)


def written_name(rv: ast.RangeVar) -> str:
    return f"{rv.schemaname}.{rv.relname}" if rv.schemaname else rv.relname or ""


class ScopeResolver:
    """Range entries per query level, memoized for one statement tree."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._entries: dict[tuple[int, str], tuple[RangeEntry, ...]] = {}

    def base_entry(self, rv: ast.RangeVar | None) -> RangeEntry:
        if rv is None:
            return RangeEntry(refname=None)
        alias = rv.alias
        relname = rv.relname or ""
        return RangeEntry(
            refname=alias.aliasname if alias is not None else relname,
            relation=self.catalog.resolve(rv.schemaname, relname),
            written=written_name(rv),
            schema_written=rv.schemaname,
            colaliases=tuple(
                c.sval or "" for c in (alias.colnames or ()) if isinstance(c, ast.String)
            )
            if alias is not None
            else (),
            aliased=alias is not None,
        )

    def query_levels(self, links: list[Link]) -> list[tuple[RangeEntry, ...]]:
        """Range entries visible from the bottom of `links`, innermost level first."""
        levels: list[tuple[RangeEntry, ...]] = []
        for position, (owner, attr, _index) in enumerate(links):
            entries = self._level(owner, attr, links[position:])
            if entries is not None:
                levels.append(entries)
        return levels

    def _level(
        self, owner: ast.Node, attr: str, links: list[Link]
    ) -> tuple[RangeEntry, ...] | None:
        if attr == "withClause":
            return None  # CTE bodies do not see the FROM of the statement they belong to
        key = (id(owner), attr)
        cached = self._entries.get(key)
        if cached is not None:
            return cached
        entries: list[RangeEntry] | None = None
        if isinstance(owner, ast.SelectStmt):
            if attr not in ("larg", "rarg"):
                ctes = visible_ctes([(owner, "fromClause", None), *links[1:]])
                entries = self._from_items(owner.fromClause, ctes)
        elif isinstance(owner, ast.UpdateStmt):
            ctes = visible_ctes([(owner, "fromClause", None), *links[1:]])
            entries = [self.base_entry(owner.relation), *self._from_items(owner.fromClause, ctes)]
        elif isinstance(owner, ast.DeleteStmt):
            ctes = visible_ctes([(owner, "usingClause", None), *links[1:]])
            entries = [self.base_entry(owner.relation), *self._from_items(owner.usingClause, ctes)]
        elif isinstance(owner, ast.InsertStmt):
            if attr in ("onConflictClause", "returningClause"):
                entries = [self.base_entry(owner.relation), RangeEntry(refname="excluded")]
        elif isinstance(owner, ast.MergeStmt):
            if attr != "sourceRelation":
                ctes = visible_ctes([(owner, "sourceRelation", None), *links[1:]])
                source = (owner.sourceRelation,) if owner.sourceRelation is not None else ()
                entries = [self.base_entry(owner.relation), *self._from_items(source, ctes)]
        elif (
            isinstance(owner, ast.CopyStmt) and owner.relation is not None and attr == "whereClause"
        ):
            entries = [self.base_entry(owner.relation)]
        if entries is None:
            return None
        if attr == "returningClause" and entries:
            entries.extend(_old_and_new(owner, entries[0]))
        result = tuple(entries)
        self._entries[key] = result
        return result

    def _from_items(self, items: tuple[ast.Node, ...] | None, ctes: set[str]) -> list[RangeEntry]:
        out: list[RangeEntry] = []
        for item in items or ():
            out.extend(self._from_item(item, ctes))
        return out

    def _from_item(self, item: ast.Node | None, ctes: set[str]) -> list[RangeEntry]:
        if isinstance(item, ast.RangeVar):
            if item.schemaname is None and item.relname in ctes:
                alias = item.alias
                return [RangeEntry(refname=alias.aliasname if alias else item.relname)]
            return [self.base_entry(item)]
        if isinstance(item, ast.RangeTableSample) and isinstance(item.relation, ast.Node):
            return self._from_item(item.relation, ctes)
        if isinstance(item, ast.JoinExpr):
            children = self._from_item(item.larg, ctes) + self._from_item(item.rarg, ctes)
            if item.alias is None:
                return children
            # A join alias hides the names of its members for qualified references, but
            # unqualified column names still reach the base relations below it.
            bases = tuple(e for e in children if e.relation is not None) + tuple(
                b for e in children for b in e.bases
            )
            hidden = [
                RangeEntry(
                    refname=None, relation=e.relation, written=e.written, colaliases=e.colaliases
                )
                for e in bases
            ]
            return [RangeEntry(refname=item.alias.aliasname, bases=bases, aliased=True), *hidden]
        alias = getattr(item, "alias", None)
        if isinstance(alias, ast.Alias):
            return [RangeEntry(refname=alias.aliasname, aliased=True)]
        if isinstance(item, ast.RangeFunction):
            return [RangeEntry(refname=_function_refname(item))]
        return [RangeEntry(refname=None)]


def _old_and_new(owner: ast.Node, target: RangeEntry) -> list[RangeEntry]:
    """RETURNING old.x / new.x (PostgreSQL 18), also under the names WITH (OLD AS o) gives."""
    names = {"old", "new"}
    clause = getattr(owner, "returningClause", None)
    for option in getattr(clause, "options", None) or ():
        if isinstance(option, ast.ReturningOption) and option.value:
            names.add(option.value)
    return [
        RangeEntry(
            refname=name,
            relation=target.relation,
            written=target.written,
            colaliases=target.colaliases,
            aliased=True,
        )
        for name in sorted(names)
    ]


def _function_refname(item: ast.RangeFunction) -> str | None:
    # `FROM generate_series(1, 3)` without alias is referred to by the function name.
    for group in item.functions or ():
        if isinstance(group, tuple) and group and isinstance(group[0], ast.FuncCall):
            names = group[0].funcname or ()
            if names and isinstance(names[-1], ast.String):
                return names[-1].sval
    return None


def iter_bases(level: tuple[RangeEntry, ...]) -> Iterator[RangeEntry]:
    """The base relations of a level (join-alias entries excluded: their bases are listed)."""
    for entry in level:
        if entry.relation is not None:
            yield entry
