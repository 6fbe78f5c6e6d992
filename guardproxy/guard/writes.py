"""Managed writes: a write of an agent runs inside a transaction (or savepoint) the proxy
owns, so that it can be checked before anyone sees it and recorded with it atomically.

For one write statement (a simple Query message) the proxy:

1. opens ``BEGIN`` (autocommit) or ``SAVEPOINT`` (inside the client's transaction);
2. with an idempotency key, claims the key in ``guardproxy.idempotency_keys``; a key
   already there means the write ran before (or runs now, elsewhere: the unique
   index makes the second claim wait for the first to commit), and the client gets
   the stored answer instead (a replay), or an error if the request differs;
3. runs the client's statement and reads its row count;
4. refuses it, undone, if the count passes ``max_rows_affected`` or the task's budget;
5. stores the answer with the key, then ``COMMIT`` / ``RELEASE``: the write and its
   ledger entry commit together or not at all;
6. hands the client the statement's own answer (``UPDATE n`` of a soft delete shown as
   ``DELETE n``), and the ReadyForQuery status it would have had.

Everything here speaks to the server in internal mode; nothing reaches the client
until the outcome is known.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Final

from guardproxy.guard.sqltext import literal, raise_sql
from guardproxy.pool.server import ServerConn
from guardproxy.protocol import codec
from guardproxy.protocol.errors import GuardError, UpstreamError

SAVEPOINT = "guardproxy_write"
CRASH_AFTER_COMMIT = os.environ.get("GUARDPROXY_TEST_CRASH_AFTER_COMMIT") == "1"


class WritePlan:
    """What the runtime must enforce for one write, from the policy and the decision.

    Built for every write statement: a plain class with its own ``__init__`` (a
    dataclass's generated one runs interpreted even when this module is compiled,
    and a frozen one sets each field through ``object.__setattr__``). ``Final``
    keeps it immutable for the type checker; ``with_key`` makes a changed copy.
    """

    def __init__(
        self,
        agent_type: str,
        statement: str,  # as sent upstream (after rewrites)
        *,
        soft_delete: bool = False,  # a DELETE the judge rewrote: shown to the client as DELETE n
        strip_rows: bool = False,  # the rewrite returns rows the agent's statement did not ask for
        max_rows_affected: int | None = None,
        cap_rule: str = "",
        idempotency_key: str | None = None,
        derived: bool = False,  # the key was derived: the Bind parameters are part of it
        # audit.on_loss fail_closed: the audit event is written in the write's own transaction
        # as (agent id, agent type, task, step), so no write is acknowledged without its record
        audit_inline: tuple[str, str, str | None, str | None] | None = None,
        key_ttl_seconds: int = 86400,
        task: str | None = None,
        max_writes_per_task: int | None = None,
        max_statements_per_task: int | None = None,
    ) -> None:
        self.agent_type: Final = agent_type
        self.statement: Final = statement
        self.soft_delete: Final = soft_delete
        self.strip_rows: Final = strip_rows
        self.max_rows_affected: Final = max_rows_affected
        self.cap_rule: Final = cap_rule
        self.idempotency_key: Final = idempotency_key
        self.derived: Final = derived
        self.audit_inline: Final = audit_inline
        self.key_ttl_seconds: Final = key_ttl_seconds
        self.task: Final = task
        self.max_writes_per_task: Final = max_writes_per_task
        self.max_statements_per_task: Final = max_statements_per_task

    def with_key(self, key: str) -> WritePlan:
        return WritePlan(
            self.agent_type,
            self.statement,
            soft_delete=self.soft_delete,
            strip_rows=self.strip_rows,
            max_rows_affected=self.max_rows_affected,
            cap_rule=self.cap_rule,
            idempotency_key=key,
            derived=self.derived,
            audit_inline=self.audit_inline,
            key_ttl_seconds=self.key_ttl_seconds,
            task=self.task,
            max_writes_per_task=self.max_writes_per_task,
            max_statements_per_task=self.max_statements_per_task,
        )

    def __repr__(self) -> str:
        return f"WritePlan({self.agent_type!r}, {self.statement!r}, key={self.idempotency_key!r})"

    def request_hash(self, parameters: bytes = b"") -> str:
        return hashlib.sha256(self.statement.encode() + b"\x00" + parameters).hexdigest()

    @property
    def needs_management(self) -> bool:
        return bool(
            self.soft_delete
            or self.max_rows_affected is not None
            or self.idempotency_key
            or self.audit_inline is not None
            or self.strip_rows  # a captured hard delete answers as the agent's DELETE
            or (self.task and (self.max_writes_per_task or self.max_statements_per_task))
        )


@dataclass
class WriteOutcome:
    response: bytes  # for the client, up to and including ReadyForQuery
    decision: str  # allowed, rewritten, replayed, denied
    rows: int | None = None
    rule: str | None = None
    reason: str | None = None


class Ledger:
    """Runs guardproxy's own statements inside the managed transaction as the proxy's login
    role (which owns the ledger), not as the agent's role, which has no rights on it."""

    def __init__(self, server: ServerConn, owner: str, agent_role: str) -> None:
        self.server = server
        self._enter = f"SET LOCAL ROLE {_ident(owner)}; " if owner != agent_role else ""
        self._leave = f"; SET LOCAL ROLE {_ident(agent_role)}" if owner != agent_role else ""

    async def query(self, sql: str) -> list[list[str | None]]:
        return await self.server.query(self._enter + sql + self._leave)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def rows_of(tag: bytes) -> int | None:
    count = tag.rpartition(b" ")[2]
    return int(count) if count.isdigit() else None


async def run(
    server: ServerConn,
    request: bytes,
    plan: WritePlan,
    agent_id: str,
    parameters: bytes = b"",
    hidden: int = 0,
) -> WriteOutcome:
    """Runs one managed write; ``hidden`` leading Parse/CloseComplete answers are the proxy's own."""
    outside = server.status == b"I"
    roles = await server.query(
        ("BEGIN" if outside else f"SAVEPOINT {SAVEPOINT}") + "; SELECT session_user, current_user"
    )
    ledger = Ledger(server, str(roles[0][0]), str(roles[0][1]))

    async def undo() -> None:
        await server.query(
            "ROLLBACK" if outside else f"ROLLBACK TO SAVEPOINT {SAVEPOINT}; RELEASE {SAVEPOINT}"
        )

    request_hash = plan.request_hash(parameters)
    if plan.derived and parameters:
        key = f"{plan.idempotency_key}:{hashlib.sha256(parameters).hexdigest()[:32]}"
        plan = plan.with_key(key)
    if plan.idempotency_key:
        replay = await _claim(ledger, plan, agent_id, request_hash)
        if replay is not None:
            await undo()
            return (
                await _finish_refusal(server, replay, outside)
                if isinstance(replay, GuardError)
                else WriteOutcome(
                    replay + codec.ready_for_query(server.status), "replayed", rule="idempotency"
                )
            )
    answers = await server.exchange(request)
    while hidden and answers and answers[0][0] in (49, 51):  # ParseComplete, CloseComplete
        answers.pop(0)
        hidden -= 1
    if any(kind == 69 for kind, _ in answers):
        # The statement failed: Postgres already rolled back or aborted; the client sees it as is.
        if outside:
            await server.query("ROLLBACK")
            answers[-1] = (90, codec.ready_for_query(b"I"))
        return WriteOutcome(b"".join(raw for _, raw in answers), "allowed")
    tag = next((raw[5:-1] for kind, raw in answers if kind == 67), b"")
    rows = rows_of(tag)
    refusal = _over_cap(plan, rows) or await _over_budget(ledger, plan, rows)
    if refusal is not None:
        await undo()
        return await _finish_refusal(server, refusal, outside, rows)
    body = [raw for kind, raw in answers if kind != 90]
    if plan.strip_rows:
        # the agent's DELETE returns no rows: no row description (NoData to a Describe)
        nodata = b"" if request[:1] == b"Q" else codec.message(b"n")
        body = [nodata if raw[:1] == b"T" else raw for raw in body if raw[:1] != b"D"]
    if plan.soft_delete or plan.strip_rows:
        deleted = codec.build_command_complete(f"DELETE {rows}")
        body = [deleted if raw[:1] == b"C" else raw for raw in body]
    if plan.idempotency_key:
        stored = b"".join(raw for raw in body if raw[:1] in (b"T", b"D", b"C"))
        await ledger.query(
            "UPDATE guardproxy.idempotency_keys SET command_tag = "
            f"{literal(tag.decode())}, response = decode({literal(stored.hex())}, 'hex') "
            f"WHERE key = {literal(plan.idempotency_key)}"
        )
    if plan.audit_inline is not None:
        agent, agent_type, task, step = plan.audit_inline
        values = ", ".join(
            literal(v) if v is not None else "NULL" for v in (agent, agent_type, task, step)
        )
        decision = "rewritten" if plan.soft_delete else "allowed"
        try:
            await ledger.query(
                "INSERT INTO guardproxy.audit_events (agent_id, agent_type, task, step, statement, decision, rows) "
                f"VALUES ({values}, {literal(plan.statement)}, {literal(decision)}, {rows if rows is not None else 'NULL'})"
            )
        except UpstreamError as exc:
            await undo()
            refusal = GuardError(
                f"{plan.agent_type} may not write while the audit log cannot record it ({exc.message}); "
                f"the write was rolled back (policy {plan.agent_type}, audit.on_loss: fail_closed)",
                hint="retry shortly; an operator must bring the audit store back",
                sqlstate="53400",
            )
            return await _finish_refusal(server, refusal, outside, rows)
    await server.query("COMMIT" if outside else f"RELEASE {SAVEPOINT}")
    if CRASH_AFTER_COMMIT:
        # a fault-injection hook for the tests: die between the commit and the reply
        os._exit(99)
    decision = "rewritten" if plan.soft_delete else "allowed"
    return WriteOutcome(b"".join(body) + codec.ready_for_query(server.status), decision, rows)


async def _claim(
    server: Ledger, plan: WritePlan, agent_id: str, request_hash: str
) -> bytes | GuardError | None:
    """Claims the key; returns None (go on), the stored answer (replay) or a refusal."""
    key = plan.idempotency_key
    assert key is not None
    claimed = await server.query(
        "INSERT INTO guardproxy.idempotency_keys (key, agent_type, agent_id, task, request_hash, expires_at) "
        f"VALUES ({literal(key)}, {literal(plan.agent_type)}, {literal(agent_id)}, "
        f"{literal(plan.task) if plan.task else 'NULL'}, {literal(request_hash)}, "
        f"now() + interval '{int(plan.key_ttl_seconds)} seconds') "
        "ON CONFLICT (key) DO UPDATE SET key = EXCLUDED.key "
        "WHERE guardproxy.idempotency_keys.expires_at < now() RETURNING key"
    )
    if claimed:
        return None
    rows = await server.query(
        "SELECT request_hash, encode(response, 'hex') FROM guardproxy.idempotency_keys "
        f"WHERE key = {literal(key)}"
    )
    if not rows:
        return None
    stored_hash, response_hex = rows[0]
    if stored_hash != request_hash:
        return GuardError(
            f"idempotency key {key!r} was already used for a different statement or parameters; "
            "nothing was executed",
            hint="use a new idempotency key for a new write; retry only with the exact same statement",
            sqlstate="22023",
        )
    notice = codec.build_notice(
        "01000",
        f"guardproxy: replayed the result of the first execution of idempotency key {key!r}; "
        "the write was not executed again",
    )
    return notice + bytes.fromhex(response_hex or "")


def _over_cap(plan: WritePlan, rows: int | None) -> GuardError | None:
    cap = plan.max_rows_affected
    if cap is None or rows is None or rows <= cap:
        return None
    return GuardError(
        f"{plan.agent_type} may change at most {cap} rows in one statement; this one would have "
        f"changed {rows}, so it was rolled back and nothing changed (policy {plan.agent_type}, {plan.cap_rule})",
        hint=f"narrow the WHERE clause so it matches at most {cap} rows, or split the work into batches",
        sqlstate="54000",
    )


async def _over_budget(server: Ledger, plan: WritePlan, rows: int | None) -> GuardError | None:
    if not plan.task or not (plan.max_writes_per_task or plan.max_statements_per_task):
        return None
    spent = await server.query(
        "INSERT INTO guardproxy.task_budgets AS b (task, agent_type, statements, rows_written) "
        f"VALUES ({literal(plan.task)}, {literal(plan.agent_type)}, 1, {rows or 0}) "
        "ON CONFLICT (task) DO UPDATE SET statements = b.statements + 1, "
        "rows_written = b.rows_written + EXCLUDED.rows_written, updated_at = now() "
        "RETURNING statements, rows_written"
    )
    statements, written = (int(v or 0) for v in spent[0])
    for name, used, limit in (
        ("max_statements_per_task", statements, plan.max_statements_per_task),
        ("max_writes_per_task", written, plan.max_writes_per_task),
    ):
        if limit is not None and used > limit:
            return GuardError(
                f"task {plan.task} of {plan.agent_type} is past its budget {name} = {limit} "
                f"(this write would bring it to {used}); the write was rolled back "
                f"(policy {plan.agent_type}, budgets.{name})",
                hint="the task has done what it may; start a new task or ask an operator",
                sqlstate="53400",
            )
    return None


async def _finish_refusal(
    server: ServerConn, error: GuardError, outside: bool, rows: int | None = None
) -> WriteOutcome:
    if outside:
        response = codec.build_error(
            error.sqlstate, error.message, hint=error.hint
        ) + codec.ready_for_query(b"I")
    else:
        # inside the client's transaction an error aborts it, as Postgres would
        answers = await server.exchange(codec.build_query(raise_sql(error)))
        response = b"".join(raw for _, raw in answers)
    return WriteOutcome(response, "denied", rows, reason=error.message)


__all__ = ["WriteOutcome", "WritePlan", "rows_of", "run"]
