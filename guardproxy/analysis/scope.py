"""Name scopes of a parse tree: which CTEs and range entries a name can refer to.

pglast's `Visitor` hands each node its *ancestry* (`Ancestor` chain). This module turns
that chain into the two scoping answers the collector needs:

* `visible_ctes()`: the CTEs an unqualified relation name may refer to at that point,
  by name. Postgres rules: a CTE is visible in the body of its statement and in the
  *later* CTEs of the same WITH list; with ``WITH RECURSIVE`` every CTE of the list is
  visible in every CTE body. Getting this wrong in the permissive direction would let
  ``WITH customers AS (SELECT * FROM customers) ...`` hide a real table read, so the
  rule is applied exactly.
* `query_levels()`: the range entries (FROM items, UPDATE / DELETE / MERGE targets,
  ``excluded``, rule ``new`` / ``old``) a column reference can refer to, innermost
  level first, for column resolution (`columns`).

A `RangeEntry` is one of four kinds, so that every name can be traced to where its
values come from:

* ``relation``: a table or view (`relation` is its resolved name);
* ``derived``: a subquery, a CTE reference, a function, ``VALUES``, ``XMLTABLE`` or
  ``JSON_TABLE`` in FROM; its values come from expressions the collector charges
  where they are written (`source` is the node its column names come from);
* ``join``: the alias of a join, ``(a JOIN b ...) AS j``: it hides the names of
  `children`, and its columns are theirs;
* ``using``: the alias ``JOIN ... USING (k) AS j`` gives the join columns `using`;
  their values come from both sides (`children`).

Both functions are pure functions of the chain; range entries are memoized per
statement node by the `ScopeResolver` that owns them (one resolver per analyzed
statement).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from pglast import ast
from pglast.visitors import Ancestor

from .catalog import Catalog

#: (owner node, attribute of the owner leading down to the node, index in that attribute)
Link = tuple[ast.Node, str, int | None]
#: The CTEs visible at a point, by name.
Ctes = dict[str, ast.CommonTableExpr]

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


def _named(ctes: tuple[ast.Node, ...]) -> Ctes:
    return {c.ctename or "": c for c in ctes if isinstance(c, ast.CommonTableExpr)}


def visible_ctes(links: list[Link]) -> Ctes:
    """CTEs visible at the bottom of `links`, by name (see the module docstring)."""
    found: Ctes = {}
    for owner, attr, index in links:
        if isinstance(owner, ast.WithClause) and attr == "ctes":
            ctes = owner.ctes or ()
            visible = ctes if owner.recursive else ctes[: index or 0]
            found = {**_named(visible), **found}
        elif isinstance(owner, _STATEMENTS_WITH_CTES) and attr != "withClause":
            with_clause = owner.withClause
            if with_clause is not None:
                found = {**_named(with_clause.ctes or ()), **found}
    return found


@dataclass(frozen=True, slots=True)
class RangeEntry:
    """Something a column reference can be qualified with (see the module docstring)."""

    refname: str | None  # alias, or the relation name; None if it cannot qualify columns
    relation: tuple[str, str] | None = None  # kind "relation": resolved (schema, name)
    written: str = ""
    schema_written: str | None = None  # schema as written (for `schema.table.column`)
    colaliases: tuple[str, ...] = ()  # FROM t AS x(a, b): renamed leading columns
    aliased: bool = False  # True when `refname` is an alias (hides schema qualification)
    kind: str = "relation"  # relation, derived, join, using
    children: tuple[RangeEntry, ...] = ()  # join / using: the entries of both sides
    using: tuple[str, ...] = ()  # using: the join columns
    source: ast.Node | None = field(default=None, compare=False)  # derived: its definition
    ctes: tuple[tuple[str, ast.CommonTableExpr], ...] = field(default=(), compare=False)

    @property
    def bases(self) -> tuple[RangeEntry, ...]:
        """The relation entries under a join or using entry (itself for a relation)."""
        if self.kind == "relation":
            return (self,)
        return tuple(b for c in self.children for b in c.bases)


def written_name(rv: ast.RangeVar) -> str:
    return f"{rv.schemaname}.{rv.relname}" if rv.schemaname else rv.relname or ""


def _alias_names(alias: ast.Alias | None) -> tuple[str, ...]:
    if alias is None:
        return ()
    return tuple(c.sval or "" for c in alias.colnames or () if isinstance(c, ast.String))


class ScopeResolver:
    """Range entries per query level, memoized for one statement tree."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._entries: dict[tuple[int, str], tuple[RangeEntry, ...]] = {}

    def base_entry(self, rv: ast.RangeVar | None, refname: str | None = None) -> RangeEntry:
        if rv is None:
            return RangeEntry(refname=None, kind="derived")
        alias = rv.alias
        relname = rv.relname or ""
        return RangeEntry(
            refname=refname or (alias.aliasname if alias is not None else relname),
            relation=self.catalog.resolve(rv.schemaname, relname),
            written=written_name(rv),
            schema_written=rv.schemaname,
            colaliases=_alias_names(alias),
            aliased=alias is not None or refname is not None,
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
                entries = self.from_items(owner.fromClause, ctes)
        elif isinstance(owner, ast.UpdateStmt):
            ctes = visible_ctes([(owner, "fromClause", None), *links[1:]])
            entries = [self.base_entry(owner.relation), *self.from_items(owner.fromClause, ctes)]
        elif isinstance(owner, ast.DeleteStmt):
            ctes = visible_ctes([(owner, "usingClause", None), *links[1:]])
            entries = [self.base_entry(owner.relation), *self.from_items(owner.usingClause, ctes)]
        elif isinstance(owner, ast.InsertStmt):
            if attr in ("onConflictClause", "returningClause"):
                # `excluded` holds the proposed row: charged as the target's columns
                entries = [
                    self.base_entry(owner.relation),
                    self.base_entry(owner.relation, refname="excluded"),
                ]
        elif isinstance(owner, ast.MergeStmt):
            if attr != "sourceRelation":
                ctes = visible_ctes([(owner, "sourceRelation", None), *links[1:]])
                source = (owner.sourceRelation,) if owner.sourceRelation is not None else ()
                entries = [self.base_entry(owner.relation), *self.from_items(source, ctes)]
        elif isinstance(owner, ast.CopyStmt) and owner.relation is not None:
            if attr == "whereClause":
                entries = [self.base_entry(owner.relation)]
        elif isinstance(owner, ast.JoinExpr) and attr == "quals":
            # ON sees the names of both sides, even when the join's alias hides them
            # from the rest of the query; the query's level follows for LATERAL names.
            ctes = visible_ctes(links)
            entries = [*self.from_item(owner.larg, ctes), *self.from_item(owner.rarg, ctes)]
        elif isinstance(owner, ast.RuleStmt) and attr in ("whereClause", "actions"):
            entries = [
                self.base_entry(owner.relation, refname="new"),
                self.base_entry(owner.relation, refname="old"),
            ]
        if entries is None:
            return None
        if attr == "returningClause" and entries:
            entries.extend(_old_and_new(owner, entries[0]))
        result = tuple(entries)
        self._entries[key] = result
        return result

    def from_items(self, items: tuple[ast.Node, ...] | None, ctes: Ctes) -> list[RangeEntry]:
        out: list[RangeEntry] = []
        for item in items or ():
            out.extend(self.from_item(item, ctes))
        return out

    def from_item(self, item: ast.Node | None, ctes: Ctes) -> list[RangeEntry]:
        """The entries one FROM item adds to its level."""
        if isinstance(item, ast.RangeVar):
            if item.schemaname is None and item.relname in ctes:
                alias = item.alias
                return [
                    _derived(
                        alias.aliasname if alias else item.relname,
                        ctes[item.relname or ""],
                        ctes,
                        _alias_names(alias),
                    )
                ]
            return [self.base_entry(item)]
        if isinstance(item, ast.RangeTableSample) and isinstance(item.relation, ast.Node):
            return self.from_item(item.relation, ctes)
        if isinstance(item, ast.JoinExpr):
            return self._join(item, ctes)
        alias = getattr(item, "alias", None)
        alias = alias if isinstance(alias, ast.Alias) else None
        if isinstance(item, ast.RangeSubselect):
            refname = alias.aliasname if alias is not None else None
            return [_derived(refname, item.subquery, ctes, _alias_names(alias))]
        if isinstance(item, ast.RangeFunction):
            refname = alias.aliasname if alias is not None else _function_refname(item)
            return [_derived(refname, item, ctes, _alias_names(alias))]
        if isinstance(item, ast.RangeTableFunc | ast.JsonTable):
            refname = alias.aliasname if alias is not None else None
            return [_derived(refname, item, ctes, _alias_names(alias))]
        # A FROM item of a kind not foreseen: its columns are unknown (`source` None).
        return [_derived(alias.aliasname if alias is not None else None, None, ctes, ())]

    def _join(self, item: ast.JoinExpr, ctes: Ctes) -> list[RangeEntry]:
        children = (*self.from_item(item.larg, ctes), *self.from_item(item.rarg, ctes))
        using_alias = item.join_using_alias
        using = tuple(c.sval or "" for c in item.usingClause or () if isinstance(c, ast.String))
        extra: list[RangeEntry] = []
        if using_alias is not None:
            # JOIN ... USING (k) AS j: j.k is the join column, read from both sides.
            sides = tuple(c for c in children if c.kind != "using")
            extra.append(
                RangeEntry(
                    refname=using_alias.aliasname,
                    kind="using",
                    children=sides,
                    using=using,
                    aliased=True,
                )
            )
        if item.alias is None:
            return [*children, *extra]
        # A join alias hides the names of its members; its columns are theirs.
        sides = tuple(c for c in children if c.kind != "using")
        return [
            RangeEntry(
                refname=item.alias.aliasname,
                kind="join",
                children=sides,
                colaliases=_alias_names(item.alias),
                aliased=True,
            )
        ]


def _derived(
    refname: str | None, source: ast.Node | None, ctes: Ctes, colaliases: tuple[str, ...]
) -> RangeEntry:
    return RangeEntry(
        refname=refname,
        kind="derived",
        source=source,
        ctes=tuple(ctes.items()),
        colaliases=colaliases,
        aliased=True,
    )


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
    """The relation entries of a level, those under join aliases included."""
    for entry in level:
        if entry.kind != "using":
            yield from entry.bases
