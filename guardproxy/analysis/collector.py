"""One walk over a statement's parse tree collecting what the policy engine judges.

`Collector` is a pglast `Visitor`: the traversal reaches every node of the tree, so a
relation or a function call is found wherever it hides (joins, subqueries, CTEs,
LATERAL, ROWS FROM, sublinks in UPDATE ... SET, ON CONFLICT, RETURNING, DDL defaults).
What each node *means* depends on where it sits, which the visitor reads from the
node's ancestry:

* a `RangeVar` is a write target, a FROM item, a lock target, a CREATE target... or
  not a relation at all (``FOR UPDATE OF alias``, a reference to a CTE);
* a `ColumnRef` is resolved against the range entries of its query level and the
  levels around it (see `scope`), with the catalog when there is one. When the
  statement alone cannot tell which relation a bare column name belongs to, the
  name is charged to every candidate: a false denial is recoverable, a missed read
  of a denied column is not.

Node types outside `statements.QUERY_NODES` inside a detailed statement are reported
as unsupported (fail closed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pglast import ast
from pglast.enums import CmdType, LockClauseStrength, SetOperation
from pglast.visitors import Ancestor

from .catalog import Catalog
from .model import FunctionRef, Op, SettingChange
from .scope import Link, RangeEntry, ScopeResolver, chain, iter_bases, visible_ctes, written_name
from .settings import from_set_config
from .statements import QUERY_NODES
from .visiting import FastVisitor

_LOCK_STRENGTH = {
    LockClauseStrength.LCS_FORKEYSHARE: "FOR KEY SHARE",
    LockClauseStrength.LCS_FORSHARE: "FOR SHARE",
    LockClauseStrength.LCS_FORNOKEYUPDATE: "FOR NO KEY UPDATE",
    LockClauseStrength.LCS_FORUPDATE: "FOR UPDATE",
}

# (owner type, attribute) of a RangeVar that names a relation being read.
_FROM_POSITIONS = {
    ("SelectStmt", "fromClause"),
    ("JoinExpr", "larg"),
    ("JoinExpr", "rarg"),
    ("UpdateStmt", "fromClause"),
    ("DeleteStmt", "usingClause"),
    ("MergeStmt", "sourceRelation"),
    ("RangeTableSample", "relation"),
}
_CREATE_POSITIONS = {
    ("IntoClause", "rel"),
    ("CreateStmt", "relation"),
    ("CreateForeignTableStmt", "relation"),
    ("ViewStmt", "view"),
    ("CreateSeqStmt", "sequence"),
}
_REFERENCE_POSITIONS = {
    ("CreateStmt", "inhRelations"),
    ("CreateForeignTableStmt", "inhRelations"),
    ("TableLikeClause", "relation"),
    ("Constraint", "pktable"),
}
_MAINTAIN_OWNERS = {"VacuumRelation", "ClusterStmt", "ReindexStmt", "RefreshMatViewStmt"}
_WRITE_STATEMENTS = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)


@dataclass(slots=True)
class RelationRecord:
    """Where one RangeVar sits, for the row-filter rewrite."""

    node: ast.RangeVar
    owner: ast.Node
    attr: str
    index: int | None
    role: str  # "from", "update", "delete", "insert", "merge", "copy", "truncate", "lock", "other"
    relation: tuple[str, str]


@dataclass(slots=True)
class AccessBuilder:
    """The merged facts of one (relation, operation) while collecting."""

    written: str
    columns: set[str] = field(default_factory=set)
    all_columns: bool = False
    has_where: bool = True


class _ColumnFinder(FastVisitor):
    """Does an expression reference any column (or a cursor position)?"""

    found = False

    def visit_ColumnRef(self, ancestors: Ancestor, node: ast.ColumnRef) -> None:
        self.found = True

    def visit_CurrentOfExpr(self, ancestors: Ancestor, node: ast.CurrentOfExpr) -> None:
        self.found = True


def strings(nodes: tuple[ast.Node, ...] | None) -> list[str]:
    """The values of the String nodes of a name list (``schema.table`` -> two strings)."""
    return [n.sval or "" for n in nodes or () if isinstance(n, ast.String)]


def references_columns(expr: ast.Node | None) -> bool:
    if expr is None:
        return False
    finder = _ColumnFinder()
    finder(expr)
    return finder.found


def _target_names(targets: tuple[ast.Node, ...] | None) -> set[str]:
    return {t.name for t in targets or () if isinstance(t, ast.ResTarget) and t.name}


class Collector(FastVisitor):
    """Collects relations, columns, functions, locks, settings and CTEs of one statement."""

    def __init__(self, catalog: Catalog, detailed: bool) -> None:
        super().__init__()
        self.catalog = catalog
        self.detailed = detailed
        self.scopes = ScopeResolver(catalog)
        self.accesses: dict[tuple[str, str, Op], AccessBuilder] = {}
        self.functions: dict[FunctionRef, None] = {}
        self.settings: list[SettingChange] = []
        self.locking: list[str] = []
        self.ctes: list[str] = []
        self.writable_ctes: list[str] = []
        self.unsupported: list[str] = []
        self.records: list[RelationRecord] = []
        self.executes: list[str] = []

    # -- bookkeeping -------------------------------------------------------------

    def add(
        self,
        relation: tuple[str, str],
        op: Op,
        written: str,
        columns: set[str] | None = None,
        all_columns: bool = False,
        has_where: bool = True,
    ) -> None:
        key = (relation[0], relation[1], op)
        access = self.accesses.get(key)
        if access is None:
            access = self.accesses[key] = AccessBuilder(written=written)
        if columns:
            access.columns.update(columns)
        access.all_columns = access.all_columns or all_columns
        access.has_where = access.has_where and has_where

    def _read(self, entry: RangeEntry, column: str | None) -> None:
        """Charge a read of `column` (None: every column) of a base range entry."""
        if entry.relation is None:
            return
        if column is not None and column in entry.colaliases:
            # FROM t AS x(a, b): `a` is t's first column, whatever its real name.
            real = self.catalog.columns(*entry.relation)
            position = entry.colaliases.index(column)
            column = real[position] if real is not None and position < len(real) else None
        if column is None:
            self.add(entry.relation, Op.SELECT, entry.written, all_columns=True)
        else:
            self.add(entry.relation, Op.SELECT, entry.written, {column})

    # -- default: fail closed on node types we do not know -----------------------

    def visit(self, ancestors: Ancestor, node: ast.Node) -> None:
        name = type(node).__name__
        if self.detailed and name not in QUERY_NODES:
            self.unsupported.append(f"{name} nodes are not supported")

    # -- relations ---------------------------------------------------------------

    def visit_RangeVar(self, ancestors: Ancestor, node: ast.RangeVar) -> None:
        links = chain(ancestors)
        if not links:
            return
        owner, attr, index = links[0]
        kind = type(owner).__name__
        if kind == "LockingClause":
            return  # FOR UPDATE OF x names a range entry, not a relation
        written = written_name(node)
        if (kind, attr) in _FROM_POSITIONS:
            if node.schemaname is None and node.relname in visible_ctes(links):
                return  # a reference to a CTE, whose body is collected on its own
            relation = self.catalog.resolve(node.schemaname, node.relname or "")
            self.add(relation, Op.SELECT, written)
            self.records.append(RelationRecord(node, owner, attr, index, "from", relation))
            return
        relation = self.catalog.resolve(node.schemaname, node.relname or "")
        role = self._target(owner, attr, relation, written)
        self.records.append(RelationRecord(node, owner, attr, index, role, relation))

    def _target(self, owner: ast.Node, attr: str, relation: tuple[str, str], written: str) -> str:
        """Record a RangeVar that is not a FROM item; return its role."""
        kind = type(owner).__name__
        if isinstance(owner, ast.InsertStmt) and attr == "relation":
            cols = _target_names(owner.cols)
            self.add(relation, Op.INSERT, written, cols, all_columns=not cols)
            conflict = owner.onConflictClause
            if conflict is not None and conflict.targetList:
                self.add(relation, Op.UPDATE, written, _target_names(conflict.targetList))
            return "insert"
        if isinstance(owner, ast.UpdateStmt) and attr == "relation":
            where = references_columns(owner.whereClause)
            self.add(relation, Op.UPDATE, written, _target_names(owner.targetList), has_where=where)
            return "update"
        if isinstance(owner, ast.DeleteStmt) and attr == "relation":
            where = references_columns(owner.whereClause)
            self.add(relation, Op.DELETE, written, has_where=where)
            return "delete"
        if isinstance(owner, ast.MergeStmt) and attr == "relation":
            # MERGE ... ON true WHEN MATCHED THEN UPDATE changes every row, like an UPDATE
            # without WHERE: the join condition (and the clause's AND) is its WHERE.
            on = references_columns(owner.joinCondition)
            for clause in owner.mergeWhenClauses or ():
                if not isinstance(clause, ast.MergeWhenClause):
                    continue
                names = _target_names(clause.targetList)
                where = on or references_columns(clause.condition)
                if clause.commandType == CmdType.CMD_UPDATE:
                    self.add(relation, Op.UPDATE, written, names, has_where=where)
                elif clause.commandType == CmdType.CMD_INSERT:
                    self.add(relation, Op.INSERT, written, names, all_columns=not names)
                elif clause.commandType == CmdType.CMD_DELETE:
                    self.add(relation, Op.DELETE, written, has_where=where)
            return "merge"
        if isinstance(owner, ast.CopyStmt) and attr == "relation":
            cols = set(strings(owner.attlist))
            op = Op.INSERT if owner.is_from else Op.SELECT
            self.add(relation, op, written, cols, all_columns=not cols)
            return "copy"
        if kind == "TruncateStmt":
            self.add(relation, Op.TRUNCATE, written)
            return "truncate"
        if kind == "LockStmt":
            self.add(relation, Op.LOCK, written)
            return "lock"
        if (kind, attr) in _CREATE_POSITIONS:
            self.add(relation, Op.CREATE, written)
            return "create"
        if (kind, attr) in _REFERENCE_POSITIONS:
            self.add(relation, Op.REFERENCES, written)
            return "other"
        if kind in _MAINTAIN_OWNERS:
            self.add(relation, Op.MAINTAIN, written)
            return "other"
        # Any other position (ALTER TABLE, CREATE INDEX / TRIGGER / RULE / POLICY, or a
        # place we did not foresee): treat it as changing the relation's definition.
        self.add(relation, Op.DDL, written)
        return "other"

    # -- columns -----------------------------------------------------------------

    def visit_ColumnRef(self, ancestors: Ancestor, node: ast.ColumnRef) -> None:
        links = chain(ancestors)
        levels = self.scopes.query_levels(links)
        if not levels:
            return  # DDL expressions (CHECK, index expressions): no range table
        fields = node.fields or ()
        if fields and isinstance(fields[-1], ast.A_Star):
            qualifier = strings(fields[:-1])
            if not qualifier:
                for entry in iter_bases(levels[0]):
                    self._read(entry, None)
                return
            found = self._find_qualified(levels, qualifier)
            if found is not None:
                self._read_entry(found, None)
            return
        names = strings(fields)
        if len(names) == 1:
            self._unqualified(links, levels, names[0])
            return
        found = self._find_qualified(levels, names[:-1])
        column = names[-1]
        if found is None and len(names) >= 3:
            # a.b.c can also be table a, column b, field c of a composite column.
            found = self._find_qualified(levels, names[:1])
            column = names[1]
        if found is not None:
            self._read_entry(found, column)

    def _read_entry(self, entry: RangeEntry, column: str | None) -> None:
        if entry.relation is not None:
            self._read(entry, column)
        for base in entry.bases:
            self._read(base, column)

    @staticmethod
    def _find_qualified(
        levels: list[tuple[RangeEntry, ...]], qualifier: list[str]
    ) -> RangeEntry | None:
        if len(qualifier) == 1:
            for level in levels:
                for entry in level:
                    if entry.refname == qualifier[0]:
                        return entry
            return None
        schema, name = qualifier[-2], qualifier[-1]
        for level in levels:
            for entry in level:
                if (
                    entry.relation is not None
                    and not entry.aliased
                    and entry.relation == (schema, name)
                ):
                    return entry
        return None

    def _unqualified(
        self, links: list[Link], levels: list[tuple[RangeEntry, ...]], name: str
    ) -> None:
        if self._is_output_name(links, name):
            return
        if self.catalog.tables:
            for level in levels:
                hit = False
                for entry in iter_bases(level):
                    assert entry.relation is not None
                    cols = self.catalog.columns(*entry.relation)
                    if cols is None:
                        self._read(entry, name)  # unknown relation: it might have it
                    elif name in cols or name in entry.colaliases:
                        self._read(entry, name)
                        hit = True
                if hit:
                    return
        else:
            for level in levels:
                for entry in iter_bases(level):
                    self._read(entry, name)
        # Not (known to be) a column: a whole-row reference to a range entry, as in
        # `SELECT c FROM customers c` or `row_to_json(c)`.
        found = self._find_qualified(levels, [name])
        if found is not None:
            self._read_entry(found, None)

    @staticmethod
    def _is_output_name(links: list[Link], name: str) -> bool:
        """A bare ORDER BY name that names an output column refers to that column."""
        if len(links) < 2:
            return False
        (first, first_attr, _), (second, second_attr, _) = links[0], links[1]
        if not (isinstance(first, ast.SortBy) and first_attr == "node"):
            return False
        if not (isinstance(second, ast.SelectStmt) and second_attr == "sortClause"):
            return False
        if second.op != SetOperation.SETOP_NONE:
            return True  # ORDER BY of a UNION can only name output columns
        for target in second.targetList or ():
            if not isinstance(target, ast.ResTarget):
                continue
            if target.name == name:
                return True
        return False

    # -- functions, locks, CTEs --------------------------------------------------

    def visit_FuncCall(self, ancestors: Ancestor, node: ast.FuncCall) -> None:
        parts = strings(node.funcname)
        if not parts:
            self.unsupported.append("a function call without a name")
            return
        schema = parts[-2] if len(parts) >= 2 else None
        ref = FunctionRef(schema=schema, name=parts[-1])
        self.functions[ref] = None
        if ref.name == "set_config" and schema in (None, "pg_catalog"):
            self.settings.append(from_set_config(node))

    def visit_ExecuteStmt(self, ancestors: Ancestor, node: ast.ExecuteStmt) -> None:
        # EXPLAIN ANALYZE EXECUTE p, CREATE TABLE AS EXECUTE p: p runs all the same.
        self.executes.append(node.name or "")

    def visit_LockingClause(self, ancestors: Ancestor, node: ast.LockingClause) -> None:
        strength = node.strength
        self.locking.append(
            _LOCK_STRENGTH.get(strength, "FOR UPDATE") if strength else "FOR UPDATE"
        )

    def visit_CommonTableExpr(self, ancestors: Ancestor, node: ast.CommonTableExpr) -> None:
        name = node.ctename or ""
        self.ctes.append(name)
        if isinstance(node.ctequery, _WRITE_STATEMENTS):
            self.writable_ctes.append(name)
