"""The policy engine as a session sees it: judge one Query or Parse message.

``SessionGuard.judge`` returns the message to forward (unchanged, or rewritten)
or raises GuardError with the denial the client must see, or LocalAnswer when the
proxy answers by itself (``SET guard.task = ...``). It keeps the agent's context
(task, step, principals, tags, SQL-level prepared statements) current.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

import pglast

from guardproxy.guard.writes import WritePlan
from guardproxy.policy import (
    AgentPolicy,
    Catalog,
    Decision,
    Judge,
    SessionContext,
    parse_context_comment,
)
from guardproxy.policy.idempotency import TAG as IDEMPOTENCY_TAG
from guardproxy.policy.idempotency import idempotency_key
from guardproxy.protocol import codec
from guardproxy.protocol.errors import GuardError

if TYPE_CHECKING:
    from guardproxy.metrics import AgentStats, StatsRegistry

log = logging.getLogger("guardproxy.policy")


def sqlcomment(fields: dict[str, str | None]) -> bytes:
    """A sqlcommenter comment: keys sorted, values URL-encoded then quoted.

    URL-encoding leaves no ``*/`` or quote in a value, so an agent-chosen task
    name cannot end the comment or change the statement.
    """
    pairs = [f"{quote(k, safe='')}='{quote(v, safe='')}'" for k, v in sorted(fields.items()) if v]
    return ("/*" + ",".join(pairs) + "*/").encode()


RECENT_MESSAGES = 64  # judged messages remembered per session


class _Judged:
    """What judging one message produced, kept to forward it again unjudged.
    Plain, not a dataclass: one is built per judged message (see WritePlan)."""

    __slots__ = (
        "catalog",
        "context",
        "cursor",
        "decision",
        "message",
        "plan_check",
        "policy",
        "row_cap",
        "sql",
        "statements",
        "write",
    )

    def __init__(
        self,
        context: SessionContext,
        policy: AgentPolicy,
        catalog: Catalog,
        message: bytes,  # as forwarded: rewritten and tagged
        sql: str,
        decision: str,
        write: WritePlan | None,
        statements: int,
        row_cap: tuple[int, bool] | None,
        plan_check: str | None,
        cursor: tuple[str, str] | None,
    ) -> None:
        self.context: Final = context
        self.policy: Final = policy
        self.catalog: Final = catalog
        self.message: Final = message
        self.sql: Final = sql
        self.decision: Final = decision
        self.write: Final = write
        self.statements: Final = statements
        self.row_cap: Final = row_cap
        self.plan_check: Final = plan_check
        self.cursor: Final = cursor


class LocalAnswer(Exception):
    """The proxy answers this message itself; ``response`` is what goes back (no ReadyForQuery)."""

    def __init__(self, response: bytes) -> None:
        super().__init__("answered by the proxy")
        self.response = response


class SessionGuard:
    def __init__(
        self,
        judge: Judge,
        policy: AgentPolicy,
        context: SessionContext,
        stats: AgentStats,
        registry: StatsRegistry,
    ) -> None:
        self.judge_engine = judge
        self.policy = policy
        self.context = context
        self.stats = stats
        self.registry = registry
        self.task_started: dict[str, float] = {}
        self.last_decision = "allowed"
        self.last_sql = ""  # what was sent upstream, for the audit log
        self.last_rule: str | None = None
        self.statement_key: str | None = None
        self.last_statements = 1
        self.last_write: WritePlan | None = None  # set when the judged message writes rows
        self.last_row_cap: tuple[int, bool] | None = (
            None  # (max rows returned, error rather than cut)
        )
        self._repeatable = False
        self.last_plan_check: str | None = None  # the shape of a read whose plan must be checked
        self.last_cursor: tuple[str, str] | None = None  # a capped FETCH or DECLARE
        self._tag_for: SessionContext | None = None
        self._tag = b""
        # message -> what judging it produced, for texts a session sends again and again
        # (an ORM's statements, a driver's unnamed Parse): valid while context and policy are
        self._recent: dict[bytes, _Judged] = {}

    def judge(self, kind: int, raw: bytes) -> bytes:
        recent = self._recent.get(raw)
        if (
            recent is not None
            and recent.context is self.context
            and recent.policy is self.policy
            and recent.catalog is self.judge_engine.catalog  # DDL or a reload: judge again
        ):
            self._check_task_duration()
            self.last_sql, self.last_rule, self.statement_key = recent.sql, None, None
            self.last_decision = recent.decision
            self.last_write = recent.write
            self.last_statements = recent.statements
            self.last_row_cap = recent.row_cap
            self.last_plan_check = recent.plan_check
            self.last_cursor = recent.cursor
            self.registry.cache_hits += 1
            return recent.message
        message = self._judge(kind, raw)
        if self._repeatable:
            if len(self._recent) >= RECENT_MESSAGES:
                del self._recent[next(iter(self._recent))]
            self._recent[raw] = _Judged(
                self.context,
                self.policy,
                self.judge_engine.catalog,
                message,
                self.last_sql,
                self.last_decision,
                self.last_write,
                self.last_statements,
                self.last_row_cap,
                self.last_plan_check,
                self.last_cursor,
            )
        return message

    def _judge(self, kind: int, raw: bytes) -> bytes:
        self._repeatable = False
        if kind == 81:
            sql_bytes = codec.parse_query(raw)
            parsed = None
        else:
            parsed = codec.parse_parse(raw)
            sql_bytes = parsed.query
        sql = sql_bytes.decode(errors="replace")
        self.last_sql, self.last_rule = sql, None
        statement_key = None
        if "/*" in sql:
            comment = parse_context_comment(sql)
            # an idempotency key in a comment belongs to this statement alone
            statement_key = comment.pop(IDEMPOTENCY_TAG, None)
            self.context = self.context.with_updates(comment)
        self.statement_key = statement_key
        self._check_task_duration()
        engine = self.judge_engine
        hits = engine.hits
        decision = engine.judge(self.policy, sql, self.context)
        if engine.hits != hits:
            self.registry.cache_hits += 1
        else:
            self.registry.cache_misses += 1
        if not decision.allowed:
            self.last_rule = decision.rule
            self.stats.denials[decision.rule] += 1
            log.info("denied %s (%s): %s", self.context.agent_id, decision.rule, decision.reason)
            raise GuardError(
                decision.reason, hint=decision.hint, sqlstate=decision.sqlstate or "42501"
            )
        if decision.monitored:
            self.stats.denials[decision.rule] += 1
            log.warning("monitor mode let through %s: %s", self.context.agent_id, decision.reason)
        self.last_decision = "monitored" if decision.monitored else "allowed"
        if decision.context_updates:
            self.context = self.context.with_updates(decision.context_updates)
        for name, prepared_sql in decision.prepared.items():
            self.context = self.context.with_prepared(name, prepared_sql)
        if decision.proxy_only and parsed is None:
            count = len(pglast.parser.split(sql)) or 1
            raise LocalAnswer(codec.build_command_complete("SET") * count)
        if decision.action == "rewrite" and not decision.monitored:
            self.last_decision = "rewritten"
            sql_bytes = decision.sql.encode()
            self.last_sql = decision.sql
        self.last_write = self._write_plan(decision) if decision.write is not None else None
        self.last_statements = len(decision.writes) or 1
        cap = decision.max_rows_returned
        self.last_row_cap = (cap, decision.rows_over_cap == "error") if cap else None
        if cap and decision.rows_over_cap == "error" and parsed is None:
            self._refuse_stacked_capped_read(sql)
        self.last_plan_check = (
            decision.shape if decision.plan_check and not decision.monitored else None
        )
        self.last_cursor = decision.cursor
        # the same message judged again would come out the same: no comment to change the
        # context, nothing that depends on the moment, nothing the proxy answers itself
        self._repeatable = (
            decision.cacheable
            and not decision.monitored
            and statement_key is None
            and "/*" not in sql
            and not decision.context_updates
            and not decision.prepared
        )
        tagged = sql_bytes + (b"\n" if b"--" in sql_bytes else b" ") + self.tag()
        if parsed is None:
            return codec.build_query(tagged)
        return codec.build_parse(parsed.name, tagged, parsed.tail)

    def _write_plan(self, decision: Decision) -> WritePlan:
        write = decision.write
        assert write is not None
        policy, ctx = self.policy, self.context
        tags = dict(ctx.tags)
        if self.statement_key:
            tags[IDEMPOTENCY_TAG] = self.statement_key
        explicit = bool(tags.get(IDEMPOTENCY_TAG))
        # derived keys need a task: without one, two equal writes are two writes
        key = None
        if explicit or ctx.task:
            key = idempotency_key(policy, tags, ctx.task, ctx.step, self.last_sql)
        return WritePlan(
            agent_type=policy.name,
            statement=self.last_sql,
            soft_delete=write.soft_delete,
            strip_rows=(write.soft_delete or write.captured) and not write.soft_delete_returning,
            max_rows_affected=write.max_rows_affected,
            cap_rule=write.cap_rule,
            idempotency_key=key,
            derived=key is not None and not explicit,
            audit_inline=(ctx.agent_id, policy.name, ctx.task, ctx.step)
            if policy.audit_fail_closed
            else None,
            key_ttl_seconds=int(policy.idempotency_ttl.total_seconds()),
            task=ctx.task,
            max_writes_per_task=policy.max_writes_per_task,
            max_statements_per_task=policy.max_statements_per_task,
        )

    def _refuse_stacked_capped_read(self, sql: str) -> None:
        """In error mode a capped read is refused after it ran: statements stacked after it
        in one message would already have run too, which Postgres would not have done."""
        if len(pglast.parser.split(sql)) > 1:
            name = self.policy.name
            raise GuardError(
                f"{name} must send a read with a row cap as a statement of its own: with "
                f"on_rows_returned_over: error, statements after it in the same message would "
                f"run even when it is refused (policy {name}, limits.max_rows_returned)",
                hint="send each statement in a message of its own",
                sqlstate="0A000",
            )

    def tag(self) -> bytes:
        """The sqlcommenter comment naming who runs the statement, built once per context."""
        ctx = self.context
        if ctx is not self._tag_for:
            self._tag = sqlcomment(
                {
                    "agent": ctx.agent_id,
                    "agent_type": self.policy.name,
                    "task": ctx.task,
                    "step": ctx.step,
                    "principals": ",".join(ctx.principals) or None,
                }
            )
            self._tag_for = ctx
        return self._tag

    def _check_task_duration(self) -> None:
        limit = self.policy.max_task_duration
        task = self.context.task
        if limit is None or task is None:
            return
        now = time.monotonic()
        started = self.task_started.setdefault(task, now)
        if now - started > limit.total_seconds():
            self.stats.denials["timeouts.max_task_duration"] += 1
            raise GuardError(
                f"task {task} of {self.policy.name} ran longer than max_task_duration "
                f"({limit}) (policy {self.policy.name}, timeouts.max_task_duration)",
                hint="start a new task (SET guard.task = '...') or ask an operator for more time",
                sqlstate="57014",
            )
