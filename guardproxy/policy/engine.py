"""`Judge`: the decision for the SQL of one Query or Parse message, with a shape cache.

Contract (the proxy calls exactly this):

    judge = Judge(policy_set, catalog)          # one per policy set / catalog snapshot
    decision = judge.judge(policy, sql, ctx)    # policy = policy_set.match(agent_id)

* `sql` is the text of one simple Query message (all its statements are judged; if
  one is denied the whole message is denied and nothing runs) or of one Parse
  message (``$n`` parameters allowed; the decision then follows the prepared
  statement to every Bind / Execute, whichever server runs it).
* Unparseable SQL: deny with SQLSTATE 42601 and the parser's message.
* SQL-level ``EXECUTE name`` is judged as the statement ``PREPARE name`` stored:
  the proxy keeps what `Decision.prepared` reports in `SessionContext.prepared`
  (`SessionContext.with_prepared`). An EXECUTE of a name the proxy has not seen
  prepared in this session is denied (26000): it may have been prepared around the
  proxy. Row filters of a prepared statement are fixed when it is prepared, like
  the Parse of the extended protocol.
* `judge_startup(policy, params)` judges the startup parameters of a client
  connection like SET statements (``options=-c ...`` included) and returns the
  ``guard.*`` context they carry.

Cache: keyed by (agent type, `shape(sql)`), the normalized text, never a hash.
A hit costs one normalize() C call and a dict lookup. Only decisions that do not
depend on a constant, on the session context or on session state are stored
(`Decision.cacheable`). The cache is per Judge and is cleared when the catalog
changes (`set_catalog`); build a new Judge for a new policy set.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from pglast.stream import RawStream

from ..analysis.analyzer import AnalyzedStatement, SqlSyntaxError, analyze_tree
from ..analysis.catalog import EMPTY_CATALOG, Catalog
from ..analysis.model import StatementInfo
from ..analysis.shape import shape
from .agent import AgentPolicy
from .context import FrozenMap, SessionContext
from .decision import (
    SQLSTATE_INSUFFICIENT_PRIVILEGE,
    SQLSTATE_INTERNAL_ERROR,
    SQLSTATE_INVALID_STATEMENT_NAME,
    SQLSTATE_SYNTAX_ERROR,
    Action,
    Decision,
)
from .loader import PolicySet
from .rowfilter import RewriteError, apply_row_filters, principals_literal
from .rules import Violation, check_statement
from .session_rules import setting_violation, startup_changes

DEFAULT_CACHE_SIZE = 20_000
_MAX_EXECUTE_DEPTH = 4


class Judge:
    """Judges SQL for agent policies; holds the decision cache (not thread-safe)."""

    def __init__(
        self,
        policies: PolicySet,
        catalog: Catalog | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.policies = policies
        self._catalog = catalog or EMPTY_CATALOG
        self._cache: dict[tuple[str, str], tuple[AgentPolicy, Decision]] = {}
        self._cache_size = cache_size
        self.hits = 0
        self.misses = 0

    # -- catalog -----------------------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    def set_catalog(self, catalog: Catalog | None) -> None:
        """Use a new catalog snapshot (after DDL or reload); drops cached decisions."""
        new = catalog or EMPTY_CATALOG
        if new is not self._catalog:
            self._catalog = new
            self._cache.clear()

    def cache_info(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._cache)}

    # -- judging -----------------------------------------------------------------

    def judge(self, policy: AgentPolicy, sql: str, ctx: SessionContext) -> Decision:
        key = shape(sql)
        if key is not None:
            entry = self._cache.get((policy.name, key))
            if entry is not None and entry[0] is policy:
                self.hits += 1
                cached = entry[1]
                if cached.action == "deny" or cached.sql is sql:
                    return cached
                # Same decision, this message's text: a shallow copy costs well under a
                # microsecond this way (dataclasses.replace costs several).
                decision: Decision = object.__new__(Decision)
                decision.__dict__.update(cached.__dict__)
                decision.__dict__["sql"] = sql
                return decision
        self.misses += 1
        try:
            decision = self._judge(policy, sql, ctx, depth=0)
        except Exception as exc:  # fail closed on anything unforeseen (RecursionError...)
            problem = Violation(
                rule="internal",
                reason=f"guardproxy could not judge this statement ({type(exc).__name__}); "
                "it is refused (fail closed)",
                hint="simplify the statement",
                sqlstate=SQLSTATE_INTERNAL_ERROR,
            )
            return self._deny(policy, problem, "", cacheable=False)
        if key is not None and decision.cacheable:
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[(policy.name, key)] = (policy, decision)
        return decision

    def judge_startup(self, policy: AgentPolicy, params: Mapping[str, str]) -> Decision:
        """Judge a client's startup parameters (see the module docstring)."""
        changes, context, problems = startup_changes(params)
        if problems:
            violation = Violation(
                rule="startup",
                reason=f"{policy.name} may not connect with these parameters: {problems[0]} "
                f"(policy {policy.name}, startup parameters)",
                hint="connect with plain parameters; settings the policy allows can be SET later",
            )
            return self._deny(policy, violation, "", cacheable=False)
        for change in changes:
            problem = setting_violation(policy, change)
            if problem is not None:
                return self._deny(policy, problem, "", cacheable=False)
        return Decision(
            action="allow",
            rule="",
            reason="",
            hint="",
            sqlstate="",
            sql="",
            context_updates=FrozenMap(context),
            cacheable=False,
        )

    def _judge(self, policy: AgentPolicy, sql: str, ctx: SessionContext, depth: int) -> Decision:
        try:
            statements = analyze_tree(sql, self._catalog)
        except SqlSyntaxError as exc:
            syntax = Violation(
                rule="syntax",
                reason=f"the statement could not be parsed: {exc.message}",
                hint="fix the SQL syntax; guardproxy parses statements like PostgreSQL does",
                sqlstate=SQLSTATE_SYNTAX_ERROR,
            )
            return self._deny(policy, syntax, sql, cacheable=False)
        state = _MessageState()
        for statement in statements:
            violation = self._statement(policy, statement.info, ctx, state, depth)
            if violation is not None:
                return self._deny(policy, violation, sql, cacheable=state.cacheable)
        return self._finish(policy, sql, ctx, statements, state)

    def _statement(
        self,
        policy: AgentPolicy,
        info: StatementInfo,
        ctx: SessionContext,
        state: _MessageState,
        depth: int,
    ) -> Violation | None:
        guard_only = info.command in ("SET", "RESET") and bool(info.settings)
        for change in info.settings:
            state.cacheable = False
            name = change.name or ""
            if name == "all" or change.action != "set":
                state.reapply = True
            if name.startswith("guard.") and change.via in ("SET", "RESET"):
                state.context[name] = (
                    ",".join(change.values or ()) if change.action == "set" else ""
                )
                continue
            guard_only = False
            problem = setting_violation(policy, change)
            if problem is not None:
                return problem
        state.guard_only = state.guard_only and guard_only
        if info.discard == "ALL":
            state.reapply = True
            state.prepared[""] = None
        violation = check_statement(policy, info, self._catalog)
        if violation is not None:
            return violation
        if info.prepare_name is not None and info.prepared_sql is not None:
            state.cacheable = False
            state.prepared[info.prepare_name] = info.prepared_sql
        if info.deallocate_name is not None:
            state.cacheable = False
            state.prepared[info.deallocate_name] = None
        if info.execute_name is not None:
            state.cacheable = False
            return self._execute(policy, info.execute_name, ctx, depth)
        return None

    def _execute(
        self, policy: AgentPolicy, name: str, ctx: SessionContext, depth: int
    ) -> Violation | None:
        stored = ctx.prepared.get(name)
        if stored is None or depth >= _MAX_EXECUTE_DEPTH:
            return Violation(
                rule="prepared",
                reason=f"{policy.name} may not EXECUTE {name}: guardproxy has not seen it prepared "
                f"in this session (policy {policy.name}, prepared statements)",
                hint=f"PREPARE {name} AS ... through guardproxy first",
                sqlstate=SQLSTATE_INVALID_STATEMENT_NAME,
            )
        inner = self._judge(policy, stored, ctx, depth + 1)
        if inner.action == "deny" or inner.monitored:
            return Violation(
                rule=inner.rule,
                reason=f"EXECUTE {name}: {inner.reason}",
                hint=inner.hint,
                sqlstate=inner.sqlstate or SQLSTATE_INSUFFICIENT_PRIVILEGE,
            )
        return None

    def _finish(
        self,
        policy: AgentPolicy,
        sql: str,
        ctx: SessionContext,
        statements: list[AnalyzedStatement],
        state: _MessageState,
    ) -> Decision:
        proxy_only = bool(statements) and state.guard_only
        context = FrozenMap(state.context)
        prepared = MappingProxyType(dict(state.prepared))

        def make(
            action: Action,
            rule: str,
            reason: str,
            out: str,
            cacheable: bool,
            monitored: bool = False,
        ) -> Decision:
            return Decision(
                action=action,
                rule=rule,
                reason=reason,
                hint="",
                sqlstate="",
                sql=out,
                monitored=monitored,
                context_updates=context,
                cacheable=cacheable,
                proxy_only=proxy_only,
                prepared=prepared,
                reapply_settings=state.reapply,
            )

        filters = policy.row_filters_for(self._catalog) if policy.row_filters else {}
        touched = [
            record.relation
            for statement in statements
            for record in statement.records
            if record.relation in filters
        ]
        if not touched:
            cacheable = state.cacheable and not state.context
            return make("allow", "", "", "" if proxy_only else sql, cacheable)
        table = filters[touched[0]].table
        rule = f"row_filters.{table}"
        if policy.monitor:
            reason = (
                f"{policy.name} would read or write {table} through its row filter "
                f"(policy {policy.name}, {rule}; mode monitor)"
            )
            return make("allow", rule, reason, sql, cacheable=False, monitored=True)
        values = ctx.placeholder_values()
        values["principals"] = principals_literal(ctx.principals)
        readable: dict[tuple[str, str], tuple[str, ...] | None] = {}
        for relation in filters:
            columns = self._catalog.columns(*relation)
            table_rule = policy.table_rule(relation[0], relation[1], self._catalog)
            readable[relation] = (
                table_rule.readable(columns) if columns is not None and table_rule else None
            )
        try:
            for statement in statements:
                apply_row_filters(statement.records, filters, values, readable)
        except RewriteError as exc:
            failed = f"row_filters.{exc.table}" if exc.table else rule
            violation = Violation(
                rule=failed,
                reason=f"{policy.name} may not run this statement: {exc} (policy {policy.name}, {failed})",
                hint="rows of this table are filtered for this agent type: read them with SELECT, "
                "change them with UPDATE / DELETE ... WHERE",
            )
            return self._deny(policy, violation, sql, cacheable=False)
        rewritten = RawStream()(tuple(s.raw for s in statements))
        reason = f"rows of {table} are filtered for {policy.name} (policy {policy.name}, {rule})"
        return make("rewrite", rule, reason, rewritten, cacheable=False)

    @staticmethod
    def _deny(policy: AgentPolicy, violation: Violation, sql: str, cacheable: bool) -> Decision:
        if policy.monitor:
            return Decision(
                action="allow",
                rule=violation.rule,
                reason=violation.reason,
                hint=violation.hint,
                sqlstate="",
                sql=sql,
                monitored=True,
                cacheable=cacheable,
            )
        return Decision(
            action="deny",
            rule=violation.rule,
            reason=violation.reason,
            hint=violation.hint,
            sqlstate=violation.sqlstate,
            sql="",
            cacheable=cacheable,
        )


class _MessageState:
    """What the statements of one message add up to, besides allow / deny."""

    __slots__ = ("cacheable", "context", "guard_only", "prepared", "reapply")

    def __init__(self) -> None:
        self.cacheable = True
        self.context: dict[str, str] = {}
        self.guard_only = True
        self.prepared: dict[str, str | None] = {}
        self.reapply = False
