"""Managed writes: one execution of an agent's write, checked before it can commit.

A write the policy bounds (a row cap, an idempotency key, a task budget, a soft
delete, an inline audit record) runs inside a transaction it cannot leave on its
own, and the proxy sees its row count before anyone else does:

* a simple Query: the proxy opens ``BEGIN`` when the client has no transaction
  open, runs the statement, and ends with ``COMMIT`` or ``ROLLBACK``; inside the
  client's transaction it runs the statement there;
* an Execute of a portal (extended protocol): it runs inside the client's round,
  whose transaction commits only at the client's Sync, which the relay holds back.

In order, with the ledger's statements in the same transaction (``Ledger``):

1. with an idempotency key, claim it; a key already there (and not expired)
   means this write ran before: the client gets the stored answer (a replay), or
   an error if the request differs;
2. run the statement and read its row count;
3. refuse it past ``max_rows_affected`` or the task's budget: the transaction is
   rolled back (ours) or made to fail (the client's, as any error would);
4. store the answer with the key, write the inline audit record;
5. hand the client the statement's own answer (``UPDATE n`` of a soft delete shown
   as ``DELETE n``).

The job speaks to the server in internal mode; nothing reaches the client until
the outcome is known. It returns a ``WriteOutcome``; the relay applies it.
"""

from __future__ import annotations

import os
import time
from typing import Final

from guardproxy.jobs.ledger import Ledger, LedgerError
from guardproxy.jobs.write_plan import WriteRun
from guardproxy.pool.backend import Backend, CopyIn
from guardproxy.protocol import codec
from guardproxy.protocol import messages as m
from guardproxy.protocol.errors import Denied, GuardError, UpstreamError

CRASH_AFTER_COMMIT = os.environ.get("GUARDPROXY_TEST_CRASH_AFTER_COMMIT") == "1"
# a Parse that cannot succeed: makes the server abort the transaction in order
_ABORT: Final = codec.build_parse(
    b"guardproxy_abort",
    b"guardproxy refused a write: this error aborts the transaction",
    b"\x00\x00",
)


class WriteOutcome:
    """What a managed write came to. ``response`` goes to the client as it is: with
    ReadyForQuery for a simple Query, without it for an Execute."""

    def __init__(
        self,
        response: bytes,
        decision: str,  # allowed, rewritten, replayed, denied, failed
        rows: int | None = None,
        rule: str | None = None,
        reason: str | None = None,
        aborted: bool = False,  # an Execute: the server skips to the client's Sync now
    ) -> None:
        self.response: Final = response
        self.decision: Final = decision
        self.rows: Final = rows
        self.rule: Final = rule
        self.reason: Final = reason
        self.aborted: Final = aborted
        self.seconds = 0.0


def rows_of(tag: bytes) -> int | None:
    count = tag.rpartition(b" ")[2]
    return int(count) if count.isdigit() else None


async def run(
    backend: Backend,
    request: bytes,
    write: WriteRun,
    simple: bool,
    copy_in: CopyIn | None = None,
) -> WriteOutcome:
    """Runs one managed write on ``backend`` (internal mode); see the module docstring.
    ``copy_in``: where a COPY FROM STDIN gets its data (the client)."""
    started = time.perf_counter()
    outcome = await _Run(backend, request, write, simple, copy_in).go()
    outcome.seconds = time.perf_counter() - started
    return outcome


class _Run:
    def __init__(
        self,
        backend: Backend,
        request: bytes,
        write: WriteRun,
        simple: bool,
        copy_in: CopyIn | None = None,
    ) -> None:
        self.backend = backend
        self.copy_in = copy_in
        self.request = request
        self.write = write
        self.plan = write.plan
        self.simple = simple
        self.began = False  # the proxy opened the transaction (and ends it)
        self.described = b""  # an Execute's RowDescription, kept with a stored answer
        self.ledger = Ledger(backend, backend.agent_role)

    async def go(self) -> WriteOutcome:
        backend, write = self.backend, self.write
        if self.simple and backend.status == b"E":
            # the client's transaction failed: Postgres refuses the statement, as it is
            answers = await backend.exchange(self.request)
            return WriteOutcome(b"".join(raw for _, raw in answers), "failed")
        if self.simple and backend.status == b"I":
            await backend.query("BEGIN")
            self.began = True
        try:
            key = write.ledger_key
            if key:
                settled = await self._claim(key)
                if settled is not None:
                    return settled
            answers = await self._execute()
            if any(kind == m.BE_ERROR for kind, _ in answers):
                return await self._failed(answers)
            tag = next((raw[5:-1] for kind, raw in answers if kind == m.BE_COMMAND_COMPLETE), b"")
            rows = rows_of(tag)
            refusal = self._over_cap(rows) or await self._over_budget(rows)
            if refusal is not None:
                return await self._refuse(refusal, rows)
            body = self._client_answers(answers, rows)
            if key:
                stored = b"".join(raw for raw in body if raw[:1] in (b"T", b"D", b"C"))
                if not self.simple and self.described:
                    stored = self.described + stored
                await self.ledger.run((b"guardproxy_store", (key, tag.decode(), stored.hex())))
            decision = "rewritten" if self.plan.soft_delete else "allowed"
            if write.audit_inline is not None:
                agent, agent_type, task, step = write.audit_inline
                values = (agent, agent_type, task, step, self.plan.statement, decision, _text(rows))
                try:
                    await self.ledger.run((b"guardproxy_audit", values))
                except LedgerError as exc:
                    name = self.plan.agent_type
                    return await self._refuse(
                        GuardError(
                            f"{name} may not write while the audit log cannot record it "
                            f"(policy {name}, audit.on_loss: fail_closed); the write was rolled "
                            f"back. The audit store said: {exc.detail}",
                            hint="retry shortly; an operator must bring the audit store back",
                            sqlstate="53400",
                        ),
                        rows,
                        failed_on_server=True,
                    )
        except LedgerError as exc:
            return await self._refuse(
                GuardError(
                    f"{self.plan.agent_type} may not write while guardproxy cannot record it "
                    f"({exc.message}); nothing was written (policy {self.plan.agent_type}, "
                    "write safety)",
                    hint="retry shortly; an operator must check guardproxy's schema and grants",
                    sqlstate="53400",
                ),
                None,
                failed_on_server=True,
            )
        if self.began:
            await backend.query("COMMIT")
        if CRASH_AFTER_COMMIT:
            os._exit(99)  # a fault-injection hook for the tests: die between commit and reply
        return WriteOutcome(b"".join(body) + self._ready(), decision, rows)

    # ------------------------------------------------------------ steps

    async def _claim(self, key: str) -> WriteOutcome | None:
        """None to go on; else the outcome: a replay of the stored answer, or a refusal."""
        write = self.write
        (claimed,) = await self.ledger.run(
            (
                b"guardproxy_claim",
                (
                    key,
                    self.plan.agent_type,
                    write.agent_id,
                    write.task,
                    write.request_hash(),
                    str(int(write.key_ttl_seconds)),
                ),
            )
        )
        if claimed:
            return None
        (found,) = await self.ledger.run((b"guardproxy_lookup", (key,)))
        if not found:
            return None
        stored_hash, response_hex = found[0]
        if stored_hash != write.request_hash():
            return await self._refuse(
                GuardError(
                    f"idempotency key {write.key_label} was already used for a different "
                    "statement or parameters; nothing was executed",
                    hint="use a new idempotency key for a new write; retry only with the exact "
                    "same statement",
                    sqlstate="22023",
                ),
                None,
            )
        notice = codec.build_notice(
            "01000",
            f"guardproxy: replayed the result of the first execution of idempotency key "
            f"{write.key_label}; the write was not executed again",
        )
        stored = bytes.fromhex(response_hex or "")
        if not self.simple:
            stored = _without_row_description(stored)
        if self.began:
            await self.backend.query("ROLLBACK")
        return WriteOutcome(notice + stored + self._ready(), "replayed", rule="idempotency")

    async def _execute(self) -> list[tuple[int, bytes]]:
        backend = self.backend
        if self.simple:
            return await backend.exchange(self.request, copy_in=self.copy_in)
        portal = codec.execute_target(self.request)[0]
        # the row description too, so that a replay to a simple Query can show the rows
        describe = codec.message(b"D", b"P" + portal + b"\x00")
        answers = await backend.exchange(
            describe + self.request + codec.FLUSH, until_ready=False, copy_in=self.copy_in
        )
        if answers and answers[0][0] in (m.BE_ROW_DESCRIPTION, m.BE_NO_DATA):
            kind, raw = answers.pop(0)
            self.described = raw if kind == m.BE_ROW_DESCRIPTION else b""
        return answers

    def _client_answers(self, answers: list[tuple[int, bytes]], rows: int | None) -> list[bytes]:
        """The statement's answers as the client sees them (no ReadyForQuery)."""
        body = [raw for kind, raw in answers if kind != m.BE_READY]
        plan = self.plan
        if plan.strip_rows:
            # the agent's DELETE returns no rows: no row description and no rows
            body = [raw for raw in body if raw[:1] not in (b"T", b"D")]
            self.described = b""
        if plan.soft_delete or plan.strip_rows:
            deleted = codec.build_command_complete(f"DELETE {rows}")
            body = [deleted if raw[:1] == b"C" else raw for raw in body]
        return body

    async def _failed(self, answers: list[tuple[int, bytes]]) -> WriteOutcome:
        """The statement failed: the client sees Postgres's error as it is."""
        body = [raw for kind, raw in answers if kind != m.BE_READY]
        error = next((raw for kind, raw in answers if kind == m.BE_ERROR), b"")
        fields = codec.error_fields(error) if error else {}
        reason = f"{fields.get('C', '')}: {fields.get('M', '')}" if error else None
        if self.began:
            await self.backend.query("ROLLBACK")
        return WriteOutcome(
            b"".join(body) + self._ready(), "failed", reason=reason, aborted=not self.simple
        )

    def _over_cap(self, rows: int | None) -> GuardError | None:
        plan = self.plan
        cap = plan.max_rows_affected
        if cap is None or rows is None or rows <= cap:
            return None
        return Denied(
            f"{plan.agent_type} may change at most {cap} rows in one statement; this one would "
            f"have changed {rows}, so it was rolled back and nothing changed (policy "
            f"{plan.agent_type}, {plan.cap_rule})",
            rule=plan.cap_rule,
            hint=f"narrow the WHERE clause so it matches at most {cap} rows, or split the work "
            "into batches",
            sqlstate="54000",
        )

    async def _over_budget(self, rows: int | None) -> GuardError | None:
        write = self.write
        if not write.budgeted:
            return None
        name = self.plan.agent_type
        calls: list[tuple[bytes, tuple[str | None, ...]]] = []
        task_budget = write.max_writes_per_task or write.max_statements_per_task
        if write.budget_task and task_budget:
            calls.append((b"guardproxy_budget", (write.budget_task, name, str(rows or 0))))
        for scope, subject, _, _, window in write.windows:
            calls.append((b"guardproxy_window", (scope, subject, str(rows or 0), str(window))))
        spent = await self.ledger.run(*calls)
        if write.budget_task and task_budget:
            statements, written = (int(v or 0) for v in spent.pop(0)[0])
            who = f"task {write.task}" if write.task else "this session's writes without a task"
            for budget, used, limit in (
                ("max_statements_per_task", statements, write.max_statements_per_task),
                ("max_writes_per_task", written, write.max_writes_per_task),
            ):
                if limit is not None and used > limit:
                    return Denied(
                        f"{who} of {name} is past its budget {budget} = {limit} (this write "
                        f"would bring it to {used}); the write was rolled back (policy {name}, "
                        f"budgets.{budget})",
                        rule=f"budgets.{budget}",
                        hint="the task has done what it may; start a new task or ask an operator"
                        if write.task
                        else "set a task (SET guard.task = '...'), or ask an operator",
                        sqlstate="53400",
                    )
        for (scope, subject, max_rows, max_statements, window), rows_spent in zip(
            write.windows, spent, strict=True
        ):
            statements, written = (int(v or 0) for v in rows_spent[0])
            for budget, used, limit in (
                ("max_statements", statements, max_statements),
                ("max_rows_written", written, max_rows),
            ):
                if limit is not None and used > limit:
                    whom = f"agent {subject}" if scope == "per_agent" else f"all {name} agents"
                    return Denied(
                        f"{whom} would pass the budget {budget} = {limit} per "
                        f"{_duration(window)} (this write would bring it to {used}), whatever "
                        f"the task; the write was rolled back (policy {name}, "
                        f"budgets.{scope}.{budget})",
                        rule=f"budgets.{scope}.{budget}",
                        hint=f"wait until earlier writes leave the {_duration(window)} window, "
                        "or ask an operator",
                        sqlstate="53400",
                    )
        return None

    async def _refuse(
        self, error: GuardError, rows: int | None, failed_on_server: bool = False
    ) -> WriteOutcome:
        """Undoes the write: our transaction rolls back; the client's is made to fail."""
        backend = self.backend
        body = codec.build_error(error.sqlstate, error.message, hint=error.hint)
        if self.began:
            if failed_on_server:
                await backend.exchange(codec.SYNC)  # the server skipped to a Sync
            await backend.query("ROLLBACK")
            response = body + codec.ready_for_query(b"I")
        elif self.simple:
            if not failed_on_server:
                await backend.exchange(_ABORT + codec.SYNC)
            else:
                await backend.exchange(codec.SYNC)
            response = body + codec.ready_for_query(backend.status)
        else:
            if not failed_on_server:
                await _abort_round(backend)
            response = body
        rule = getattr(error, "rule", None)
        return WriteOutcome(
            response, "denied", rows, rule=rule, reason=error.message, aborted=not self.simple
        )

    def _ready(self) -> bytes:
        return codec.ready_for_query(self.backend.status) if self.simple else b""


async def _abort_round(backend: Backend) -> None:
    """Makes the server fail inside the client's round; it then skips to the client's Sync."""
    backend.send(_ABORT + codec.FLUSH)
    while True:
        kind, _ = await backend.recv()
        if kind == m.BE_ERROR:
            return


def _without_row_description(stored: bytes) -> bytes:
    """A stored answer without its RowDescription (an Execute's answer has none)."""
    out, pos = [], 0
    while pos + 5 <= len(stored):
        end = pos + 1 + int.from_bytes(stored[pos + 1 : pos + 5], "big")
        if stored[pos : pos + 1] != b"T":
            out.append(stored[pos:end])
        pos = end
    return b"".join(out)


def _duration(seconds: float) -> str:
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds % 60 == 0:
        return f"{int(seconds // 60)}min"
    return f"{seconds:g}s"


def _text(value: int | None) -> str | None:
    return None if value is None else str(value)


__all__ = ["UpstreamError", "WriteOutcome", "rows_of", "run"]
