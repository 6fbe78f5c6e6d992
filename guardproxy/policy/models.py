"""The policy file format: pydantic models of one YAML file per agent type.

`PolicyDocument` mirrors the YAML exactly (unknown keys are errors, every value is
checked for type and range). Checks that involve several keys (an operation that
needs a statement class the policy does not allow, a column both allowed and
denied, ...) are in `checks.py`; the loader runs both and reports every problem.
`docs/policies.md` is the reference for each key; keep the two in step.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from .durations import parse_duration
from .names import parse_column_name

Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
ColumnName = Annotated[str, AfterValidator(parse_column_name)]

StatementClassName = Literal[
    "read",
    "write",
    "ddl",
    "admin",
    "code",
    "notify",
    "transaction",
    "session",
    "cursor",
    "prepared",
]
TableOp = Literal[
    "select", "insert", "update", "delete", "truncate", "ddl", "references", "maintain"
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class SoftDeleteDocument(_Strict):
    """``tables.<name>.soft_delete``: the columns a DELETE sets instead of removing rows."""

    deleted_at: ColumnName = "deleted_at"  # timestamptz: when (NULL: the row is live)
    deleted_by: ColumnName = "deleted_by"  # text: the agent id
    reason: ColumnName = "delete_reason"  # text: the context's reason tag

    @model_validator(mode="after")
    def _distinct(self) -> SoftDeleteDocument:
        names = [self.deleted_at, self.deleted_by, self.reason]
        if len(set(names)) != len(names):
            raise ValueError(
                f"deleted_at, deleted_by and reason must be three different columns; "
                f"got {', '.join(names)}"
            )
        return self


def _soft_delete(value: object) -> object:
    """``soft_delete: true`` means the default column names; false or null: none."""
    if value is True:
        return {}
    if value is False or value is None:
        return None
    if isinstance(value, dict | SoftDeleteDocument):
        return value
    raise ValueError(
        "expected true, or a mapping naming the columns "
        "{deleted_at: ..., deleted_by: ..., reason: ...}; "
        f"got {value!r}"
    )


def _none_is_empty(value: object) -> object:
    """A key with only comments under it (``tables:`` of a fresh `guardproxy init`
    skeleton) is YAML null: no entries."""
    return {} if value is None else value


class TableDocument(_Strict):
    """``tables.<name>``: what the agent may do to one table or view."""

    ops: list[TableOp] = Field(default_factory=lambda: list[TableOp](["select"]), min_length=1)
    columns: list[ColumnName] | None = None  # readable columns; None: all (minus deny_columns)
    update_columns: list[ColumnName] | None = None  # None: all (minus deny_columns)
    insert_columns: list[ColumnName] | None = None  # None: all (minus deny_columns)
    deny_columns: list[ColumnName] = Field(default_factory=list)  # never read nor written
    # write safety (docs/policies.md, "Write safety")
    soft_delete: Annotated[SoftDeleteDocument | None, BeforeValidator(_soft_delete)] = None
    append_only: bool = False
    capture_deleted_rows: bool = False
    max_rows_affected: int | None = Field(default=None, ge=1)
    # writing a foreign key that refers to a soft-deleted row of another table
    soft_deleted_parents: Literal["refuse", "allow"] = "refuse"


class FunctionsDocument(_Strict):
    """``functions``: which functions may be called (by name, in any schema)."""

    default: Literal["allow", "deny"] = "allow"
    allow: list[str] = Field(default_factory=list)  # globs; also lifts the side-effect list
    deny: list[str] = Field(default_factory=list)  # globs; always wins

    @field_validator("allow", "deny")
    @classmethod
    def _patterns(cls, values: list[str]) -> list[str]:
        for value in values:
            if not value or any(ch.isspace() for ch in value) or "(" in value:
                raise ValueError(
                    f"expected a function name or glob such as pg_sleep or dblink*; got {value!r}"
                )
        return [v.lower() if not v.startswith('"') else v.strip('"') for v in values]


class TimeoutsDocument(_Strict):
    """``timeouts``: enforced on upstream sessions (and by the proxy where Postgres cannot)."""

    statement_timeout: Duration | None = None
    idle_in_transaction_timeout: Duration | None = None
    transaction_timeout: Duration | None = None
    max_task_duration: Duration | None = None


class LimitsDocument(_Strict):
    """``limits``: per agent type, so one type cannot starve the others."""

    max_server_connections: int | None = Field(default=None, ge=1, le=10_000)
    max_client_sessions: int | None = Field(default=None, ge=1, le=1_000_000)
    max_rows_affected: int | None = Field(default=None, ge=1)  # per write statement
    max_rows_returned: int | None = Field(default=None, ge=1, le=100_000_000)  # per read
    # bytes of row data (DataRow / CopyData payloads) per result and per cursor
    max_bytes_returned: int | None = Field(default=None, ge=1, le=1 << 40)
    on_rows_returned_over: Literal["truncate", "error"] = "truncate"
    max_plan_cost: float | None = Field(default=None, gt=0)  # EXPLAIN total cost of a read
    max_plan_rows: int | None = Field(default=None, ge=1)  # EXPLAIN row estimate of a read


class IdempotencyDocument(_Strict):
    """``idempotency``: which writes get an idempotency key, and for how long it holds."""

    mode: Literal["off", "explicit", "derived"] = "off"
    ttl: Duration = timedelta(hours=24)


class WindowBudgetDocument(_Strict):
    """What one agent (or all agents of the type) may write within a rolling ``window``,
    whatever task names they use."""

    max_rows_written: int | None = Field(default=None, ge=1)
    max_statements: int | None = Field(default=None, ge=1)
    window: Duration = timedelta(hours=1)

    @model_validator(mode="after")
    def _a_limit(self) -> WindowBudgetDocument:
        if self.max_rows_written is None and self.max_statements is None:
            raise ValueError("give max_rows_written, max_statements or both")
        seconds = self.window.total_seconds()
        if not 60 <= seconds <= 31 * 86400:
            raise ValueError("window must be between 1min and 31d")
        return self


class BudgetsDocument(_Strict):
    """``budgets``: what one task (context ``task``) may do, across sessions and proxies;
    ``per_agent`` / ``per_agent_type``: what one agent, and the whole type, may do in a
    rolling window, whatever task names are used."""

    max_writes_per_task: int | None = Field(default=None, ge=1)  # rows written
    max_statements_per_task: int | None = Field(default=None, ge=1)
    per_agent: WindowBudgetDocument | None = None
    per_agent_type: WindowBudgetDocument | None = None


class AuditDocument(_Strict):
    """``audit``: what happens when audit events cannot be recorded."""

    on_loss: Literal["count", "fail_closed"] = "count"


class SettingsDocument(_Strict):
    """``settings``: run-time parameters the agent may not SET, on top of the built-in rules."""

    deny: list[str] = Field(default_factory=list)

    @field_validator("deny")
    @classmethod
    def _lower(cls, values: list[str]) -> list[str]:
        for value in values:
            if not value or any(ch.isspace() for ch in value):
                raise ValueError(f"expected a setting name such as work_mem; got {value!r}")
        return [v.lower() for v in values]


class RowFilterOpsDocument(_Strict):
    """``row_filters.<table>`` as a mapping: a condition per operation, like the ``USING``
    and ``WITH CHECK`` of row-level security (docs/policies.md, ``row_filters``)."""

    select: Annotated[str, Field(min_length=1)] | None = None  # reads
    update: Annotated[str, Field(min_length=1)] | None = None  # rows UPDATE may change
    delete: Annotated[str, Field(min_length=1)] | None = None  # rows DELETE may remove
    insert: Annotated[str, Field(min_length=1)] | None = None  # every row INSERT adds

    @model_validator(mode="after")
    def _some(self) -> RowFilterOpsDocument:
        if not any((self.select, self.update, self.delete, self.insert)):
            raise ValueError("give a condition for at least one of select, update, delete, insert")
        return self


class PolicyDocument(_Strict):
    """One policy file: the policy of one agent type (the file name is the type's name)."""

    description: str = ""
    agents: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    upstream_role: str = Field(min_length=1, max_length=63)
    mode: Literal["enforce", "monitor"] = "enforce"
    statements: list[StatementClassName] = Field(
        default_factory=lambda: list[StatementClassName](["read"])
    )
    tables: Annotated[dict[str, TableDocument], BeforeValidator(_none_is_empty)] = Field(
        default_factory=dict
    )
    functions: FunctionsDocument = Field(default_factory=FunctionsDocument)
    require_where: bool = True
    allow_locking: bool = False
    timeouts: TimeoutsDocument = Field(default_factory=TimeoutsDocument)
    limits: LimitsDocument = Field(default_factory=LimitsDocument)
    settings: SettingsDocument = Field(default_factory=SettingsDocument)
    row_filters: Annotated[
        dict[str, Annotated[str, Field(min_length=1)] | RowFilterOpsDocument],
        BeforeValidator(_none_is_empty),
    ] = Field(default_factory=dict)
    idempotency: IdempotencyDocument = Field(default_factory=IdempotencyDocument)
    budgets: BudgetsDocument = Field(default_factory=BudgetsDocument)
    audit: AuditDocument = Field(default_factory=AuditDocument)
    # verified delegation tokens (docs/delegation.md): off, optional or required
    delegation: Annotated[
        Literal["off", "optional", "required"],
        BeforeValidator(lambda v: "off" if v is False else v),  # YAML reads a bare off as false
    ] = "off"
