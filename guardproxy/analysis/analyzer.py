"""Parse SQL with pglast and describe each statement as a `StatementInfo`.

Contract:

* `analyze(sql, catalog=None)` returns one `StatementInfo` per statement of `sql`
  (a simple Query message may hold several; an empty text holds none). It raises
  `SqlSyntaxError` when libpg_query cannot parse the text: that is the same parser
  as the server's, so what it rejects the server would reject too.
* `analyze_tree()` returns the same plus the parse tree and where each relation sits,
  for the rewrites (row filters) that must edit the tree the decision was made on.
* Nothing here depends on a policy: the result is a pure function of the SQL text
  and the catalog, so callers may cache it by (text, catalog.version).
"""

from __future__ import annotations

from dataclasses import dataclass

import pglast
from pglast import ast, parser
from pglast.enums import DiscardMode, ObjectType, TransactionStmtKind
from pglast.stream import RawStream

from .catalog import EMPTY_CATALOG, Catalog
from .collector import AccessBuilder, Collector, RelationRecord, strings
from .model import (
    DDL_OPS,
    WRITE_OPS,
    CopyInfo,
    Op,
    RelationAccess,
    SettingChange,
    StatementClass,
    StatementInfo,
)
from .settings import from_transaction_options, from_variable_set
from .statements import DETAILED_CLASSES, LOCK_MODES, LOCK_MODES_FOR_READERS, STATEMENTS


class SqlSyntaxError(ValueError):
    """The SQL does not parse. `position` is 1-based in characters (0: unknown)."""

    sqlstate = "42601"

    def __init__(self, message: str, position: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


@dataclass(frozen=True, slots=True)
class AnalyzedStatement:
    raw: ast.RawStmt
    info: StatementInfo
    records: tuple[RelationRecord, ...]


def parse(sql: str) -> tuple[ast.RawStmt, ...]:
    """pglast's parse, with its error turned into `SqlSyntaxError`.

    libpg_query's own parse runs first (via normalize, a few microseconds): it refuses
    nesting deeper than Postgres' stack depth limit with a clean error, while
    building Python objects for a far deeper tree (``SELECT 1+1+...+1`` with 30 000
    terms) overflows the C stack and kills the process.
    """
    try:
        parser.normalize(sql)
        return tuple(pglast.parse_sql(sql))
    except parser.ParseError as exc:
        message = str(exc.args[0]) if exc.args else str(exc)
        location = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else -1
        position = 0
        if location >= 0:
            # libpg_query reports a byte offset into the UTF-8 text.
            position = len(sql.encode()[:location].decode(errors="ignore")) + 1
        raise SqlSyntaxError(message, position) from None


def analyze(sql: str, catalog: Catalog | None = None) -> tuple[StatementInfo, ...]:
    """Describe every statement of `sql` (see the module docstring)."""
    return tuple(s.info for s in analyze_tree(sql, catalog))


def analyze_tree(sql: str, catalog: Catalog | None = None) -> list[AnalyzedStatement]:
    raws = parse(sql)
    data = sql.encode()
    return [_analyze_one(raw, _slice(data, raw), catalog or EMPTY_CATALOG) for raw in raws]


def _slice(data: bytes, raw: ast.RawStmt) -> str:
    start = raw.stmt_location or 0
    end = start + raw.stmt_len if raw.stmt_len else len(data)
    return data[start:end].decode(errors="replace").strip()


def _analyze_one(raw: ast.RawStmt, text: str, catalog: Catalog) -> AnalyzedStatement:
    stmt = raw.stmt
    name = type(stmt).__name__
    known = STATEMENTS.get(name)
    if known is None or stmt is None:
        info = StatementInfo(
            command=name,
            kind=StatementClass.ADMIN,
            classes=frozenset({StatementClass.ADMIN}),
            text=text,
            unsupported=(f"{name} statements are not supported by guardproxy",),
        )
        return AnalyzedStatement(raw, info, ())
    kind, command = known
    collector = Collector(catalog, detailed=kind in DETAILED_CLASSES)
    collector(stmt)
    root = _RootFacts(stmt, kind, command)
    for access_key in collector.accesses:
        root.classes.add(_class_of(access_key[2], kind))
    if isinstance(stmt, ast.DropStmt):
        for relation, written in _dropped_relations(stmt, catalog):
            collector.add(relation, Op.DDL, written)
    settings = [*root.settings, *collector.settings]
    info = StatementInfo(
        command=root.command,
        kind=kind,
        classes=frozenset(root.classes),
        text=text,
        relations=tuple(_to_access(key, value) for key, value in collector.accesses.items()),
        functions=tuple(collector.functions),
        settings=tuple(settings),
        locking=tuple(root.locking + collector.locking),
        ctes=tuple(collector.ctes),
        writable_ctes=tuple(collector.writable_ctes),
        explain_analyze=root.explain_analyze,
        copy=root.copy,
        prepare_name=root.prepare_name,
        prepared_sql=root.prepared_sql,
        execute_name=root.execute_name or (collector.executes[0] if collector.executes else None),
        deallocate_name=root.deallocate_name,
        discard=root.discard,
        unsupported=tuple(dict.fromkeys(collector.unsupported + root.unsupported)),
        unresolved=tuple(dict.fromkeys(collector.unresolved)),
        possible_calls=tuple(collector.possible_calls),
    )
    return AnalyzedStatement(raw, info, tuple(collector.records))


def _to_access(key: tuple[str, str, Op], value: AccessBuilder) -> RelationAccess:
    schema, name, op = key
    return RelationAccess(
        schema=schema,
        name=name,
        op=op,
        written=value.written,
        columns=frozenset(value.columns),
        all_columns=value.all_columns,
        has_where=value.has_where,
    )


def _class_of(op: Op, kind: StatementClass) -> StatementClass:
    """The statement class an operation on a relation needs."""
    if op in WRITE_OPS:
        return StatementClass.WRITE
    if op is Op.MAINTAIN:
        return StatementClass.ADMIN
    if op in DDL_OPS:
        # GRANT ... ON TABLE t names t too, but it is an admin statement.
        return StatementClass.ADMIN if kind is StatementClass.ADMIN else StatementClass.DDL
    return StatementClass.READ


class _RootFacts:
    """Facts that only the root statement node carries."""

    def __init__(self, stmt: ast.Node, kind: StatementClass, command: str) -> None:
        self.command = command
        self.classes: set[StatementClass] = {kind}
        self.settings: list[SettingChange] = []
        self.locking: list[str] = []
        self.unsupported: list[str] = []
        self.explain_analyze = False
        self.copy: CopyInfo | None = None
        self.prepare_name: str | None = None
        self.prepared_sql: str | None = None
        self.execute_name: str | None = None
        self.deallocate_name: str | None = None
        self.discard: str | None = None
        handler = getattr(self, f"_{type(stmt).__name__}", None)
        if handler is not None:
            handler(stmt)

    def _TransactionStmt(self, stmt: ast.TransactionStmt) -> None:
        tk = TransactionStmtKind
        self.command = {
            tk.TRANS_STMT_BEGIN: "BEGIN",
            tk.TRANS_STMT_START: "START TRANSACTION",
            tk.TRANS_STMT_COMMIT: "COMMIT",
            tk.TRANS_STMT_ROLLBACK: "ROLLBACK",
            tk.TRANS_STMT_SAVEPOINT: "SAVEPOINT",
            tk.TRANS_STMT_RELEASE: "RELEASE",
            tk.TRANS_STMT_ROLLBACK_TO: "ROLLBACK TO SAVEPOINT",
            tk.TRANS_STMT_PREPARE: "PREPARE TRANSACTION",
            tk.TRANS_STMT_COMMIT_PREPARED: "COMMIT PREPARED",
            tk.TRANS_STMT_ROLLBACK_PREPARED: "ROLLBACK PREPARED",
        }.get(stmt.kind or tk.TRANS_STMT_BEGIN, "TRANSACTION")
        if stmt.kind in (tk.TRANS_STMT_BEGIN, tk.TRANS_STMT_START):
            self.settings.extend(from_transaction_options(stmt.options))
        elif stmt.kind in (
            tk.TRANS_STMT_PREPARE,
            tk.TRANS_STMT_COMMIT_PREPARED,
            tk.TRANS_STMT_ROLLBACK_PREPARED,
        ):
            # Two-phase commit leaves transactions (and their locks) behind the session.
            self.classes = {StatementClass.ADMIN}

    def _VariableSetStmt(self, stmt: ast.VariableSetStmt) -> None:
        changes = from_variable_set(stmt)
        self.settings.extend(changes)
        if changes and changes[0].via == "RESET":
            self.command = "RESET"
        if (stmt.name or "").lower() == "transaction":
            self.command = "SET TRANSACTION"
            self.classes = {StatementClass.TRANSACTION}

    def _DiscardStmt(self, stmt: ast.DiscardStmt) -> None:
        self.discard = {
            DiscardMode.DISCARD_ALL: "ALL",
            DiscardMode.DISCARD_PLANS: "PLANS",
            DiscardMode.DISCARD_SEQUENCES: "SEQUENCES",
            DiscardMode.DISCARD_TEMP: "TEMP",
        }.get(stmt.target or DiscardMode.DISCARD_ALL, "ALL")
        self.command = f"DISCARD {self.discard}"

    def _ExplainStmt(self, stmt: ast.ExplainStmt) -> None:
        for opt in stmt.options or ():
            if isinstance(opt, ast.DefElem) and opt.defname == "analyze":
                arg = opt.arg
                off = isinstance(arg, ast.Boolean) and not arg.boolval
                off = off or (
                    isinstance(arg, ast.String)
                    and (arg.sval or "").lower() in ("off", "false", "0")
                )
                off = off or (isinstance(arg, ast.Integer) and arg.ival == 0)
                self.explain_analyze = not off
        if self.explain_analyze:
            self.command = "EXPLAIN ANALYZE"

    def _CopyStmt(self, stmt: ast.CopyStmt) -> None:
        endpoint = "program" if stmt.is_program else "file" if stmt.filename else "client"
        self.copy = CopyInfo(from_client=bool(stmt.is_from), endpoint=endpoint)
        self.command = "COPY FROM" if stmt.is_from else "COPY TO"
        if stmt.is_from:
            self.classes.add(StatementClass.WRITE)
        if endpoint != "client":
            # Server-side files and programs run as the server's OS user.
            self.classes.add(StatementClass.ADMIN)

    def _LockStmt(self, stmt: ast.LockStmt) -> None:
        mode = LOCK_MODES.get(stmt.mode or 8, "ACCESS EXCLUSIVE")
        self.locking.append(f"LOCK IN {mode} MODE")
        if stmt.mode not in LOCK_MODES_FOR_READERS:
            self.classes.add(StatementClass.WRITE)

    def _PrepareStmt(self, stmt: ast.PrepareStmt) -> None:
        self.prepare_name = stmt.name
        self.prepared_sql = RawStream()(stmt.query) if stmt.query is not None else None

    def _ExecuteStmt(self, stmt: ast.ExecuteStmt) -> None:
        self.execute_name = stmt.name

    def _DeallocateStmt(self, stmt: ast.DeallocateStmt) -> None:
        self.deallocate_name = (
            "" if stmt.name is None or getattr(stmt, "isall", False) else stmt.name
        )

    def _DeclareCursorStmt(self, stmt: ast.DeclareCursorStmt) -> None:
        self.command = "DECLARE CURSOR"

    def _FetchStmt(self, stmt: ast.FetchStmt) -> None:
        self.command = "MOVE" if stmt.ismove else "FETCH"

    def _CreateTableAsStmt(self, stmt: ast.CreateTableAsStmt) -> None:
        if stmt.objtype == ObjectType.OBJECT_MATVIEW:
            self.command = "CREATE MATERIALIZED VIEW"
        elif stmt.is_select_into:
            self.command = "SELECT INTO"


_DROPPABLE_RELATIONS = {
    ObjectType.OBJECT_TABLE,
    ObjectType.OBJECT_VIEW,
    ObjectType.OBJECT_MATVIEW,
    ObjectType.OBJECT_FOREIGN_TABLE,
    ObjectType.OBJECT_SEQUENCE,
}


def _dropped_relations(stmt: ast.DropStmt, catalog: Catalog) -> list[tuple[tuple[str, str], str]]:
    """DROP TABLE / VIEW / SEQUENCE name their objects as lists of strings."""
    if stmt.removeType not in _DROPPABLE_RELATIONS:
        return []
    out: list[tuple[tuple[str, str], str]] = []
    for obj in stmt.objects or ():
        parts = strings(obj) if isinstance(obj, tuple) else []
        if not parts:
            continue
        schema = parts[-2] if len(parts) >= 2 else None
        relation = catalog.resolve(schema, parts[-1])
        out.append((relation, ".".join(parts)))
    return out
