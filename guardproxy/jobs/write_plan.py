"""What the runtime must enforce for a write: fixed when the statement is judged
(``WritePlan``) and completed for each execution (``WriteRun``).

A prepared write runs many times, under whatever task, step and tags the session
has at that moment: its idempotency key, its budget and its audit record belong
to the execution, not to the Parse. Plain classes with their own ``__init__``: one
is built per statement on the hot path, and a frozen dataclass sets every field
through ``object.__setattr__`` in an interpreted ``__init__`` even when compiled.
"""

from __future__ import annotations

import hashlib
from typing import Final


class WritePlan:
    """The write-safety facts of one judged statement (the same for every execution)."""

    def __init__(
        self,
        agent_type: str,
        statement: str,  # as sent upstream (after rewrites), without the proxy's tag
        *,
        soft_delete: bool = False,  # a DELETE the judge rewrote: shown to the client as DELETE n
        strip_rows: bool = False,  # the rewrite returns rows the agent's statement did not ask for
        max_rows_affected: int | None = None,
        cap_rule: str = "",
        statement_key: str | None = None,  # an idempotency key in the statement's own comment
        rule: str | None = None,  # the rule that rewrote it (soft delete, capture...), if any
    ) -> None:
        self.agent_type: Final = agent_type
        self.statement: Final = statement
        self.soft_delete: Final = soft_delete
        self.strip_rows: Final = strip_rows
        self.max_rows_affected: Final = max_rows_affected
        self.cap_rule: Final = cap_rule
        self.statement_key: Final = statement_key
        self.rule: Final = rule

    def __repr__(self) -> str:
        return f"WritePlan({self.agent_type!r}, {self.statement!r})"


class WriteRun:
    """One execution of a write: its plan and what the session context adds to it."""

    def __init__(
        self,
        plan: WritePlan,
        *,
        agent_id: str,
        idempotency_key: str | None = None,
        derived: bool = False,  # the key was derived: the Bind parameters are part of it
        parameters: bytes = b"",  # the Bind's values (what makes two executions differ)
        # audit.on_loss fail_closed: the audit event is written in the write's own
        # transaction as (agent id, agent type, task, step), so no write is acknowledged
        # without its record
        audit_inline: tuple[str, str, str | None, str | None] | None = None,
        key_ttl_seconds: int = 86400,
        task: str | None = None,
        max_writes_per_task: int | None = None,
        max_statements_per_task: int | None = None,
        key_label: str = "",  # the key as the agent knows it, for messages
        budget_task: str | None = None,  # the task budgets count against (the session's)
        # rolling-window budgets: (per_agent | per_agent_type, subject, max rows written,
        # max statements, window in seconds)
        windows: tuple[tuple[str, str, int | None, int | None, float], ...] = (),
    ) -> None:
        self.plan: Final = plan
        self.key_label: Final = key_label
        self.budget_task: Final = budget_task or task
        self.windows: Final = windows
        self.agent_id: Final = agent_id
        self.idempotency_key: Final = idempotency_key
        self.derived: Final = derived
        self.parameters: Final = parameters
        self.audit_inline: Final = audit_inline
        self.key_ttl_seconds: Final = key_ttl_seconds
        self.task: Final = task
        self.max_writes_per_task: Final = max_writes_per_task
        self.max_statements_per_task: Final = max_statements_per_task

    @property
    def ledger_key(self) -> str | None:
        """The key as stored: a derived key includes the Bind parameters."""
        key = self.idempotency_key
        if key and self.derived and self.parameters:
            return f"{key}:{hashlib.sha256(self.parameters).hexdigest()[:32]}"
        return key

    def request_hash(self) -> str:
        """What a retry must repeat exactly: the statement and its parameters."""
        return hashlib.sha256(self.plan.statement.encode() + b"\x00" + self.parameters).hexdigest()

    @property
    def budgeted(self) -> bool:
        task_budget = self.max_writes_per_task or self.max_statements_per_task
        return bool((self.budget_task and task_budget) or self.windows)

    @property
    def needs_management(self) -> bool:
        """Whether the write must run as a managed write (checked before it commits)."""
        plan = self.plan
        return bool(
            plan.soft_delete
            or plan.max_rows_affected is not None
            or plan.strip_rows  # a captured hard delete answers as the agent's DELETE
            or self.idempotency_key
            or self.audit_inline is not None
            or self.budgeted
        )
