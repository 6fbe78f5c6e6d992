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

Write safety (`writes`, `rowcap`): after every statement of the message passed the
rules, each is checked for append-only tables, soft-delete and capture conditions
and countable row caps; then, in enforce mode, the tree is rewritten: row filters
and soft-delete filters (``deleted_at IS NULL``) on every read, UPDATE and DELETE
of the table, DELETEs of soft-delete / capture tables into the writable-CTE form,
upserts on soft-delete tables guarded, reads capped at ``max_rows_returned + 1``.
`Decision.write` / `writes` say what the message writes, `Decision.max_rows_returned`
what the runtime cuts.

Cache: keyed by (agent type, `shape(sql)`), the normalized text, never a hash.
A hit costs one normalize() C call and a dict lookup. Only decisions that do not
depend on a constant, on the session context or on session state are stored
(`Decision.cacheable`). One rewrite is cached: the row cap appended to a SELECT
without LIMIT (``\nLIMIT n``) depends on the shape alone, so a hit appends it to the
new message's text (one split() C call more). Reads rewritten only by row filters
are served from a template per shape and filter values (`templates`): the rewrite
of the normalized text, filled with each statement's constants. The caches are
per Judge and are cleared when the catalog changes (`set_catalog`); build a new
Judge for a new policy set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

from pglast import ast
from pglast.stream import RawStream

from ..analysis.analyzer import AnalyzedStatement, SqlSyntaxError, analyze_tree
from ..analysis.catalog import EMPTY_CATALOG, Catalog
from ..analysis.collector import RelationRecord
from ..analysis.model import StatementInfo
from ..analysis.shape import shape
from . import (
    pgprint,  # noqa: F401  (prints MERGE for Postgres 15)
    rowcap,
    templates,
)
from .agent import AgentPolicy, key_path
from .context import FrozenMap, SessionContext
from .decision import (
    SQLSTATE_INSUFFICIENT_PRIVILEGE,
    SQLSTATE_INTERNAL_ERROR,
    SQLSTATE_INVALID_STATEMENT_NAME,
    SQLSTATE_SYNTAX_ERROR,
    Action,
    Decision,
    WriteEffects,
)
from .filterhints import filter_reason, filtered_table_hint, operation_rule
from .insertcheck import add_insert_check
from .loader import PolicySet
from .rowfilter import (
    RewriteError,
    RowFilter,
    apply_row_filters,
    no_principals_notices,
    principals_literal,
)
from .rules import Violation, check_statement
from .session_rules import forwarded_guard_violation, setting_violation, startup_changes
from .writes import DeleteContext, WriteAnalysis, analyze_writes, rewrite_writes, soft_delete_filter

DEFAULT_CACHE_SIZE = 20_000
FilterValues = tuple[tuple[str, str | None], ...]  # row-filter placeholder -> its value
# templates hold the token list of their normalized text (kilobytes for a long one)
TEMPLATE_CACHE_SIZE = 2_000
_MAX_EXECUTE_DEPTH = 4


@dataclass(frozen=True, slots=True)
class _Entry:
    """A cached decision; `appends`: statements that get the row cap LIMIT appended."""

    policy: AgentPolicy
    decision: Decision
    appends: tuple[int, ...] = ()


class _Templated:
    """A rewritten read's shape: its decision and the template of its text."""

    __slots__ = ("decision", "normalized", "policy", "template")

    def __init__(
        self,
        policy: AgentPolicy,
        decision: Decision,
        template: templates.Template,
        normalized: templates.Tokens,
    ) -> None:
        self.policy = policy
        self.decision = decision
        self.template = template
        self.normalized = normalized

    def fill(self, sql: str) -> str | None:
        """``sql`` rewritten from the template; None when it cannot be (judge it in full).
        The filter values it was printed with are part of the key it is found by."""
        statement = templates.tokens(sql)
        if statement is None:
            return None
        template = self.template
        constants = templates.constants(statement, self.normalized, template.first_new)
        if constants is None or len(constants) < template.needs:
            return None
        return template.fill(constants)


def placeholder_values(ctx: SessionContext) -> dict[str, str | None]:
    """What row-filter placeholders stand for in this context."""
    values = ctx.placeholder_values()
    values["principals"] = principals_literal(ctx.principals)
    return values


def filter_values(ctx: SessionContext, names: Sequence[str]) -> FilterValues:
    """The values of the named row-filter placeholders in this context (None kept
    apart from the text 'None': a template is only ever shared by equal values)."""
    values = placeholder_values(ctx)
    return tuple((name, values.get(name)) for name in names)


def _with_sql(decision: Decision, sql: str) -> Decision:
    # Same decision, this message's text: a shallow copy costs well under a
    # microsecond this way (dataclasses.replace costs several).
    copy: Decision = object.__new__(Decision)
    copy.__dict__.update(decision.__dict__)
    copy.__dict__["sql"] = sql
    return copy


@dataclass(frozen=True, slots=True)
class _Filters:
    """Per policy and catalog: the row filter of each table (soft delete included)."""

    policy: AgentPolicy
    filters: Mapping[tuple[str, str], RowFilter]
    soft_only: frozenset[tuple[str, str]]  # filtered only because of soft_delete
    rules: Mapping[str, str]  # filter table key -> rule path
    readable: Mapping[tuple[str, str], tuple[str, ...] | None]
    columns: Mapping[tuple[str, str], tuple[str, ...] | None]  # all, for insert checks


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
        self._cache: dict[tuple[str, str], _Entry] = {}
        # rewritten reads: (agent type, shape, filter values) -> template, None if none
        self._templates: dict[tuple[str, str, FilterValues], _Templated | None] = {}
        # shapes whose filters use the context -> the placeholders they use
        self._valued: dict[tuple[str, str], tuple[str, ...]] = {}
        self._filters: dict[str, _Filters] = {}
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
            self._filters.clear()
            self._templates.clear()
            self._valued.clear()

    def cache_info(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._cache)}

    # -- judging -----------------------------------------------------------------

    def judge(self, policy: AgentPolicy, sql: str, ctx: SessionContext) -> Decision:
        key = shape(sql)
        if key is not None:
            entry = self._cache.get((policy.name, key))
            if entry is not None and entry.policy is policy:
                self.hits += 1
                cached = entry.decision
                if cached.action == "deny" or cached.sql is sql:
                    return cached
                out = sql
                if entry.appends and policy.max_rows_returned is not None:
                    out = rowcap.append_limits(sql, entry.appends, policy.max_rows_returned)
                return _with_sql(cached, out)
            shape_key = (policy.name, key)
            used = self._valued.get(shape_key)
            values = filter_values(ctx, used) if used else ()
            known = self._templates.get((policy.name, key, values))
            if known is not None and known.policy is policy:
                try:
                    filled = known.fill(sql)
                except Exception:  # unforeseen: judge it in full below
                    filled = None
                if filled is not None:
                    self.hits += 1
                    return _with_sql(known.decision, filled)
        self.misses += 1
        try:
            decision, appends, template_values = self._judge(policy, sql, ctx, 0, key or "")
        except Exception as exc:  # fail closed on anything unforeseen (RecursionError...)
            problem = Violation(
                rule="internal",
                reason=f"guardproxy could not judge this statement ({type(exc).__name__}); "
                "it is refused (fail closed)",
                hint="simplify the statement",
                sqlstate=SQLSTATE_INTERNAL_ERROR,
            )
            return self._deny(policy, problem, "", cacheable=False, shape=key or "")
        if key is not None and decision.cacheable:
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[(policy.name, key)] = _Entry(policy, decision, appends)
        elif key is not None and template_values is not None:
            try:
                self._remember_template(policy, sql, key, ctx, decision, template_values)
            except Exception:  # unforeseen: no template, the decision stands
                self._templates[(policy.name, key, template_values)] = None
        return decision

    def _remember_template(
        self,
        policy: AgentPolicy,
        sql: str,
        key: str,
        ctx: SessionContext,
        decision: Decision,
        values: FilterValues,
    ) -> None:
        """Learns the template of a rewritten read's shape, or that it has none (None:
        judge every statement). The normalized text is rewritten once, and the template
        filled with this statement's constants must have the structure of its own full
        rewrite."""
        if values:  # its rewrite depends on the session context: looked up with it
            if len(self._valued) >= TEMPLATE_CACHE_SIZE:
                self._valued.clear()
            self._valued[(policy.name, key)] = tuple(name for name, _ in values)
        template_key = (policy.name, key, values)
        if template_key in self._templates:
            return  # learned before
        if len(self._templates) >= TEMPLATE_CACHE_SIZE:
            self._templates.pop(next(iter(self._templates)))
        self._templates[template_key] = None
        statement, normalized = templates.tokens(sql), templates.tokens(key)
        if statement is None or normalized is None:
            return
        first_new = templates.first_new_parameter(statement)
        constants = templates.constants(statement, normalized, first_new)
        if constants is None:
            return
        try:
            general, _, general_values = self._judge(policy, key, ctx, 0, key)
            template = templates.Template(general.sql, first_new)
        except Exception:  # the normalized text does not parse (interval $1) or rewrite
            return
        if (
            general.action == "rewrite"
            and general.rule == decision.rule
            and general_values == values
            and template.needs <= len(constants)
            and shape(template.fill(constants)) == shape(decision.sql)
        ):
            self._templates[template_key] = _Templated(policy, decision, template, normalized)

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

    def _judge(
        self, policy: AgentPolicy, sql: str, ctx: SessionContext, depth: int, key: str
    ) -> tuple[Decision, tuple[int, ...], FilterValues | None]:
        try:
            statements = analyze_tree(sql, self._catalog)
        except SqlSyntaxError as exc:
            syntax = Violation(
                rule="syntax",
                reason=f"the statement could not be parsed: {exc.message}",
                hint="fix the SQL syntax; guardproxy parses statements like PostgreSQL does",
                sqlstate=SQLSTATE_SYNTAX_ERROR,
            )
            return self._deny(policy, syntax, sql, cacheable=False, shape=key), (), None
        state = _MessageState()
        for statement in statements:
            violation = self._statement(policy, statement.info, ctx, state, depth)
            if violation is not None:
                return self._deny(policy, violation, sql, state.cacheable, key), (), None
        forwarded = (
            None
            if state.guard_only
            else forwarded_guard_violation(policy, [*state.context, *state.resets])
        )
        if forwarded is not None:
            return self._deny(policy, forwarded, sql, False, key), (), None
        analyses: list[WriteAnalysis] = []
        for statement in statements:
            analysis = analyze_writes(
                policy, self._catalog, statement, state.executed.get(id(statement.info))
            )
            if analysis.violation is not None:
                return self._deny(policy, analysis.violation, sql, state.cacheable, key), (), None
            analyses.append(analysis)
        return self._finish(policy, sql, ctx, statements, analyses, state, key)

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
            if name == "all" and change.via == "RESET":
                state.reset_all()
            if name.startswith("guard.") and change.via in ("SET", "RESET"):
                if change.action == "set":
                    state.context[name] = ",".join(change.values or ())
                    state.resets.discard(name)
                else:  # back to its value at login, as Postgres does with a setting
                    state.context.pop(name, None)
                    state.resets.add(name)
                if change.local:
                    state.local.add(name)
                continue
            guard_only = False
            problem = setting_violation(policy, change)
            if problem is not None:
                return problem
        state.guard_only = state.guard_only and guard_only
        if info.discard == "ALL":
            state.reapply = True
            state.prepared[""] = None
            state.reset_all()
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
            return self._execute(policy, info, ctx, state, depth)
        return None

    def _execute(
        self,
        policy: AgentPolicy,
        info: StatementInfo,
        ctx: SessionContext,
        state: _MessageState,
        depth: int,
    ) -> Violation | None:
        name = info.execute_name or ""
        stored = ctx.prepared.get(name)
        if stored is None or depth >= _MAX_EXECUTE_DEPTH:
            return Violation(
                rule="prepared",
                reason=f"{policy.name} may not EXECUTE {name}: guardproxy has not seen it prepared "
                f"in this session (policy {policy.name}, prepared statements)",
                hint=f"PREPARE {name} AS ... through guardproxy first",
                sqlstate=SQLSTATE_INVALID_STATEMENT_NAME,
            )
        inner, _, _ = self._judge(policy, stored, ctx, depth + 1, "")
        if inner.action == "deny" or inner.monitored:
            return Violation(
                rule=inner.rule,
                reason=f"EXECUTE {name}: {inner.reason}",
                hint=inner.hint,
                sqlstate=inner.sqlstate or SQLSTATE_INSUFFICIENT_PRIVILEGE,
            )
        state.executed[id(info)] = inner
        return None

    # -- rewriting ---------------------------------------------------------------

    def _filters_for(self, policy: AgentPolicy) -> _Filters:
        """Row filters (the policy's, and ``deleted_at IS NULL`` of soft-delete tables)."""
        known = self._filters.get(policy.name)
        if known is not None and known.policy is policy:
            return known
        catalog = self._catalog
        own = policy.row_filters_for(catalog) if policy.row_filters else {}
        filters: dict[tuple[str, str], RowFilter] = {}
        soft_only: set[tuple[str, str]] = set()
        rules: dict[str, str] = {}
        readable: dict[tuple[str, str], tuple[str, ...] | None] = {}
        every: dict[tuple[str, str], tuple[str, ...] | None] = {}
        for relation, rule in policy.resolved_tables(catalog).items():
            combined = soft_delete_filter(rule, own.get(relation))
            if combined is None:
                continue
            filters[relation] = combined
            if relation in own:
                rules[combined.table] = f"row_filters.{combined.table}"
            else:
                soft_only.add(relation)
                rules[combined.table] = f"{key_path('tables', rule.key)}.soft_delete"
            columns = catalog.columns(*relation)
            readable[relation] = rule.readable(columns) if columns is not None else None
            every[relation] = columns
        result = _Filters(
            policy, MappingProxyType(filters), frozenset(soft_only), rules, readable, every
        )
        self._filters[policy.name] = result
        return result

    def _finish(
        self,
        policy: AgentPolicy,
        sql: str,
        ctx: SessionContext,
        statements: list[AnalyzedStatement],
        analyses: list[WriteAnalysis],
        state: _MessageState,
        key: str,
    ) -> tuple[Decision, tuple[int, ...], FilterValues | None]:
        proxy_only = bool(statements) and state.guard_only
        context = FrozenMap(state.context)
        prepared = MappingProxyType(dict(state.prepared))
        enforce = not policy.monitor
        writes = tuple(
            a.effects if enforce or a.effects is None else _unmanaged(a.effects) for a in analyses
        )
        max_rows = policy.max_rows_returned if enforce else None
        plans = [rowcap.plan(s.raw, max_rows) if max_rows else "none" for s in statements]
        executed_reads = [
            inner
            for s in statements
            if s.info.command == "EXECUTE"
            and (inner := state.executed.get(id(s.info))) is not None
            and inner.write is None
        ]
        returns_rows = max_rows is not None and (
            any(rowcap.returns_rows(s.raw) for s in statements)
            or any(inner.max_rows_returned is not None for inner in executed_reads)
        )
        max_bytes = policy.max_bytes_returned if enforce else None
        # cursors are followed capped or not: a FETCH must not outlive the decision
        # its DECLARE was made under (a reload, other principals)
        cursors = tuple(rowcap.cursor_of(s.raw) for s in statements)
        cursor = cursors[0] if len(cursors) == 1 else None
        if not any(c is not None for c in cursors):
            cursors = ()
        plan_check = (
            enforce
            and (policy.max_plan_cost is not None or policy.max_plan_rows is not None)
            and (
                any(rowcap.explainable(s.raw) for s in statements)
                or any(inner.plan_check for inner in executed_reads)
            )
        )

        def make(
            action: Action,
            rule: str,
            reason: str,
            out: str,
            cacheable: bool,
            monitored: bool = False,
            notices: tuple[str, ...] = (),
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
                context_resets=frozenset(state.resets),
                context_local=frozenset(state.local),
                cacheable=cacheable,
                proxy_only=proxy_only,
                prepared=prepared,
                reapply_settings=state.reapply,
                write=_merge(writes),
                writes=writes if any(w is not None for w in writes) else (),
                max_rows_returned=max_rows if returns_rows else None,
                rows_over_cap=policy.on_rows_returned_over,
                max_bytes_returned=max_bytes,
                shape=key,
                plan_check=plan_check,
                cursor=cursor,
                notices=notices,
                cursors=cursors,
            )

        table_filters = self._filters_for(policy)
        filters = table_filters.filters
        touched = [
            (statement, record)
            for statement in statements
            for record in statement.records
            if record.relation in filters
            and _filtered(record, record.relation in table_filters.soft_only)
            and filters[record.relation].applies(record)
        ]
        write_rule = next((a.rule for a in analyses if a.rewrites), "")
        filter_rule = ""
        if touched:
            first = filters[touched[0][1].relation]
            filter_rule = operation_rule(table_filters.rules[first.table], first, touched[0][1])
        rule = (
            filter_rule
            if filter_rule.startswith("row_filters.")
            else write_rule
            or filter_rule
            or ("limits.max_rows_returned" if {"append", "tree"} & set(plans) else "")
        )
        tree = bool(touched) or bool(write_rule)
        if tree and policy.monitor:
            reason = (
                f"{policy.name} would have this statement rewritten (policy {policy.name}, "
                f"{rule}; mode monitor)"
            )
            return make("allow", rule, reason, sql, cacheable=False, monitored=True), (), None
        constant = "kept" in plans  # the decision depends on a LIMIT constant
        if not tree and "tree" not in plans:
            appends = tuple(i for i, plan in enumerate(plans) if plan == "append")
            cacheable = state.cacheable and not state.context and not constant
            if not appends:
                return make("allow", "", "", "" if proxy_only else sql, cacheable), (), None
            assert max_rows is not None
            out = rowcap.append_limits(sql, appends, max_rows)
            return (
                make("rewrite", "limits.max_rows_returned", _cap_reason(policy), out, cacheable),
                appends,
                None,
            )
        values = placeholder_values(ctx)
        deleter = DeleteContext.of(ctx.agent_id, ctx.task, ctx.step, ctx.tags)
        try:
            for statement in statements:
                records = tuple(r for s, r in touched if s is statement)
                apply_row_filters(
                    records,
                    filters,
                    values,
                    table_filters.readable,
                    table_filters.soft_only,
                    table_filters.columns,
                    add_insert_check,
                )
            for analysis in analyses:
                rewrite_writes(analysis, deleter, self._catalog)
        except RewriteError as exc:
            failed = table_filters.rules.get(exc.table, rule) if exc.table else rule
            violation = Violation(
                rule=failed,
                reason=f"{policy.name} may not run this statement: {exc} (policy {policy.name}, {failed})",
                hint=exc.hint or filtered_table_hint(policy, exc.table),
            )
            return self._deny(policy, violation, sql, cacheable=False, shape=key), (), None
        if max_rows is not None:
            for statement in statements:
                rowcap.cap_tree(statement.raw, max_rows)
        for statement in statements:
            rowcap.printable(statement.raw)
        rewritten = RawStream()(tuple(s.raw for s in statements))
        if rule == write_rule and write_rule:
            reason = _write_reason(policy, write_rule)
        elif rule.startswith("row_filters."):
            reason = filter_reason(policy.name, rule)
        elif rule.endswith(".soft_delete"):
            reason = (
                f"soft-deleted rows are hidden from {policy.name} (policy {policy.name}, {rule})"
            )
        else:
            reason = _cap_reason(policy)
        notices = no_principals_notices(
            policy.name, ctx.principals, [(r, filters[r.relation]) for _, r in touched]
        )
        decision = make("rewrite", rule, reason, rewritten, cacheable=False, notices=notices)
        # a read rewritten only by row filters depends on the statement's structure (and
        # the filters' values): later statements of this shape can take it from a template
        templatable = (
            state.cacheable
            and not state.context
            and not state.prepared
            and not constant
            and max_rows is None
            and not write_rule
            and all(w is None for w in writes)
        )
        if not templatable:
            return decision, (), None
        # keyed by the values of the placeholders its filters use (none: soft deletes)
        used = sorted({name for _, r in touched for name in filters[r.relation].placeholders})
        return decision, (), tuple((name, values.get(name)) for name in used)

    @staticmethod
    def _deny(
        policy: AgentPolicy, violation: Violation, sql: str, cacheable: bool, shape: str = ""
    ) -> Decision:
        # settings.guard holds even in monitor mode: what it stops would reach Postgres
        if policy.monitor and violation.rule != "settings.guard":
            return Decision(
                action="allow",
                rule=violation.rule,
                reason=violation.reason,
                hint=violation.hint,
                sqlstate="",
                sql=sql,
                monitored=True,
                cacheable=cacheable,
                shape=shape,
            )
        return Decision(
            action="deny",
            rule=violation.rule,
            reason=violation.reason,
            hint=violation.hint,
            sqlstate=violation.sqlstate,
            sql="",
            cacheable=cacheable,
            shape=shape,
        )


def _filtered(record: RelationRecord, soft_only: bool) -> bool:
    """Does the row filter of the record's table apply to it? A soft-delete filter
    only to reads, UPDATE and DELETE (INSERT and COPY FROM add live rows; TRUNCATE
    and MERGE were refused)."""
    if not soft_only:
        return True
    if record.role in ("from", "update", "delete"):
        return True
    owner = record.owner
    return record.role == "copy" and isinstance(owner, ast.CopyStmt) and not owner.is_from


def _unmanaged(effects: WriteEffects) -> WriteEffects:
    """Monitor mode: nothing is rewritten nor refused."""
    return replace(
        effects,
        soft_delete=False,
        soft_delete_returning=False,
        captured=False,
        max_rows_affected=None,
        cap_rule="",
    )


def _merge(writes: Sequence[WriteEffects | None]) -> WriteEffects | None:
    present = [w for w in writes if w is not None]
    if len(present) <= 1:
        return present[0] if present else None
    caps = [(w.max_rows_affected, w.cap_rule) for w in present if w.max_rows_affected is not None]
    cap, cap_rule = min(caps, key=lambda pair: pair[0] or 0) if caps else (None, "")
    return WriteEffects(
        operation=present[0].operation,
        tables=tuple(dict.fromkeys(t for w in present for t in w.tables)),
        soft_delete=any(w.soft_delete for w in present),
        soft_delete_returning=any(w.soft_delete_returning for w in present),
        max_rows_affected=cap,
        cap_rule=cap_rule,
        captured=any(w.captured for w in present),
    )


def _cap_reason(policy: AgentPolicy) -> str:
    return (
        f"reads of {policy.name} return at most {policy.max_rows_returned} rows "
        f"(policy {policy.name}, limits.max_rows_returned)"
    )


def _write_reason(policy: AgentPolicy, rule: str) -> str:
    if rule.endswith(".soft_deleted_parents"):
        what = "checks that the rows this write refers to are not soft-deleted"
    elif rule.endswith(".soft_delete"):
        what = "soft-deletes the rows (they stay in the table, marked deleted, and are recorded)"
    else:
        what = "records the images of the deleted rows"
    return f"guardproxy {what} (policy {policy.name}, {rule})"


class _MessageState:
    """What the statements of one message add up to, besides allow / deny."""

    __slots__ = (
        "cacheable",
        "context",
        "executed",
        "guard_only",
        "local",
        "prepared",
        "reapply",
        "resets",
    )

    def __init__(self) -> None:
        self.cacheable = True
        self.context: dict[str, str] = {}
        self.resets: set[str] = set()
        self.local: set[str] = set()
        self.executed: dict[int, Decision] = {}  # id(StatementInfo) of an EXECUTE -> inner
        self.guard_only = True
        self.prepared: dict[str, str | None] = {}
        self.reapply = False

    def reset_all(self) -> None:
        """RESET ALL, DISCARD ALL: every guard.* key goes back to its value at login."""
        self.context.clear()
        self.resets = {"*"}
        self.cacheable = False
