"""One walk over a statement's parse tree collecting what the policy engine judges.

`Collector` is a pglast `Visitor`: the traversal reaches every node of the tree, so a
relation or a function call is found wherever it hides (joins, subqueries, CTEs,
LATERAL, ROWS FROM, sublinks in UPDATE ... SET, ON CONFLICT, RETURNING, DDL defaults).
What each node *means* depends on where it sits, which the visitor reads from the
node's ancestry:

* a `RangeVar` is a write target, a FROM item, a lock target, a CREATE target... or
  not a relation at all (``FOR UPDATE OF alias``, a reference to a CTE);
* a `ColumnRef` is resolved against the range entries of its query level and the
  levels around it (see `scope` and `columns`), with the catalog when there is one.
  When the statement alone cannot tell which relation a bare column name belongs
  to, the name is charged to every candidate: a false denial is recoverable, a
  missed read of a denied column is not. A reference that resolves to nothing is
  recorded as *unresolved* (the statement is denied), never dropped;
* the join columns of ``JOIN ... USING (k)`` and ``NATURAL JOIN`` are compared, so they
  are reads of both sides, as are the conflict columns of ``ON CONFLICT (k)``.

Node types outside `statements.QUERY_NODES` inside a detailed statement are reported
as unsupported (fail closed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pglast import ast
from pglast.enums import CmdType, LockClauseStrength
from pglast.visitors import Ancestor

from .catalog import Catalog
from .columns import ColumnResolver
from .model import FunctionRef, Op, SettingChange
from .scope import Link, RangeEntry, ScopeResolver, chain, visible_ctes, written_name
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


def _in_function_body(links: list[Link]) -> bool:
    """SQL function bodies name their parameters like columns (DDL, judged as a whole)."""
    return any(isinstance(owner, ast.CreateFunctionStmt) for owner, _, _ in links)


def _target_names(targets: tuple[ast.Node, ...] | None) -> set[str]:
    return {t.name for t in targets or () if isinstance(t, ast.ResTarget) and t.name}


class Collector(FastVisitor):
    """Collects relations, columns, functions, locks, settings and CTEs of one statement."""

    def __init__(self, catalog: Catalog, detailed: bool) -> None:
        super().__init__()
        self.catalog = catalog
        self.detailed = detailed
        self.scopes = ScopeResolver(catalog)
        self.columns = ColumnResolver(catalog, self.scopes)
        self.accesses: dict[tuple[str, str, Op], AccessBuilder] = {}
        self.functions: dict[FunctionRef, None] = {}
        self.settings: list[SettingChange] = []
        self.locking: list[str] = []
        self.ctes: list[str] = []
        self.writable_ctes: list[str] = []
        self.unsupported: list[str] = []
        self.unresolved: list[str] = []
        self.possible_calls: dict[FunctionRef, None] = {}
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
        resolution = self.columns.resolve(node, links)
        if resolution is None:
            if self.detailed:
                shown = ".".join(strings(node.fields)) or "*"
                self.unresolved.append(f"{shown} (a column reference outside of any query)")
            return
        for entry, column in resolution.reads:
            self._read(entry, column)
        for call in resolution.calls:
            self.functions[call] = None
        for call in resolution.possible_calls:
            self.possible_calls[call] = None
        if resolution.unresolved is not None and not _in_function_body(links):
            self.unresolved.append(resolution.unresolved)

    def visit_JoinExpr(self, ancestors: Ancestor, node: ast.JoinExpr) -> None:
        """``USING (k)`` and ``NATURAL`` compare the join columns of both sides: reads."""
        if not node.usingClause and not node.isNatural:
            return
        ctes = visible_ctes(chain(ancestors))
        sides = [
            [e for e in self.scopes.from_item(side, ctes) if e.kind != "using"]
            for side in (node.larg, node.rarg)
        ]
        names: set[str] | None = set(strings(node.usingClause))
        if node.isNatural:
            names = self._common_columns(sides)
        for side in sides:
            for entry in side:
                if names is None:
                    reads = self.columns.whole_row(entry)
                else:
                    reads = [r for name in names for r in self.columns.lookup(entry, name).reads]
                for base, column in reads:
                    self._read(base, column)

    def _common_columns(self, sides: list[list[RangeEntry]]) -> set[str] | None:
        """The columns a NATURAL join compares; None when a side's columns are unknown."""
        found: list[set[str]] = []
        for side in sides:
            names: set[str] = set()
            for entry in side:
                columns = self.columns.columns.of(entry)
                if columns is None or None in columns:
                    return None
                names.update(c for c in columns if c is not None)
            found.append(names)
        return found[0] & found[1]

    def visit_InferClause(self, ancestors: Ancestor, node: ast.InferClause) -> None:
        """``ON CONFLICT (k)`` compares k with the rows of the table: a read of k."""
        links = chain(ancestors)
        insert = next((o for o, _, _ in links if isinstance(o, ast.InsertStmt)), None)
        if insert is None or insert.relation is None:
            return
        entry = self.scopes.base_entry(insert.relation)
        for elem in node.indexElems or ():
            if isinstance(elem, ast.IndexElem) and elem.name:
                self._read(entry, elem.name)

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
