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
from pathlib import Path
from types import MappingProxyType

from ..analysis.catalog import Catalog
from ..analysis.model import Op, StatementClass
from .durations import to_ms
from .models import PolicyDocument
from .rowfilter import RowFilter

#: Statement classes that change something; a policy without them is read-only.
CHANGING_CLASSES = frozenset(
    {StatementClass.WRITE, StatementClass.DDL, StatementClass.ADMIN, StatementClass.CODE}
)


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

    def __post_init__(self) -> None:
        qualified = {(t.schema, t.name): t for t in self.tables if t.schema is not None}
        unqualified = {t.name: t for t in self.tables if t.schema is None}
        object.__setattr__(self, "_qualified", MappingProxyType(qualified))
        object.__setattr__(self, "_unqualified", MappingProxyType(unqualified))

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
        return None

    def row_filters_for(self, catalog: Catalog) -> dict[tuple[str, str], RowFilter]:
        return {catalog.resolve(t.schema, t.name): f for t, f in self.row_filters}

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
            lines.append(f"  table {rule.key}: " + "; ".join(parts))
        for rule, row_filter in self.row_filters:
            lines.append(f"  row filter {rule.key}: {row_filter.source}")
        timeouts = self.document.timeouts.model_dump(exclude_none=True)
        if timeouts:
            lines.append("  timeouts: " + ", ".join(f"{k} {_fmt(v)}" for k, v in timeouts.items()))
        limits = self.document.limits.model_dump(exclude_none=True)
        if limits:
            lines.append("  limits: " + ", ".join(f"{k} {v}" for k, v in limits.items()))
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
