"""How the audit writer gathers a batch (guardproxy/guard/audit.py), without a database:
one linger per batch for what arrives meanwhile, never a wait when a batch is queued."""

from __future__ import annotations

import asyncio

from guardproxy.guard.audit import AuditEvent, AuditLog
from guardproxy.metrics import StatsRegistry


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
