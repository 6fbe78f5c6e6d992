"""A session's writes: which need the managed path, collecting extended-protocol
requests until Sync, running them through guardproxy.guard.writes, and the audit log.

The session hands over a message when the guard says it writes rows. Writes the
policy leaves unmanaged (no cap, key, budget or soft delete) are only audited.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from guardproxy.guard import writes
from guardproxy.guard.audit import AuditEvent
from guardproxy.guard.writes import WritePlan
from guardproxy.protocol import codec
from guardproxy.protocol.errors import GuardError

if TYPE_CHECKING:
    from guardproxy.server.guard import SessionGuard
    from guardproxy.server.session import ClientSession

log = logging.getLogger("guardproxy.writes")


class SessionWrites:
    def __init__(self, session: ClientSession) -> None:
        self.session = session
        self.plans: dict[bytes, WritePlan] = {}  # prepared statement (b"" unnamed) -> its plan
        self.collecting: list[bytes] | None = None  # extended-protocol request being gathered
        self.collect_name = b""
        self.collect_plan: WritePlan | None = None
        self.running = False

    # ------------------------------------------------------------ audit

    def audit(
        self,
        guard: SessionGuard,
        statement: str,
        decision: str,
        *,
        rule: str | None = None,
        reason: str | None = None,
        rows: int | None = None,
        duration_ms: float | None = None,
    ) -> bool:
        log_ = self.session.proxy.audit
        if log_ is None:
            return True
        ctx = guard.context
        return log_.record(
            AuditEvent(
                agent_id=ctx.agent_id,
                agent_type=guard.policy.name,
                statement=statement,
                decision=decision,
                task=ctx.task,
                step=ctx.step,
                principals=ctx.principals,
                rule=rule,
                reason=reason,
                rows=rows,
                duration_ms=duration_ms,
            )
        )

    def audit_refuses(self, guard: SessionGuard) -> GuardError | None:
        """With audit.on_loss fail_closed, a write is refused while its record cannot be kept."""
        log_ = self.session.proxy.audit
        if log_ is None or not guard.policy.audit_fail_closed or log_.accepting:
            return None
        return GuardError(
            f"{guard.policy.name} may not write while the audit log cannot record it "
            f"(policy {guard.policy.name}, audit.on_loss: fail_closed)",
            hint="retry shortly; an operator must bring the audit store back",
            sqlstate="53400",
        )

    # ------------------------------------------------------------ taking messages

    def judged(self, kind: int, raw: bytes, guard: SessionGuard) -> bool:
        """After the guard allowed a Query or Parse that writes; True when this took the message."""
        plan = guard.last_write
        assert plan is not None
        refusal = self.audit_refuses(guard)
        if refusal is not None:
            self.session.deny(kind, refusal)
            return True
        if kind == 80:
            name = codec.parse_parse(raw).name
            self.plans[name] = plan
            return False
        if not plan.needs_management:
            self.audit(guard, plan.statement, guard.last_decision)
            return False
        if guard.last_statements > 1:
            # one row count, one ledger entry, one transaction of the proxy's own: one statement
            self.session.deny(
                kind,
                GuardError(
                    f"{guard.policy.name} must send a bounded write (row cap, idempotency key, task "
                    "budget or soft delete) as a statement of its own, not inside a multi-statement "
                    f"message (policy {guard.policy.name}, write safety)",
                    hint="send BEGIN, each write and COMMIT as separate statements",
                    sqlstate="0A000",
                ),
            )
            return True
        self._start(raw, plan, b"", b"")
        return True

    def collect(self, kind: int, raw: bytes) -> bool:
        """Extended protocol: gathers Bind .. Sync of a managed statement; True when taken."""
        if self.collecting is None:
            if kind != 66 or not self.plans:
                return False
            name = codec.bind_statement(raw)[0]
            plan = self.plans.get(name)
            if plan is None:
                return False
            guard = self.session.guard
            assert guard is not None
            if not plan.needs_management:
                self.audit(guard, plan.statement, "allowed")
                return False
            self.collecting, self.collect_name, self.collect_plan = [raw], name, plan
            return True
        self.collecting.append(raw)
        if kind == 83:  # Sync: the whole request is here
            bind = self.collecting[0]
            request, self.collecting = b"".join(self.collecting), None
            plan, self.collect_plan = self.collect_plan, None
            assert plan is not None
            # what the retry must repeat: the parameters, not the client's statement name
            parameters = codec.bind_values(bind)
            self._start(request, plan, self.collect_name, parameters)
        return True

    # ------------------------------------------------------------ running

    def _start(
        self, request: bytes, plan: WritePlan, statement: bytes | None, parameters: bytes
    ) -> None:
        session = self.session
        session.blocked = True
        self.running = True
        if session.transport is not None:
            session.transport.pause_reading()
        session.spawn(self._run(request, plan, statement, parameters))

    async def _run(
        self, request: bytes, plan: WritePlan, statement: bytes | None, parameters: bytes
    ) -> None:
        session = self.session
        guard = session.guard
        assert guard is not None
        started = time.perf_counter()
        try:
            # internal mode: nothing reaches the client until the outcome is decided
            server = await session.server_for_internal_use("the write could run")
            prefix, hidden = (
                session.prepare_prefix(server, statement) if statement is not None else (b"", 0)
            )
            if statement is not None:
                request = session.rename_bind(server, request, statement)
            outcome = await writes.run(
                server, prefix + request, plan, session.agent_id, parameters, hidden
            )
        except (GuardError, ConnectionError, OSError) as exc:
            session.internal_use_failed(exc)
            self._done()
            return
        except asyncio.CancelledError as exc:
            session.internal_use_failed(exc)  # mid-write: never reuse its server
            raise
        elapsed = time.perf_counter() - started
        stats = session.stats
        stats.statement_time.observe(elapsed)
        stats.statements["write", outcome.decision] += 1
        if outcome.rows is not None and outcome.decision != "denied":
            stats.rows_affected += outcome.rows
        if outcome.decision == "replayed":
            stats.replays += 1
        if outcome.decision == "denied":
            stats.denials[plan.cap_rule or "write_safety"] += 1
        if plan.audit_inline is None or outcome.decision not in ("allowed", "rewritten"):
            self.audit(
                guard,
                plan.statement,
                outcome.decision,
                rule=outcome.rule,
                reason=outcome.reason,
                rows=outcome.rows,
                duration_ms=elapsed * 1000,
            )
        session.write(outcome.response)
        server.client = session
        self.running = False
        session.after_managed(server)
        self._done()

    def _done(self) -> None:
        self.running = False
        self.session.blocked = False
        self.session.resume()
