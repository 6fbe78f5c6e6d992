"""How the audit writer gathers a batch (guardproxy/store/audit_writer.py), without a database:
one linger per batch for what arrives meanwhile, never a wait when a batch is queued;
and what a row stores: agent-chosen values sanitised, with the writer's marker.
The writer against a real Postgres: tests/integration/test_audit_integrity.py."""

from __future__ import annotations

import asyncio
import json

import asyncpg

from guardproxy.metrics import StatsRegistry
from guardproxy.store.audit_writer import (
    ALTERED_TAG,
    COLUMNS,
    SHORT_LIMIT,
    AuditEvent,
    AuditLog,
    blames_the_data,
)


def _event(n: int) -> AuditEvent:
    return AuditEvent("support-1", "support", f"UPDATE t SET n = {n}", "allowed")


async def test_a_queued_batch_is_taken_without_waiting_for_the_linger() -> None:
    log = AuditLog("postgresql://unused", StatsRegistry(), batch=3, linger=30.0)
    for n in range(5):
        assert log.record(_event(n))
    events = [await log.queue.get()]
    await asyncio.wait_for(log._gather(events), 5)  # the 30 s linger would time out
    assert [e.statement for e in events] == [f"UPDATE t SET n = {n}" for n in range(3)]
    assert log.queue.qsize() == 2 and log.in_flight == 3


async def test_what_arrives_within_the_linger_joins_the_batch() -> None:
    log = AuditLog("postgresql://unused", StatsRegistry(), batch=10, linger=0.5)
    loop = asyncio.get_running_loop()
    assert log.record(_event(0))
    events = [await log.queue.get()]
    # timers fire in deadline order: both land before the linger's end
    loop.call_later(0.01, log.record, _event(1))
    loop.call_later(0.02, log.record, _event(2))
    await log._gather(events)
    assert [e.statement for e in events] == [f"UPDATE t SET n = {n}" for n in range(3)]
    assert log.queue.empty() and log.in_flight == 3


async def test_a_full_queue_counts_what_it_loses() -> None:
    stats = StatsRegistry()
    log = AuditLog("postgresql://unused", stats, queue_size=2)
    assert log.record(_event(0)) and log.record(_event(1))
    assert not log.record(_event(2))
    assert stats.audit_events_lost == 1 and not log.accepting


# ---------------------------------------------------------------- what a row stores


def _row(event: AuditEvent) -> dict[str, object]:
    return dict(zip(COLUMNS, event.record(), strict=True))


def test_an_ordinary_event_is_stored_as_it_is_without_a_marker() -> None:
    event = AuditEvent(
        "support-1",
        "support",
        "UPDATE orders\n\tSET status = 'packed' WHERE id = 4",
        "allowed",
        task="T-17",
        step="refund 2",
        principals=("42", "43"),
        rows=1,
        duration_ms=1.5,
    )
    row = _row(event)
    assert row["statement"] == event.statement  # newlines and tabs of a statement stay
    assert (row["task"], row["step"], row["principals"]) == ("T-17", "refund 2", ["42", "43"])
    assert row["tags"] is None


def test_values_postgres_cannot_store_are_escaped_and_the_fields_named() -> None:
    event = AuditEvent(
        "support-1",
        "support",
        "UPDATE t SET x = 'a\x00b\x1b[2J'",
        "allowed",
        task="ship\x00",
        step="bad\udcffutf8",
        principals=("42\n43",),
    )
    row = _row(event)
    assert row["task"] == "ship\\x00" and row["step"] == "bad\\udcffutf8"
    assert row["principals"] == ["42\\x0a43"]
    assert row["statement"] == "UPDATE t SET x = 'a\\x00b\\x1b[2J'"
    tags = json.loads(str(row["tags"]))
    assert tags == {ALTERED_TAG: "task,step,principals,statement"}
    for value in row.values():  # all of it encodes as UTF-8 and holds no NUL
        text = json.dumps(value, ensure_ascii=False, default=str)
        text.encode("utf-8")
        assert "\x00" not in text and "\\u0000" not in text


def test_over_long_values_are_cut_below_the_index_entry_limit() -> None:
    # 1,000 four-byte characters: 4,000 bytes, more than a btree entry takes (~2,700)
    event = AuditEvent("a" * 5000, "support", "SELECT 1", "denied", task="🚚" * 1000)
    row = _row(event)
    assert len(str(row["task"]).encode()) <= SHORT_LIMIT
    assert len(str(row["agent_id"]).encode()) <= SHORT_LIMIT
    assert str(row["task"]).endswith("characters]")
    assert json.loads(str(row["tags"]))[ALTERED_TAG] == "agent_id,task"


def test_an_agent_cannot_set_or_hide_the_writers_marker() -> None:
    event = AuditEvent(
        "support-1", "support", "SELECT 1", "allowed", tags={ALTERED_TAG: "", "trace": "t-1"}
    )
    tags = json.loads(str(_row(event)["tags"]))
    assert tags == {"trace": "t-1", ALTERED_TAG: "tags"}


def test_a_placeholder_is_ascii_and_says_why() -> None:
    event = AuditEvent(
        "süpport\x00", "support", "UPDATE t SET x = '注文'", "allowed", task="t", rows=1 << 70
    )
    row = dict(zip(COLUMNS, event.placeholder(OverflowError("int too big")), strict=True))
    for value in row.values():
        if isinstance(value, str):
            value.encode("ascii")
    assert row["agent_id"] == "s\\xfcpport\\x00" and row["rows"] is None
    assert "refused this event (OverflowError: int too big)" in str(row["reason"])
    assert json.loads(str(row["tags"])) == {ALTERED_TAG: "event"}


def test_which_failures_blame_the_data() -> None:
    assert blames_the_data(asyncpg.exceptions.CharacterNotInRepertoireError("nul"))
    assert blames_the_data(asyncpg.exceptions.ProgramLimitExceededError("index row size"))
    assert blames_the_data(OverflowError("int too big")) and blames_the_data(
        UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")
    )
    assert not blames_the_data(asyncpg.exceptions.UndefinedTableError("no audit_events"))
    assert not blames_the_data(asyncpg.exceptions.ConnectionDoesNotExistError("closed"))
    assert not blames_the_data(OSError("connection refused")) and not blames_the_data(
        TimeoutError()
    )
