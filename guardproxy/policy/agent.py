"""`AgentPolicy`: the validated, compiled policy of one agent type, as the proxy uses it.

Built by the loader from a `PolicyDocument` that passed every check; immutable, so
a reload swaps whole `PolicySet` snapshots and a session keeps a consistent view.

What the proxy enforces itself (the judge only exposes them):

* `statement_timeout`, `idle_in_transaction_timeout`: set on upstream sessions (see
  `upstream_settings()`); the judge refuses any attempt to raise or disable them.
* `transaction_timeout`: Postgres 17 has a setting for it, 15 and 16 do not, so the
  proxy measures transaction age and cancels / terminates beyond it.
* `max_task_duration`: the proxy refuses statements of a task this long after the
  task's first statement (task from the session context).
* `max_server_connections` / `max_client_sessions`: pool size and admission limit
  of this agent type.
* `upstream_role`: the role upstream connections of this type log in as (or SET
  ROLE to, from the proxy's own login; never from an agent's statement).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from fnmatch import fnmatchcase
from pathlib import Path
from types import MappingProxyType

from ..analysis.catalog import Catalog
from ..analysis.model import Op, StatementClass
from .decision import RowsOverCap
from .durations import to_ms
from .models import PolicyDocument, WindowBudgetDocument
from .rowfilter import RowFilter


def key_path(*parts: str | int) -> str:
    """``tables.customers.ops`` / ``tables["sales.orders"].ops`` / ``agents[0]``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part and all(ch.isalnum() or ch in "_-" for ch in part):
            out += f".{part}" if out else part
        else:
            out += f'["{part}"]'
    return out


#: Schemas a table glob never covers: the system catalogs and guardproxy's own.
GLOB_EXCLUDED_SCHEMAS = frozenset({"pg_catalog", "information_schema", "guardproxy"})

#: Statement classes that change something; a policy without them is read-only.
CHANGING_CLASSES = frozenset(
    {StatementClass.WRITE, StatementClass.DDL, StatementClass.ADMIN, StatementClass.CODE}
)


@dataclass(frozen=True)
class SoftDelete:
    """The soft-delete columns of a table (``tables.<key>.soft_delete``)."""

    deleted_at: str = "deleted_at"
    deleted_by: str = "deleted_by"
    reason: str = "delete_reason"

    @property
    def columns(self) -> tuple[str, str, str]:
        return (self.deleted_at, self.deleted_by, self.reason)


@dataclass(frozen=True)
class TableRule:
    """``tables.<key>`` compiled: names parsed the way Postgres parses them."""

    key: str  # as written in the policy, for messages and rule paths
    schema: str | None  # None: unqualified, resolved with the catalog's search path
    name: str
    ops: frozenset[Op]
    columns: frozenset[str] | None = None
    update_columns: frozenset[str] | None = None
    insert_columns: frozenset[str] | None = None
    deny_columns: frozenset[str] = frozenset()
    soft_delete: SoftDelete | None = None  # DELETE sets these columns instead
    append_only: bool = False  # INSERT only
    capture_deleted_rows: bool = False  # hard DELETEs keep row images
    max_rows_affected: int | None = None  # per write statement
    pattern: bool = False  # a glob (``reporting.*``, ``audit_*``): `schema` / `name` are patterns

    def matches(self, schema: str, name: str, catalog: Catalog) -> bool:
        """Does this glob rule cover the relation? Never a system catalog nor guardproxy's
        own schema; an unqualified glob only relations its name finds on the search path."""
        if not self.pattern or schema in GLOB_EXCLUDED_SCHEMAS:
            return False
        if not fnmatchcase(name, self.name):
            return False
        if self.schema is not None:
            return fnmatchcase(schema, self.schema)
        return catalog.resolve(None, name) == (schema, name)

    # foreign keys of this table may not refer to soft-deleted rows (soft_deleted_parents)
    refuse_deleted_parents: bool = True

    def readable(self, all_columns: tuple[str, ...]) -> tuple[str, ...]:
        """The columns of `all_columns` this rule lets the agent read, in order."""
        return tuple(
            c
            for c in all_columns
            if c not in self.deny_columns and (self.columns is None or c in self.columns)
        )


@dataclass(frozen=True)
class FunctionRules:
    default: str  # "allow" or "deny" (deny: only built-in functions and `allow`)
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentPolicy:
    """The policy of one agent type."""

    name: str
    source: Path
    document: PolicyDocument
    agents: tuple[str, ...]
    upstream_role: str
    mode: str  # "enforce" or "monitor"
    statements: frozenset[StatementClass]
    tables: tuple[TableRule, ...]
    functions: FunctionRules
    require_where: bool
    allow_locking: bool
    denied_settings: frozenset[str]
    row_filters: tuple[tuple[TableRule, RowFilter], ...] = ()
    description: str = ""
    _qualified: Mapping[tuple[str, str], TableRule] = field(default_factory=dict, repr=False)
    _unqualified: Mapping[str, TableRule] = field(default_factory=dict, repr=False)

    _globs: tuple[TableRule, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        exact = [t for t in self.tables if not t.pattern]
        qualified = {(t.schema, t.name): t for t in exact if t.schema is not None}
        unqualified = {t.name: t for t in exact if t.schema is None}
        object.__setattr__(self, "_qualified", MappingProxyType(qualified))
        object.__setattr__(self, "_unqualified", MappingProxyType(unqualified))
        object.__setattr__(self, "_globs", tuple(t for t in self.tables if t.pattern))

    def __hash__(self) -> int:
        return hash((self.name, self.source))

    # -- tables ------------------------------------------------------------------

    def table_rule(self, schema: str, name: str, catalog: Catalog) -> TableRule | None:
        """The rule for a resolved relation: a qualified key, or an unqualified key that
        resolves (with the catalog's search path) to this very relation."""
        rule = self._qualified.get((schema, name))
        if rule is not None:
            return rule
        rule = self._unqualified.get(name)
        if rule is not None and catalog.resolve(None, name) == (schema, name):
            return rule
        for glob in self._globs:  # an exact entry overrides a glob; the first glob wins
            if glob.matches(schema, name, catalog):
                return glob
        return None

    def glob_matches(self, rule: TableRule, catalog: Catalog) -> list[tuple[str, str]]:
        """The relations of the catalog a glob rule covers (those no exact entry or earlier
        glob takes), in catalog order."""
        return [
            relation
            for relation in catalog.tables
            if rule.matches(*relation, catalog) and self.table_rule(*relation, catalog) is rule
        ]

    def row_filters_for(self, catalog: Catalog) -> dict[tuple[str, str], RowFilter]:
        out: dict[tuple[str, str], RowFilter] = {}
        for rule, row_filter in self.row_filters:
            for relation in self._relations(rule, catalog):
                out[relation] = row_filter
        return out

    def resolved_tables(self, catalog: Catalog) -> dict[tuple[str, str], TableRule]:
        """Every table rule by the (schema, name) it resolves to with `catalog` (a glob by
        each relation it covers)."""
        out: dict[tuple[str, str], TableRule] = {}
        for rule in self.tables:
            for relation in self._relations(rule, catalog):
                out.setdefault(relation, rule)
        return out

    def _relations(self, rule: TableRule, catalog: Catalog) -> list[tuple[str, str]]:
        if rule.pattern:
            return self.glob_matches(rule, catalog)
        return [catalog.resolve(rule.schema, rule.name)]

    def cap_for(self, rule: TableRule | None) -> tuple[int | None, str]:
        """The row cap of a write to a table and the rule that sets it."""
        if rule is not None and rule.max_rows_affected is not None:
            return rule.max_rows_affected, f"{key_path('tables', rule.key)}.max_rows_affected"
        if self.max_rows_affected is not None:
            return self.max_rows_affected, "limits.max_rows_affected"
        return None, ""

    @property
    def uses_guard_schema(self) -> bool:
        """True when the judge's rewrites for this type write to ``guardproxy.deleted_rows``
        or call ``guardproxy.refuse_soft_deleted`` / ``guardproxy.check_insert`` /
        ``guardproxy.live_parent`` (its role needs privileges there): a child row written
        for a soft-delete parent table is checked by the latter, so any soft-delete table
        with any insert or update does."""
        soft = any(t.soft_delete is not None for t in self.tables)
        return self.uses_insert_checks or any(
            (t.soft_delete is not None and t.ops & {Op.DELETE, Op.INSERT})
            or (t.capture_deleted_rows and Op.DELETE in t.ops)
            or (soft and t.refuse_deleted_parents and t.ops & {Op.INSERT, Op.UPDATE})
            for t in self.tables
        )

    @property
    def uses_insert_checks(self) -> bool:
        """True when a row filter has an ``insert`` condition: the rewrite calls
        ``guardproxy.check_insert`` (its role needs EXECUTE on it)."""
        return any(f.insert is not None for _, f in self.row_filters)

    # -- write safety the runtime enforces ---------------------------------------

    @property
    def max_rows_affected(self) -> int | None:
        """``limits.max_rows_affected``: the cap of tables without their own."""
        return self.document.limits.max_rows_affected

    @property
    def max_rows_returned(self) -> int | None:
        return self.document.limits.max_rows_returned

    @property
    def max_bytes_returned(self) -> int | None:
        """``limits.max_bytes_returned``: bytes of row data per result and per cursor."""
        return self.document.limits.max_bytes_returned

    @property
    def on_rows_returned_over(self) -> RowsOverCap:
        return self.document.limits.on_rows_returned_over

    @property
    def max_plan_cost(self) -> float | None:
        return self.document.limits.max_plan_cost

    @property
    def max_plan_rows(self) -> int | None:
        return self.document.limits.max_plan_rows

    @property
    def idempotency_mode(self) -> str:
        """``off``, ``explicit`` (writes with an ``idempotency_key`` tag) or ``derived``."""
        return self.document.idempotency.mode

    @property
    def idempotency_ttl(self) -> timedelta:
        return self.document.idempotency.ttl

    @property
    def max_writes_per_task(self) -> int | None:
        """``budgets.max_writes_per_task``: rows a task may write, over all its statements."""
        return self.document.budgets.max_writes_per_task

    @property
    def max_statements_per_task(self) -> int | None:
        return self.document.budgets.max_statements_per_task

    @property
    def window_budgets(self) -> tuple[tuple[str, WindowBudgetDocument], ...]:
        """The rolling-window budgets, as (``per_agent`` | ``per_agent_type``, budget)."""
        budgets = self.document.budgets
        return tuple(
            (scope, budget)
            for scope, budget in (
                ("per_agent", budgets.per_agent),
                ("per_agent_type", budgets.per_agent_type),
            )
            if budget is not None
        )

    @property
    def audit_on_loss(self) -> str:
        """``count`` (drop events that cannot be recorded, and count them) or ``fail_closed``."""
        return self.document.audit.on_loss

    @property
    def audit_fail_closed(self) -> bool:
        """``audit.on_loss: fail_closed``: refuse writes while their audit events would be lost."""
        return self.document.audit.on_loss == "fail_closed"

    # -- limits the proxy enforces -----------------------------------------------

    @property
    def read_only(self) -> bool:
        """True when the policy allows no statement class that changes anything."""
        return not (self.statements & CHANGING_CLASSES)

    @property
    def statement_timeout(self) -> timedelta | None:
        return self.document.timeouts.statement_timeout

    @property
    def idle_in_transaction_timeout(self) -> timedelta | None:
        return self.document.timeouts.idle_in_transaction_timeout

    @property
    def transaction_timeout(self) -> timedelta | None:
        return self.document.timeouts.transaction_timeout

    @property
    def max_task_duration(self) -> timedelta | None:
        return self.document.timeouts.max_task_duration

    @property
    def max_server_connections(self) -> int | None:
        return self.document.limits.max_server_connections

    @property
    def max_client_sessions(self) -> int | None:
        return self.document.limits.max_client_sessions

    @property
    def monitor(self) -> bool:
        return self.mode == "monitor"

    def timeout_limits_ms(self) -> dict[str, int]:
        """Upper bounds, by Postgres setting name, that an agent may lower but not raise."""
        limits: dict[str, int] = {}
        if self.statement_timeout is not None:
            limits["statement_timeout"] = to_ms(self.statement_timeout)
        if self.idle_in_transaction_timeout is not None:
            limits["idle_in_transaction_session_timeout"] = to_ms(self.idle_in_transaction_timeout)
        if self.transaction_timeout is not None:
            limits["transaction_timeout"] = to_ms(self.transaction_timeout)
        return limits

    def upstream_settings(self, server_version_num: int = 150000) -> dict[str, str]:
        """Settings for every upstream session of this type (startup packet ``options``
        or SET right after connecting, so that RESET / DISCARD ALL return to them).

        ``transaction_timeout`` is included only for servers that have it (17+).
        """
        settings: dict[str, str] = {"standard_conforming_strings": "on"}
        for name, ms in self.timeout_limits_ms().items():
            if name == "transaction_timeout" and server_version_num < 170000:
                continue
            settings[name] = f"{ms}ms"
        if self.read_only:
            settings["default_transaction_read_only"] = "on"
        return settings

    def summary(self) -> str:
        """One line per aspect, for `guardproxy check`."""
        lines = [
            f"{self.name} ({self.source.name}): agents {', '.join(self.agents)} "
            f"as role {self.upstream_role}, mode {self.mode}",
            "  statements: " + ", ".join(sorted(s.value for s in self.statements)),
        ]
        for rule in self.tables:
            parts = [", ".join(sorted(o.value for o in rule.ops))]
            if rule.columns is not None:
                parts.append("columns " + ", ".join(sorted(rule.columns)))
            if rule.update_columns is not None:
                parts.append("update " + ", ".join(sorted(rule.update_columns)))
            if rule.deny_columns:
                parts.append("deny " + ", ".join(sorted(rule.deny_columns)))
            if rule.soft_delete is not None:
                parts.append("soft delete (" + ", ".join(rule.soft_delete.columns) + ")")
            if rule.append_only:
                parts.append("append-only")
            if rule.capture_deleted_rows:
                parts.append("deleted rows captured")
            if rule.max_rows_affected is not None:
                parts.append(f"at most {rule.max_rows_affected} rows per write")
            if not rule.refuse_deleted_parents:
                parts.append("may refer to soft-deleted parents")
            lines.append(f"  table {rule.key}: " + "; ".join(parts))
        for rule, row_filter in self.row_filters:
            if row_filter.reads and len(row_filter.variants) == 1:
                lines.append(f"  row filter {rule.key}: {row_filter.source}")
                continue
            for op, variant in row_filter.variants:
                lines.append(f"  row filter {rule.key}, {op}: {variant.source}")
        timeouts = self.document.timeouts.model_dump(exclude_none=True)
        if timeouts:
            lines.append("  timeouts: " + ", ".join(f"{k} {_fmt(v)}" for k, v in timeouts.items()))
        limits = self.document.limits.model_dump(exclude_none=True)
        if self.max_rows_returned is None and self.max_bytes_returned is None:
            limits.pop("on_rows_returned_over", None)
        if limits:
            lines.append("  limits: " + ", ".join(f"{k} {v}" for k, v in limits.items()))
        if self.idempotency_mode != "off":
            lines.append(
                f"  idempotency: {self.idempotency_mode}, keys kept {_fmt(self.idempotency_ttl)}"
            )
        budgets = self.document.budgets.model_dump(exclude_none=True)
        if budgets:
            lines.append("  budgets: " + ", ".join(f"{k} {v}" for k, v in budgets.items()))
        if self.audit_on_loss != "count":
            lines.append(f"  audit: on_loss {self.audit_on_loss}")
        return "\n".join(lines)


def _fmt(value: timedelta) -> str:
    ms = to_ms(value)
    if ms % 3_600_000 == 0:
        return f"{ms // 3_600_000}h"
    if ms % 60_000 == 0:
        return f"{ms // 60_000}min"
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"
