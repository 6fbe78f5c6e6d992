"""The column names of range entries, and of the rows a query returns.

Column resolution (`columns`) must know which names a FROM item offers: a name that
no item offers is not a column (it is then a whole-row reference, an output column
name, a call in functional notation ``t.f`` = ``f(t)``, or an error), and guardproxy
must not guess which. `EntryColumns.of(entry)` answers, per entry kind:

* a relation: its columns in the catalog (renamed by ``AS t(a, b)``), unknown when the
  catalog does not list it;
* a subquery, a CTE, ``VALUES``: the output names of its query, as Postgres names them
  (`figure_name` follows Postgres' FigureColname: ``count(*)`` is ``count``, ``x::int``
  is ``x``, a constant is ``?column?``), ``*`` expanded through the entries it reads;
* a function in FROM: its column definition list, or the known columns of common
  set-returning built-ins (a scalar function's column is named after its alias or
  itself); otherwise unknown;
* ``XMLTABLE`` / ``JSON_TABLE``: the columns they declare;
* a join alias: its members' columns; a ``USING`` alias: the join columns.

A name list may hold None where Postgres' name is not known to guardproxy; a whole
list is None when even its length is unknown. Callers treat both as "might be any
name" and stay on the safe side. Pure: one instance per analyzed statement (results
are memoized by node).
"""

from __future__ import annotations

from pglast import ast
from pglast.enums import (
    A_Expr_Kind,
    JsonExprOp,
    JsonTableColumnType,
    MinMaxOp,
    SetOperation,
    SQLValueFunctionOp,
    SubLinkType,
    XmlExprOp,
)

from .catalog import Catalog
from .scope import Ctes, RangeEntry, ScopeResolver

Names = tuple[str | None, ...]

#: Postgres' name for an expression that has none of its own.
UNNAMED = "?column?"

#: Set-returning built-ins whose columns are known: None means one column named after
#: the alias (or the function), as for any function returning a scalar.
KNOWN_FUNCTION_COLUMNS: dict[str, tuple[str, ...] | None] = {
    "generate_series": None,
    "generate_subscripts": None,
    "unnest": None,
    "regexp_split_to_table": None,
    "regexp_matches": None,
    "string_to_table": None,
    "json_object_keys": None,
    "jsonb_object_keys": None,
    "jsonb_path_query": None,
    "json_array_elements": ("value",),
    "jsonb_array_elements": ("value",),
    "json_array_elements_text": ("value",),
    "jsonb_array_elements_text": ("value",),
    "json_each": ("key", "value"),
    "jsonb_each": ("key", "value"),
    "json_each_text": ("key", "value"),
    "jsonb_each_text": ("key", "value"),
}

_SQL_VALUE_NAMES = {
    SQLValueFunctionOp.SVFOP_CURRENT_DATE: "current_date",
    SQLValueFunctionOp.SVFOP_CURRENT_TIME: "current_time",
    SQLValueFunctionOp.SVFOP_CURRENT_TIME_N: "current_time",
    SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP: "current_timestamp",
    SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP_N: "current_timestamp",
    SQLValueFunctionOp.SVFOP_LOCALTIME: "localtime",
    SQLValueFunctionOp.SVFOP_LOCALTIME_N: "localtime",
    SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP: "localtimestamp",
    SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP_N: "localtimestamp",
    SQLValueFunctionOp.SVFOP_CURRENT_ROLE: "current_role",
    SQLValueFunctionOp.SVFOP_CURRENT_USER: "current_user",
    SQLValueFunctionOp.SVFOP_USER: "user",
    SQLValueFunctionOp.SVFOP_SESSION_USER: "session_user",
    SQLValueFunctionOp.SVFOP_CURRENT_CATALOG: "current_catalog",
    SQLValueFunctionOp.SVFOP_CURRENT_SCHEMA: "current_schema",
}
_XML_NAMES = {
    XmlExprOp.IS_XMLCONCAT: "xmlconcat",
    XmlExprOp.IS_XMLELEMENT: "xmlelement",
    XmlExprOp.IS_XMLFOREST: "xmlforest",
    XmlExprOp.IS_XMLPARSE: "xmlparse",
    XmlExprOp.IS_XMLPI: "xmlpi",
    XmlExprOp.IS_XMLROOT: "xmlroot",
    XmlExprOp.IS_XMLSERIALIZE: "xmlserialize",
}
_JSON_NAMES = {
    JsonExprOp.JSON_EXISTS_OP: "json_exists",
    JsonExprOp.JSON_QUERY_OP: "json_query",
    JsonExprOp.JSON_VALUE_OP: "json_value",
}
_FIXED_NAMES: dict[type, str] = {
    ast.GroupingFunc: "grouping",
    ast.A_ArrayExpr: "array",
    ast.RowExpr: "row",
    ast.CoalesceExpr: "coalesce",
    ast.XmlSerialize: "xmlserialize",
    ast.MergeSupportFunc: "merge_action",
    ast.JsonParseExpr: "json",
    ast.JsonScalarExpr: "json_scalar",
    ast.JsonSerializeExpr: "json_serialize",
    ast.JsonObjectConstructor: "json_object",
    ast.JsonArrayConstructor: "json_array",
    ast.JsonArrayQueryConstructor: "json_array",
    ast.JsonObjectAgg: "json_objectagg",
    ast.JsonArrayAgg: "json_arrayagg",
}
# Expressions Postgres leaves unnamed.
_UNNAMED_KINDS = (
    ast.A_Const,
    ast.ParamRef,
    ast.BoolExpr,
    ast.BooleanTest,
    ast.NullTest,
    ast.JsonIsPredicate,
    ast.A_Indices,
)


def figure_name(expr: ast.Node | None) -> str | None:
    """The name Postgres gives an output column without ``AS``; None: not known here."""
    name, _strength = _figure(expr)
    return name


def _figure(expr: ast.Node | None) -> tuple[str | None, int]:
    """(name, strength) like Postgres' FigureColnameInternal: 2 a real name, 1 a type
    name or keyword, 0 nothing better than ``?column?``."""
    if isinstance(expr, ast.ColumnRef):
        tail = (expr.fields or ())[-1:]
        if tail and isinstance(tail[0], ast.String):
            return tail[0].sval, 2
        return UNNAMED, 0
    if isinstance(expr, ast.A_Indirection):
        for item in reversed(expr.indirection or ()):
            if isinstance(item, ast.String):
                return item.sval, 2
        return _figure(expr.arg)
    if isinstance(expr, ast.FuncCall):
        parts = expr.funcname or ()
        function = parts[-1] if parts else None
        return (function.sval, 2) if isinstance(function, ast.String) else (None, 0)
    if isinstance(expr, ast.TypeCast):
        name, strength = _figure(expr.arg)
        if strength <= 1 and expr.typeName is not None:
            type_names = expr.typeName.names or ()
            type_name = type_names[-1] if type_names else None
            if isinstance(type_name, ast.String):
                return type_name.sval, 1
        return name, strength
    if isinstance(expr, ast.CollateClause):
        return _figure(expr.arg)
    if isinstance(expr, ast.CaseExpr):
        name, strength = _figure(expr.defresult)
        return (name, strength) if strength > 1 else ("case", 1)
    if isinstance(expr, ast.SubLink):
        return _sublink_name(expr)
    if isinstance(expr, ast.A_Expr):
        return ("nullif", 2) if expr.kind == A_Expr_Kind.AEXPR_NULLIF else (UNNAMED, 0)
    if isinstance(expr, ast.MinMaxExpr):
        return ("greatest" if expr.op == MinMaxOp.IS_GREATEST else "least"), 2
    if isinstance(expr, ast.SQLValueFunction):
        name = _SQL_VALUE_NAMES.get(expr.op) if expr.op is not None else None
        return (name, 2) if name else (None, 0)
    if isinstance(expr, ast.XmlExpr):
        name = _XML_NAMES.get(expr.op) if expr.op is not None else None
        return (name, 2) if name else (UNNAMED, 0)
    if isinstance(expr, ast.JsonFuncExpr):
        name = _JSON_NAMES.get(expr.op) if expr.op is not None else None
        return (name, 2) if name else (None, 0)
    fixed = _FIXED_NAMES.get(type(expr))
    if fixed is not None:
        return fixed, 2
    if isinstance(expr, _UNNAMED_KINDS):
        return UNNAMED, 0
    return None, 0


def _sublink_name(link: ast.SubLink) -> tuple[str | None, int]:
    kind = link.subLinkType
    if kind == SubLinkType.EXISTS_SUBLINK:
        return "exists", 2
    if kind == SubLinkType.ARRAY_SUBLINK:
        return "array", 2
    if kind == SubLinkType.EXPR_SUBLINK:
        select = link.subselect
        while isinstance(select, ast.SelectStmt) and select.op != SetOperation.SETOP_NONE:
            select = select.larg
        if isinstance(select, ast.SelectStmt) and select.targetList:
            target = select.targetList[0]
            if isinstance(target, ast.ResTarget):
                return (target.name, 2) if target.name else (figure_name(target.val), 2)
        return None, 0
    return UNNAMED, 0


def _renamed(names: Names | None, aliases: tuple[str, ...]) -> Names | None:
    """``AS x(a, b)`` renames the leading columns."""
    if not aliases:
        return names
    if names is None:
        return None  # which columns keep their names is unknown
    return (*aliases, *names[len(aliases) :])


class EntryColumns:
    """Column names of range entries and query outputs (see the module docstring)."""

    def __init__(self, catalog: Catalog, scopes: ScopeResolver) -> None:
        self.catalog = catalog
        self.scopes = scopes
        self._memo: dict[int, Names | None] = {}
        self._busy: set[int] = set()

    def of(self, entry: RangeEntry) -> Names | None:
        """The columns of an entry, in order (None where unknown, see the module docstring)."""
        if entry.kind == "relation":
            assert entry.relation is not None
            return _renamed(self.catalog.columns(*entry.relation), entry.colaliases)
        if entry.kind == "using":
            return entry.using
        if entry.kind == "join":
            parts = [self.of(child) for child in entry.children]
            if any(p is None for p in parts):
                return None
            return _renamed(tuple(n for p in parts if p is not None for n in p), entry.colaliases)
        return _renamed(self._source(entry.source, dict(entry.ctes)), entry.colaliases)

    def _source(self, node: ast.Node | None, ctes: Ctes) -> Names | None:
        if node is None:
            return None
        key = id(node)
        if key in self._memo:
            return self._memo[key]
        if key in self._busy:
            return None  # a recursive CTE read in its own body
        self._busy.add(key)
        try:
            names = self._compute(node, ctes)
        finally:
            self._busy.discard(key)
        self._memo[key] = names
        return names

    def _compute(self, node: ast.Node, ctes: Ctes) -> Names | None:
        if isinstance(node, ast.CommonTableExpr):
            names = self.query(node.ctequery, ctes)
            aliases = tuple(
                c.sval or "" for c in node.aliascolnames or () if isinstance(c, ast.String)
            )
            names = _renamed(names, aliases)
            extra: list[str] = []
            if node.search_clause is not None and node.search_clause.search_seq_column:
                extra.append(node.search_clause.search_seq_column)
            cycle = node.cycle_clause
            if cycle is not None:
                extra.extend(c for c in (cycle.cycle_mark_column, cycle.cycle_path_column) if c)
            return None if names is None else (*names, *extra)
        if isinstance(node, ast.RangeFunction):
            return _function_columns(node)
        if isinstance(node, ast.RangeTableFunc):
            return tuple(
                c.colname for c in node.columns or () if isinstance(c, ast.RangeTableFuncCol)
            )
        if isinstance(node, ast.JsonTable):
            return _json_table_columns(node.columns)
        return self.query(node, ctes)

    def query(self, node: ast.Node | None, ctes: Ctes) -> Names | None:
        """The output column names of a query (SELECT, VALUES, set operation, or a write's
        RETURNING); None when unknown."""
        if isinstance(node, ast.SelectStmt):
            inner = _with(node, ctes)
            if node.op is not None and node.op != SetOperation.SETOP_NONE:
                return self.query(node.larg, inner)
            if node.valuesLists:
                first = node.valuesLists[0]
                width = len(first) if isinstance(first, tuple) else 1
                return tuple(f"column{i}" for i in range(1, width + 1))
            entries = self.scopes.from_items(node.fromClause, inner)
            return self._targets(node.targetList, entries)
        if isinstance(node, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt | ast.MergeStmt):
            clause = node.returningClause
            if clause is None:
                return ()
            inner = _with(node, ctes)
            entries = [self.scopes.base_entry(node.relation)]
            if isinstance(node, ast.UpdateStmt):
                entries += self.scopes.from_items(node.fromClause, inner)
            elif isinstance(node, ast.DeleteStmt):
                entries += self.scopes.from_items(node.usingClause, inner)
            return self._targets(clause.exprs, entries)
        return None

    def _targets(
        self, targets: tuple[ast.Node, ...] | None, entries: list[RangeEntry]
    ) -> Names | None:
        names: list[str | None] = []
        for target in targets or ():
            if not isinstance(target, ast.ResTarget):
                return None
            value = target.val
            if target.name:
                names.append(target.name)
            elif isinstance(value, ast.ColumnRef) and isinstance(
                (value.fields or (None,))[-1], ast.A_Star
            ):
                expanded = self._star(value, entries)
                if expanded is None:
                    return None
                names.extend(expanded)
            else:
                names.append(figure_name(value))
        return tuple(names)

    def _star(self, ref: ast.ColumnRef, entries: list[RangeEntry]) -> Names | None:
        qualifier = [f.sval for f in ref.fields or () if isinstance(f, ast.String)]
        chosen = [
            e
            for e in entries
            if e.kind != "using" and (not qualifier or e.refname == qualifier[-1])
        ]
        if qualifier and not chosen:
            return None
        out: list[str | None] = []
        for entry in chosen:
            columns = self.of(entry)
            if columns is None:
                return None
            out.extend(columns)
        return tuple(out)


def _with(node: ast.Node, ctes: Ctes) -> Ctes:
    clause = getattr(node, "withClause", None)
    if not isinstance(clause, ast.WithClause):
        return ctes
    own = {c.ctename or "": c for c in clause.ctes or () if isinstance(c, ast.CommonTableExpr)}
    return {**ctes, **own}


def _function_columns(item: ast.RangeFunction) -> Names | None:
    names: list[str | None] = []
    groups = [g for g in item.functions or () if isinstance(g, tuple) and g]
    for group in groups:
        call, coldefs = group[0], group[1] if len(group) > 1 else None
        if coldefs:
            names.extend(c.colname for c in coldefs if isinstance(c, ast.ColumnDef))
            continue
        if item.coldeflist and len(groups) == 1:
            names.extend(c.colname for c in item.coldeflist if isinstance(c, ast.ColumnDef))
            continue
        function = figure_name(call) if isinstance(call, ast.FuncCall) else None
        if function not in KNOWN_FUNCTION_COLUMNS:
            return None
        known = KNOWN_FUNCTION_COLUMNS[function or ""]
        if known is not None:
            names.extend(known)
        elif item.alias is not None and len(groups) == 1 and not item.alias.colnames:
            names.append(item.alias.aliasname)  # a scalar function takes its alias' name
        else:
            names.append(function)
    if item.ordinality:
        names.append("ordinality")
    return tuple(names)


def _json_table_columns(columns: tuple[ast.Node, ...] | None) -> Names:
    names: list[str | None] = []
    for column in columns or ():
        if not isinstance(column, ast.JsonTableColumn):
            continue
        if column.coltype == JsonTableColumnType.JTC_NESTED:
            names.extend(_json_table_columns(column.columns))
        else:
            names.append(column.name)
    return tuple(names)
