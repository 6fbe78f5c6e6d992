"""The policy engine as one client session uses it: judge the SQL of a Query or Parse.

``Judging.judge`` returns a ``Judgement``: everything the relay needs to run the
statement (the text to send, tagged; its read cap; its write plan; whether it
pins the session...), or raises ``Denied`` with the error the client must see,
or ``LocalAnswer`` when the proxy answers by itself (``SET guard.task = ...``).
It keeps the agent's context (task, step, principals, tags, SQL-level prepared
statements) current. ``Judgement.current`` says whether a judgement still holds:
a statement prepared earlier is judged again when the policy, the catalog or, for
a context-dependent rewrite, the context changed since.

Pure: no sockets, no database.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

import pglast

from guardproxy.delegation import binding
from guardproxy.delegation.claims import Delegation
from guardproxy.delegation.errors import RevocationsUnavailable, TokenError
from guardproxy.jobs.write_plan import WritePlan, WriteRun
from guardproxy.metrics import UNCOUNTED, Tally
from guardproxy.policy import (
    AgentPolicy,
    Catalog,
    Decision,
    Judge,
    SessionContext,
    parse_context_comment,
)
from guardproxy.policy.context import CONTEXT_VALUE_SQLSTATE, context_value_problem
from guardproxy.policy.idempotency import TAG as IDEMPOTENCY_TAG
from guardproxy.policy.idempotency import idempotency_key
from guardproxy.protocol import codec
from guardproxy.protocol.errors import Denied, GuardError
from guardproxy.relay.classify import statement_kind
from guardproxy.relay.pinning import pin_reason
from guardproxy.relay.session_sql import (
    Command,
    CommandParts,
    command_from_parts,
    command_parts,
    prepared_command,
)

if TYPE_CHECKING:
    from guardproxy.delegation.verify import Verifier
    from guardproxy.metrics import AgentStats, StatsRegistry

log = logging.getLogger("guardproxy.policy")

RECENT_MESSAGES = 64  # judged texts remembered per session


class LocalAnswer(Exception):
    """The proxy answers this Query itself; ``response`` is what goes back (no ReadyForQuery)."""

    def __init__(self, response: bytes) -> None:
        super().__init__("answered by the proxy")
        self.response = response


def sqlcomment(fields: dict[str, str | None]) -> bytes:
    """A sqlcommenter comment: keys sorted, values URL-encoded then quoted.

    URL-encoding leaves no ``*/`` or quote in a value, so an agent-chosen task
    name cannot end the comment or change the statement.
    """
    pairs = [f"{quote(k, safe='')}='{quote(v, safe='')}'" for k, v in sorted(fields.items()) if v]
    return ("/*" + ",".join(pairs) + "*/").encode()


class Judgement:
    """What judging one text produced. Plain, not a dataclass: one per judged text."""

    __slots__ = (
        "byte_cap",
        "cap_error",
        "catalog",
        "context",
        "cursor",
        "cursors",
        "decision",
        "kind",
        "notices",
        "pins",
        "plan_check",
        "policy",
        "row_cap",
        "rule",
        "sensitive",
        "sent",
        "settings",
        "shift",
        "sql",
        "statements",
        "write",
    )

    def __init__(
        self,
        sent: bytes,  # the text to send upstream: the proxy's tag, then the (rewritten) SQL
        sql: str,  # the (rewritten) SQL without the tag, for the audit log
        *,
        shift: int = 0,  # length of the tag prefix: error positions move by this much
        decision: str = "allowed",  # allowed, rewritten or monitored
        kind: str = "query",  # read or write once judged; query without policies
        write: WritePlan | None = None,
        statements: int = 1,
        row_cap: int = 0,  # limits.max_rows_returned (0: none)
        cap_error: bool = False,  # refuse rather than truncate past the cap
        cursor: tuple[str, str] | None = None,  # a capped FETCH or DECLARE
        plan_check: str | None = None,  # the shape of a read whose plan must be checked
        pins: str | None = None,  # why running it ties the session to its server
        settings: bool = False,  # it may change session settings (set_config)
        sensitive: bool = False,  # the decision depends on the context: judge it again
        byte_cap: int = 0,  # limits.max_bytes_returned (0: none)
        cursors: tuple[tuple[str, str] | None, ...] = (),  # per statement, several FETCHes
        notices: tuple[str, ...] = (),  # NoticeResponses the client gets before the answer
        rule: str | None = None,  # the rule that rewrote it (or would have, monitored)
        context: SessionContext | None = None,
        policy: AgentPolicy | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        self.sent: Final = sent
        self.sql: Final = sql
        self.shift: Final = shift
        self.decision: Final = decision
        self.kind: Final = kind
        self.write: Final = write
        self.statements: Final = statements
        self.row_cap: Final = row_cap
        self.cap_error: Final = cap_error
        self.cursor: Final = cursor
        self.plan_check: Final = plan_check
        self.pins: Final = pins
        self.settings: Final = settings
        self.sensitive: Final = sensitive
        self.byte_cap: Final = byte_cap
        self.cursors: Final = cursors
        self.notices: Final = notices
        self.rule: Final = rule
        self.context: Final = context
        self.policy: Final = policy
        self.catalog: Final = catalog

    def with_sent(self, sent: bytes, pins: str | None) -> Judgement:
        """The same judgement sending another text (an EXECUTE of a registry statement)."""
        return Judgement(
            sent,
            self.sql,
            shift=self.shift,
            decision=self.decision,
            kind=self.kind,
            write=self.write,
            statements=self.statements,
            row_cap=self.row_cap,
            cap_error=self.cap_error,
            cursor=self.cursor,
            plan_check=self.plan_check,
            pins=pins,
            settings=self.settings,
            sensitive=self.sensitive,
            byte_cap=self.byte_cap,
            cursors=self.cursors,
            notices=self.notices,
            rule=self.rule,
            context=self.context,
            policy=self.policy,
            catalog=self.catalog,
        )


class Analysis:
    """What judging a text computes from the policy alone: the engine's decision, what
    running it would pin, and (for a denial) whether it reads or writes. A judge worker
    process computes it for large statements (``server/judge_workers.py``)."""

    __slots__ = ("command", "decision", "kind", "pins")

    def __init__(
        self,
        decision: Decision,
        kind: str = "read",
        pins: str | None = None,
        command: Command | None = None,
    ) -> None:
        self.decision = decision
        self.kind = kind  # read or write, for the metrics of a denial
        self.pins = pins
        self.command = command  # a SQL-level PREPARE / EXECUTE / DEALLOCATE in it

    @classmethod
    def refused(cls, denial: Denied) -> Analysis:
        return cls(
            Decision(
                action="deny",
                rule=denial.rule,
                reason=denial.message,
                hint=denial.hint or "",
                sqlstate=denial.sqlstate,
                sql="",
            )
        )

    def portable(self) -> PortableAnalysis:
        """Plain values for the trip between processes (neither a read-only mapping nor
        a compiled class pickles)."""
        command = None if self.command is None else command_parts(self.command)
        decision = replace(self.decision, prepared=dict(self.decision.prepared))
        return (decision, self.kind, self.pins, command)

    @classmethod
    def restored(cls, parts: PortableAnalysis) -> Analysis:
        decision, kind, pins, command = parts
        return cls(
            replace(decision, prepared=MappingProxyType(dict(decision.prepared))),
            kind,
            pins,
            None if command is None else command_from_parts(command),
        )


PortableAnalysis = tuple[Decision, str, str | None, CommandParts | None]


def analyze(engine: Judge, policy: AgentPolicy, sql: str, context: SessionContext) -> Analysis:
    """The analysis of one text (pure; in a judge worker for large statements)."""
    decision = engine.judge(policy, sql, context)
    if not decision.allowed:
        return Analysis(decision, statement_kind(sql.encode()))
    rewritten = decision.action == "rewrite" and not decision.monitored
    text = (decision.sql if rewritten else sql).encode()
    return Analysis(decision, pins=pin_reason(text), command=prepared_command(sql.encode()))


_PLAIN: dict[bytes, Judgement] = {}
_PLAIN_KEPT: Final = 1024


def plain(text: bytes) -> Judgement:
    """The judgement of a text when no policies are configured: sent as it is (the
    same for every session: texts sent again and again are looked up)."""
    judgement = _PLAIN.get(text)
    if judgement is not None:
        return judgement
    judgement = Judgement(
        text,
        "",
        pins=pin_reason(text),
        settings=b"set_config" in text.lower(),
    )
    if len(_PLAIN) >= _PLAIN_KEPT:
        _PLAIN.clear()  # texts that never repeat (literals inlined): start again
    _PLAIN[text] = judgement
    return judgement


class Judging:
    def __init__(
        self,
        judge: Judge,
        policy: AgentPolicy,
        context: SessionContext,
        stats: AgentStats,
        registry: StatsRegistry,
        verifier: Verifier | None = None,
        delegation: Delegation | None = None,
    ) -> None:
        self.judge_engine = judge
        self.base_policy = policy  # the agent type's; ``policy``: as a token narrows it
        self.policy = policy
        self.context = context
        self.login_context = context  # what RESET ALL and DISCARD ALL go back to
        # guard.* values to go back to when the transaction ends: after a rollback
        # (``_tx_before``), and in any case for what SET LOCAL changed (``_tx_local``)
        self._tx_before: dict[str, str] = {}
        self._tx_local: dict[str, str] = {}
        self.transaction_changes = False  # something to go back when the transaction ends
        self.verifier = verifier
        self.delegation: Delegation | None = None
        self.delegated = binding.mode(policy) != "off"  # the type takes delegation tokens
        self.stats = stats
        self.registry = registry
        self.task_started: dict[str, float] = {}
        # what this session's writes without a task count against, for task budgets
        self.session_task = f"session:{context.agent_id}:{secrets.token_hex(6)}"
        self._tag_for: SessionContext | None = None
        self._tag = b""
        # text -> what judging it produced, for texts a session sends again and again
        # (an ORM's statements, a driver's unnamed Parse): valid while context, policy
        # and catalog are those it was judged under
        self._recent: dict[tuple[bytes, bool], Judgement] = {}
        self.tally: Tally = UNCOUNTED  # statements run under the session's delegation token
        if delegation is not None:
            self._bind(delegation)

    # ------------------------------------------------------------ judging

    def judge(
        self,
        text: bytes,
        query: bool,
        prepared: tuple[str, bytes] | None = None,
        in_transaction: bool = False,
        given: Analysis | None = None,
    ) -> Judgement:
        """Judges the SQL of a Query (``query``) or Parse message; the session context
        takes what its comments and ``SET guard.*`` statements say. ``prepared``: the
        name and text of the prepared statement an ``EXECUTE`` runs; ``in_transaction``:
        a transaction is open (a delegation token cannot change then); ``given``: the
        analysis a judge worker made of it (a large statement)."""
        if self.delegated:
            self.gate()
        recent = self._recent.get((text, query)) if prepared is None else None
        if recent is not None and self.current(recent, exact=True):
            self._check_task_duration(self.context)
            self.registry.cache_hits += 1
            return recent
        sql = text.decode(errors="replace")
        context = self.context
        if "/*" in sql:
            comment = _checked(parse_context_comment(sql))
            if self.delegated:
                self._decided(comment, "comment")
            context = context.with_updates(_without_key(comment))
            self.context = context
        if prepared is not None:
            context = context.with_prepared(prepared[0], prepared[1].decode(errors="replace"))
        judgement, decision = self._judge(sql, context, query, given)
        if decision.context_updates or decision.context_resets:
            token, updates = binding.take_token(_checked(decision.context_updates))
            if self.delegated:
                self._decided(updates, "SET")
            if token is not None:
                self.present(token, in_transaction)
            self._change_context(updates, decision, in_transaction)
        for name, prepared_sql in decision.prepared.items():
            self.context = self.context.with_prepared(name, prepared_sql)
        if decision.proxy_only and query:
            count = len(pglast.parser.split(sql)) or 1
            raise LocalAnswer(codec.build_command_complete("SET") * count)
        # the same text judged again would come out the same: no comment to change the
        # context, nothing that depends on the moment, nothing the proxy answers itself
        if (
            decision.cacheable
            and not decision.monitored
            and "/*" not in sql
            and not decision.context_updates
            and not decision.context_resets
            and not decision.prepared
        ):
            if len(self._recent) >= RECENT_MESSAGES:
                del self._recent[next(iter(self._recent))]
            self._recent[(text, query)] = judgement
        return judgement

    def _change_context(
        self, updates: Mapping[str, str], decision: Decision, in_transaction: bool
    ) -> None:
        """SET and RESET of guard.* keys, as Postgres treats settings: a RESET goes back
        to the value at login, a SET LOCAL lasts until the end of the transaction, and
        a rollback undoes what the transaction set."""
        before = self.context
        after = before
        if decision.context_resets:
            after = after.with_updates(_login_values(before, self.login_context, decision))
        after = after.with_updates(updates)
        if self.delegation is not None:
            after = binding.bind_context(after, self.delegation)  # the token's stay
        local = {_bare(k) for k in decision.context_local}
        for key in _changed_keys(before, after):
            old = _context_value(before, key)
            if key in local:
                self._tx_local.setdefault(key, old)
                self.transaction_changes = True
            elif in_transaction:
                self._tx_before.setdefault(key, old)
                self.transaction_changes = True
        self.context = after

    def transaction_ended(self, rolled_back: bool) -> None:
        """The transaction ended: what SET LOCAL changed goes back, and after a
        rollback what the transaction set."""
        restore = dict(self._tx_before) if rolled_back else {}
        for key, value in self._tx_local.items():
            restore.setdefault(key, value)
        self._tx_before.clear()
        self._tx_local.clear()
        self.transaction_changes = False
        if restore:
            context = self.context.with_updates(restore)
            if self.delegation is not None:
                context = binding.bind_context(context, self.delegation)
            self.context = context

    # ------------------------------------------------------------ delegation

    def before_execution(self) -> None:
        """Before a prepared statement runs (Execute, EXECUTE): what holds for every
        statement whether or not it is judged again: a valid delegation token, the
        task's time."""
        if self.delegated:
            self.gate()
        if self.policy.max_task_duration is not None:
            self._check_task_duration(self.context)

    def gate(self) -> None:
        """Before every statement: the token a type requires is there, and still valid."""
        try:
            binding.gate(self.base_policy, self.delegation, self.verifier, time.time())
        except TokenError as exc:
            raise Denied(
                exc.message,
                rule="delegation",
                hint=exc.hint,
                sqlstate=exc.sqlstate,
                counted_as=f"delegation.{exc.kind}",
            ) from None
        except RevocationsUnavailable as exc:
            raise Denied(
                exc.message, rule="delegation", hint=exc.hint, sqlstate=exc.sqlstate
            ) from None

    def present(self, token: str, in_transaction: bool = False) -> None:
        """A token the agent presents (SET guard.token, options, password): verified, it
        decides the session's principals and task, and narrows its policy."""
        if in_transaction:
            raise Denied(
                "a delegation token cannot change inside a transaction: the database sees "
                "the principals it names from the start of each transaction",
                rule="delegation",
                hint="COMMIT or ROLLBACK first, then SET guard.token",
                sqlstate="25001",
            )
        try:
            delegation = binding.present(
                self.base_policy, self.verifier, token, self.context.agent_id, time.time()
            )
        except TokenError as exc:
            raise Denied(
                exc.message,
                rule="delegation",
                hint=exc.hint,
                sqlstate=exc.sqlstate,
                counted_as=f"delegation.{exc.kind}",
            ) from None
        self._bind(delegation)

    def _bind(self, delegation: Delegation) -> None:
        self.delegation = delegation
        self.tally = self.stats.delegation_tally(delegation.issuer)
        self.policy = binding.effective_policy(self.base_policy, delegation)
        self.context = binding.bind_context(self.context, delegation)
        self._recent.clear()

    def _decided(self, updates: Mapping[str, str], source: str) -> None:
        """Context keys a token decides are refused from the agent (principals...)."""
        try:
            binding.check_context_updates(self.base_policy, updates, self.delegation, source)
        except GuardError as exc:
            raise Denied(
                exc.message, rule="delegation", hint=exc.hint, sqlstate=exc.sqlstate
            ) from None

    def reloaded(self, policy: AgentPolicy, judge: Judge) -> None:
        """The policies were reloaded: this type's new policy, narrowed by the token."""
        self.base_policy, self.judge_engine = policy, judge
        self.delegated = binding.mode(policy) != "off"
        self.policy = binding.effective_policy(policy, self.delegation)

    def forget_prepared(self, name: str | None) -> None:
        """A DEALLOCATE (None: of all) the judge must know of."""
        self.context = self.context.with_prepared(name or "", None)

    def rejudge(self, text: bytes) -> Judgement:
        """A prepared statement judged again under the session's context now (its own
        comments apply to it, not to the session)."""
        if self.delegated:
            self.gate()
        sql = text.decode(errors="replace")
        context = self.context
        if "/*" in sql:
            context = context.with_updates(_without_key(_checked(parse_context_comment(sql))))
        return self._judge(sql, context, False)[0]

    def current(self, judgement: Judgement, exact: bool = False) -> bool:
        """Whether ``judgement`` still holds: same policy and catalog, and (for a decision
        that depends on it, or for the exact text and tag with ``exact``) same context."""
        if (
            judgement.policy is not self.policy
            or judgement.catalog is not self.judge_engine.catalog
        ):
            return False
        context = judgement.context
        if context is self.context or context is None:
            return True
        if not (exact or judgement.sensitive) and _same_tag(context, self.context):
            return True
        return context == self.context

    def context_for(self, text: bytes) -> SessionContext:
        """The context a text is judged under (its comments applied, the session's own
        untouched): what a judge worker needs along with the text."""
        if self.delegated:
            self.gate()
        sql = text.decode(errors="replace")
        if "/*" not in sql:
            return self.context
        return self.context.with_updates(_without_key(_checked(parse_context_comment(sql))))

    def _judge(
        self, sql: str, context: SessionContext, query: bool, given: Analysis | None = None
    ) -> tuple[Judgement, Decision]:
        self._check_task_duration(context)
        engine = self.judge_engine
        policy = self.policy
        if given is None:
            hits = engine.hits
            decision = engine.judge(policy, sql, context)
            if engine.hits != hits:
                self.registry.cache_hits += 1
            else:
                self.registry.cache_misses += 1
        else:
            decision = given.decision
            self.registry.cache_misses += 1
        if not decision.allowed:
            log.info("denied %s (%s): %s", context.agent_id, decision.rule, decision.reason)
            raise Denied(
                decision.reason,
                rule=decision.rule,
                hint=decision.hint,
                sqlstate=decision.sqlstate or "42501",
                kind=given.kind if given is not None else None,
            )
        label = "allowed"
        if decision.monitored:
            self.stats.denials[decision.rule] += 1
            log.warning("monitor mode let through %s: %s", context.agent_id, decision.reason)
            label = "monitored"
        out = sql
        if decision.action == "rewrite" and not decision.monitored:
            label, out = "rewritten", decision.sql
        cap = decision.max_rows_returned or 0
        byte_cap = decision.max_bytes_returned or 0
        cap_error = bool(cap or byte_cap) and decision.rows_over_cap == "error"
        if cap_error and query:
            self._refuse_stacked_capped_read(sql)
        tag = self.tag(context)
        sent = tag + b" " + out.encode()
        write = self._write_plan(decision, out, context, sql) if decision.write else None
        judgement = Judgement(
            sent,
            out,
            shift=len(tag) + 1,
            decision=label,
            kind="write" if write is not None else "read",
            write=write,
            statements=len(decision.writes) or 1,
            row_cap=cap,
            cap_error=cap_error,
            cursor=decision.cursor,
            plan_check=decision.shape if decision.plan_check and not decision.monitored else None,
            pins=given.pins if given is not None else pin_reason(sent),
            settings=b"set_config" in sent.lower(),
            sensitive=not decision.cacheable,
            byte_cap=byte_cap,
            cursors=decision.cursors,
            notices=decision.notices,
            rule=decision.rule or None if label != "allowed" else None,
            context=context,
            policy=policy,
            catalog=engine.catalog,
        )
        return judgement, decision

    def _write_plan(
        self, decision: Decision, statement: str, context: SessionContext, sql: str
    ) -> WritePlan:
        write = decision.write
        assert write is not None
        key = parse_context_comment(sql).get(IDEMPOTENCY_TAG) if "/*" in sql else None
        return WritePlan(
            self.policy.name,
            statement,
            soft_delete=write.soft_delete,
            strip_rows=(write.soft_delete or write.captured) and not write.soft_delete_returning,
            max_rows_affected=write.max_rows_affected,
            cap_rule=write.cap_rule,
            statement_key=key or None,
            rule=decision.rule or None if decision.action == "rewrite" else None,
        )

    def write_run(self, plan: WritePlan, parameters: bytes = b"") -> WriteRun:
        """One execution of ``plan`` under the session's context now."""
        policy, ctx = self.policy, self.context
        tags = dict(ctx.tags)
        if plan.statement_key:
            tags[IDEMPOTENCY_TAG] = plan.statement_key
        explicit = bool(tags.get(IDEMPOTENCY_TAG))
        key = None
        # a derived key needs a task and a step (the attempt): else two equal writes are two
        if explicit or (ctx.task and ctx.step):
            key = idempotency_key(
                policy, tags, ctx.task, ctx.step, plan.statement, agent_id=ctx.agent_id
            )
        return WriteRun(
            plan,
            agent_id=ctx.agent_id,
            idempotency_key=key,
            derived=key is not None and not explicit,
            parameters=parameters,
            audit_inline=(ctx.agent_id, policy.name, ctx.task, ctx.step)
            if policy.audit_fail_closed
            else None,
            key_ttl_seconds=int(policy.idempotency_ttl.total_seconds()),
            task=ctx.task,
            max_writes_per_task=policy.max_writes_per_task,
            max_statements_per_task=policy.max_statements_per_task,
            key_label=repr(tags[IDEMPOTENCY_TAG])
            if explicit
            else f"derived from task {ctx.task!r} and step {ctx.step!r}",
            budget_task=ctx.task or self.session_task,
            windows=tuple(
                (
                    scope,
                    ctx.agent_id if scope == "per_agent" else policy.name,
                    budget.max_rows_written,
                    budget.max_statements,
                    budget.window.total_seconds(),
                )
                for scope, budget in policy.window_budgets
            ),
        )

    def _refuse_stacked_capped_read(self, sql: str) -> None:
        """In error mode a capped read is refused after it ran: statements stacked after it
        in one message would already have run too, which Postgres would not have done."""
        if len(pglast.parser.split(sql)) > 1:
            name = self.policy.name
            raise Denied(
                f"{name} must send a read with a row cap as a statement of its own: with "
                f"on_rows_returned_over: error, statements after it in the same message would "
                f"run even when it is refused (policy {name}, limits.max_rows_returned)",
                rule="limits.max_rows_returned",
                hint="send each statement in a message of its own",
                sqlstate="0A000",
            )

    def tag(self, ctx: SessionContext) -> bytes:
        """The sqlcommenter comment naming who runs the statement, built once per context."""
        if ctx is not self._tag_for:
            delegation = self.delegation
            self._tag = sqlcomment(
                {
                    "agent": ctx.agent_id,
                    "agent_type": self.policy.name,
                    "task": ctx.task,
                    "step": ctx.step,
                    "principals": ",".join(ctx.principals) or None,
                    "token_id": delegation.token_id if delegation is not None else None,
                }
            )
            self._tag_for = ctx
        return self._tag

    def _check_task_duration(self, context: SessionContext) -> None:
        limit = self.policy.max_task_duration
        task = context.task
        if limit is None or task is None:
            return
        now = time.monotonic()
        started = self.task_started.setdefault(task, now)
        if now - started > limit.total_seconds():
            raise Denied(
                f"task {task} of {self.policy.name} ran longer than max_task_duration "
                f"({limit}) (policy {self.policy.name}, timeouts.max_task_duration)",
                rule="timeouts.max_task_duration",
                hint="start a new task (SET guard.task = '...') or ask an operator for more time",
                sqlstate="57014",
            )


def _checked(values: Mapping[str, str]) -> Mapping[str, str]:
    """Context values an agent chose, refused at the door when they cannot be kept as
    printable text (the audit log, logs and terminals show them)."""
    for key, value in values.items():
        problem = context_value_problem(key, value)
        if problem is not None:
            raise Denied(problem, rule="context", sqlstate=CONTEXT_VALUE_SQLSTATE)
    return values


def _bare(key: str) -> str:
    return key.lower().removeprefix("guard.")


def _context_value(context: SessionContext, key: str) -> str:
    """One guard.* key's value as SET would give it ("" when unset)."""
    if key == "task":
        return context.task or ""
    if key == "step":
        return context.step or ""
    if key == "principals":
        return ",".join(context.principals)
    return context.tags.get(key, "")


def _changed_keys(before: SessionContext, after: SessionContext) -> list[str]:
    keys = {"task", "step", "principals", *before.tags, *after.tags}
    return [k for k in sorted(keys) if _context_value(before, k) != _context_value(after, k)]


def _login_values(
    context: SessionContext, login: SessionContext, decision: Decision
) -> dict[str, str]:
    """The login values of the keys a RESET names (all of them for RESET ALL)."""
    resets = decision.context_resets
    if "*" in resets:
        keys = {"task", "step", "principals", *context.tags, *login.tags}
    else:
        keys = {_bare(k) for k in resets}
    return {key: _context_value(login, key) for key in keys}


def _without_key(comment: Mapping[str, str]) -> dict[str, str]:
    """A comment's context keys; its idempotency key belongs to the statement alone."""
    return {k: v for k, v in comment.items() if k != IDEMPOTENCY_TAG}


def _same_tag(a: SessionContext, b: SessionContext) -> bool:
    return (
        a.agent_id == b.agent_id
        and a.task == b.task
        and a.step == b.step
        and a.principals == b.principals
    )
