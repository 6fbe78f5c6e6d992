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

One event never costs another. What an agent chose (ids, task, step, principals,
tags, the statement) is stored sanitised (`AuditEvent.record`): characters
Postgres cannot store or an operator should not see raw are escaped visibly
(``\\x00``), over-long values are cut, and the tag ``guardproxy.altered`` names
the fields that were changed (the writer owns that tag: an agent cannot set it).
Should the store still refuse a batch for its data, the batch is written again
event by event; an event refused alone is replaced by a placeholder row (ASCII,
what could be kept, and why) and counted in ``audit_events_rejected``. Events
with no row at all (queue full, store down) are counted in ``audit_events_lost``.
Both counters have an alert (deploy/prometheus/alerts.yml).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import math
import time
from typing import Any, Final

import asyncpg

from guardproxy.metrics import StatsRegistry
from guardproxy.safetext import clip_utf8, visible

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
    "at",
    "outcome",
)
# Tag naming the fields the writer changed ("task,statement"; "event" for a placeholder).
ALTERED_TAG = "guardproxy.altered"
# UTF-8 bytes kept of a name-like value (ids, task, step, each principal, tag keys and
# values, rule): below Postgres' limit for one btree index entry (about 2,700 bytes;
# agent_id and task are indexed), whatever characters are used.
SHORT_LIMIT = 1024
TEXT_LIMIT = 1 << 20  # UTF-8 bytes kept of a statement or a reason
MAX_PRINCIPALS = 256
LINES = "\t\n\r"  # kept in statements and reasons, where lines matter
_INT64 = 1 << 63
# SQLSTATE classes that blame the data sent, not the store: data exception, integrity
# constraint, program limit exceeded (an index entry too large).
_DATA_CLASSES = ("22", "23", "54")


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
        at: float | None = None,  # when it happened (epoch seconds); now when not given
        outcome: str | None = None,  # of a write upstream: succeeded, failed, undone
    ) -> None:
        self.at: Final = time.time() if at is None else at
        self.outcome: Final = outcome
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
        """The row to store, sanitised (see the module docstring)."""
        c = _Cleaner()
        principals = [c.short("principals", p) for p in self.principals[:MAX_PRINCIPALS]]
        if len(self.principals) > MAX_PRINCIPALS:
            c.altered.append("principals")
        if ALTERED_TAG in self.tags:  # the writer's own tag: never taken from an agent
            c.altered.append("tags")
        tags = {
            c.short("tags", k): c.short("tags", v) for k, v in self.tags.items() if k != ALTERED_TAG
        }
        row = (
            c.short("agent_id", self.agent_id),
            c.short("agent_type", self.agent_type),
            c.short_or_none("task", self.task),
            c.short_or_none("step", self.step),
            principals or None,
            c.text("statement", self.statement),
            c.short("decision", self.decision),
            c.short_or_none("rule", self.rule),
            None if self.reason is None else c.text("reason", self.reason),
            self.rows,
            self.duration_ms,
        )
        if c.altered:
            tags[ALTERED_TAG] = ",".join(f for f in COLUMNS if f in c.altered)
        return (*row, json.dumps(tags) if tags else None, self.when(), self.outcome)

    def when(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.at, datetime.UTC)

    def placeholder(self, error: BaseException) -> tuple[Any, ...]:
        """A row the store takes whatever refused the event: ASCII only, every value
        escaped and cut short, the numbers only when they fit, and why."""
        why = _describe(error)
        rows = self.rows if isinstance(self.rows, int) and -_INT64 <= self.rows < _INT64 else None
        ms = self.duration_ms
        return (
            _ascii(self.agent_id, 200),
            _ascii(self.agent_type, 200),
            None if self.task is None else _ascii(self.task, 200),
            None if self.step is None else _ascii(self.step, 200),
            None,
            _ascii(self.statement, 4096),
            _ascii(self.decision, 64),
            None if self.rule is None else _ascii(self.rule, 200),
            f"the audit store refused this event ({_ascii(why, 300)}); this row keeps what "
            "could be kept, escaped and cut",
            rows,
            ms if isinstance(ms, float | int) and math.isfinite(ms) else None,
            json.dumps({ALTERED_TAG: "event"}),
            self.when(),
            None if self.outcome is None else _ascii(self.outcome, 32),
        )


class _Cleaner:
    """Sanitises the values of one event and notes which fields it changed."""

    def __init__(self) -> None:
        self.altered: list[str] = []

    def short(self, field: str, value: object) -> str:
        return self._clean(field, value, "", SHORT_LIMIT)

    def short_or_none(self, field: str, value: str | None) -> str | None:
        return None if value is None else self._clean(field, value, "", SHORT_LIMIT)

    def text(self, field: str, value: object) -> str:
        return self._clean(field, value, LINES, TEXT_LIMIT)

    def _clean(self, field: str, value: object, keep: str, limit: int) -> str:
        text = value if isinstance(value, str) else str(value)
        out = visible(text, keep)
        if len(out) * 4 > limit:  # only long values need counting bytes
            cut = clip_utf8(out, limit - 40)
            if len(cut) < len(out):
                out = f"{cut}...[cut {len(out) - len(cut)} characters]"
        if out != text:
            self.altered.append(field)
        return out


def _ascii(text: object, limit: int) -> str:
    escaped = visible(str(text)).encode("ascii", "backslashreplace").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


def _describe(error: BaseException) -> str:
    state = getattr(error, "sqlstate", None)
    # visible: the error may quote what the agent sent, and it goes to the log
    return visible(
        f"{state + ' ' if isinstance(state, str) else ''}{type(error).__name__}: {error}"
    )


def blames_the_data(error: BaseException) -> bool:
    """True when a failed write is the fault of what was sent (one event may be to
    blame), False when the store itself failed (unreachable, shut down, full...)."""
    if isinstance(error, asyncpg.PostgresError):
        return str(error.sqlstate or "")[:2] in _DATA_CLASSES
    # asyncpg's client-side DataError, UnicodeEncodeError, OverflowError: a value
    # that could not be encoded
    return isinstance(error, ValueError | TypeError | OverflowError)


_CHANGED_NOTHING: Final = frozenset(("denied", "truncated"))


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
        """Queues the event; False (and counted as lost) when the queue is full. Events
        of statements that changed nothing (denials, truncated reads) take at most half
        of it: a flood of them never costs another agent the record of its writes."""
        if event.decision in _CHANGED_NOTHING and self.queue.qsize() * 2 >= self.queue.maxsize:
            self.stats.audit_events_lost += 1
            return False
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
            try:
                await self._gather(events)
                await self._write(events)
            except Exception as exc:  # never let the writer die: every later event would be lost
                self.stats.audit_events_lost += len(events)
                log.exception("audit writer failed, %d events lost: %s", len(events), exc)
            finally:
                self.in_flight = 0

    async def _copy(self, records: list[tuple[Any, ...]]) -> None:
        conn = await self._connection()
        # COPY: one round trip and no per-row statement work, whatever the batch size
        await conn.copy_records_to_table(
            "audit_events", records=records, columns=COLUMNS, schema_name="guardproxy"
        )

    async def _write(self, events: list[AuditEvent]) -> None:
        """One COPY for the batch; event by event when the store refuses its data."""
        try:
            await self._copy([e.record() for e in events])
        except Exception as exc:
            if not blames_the_data(exc):
                await self._store_down(len(events), exc)
                return
            log.warning(
                "audit store refused a batch of %d events (%s); writing them one by one",
                len(events),
                _describe(exc),
            )
            await self._write_each(events)
            return
        self.healthy = True

    async def _write_each(self, events: list[AuditEvent]) -> None:
        """Each event alone: one the store refuses becomes a placeholder row (counted in
        audit_events_rejected); should the placeholder fail too, the store is at fault."""
        for i, event in enumerate(events):
            try:
                await self._copy([event.record()])
                continue
            except Exception as exc:
                if not blames_the_data(exc):
                    await self._store_down(len(events) - i, exc)
                    return
                refused = exc
            try:
                await self._copy([event.placeholder(refused)])
            except Exception as exc:
                await self._store_down(len(events) - i, exc)
                return
            self.stats.audit_events_rejected += 1
            log.error(
                "audit store refused an event of agent %s (%s); a placeholder row records it",
                _ascii(event.agent_id, 200),
                _describe(refused),
            )
        self.healthy = True

    async def _store_down(self, lost: int, exc: BaseException) -> None:
        self.healthy = False
        self.stats.audit_events_lost += lost
        log.error("audit store failed, %d events lost: %s", lost, _describe(exc))
        with contextlib.suppress(Exception):
            if self._conn is not None:
                await self._conn.close()
        self._conn = None
        await asyncio.sleep(1.0)

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
