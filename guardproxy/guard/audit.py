"""Audit events, written in batches off the hot path through a bounded queue.

``AuditLog.record`` never waits: it puts the event on the queue or, when the
queue is full, counts it as lost and says so (the caller decides, by policy,
whether a lost event blocks the agent). A background task drains the queue
into ``guardproxy.audit_events`` with one COPY per batch, using a connection of
its own (asyncpg), so audit writes never wait behind agents.

A batch gathers for up to ``linger`` seconds after its first event: a busy
proxy then commits (and makes Postgres flush its WAL) a few dozen times a
second rather than once per write, and events still reach the table within
a fraction of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, Final

import asyncpg

from guardproxy.metrics import StatsRegistry

log = logging.getLogger("guardproxy.audit")

COLUMNS = (
    "agent_id",
    "agent_type",
    "task",
    "step",
    "principals",
    "statement",
    "decision",
    "rule",
    "reason",
    "rows",
    "duration_ms",
    "tags",
)


class AuditEvent:
    """One row of guardproxy.audit_events. A plain class, built for every audited
    statement (see WritePlan for why not a frozen dataclass)."""

    def __init__(
        self,
        agent_id: str,
        agent_type: str,
        statement: str,
        decision: str,  # allowed (a write), denied, rewritten, replayed, truncated, undo
        *,
        task: str | None = None,
        step: str | None = None,
        principals: tuple[str, ...] = (),
        rule: str | None = None,
        reason: str | None = None,
        rows: int | None = None,
        duration_ms: float | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.agent_id: Final = agent_id
        self.agent_type: Final = agent_type
        self.statement: Final = statement
        self.decision: Final = decision
        self.task: Final = task
        self.step: Final = step
        self.principals: Final = principals
        self.rule: Final = rule
        self.reason: Final = reason
        self.rows: Final = rows
        self.duration_ms: Final = duration_ms
        self.tags: Final[dict[str, str]] = tags or {}

    def record(self) -> tuple[Any, ...]:
        return (
            self.agent_id,
            self.agent_type,
            self.task,
            self.step,
            list(self.principals) or None,
            self.statement,
            self.decision,
            self.rule,
            self.reason,
            self.rows,
            self.duration_ms,
            json.dumps(self.tags) if self.tags else None,
        )


class AuditLog:
    def __init__(
        self,
        dsn: str,
        stats: StatsRegistry,
        queue_size: int = 10000,
        batch: int = 500,
        linger: float = 0.02,
    ) -> None:
        self.dsn = dsn
        self.stats = stats
        self.queue: asyncio.Queue[AuditEvent] = asyncio.Queue(queue_size)
        self.batch = batch
        self.linger = linger
        self.in_flight = 0  # events taken from the queue and not yet written (or lost)
        self.healthy = True  # the store took the last batch
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._drain())

    def record(self, event: AuditEvent) -> bool:
        """Queues the event; False (and counted as lost) when the queue is full."""
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.stats.audit_events_lost += 1
            return False
        return True

    @property
    def accepting(self) -> bool:
        return self.healthy and not self.queue.full()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            # the statement cache keeps COPY's column introspection from being prepared per batch
            self._conn = await asyncpg.connect(self.dsn, timeout=5)
        return self._conn

    async def _drain(self) -> None:
        while True:
            events = [await self.queue.get()]
            self.in_flight = 1
            await self._gather(events)
            try:
                conn = await self._connection()
                # COPY: one round trip and no per-row statement work, whatever the batch size
                await conn.copy_records_to_table(
                    "audit_events",
                    records=[e.record() for e in events],
                    columns=COLUMNS,
                    schema_name="guardproxy",
                )
                self.healthy = True
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                self.healthy = False
                self.stats.audit_events_lost += len(events)
                log.error("audit store unreachable, %d events lost: %s", len(events), exc)
                with contextlib.suppress(Exception):
                    if self._conn is not None:
                        await self._conn.close()
                self._conn = None
                await asyncio.sleep(1.0)
            finally:
                self.in_flight = 0

    async def _gather(self, events: list[AuditEvent]) -> None:
        """Adds to the batch what arrives within ``linger`` of its first event.

        One sleep per batch, not a wake-up per event: the writer is not woken for each
        write an agent makes (it was a task step and a timer each). A backlog of a
        whole batch is taken at once, without waiting."""
        self.in_flight = len(events)
        if self.queue.qsize() + len(events) < self.batch:
            await asyncio.sleep(self.linger)
        while len(events) < self.batch and not self.queue.empty():
            events.append(self.queue.get_nowait())
        self.in_flight = len(events)

    async def flush(self, timeout: float = 5.0) -> None:
        """Waits (bounded) until queued events are written; used at shutdown and by tests."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (not self.queue.empty() or self.in_flight) and loop.time() < deadline:
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
