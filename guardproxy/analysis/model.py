"""What the analyzer reports about one SQL statement: frozen, hashable values.

`analyze()` turns each statement of a SQL text into one `StatementInfo`. The policy
engine only reads these values; it never looks at the parse tree itself, so every
fact a rule needs must be recorded here.

Conventions:

* Names are the parsed names: unquoted identifiers already folded to lower case,
  quoted and ``U&"..."`` identifiers exactly as Postgres would see them.
* A relation is identified by its *resolved* schema (the schema Postgres would pick
  for an unqualified name, given the catalog's search path) and its name; `written`
  keeps the spelling of the statement for messages.
* One `RelationAccess` per (relation, operation): the columns of every occurrence are
  merged. Reading columns in the WHERE / RETURNING of an UPDATE or DELETE is a
  separate ``select`` access, as Postgres requires the SELECT privilege for it.
* `all_columns` means "every column, present and future": ``*``, ``t.*``, whole-row
  references (``SELECT c FROM customers c``, ``row_to_json(c)``, ``c.row_to_json``),
  COPY without a column list, INSERT without a column list, column aliases that could
  not be mapped back to real names without a catalog.
* Columns compared by ``JOIN ... USING``, ``NATURAL JOIN`` and ``ON CONFLICT (k)`` are
  read columns; so are system columns (``ctid``, ``xmin``...), by their names.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class StatementClass(StrEnum):
    """The families of statements a policy allows (key ``statements``)."""

    READ = "read"  # SELECT, VALUES, TABLE, SHOW-free reads, COPY ... TO STDOUT
    WRITE = "write"  # INSERT, UPDATE, DELETE, MERGE, TRUNCATE, COPY ... FROM STDIN
    DDL = "ddl"  # CREATE / ALTER / DROP / COMMENT on schema objects, SELECT INTO
    ADMIN = "admin"  # roles, grants, VACUUM, ALTER SYSTEM, server-side COPY, 2PC...
    CODE = "code"  # DO blocks and CALL: code the proxy cannot see into
    NOTIFY = "notify"  # LISTEN / NOTIFY
    # Always allowed (each governed by its own rules): drivers need them.
    TRANSACTION = "transaction"  # BEGIN, COMMIT, SAVEPOINT, SET TRANSACTION...
    SESSION = "session"  # SET, RESET, SHOW, DISCARD, UNLISTEN
    CURSOR = "cursor"  # DECLARE (judged by its query), FETCH, MOVE, CLOSE
    PREPARED = "prepared"  # PREPARE (judged by its query), EXECUTE, DEALLOCATE


#: Classes every policy allows implicitly: their content is judged by other rules.
ALWAYS_ALLOWED_CLASSES = frozenset(
    {
        StatementClass.TRANSACTION,
        StatementClass.SESSION,
        StatementClass.CURSOR,
        StatementClass.PREPARED,
    }
)


class Op(StrEnum):
    """What a statement does to a relation."""

    SELECT = "select"
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    TRUNCATE = "truncate"
    LOCK = "lock"  # LOCK TABLE (row locks of SELECT ... FOR UPDATE are `locking`)
    CREATE = "create"  # a new relation: CREATE TABLE / VIEW / SELECT INTO ...
    DDL = "ddl"  # ALTER / DROP / CREATE INDEX / TRIGGER / RULE / POLICY on it
    REFERENCES = "references"  # named by DDL of another object (FK, LIKE, INHERITS)
    MAINTAIN = "maintain"  # VACUUM, ANALYZE, CLUSTER, REINDEX, REFRESH


#: Operations that change rows.
WRITE_OPS = frozenset({Op.INSERT, Op.UPDATE, Op.DELETE, Op.TRUNCATE})
#: Operations that change schema objects.
DDL_OPS = frozenset({Op.CREATE, Op.DDL, Op.REFERENCES})


@dataclass(frozen=True, slots=True)
class RelationAccess:
    """One operation on one relation, with the columns involved."""

    schema: str
    name: str
    op: Op
    written: str  # as the statement spelled it, e.g. "customers" or "Sales.Orders"
    columns: frozenset[str] = frozenset()
    all_columns: bool = False
    # UPDATE / DELETE only: False when there is no WHERE or it references no column
    # (`WHERE true`, `WHERE 1 = 1`); `WHERE CURRENT OF cursor` counts as a WHERE.
    has_where: bool = True

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class FunctionRef:
    """A function called anywhere in the statement (FROM clause, CALL, defaults...)."""

    schema: str | None  # None when unqualified
    name: str

    @property
    def qualified(self) -> str:
        return self.name if self.schema is None else f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class SettingChange:
    """A change of a run-time setting, whatever the syntax used for it.

    `name` is the setting as Postgres names it internally: ``SET ROLE x`` is ``role``,
    ``SET SCHEMA 'x'`` is ``search_path``, ``BEGIN READ WRITE`` and ``SET TRANSACTION
    READ WRITE`` are ``transaction_read_only`` = ``off``, ``SET SESSION
    CHARACTERISTICS AS TRANSACTION READ WRITE`` is ``default_transaction_read_only``.
    ``RESET ALL`` is recorded with name ``all``. `name` is None when it is not a
    literal (``set_config(some_expression, ...)``).
    """

    name: str | None
    action: str  # "set", "reset" (RESET x / SET x TO DEFAULT / RESET ALL), "current"
    values: tuple[str, ...] | None = None  # literal values as text; None if not literal
    local: bool = False  # SET LOCAL, set_config(..., true), transaction-level modes
    via: str = "SET"  # "SET", "BEGIN", "SET TRANSACTION", "set_config", "RESET"


@dataclass(frozen=True, slots=True)
class CopyInfo:
    """The data direction and endpoint of a COPY statement."""

    from_client: bool  # COPY ... FROM (data flows into the table)
    endpoint: str  # "client" (STDIN/STDOUT), "file" or "program"


@dataclass(frozen=True, slots=True)
class StatementInfo:
    """Everything the policy engine needs to know about one statement."""

    command: str  # "SELECT", "INSERT", "EXPLAIN", "SET", "CREATE TABLE", ...
    kind: StatementClass  # class of the statement itself
    classes: frozenset[StatementClass]  # every class it needs (a writable CTE adds WRITE)
    text: str  # this statement's own text
    relations: tuple[RelationAccess, ...] = ()
    functions: tuple[FunctionRef, ...] = ()
    settings: tuple[SettingChange, ...] = ()
    locking: tuple[str, ...] = ()  # "FOR UPDATE", "LOCK IN ACCESS EXCLUSIVE MODE", ...
    ctes: tuple[str, ...] = ()  # names of the CTEs defined anywhere in the statement
    writable_ctes: tuple[str, ...] = ()  # CTEs whose body is INSERT / UPDATE / DELETE / MERGE
    explain_analyze: bool = False  # EXPLAIN ANALYZE: the inner statement runs
    copy: CopyInfo | None = None
    prepare_name: str | None = None  # PREPARE name AS ...
    prepared_sql: str | None = None  # the statement PREPARE stores, printed by pglast
    execute_name: str | None = None  # EXECUTE name (...)
    deallocate_name: str | None = None  # DEALLOCATE name; "" for DEALLOCATE ALL
    discard: str | None = None  # DISCARD ALL / PLANS / SEQUENCES / TEMP
    # Why the analyzer could not judge the statement (unknown node types, unsupported
    # statement kinds, non-literal setting names...). Non-empty means: deny.
    unsupported: tuple[str, ...] = ()
    # Column references that resolve to no column, output name or FROM item, each
    # with why ("j.x: no table, alias or FROM item named j is in scope"). Non-empty
    # means: deny (fail closed; see `guardproxy.analysis.columns`).
    unresolved: tuple[str, ...] = ()
    # `t.f` where the columns of t are not known: a column f, or the call f(t) in
    # functional notation. The function rules that deny by name apply to these.
    possible_calls: tuple[FunctionRef, ...] = ()

    def relations_with(self, op: Op) -> tuple[RelationAccess, ...]:
        return tuple(r for r in self.relations if r.op is op)

    @property
    def is_read_only(self) -> bool:
        """True when the statement changes nothing: no write / DDL / admin class."""
        return not (
            self.classes
            & {
                StatementClass.WRITE,
                StatementClass.DDL,
                StatementClass.ADMIN,
                StatementClass.CODE,
                StatementClass.NOTIFY,
            }
        )
