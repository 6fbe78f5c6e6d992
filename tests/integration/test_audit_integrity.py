"""One event never costs another: the audit writer (guardproxy/store/audit_writer.py) against
a real Postgres, and through the real proxy with hostile context in the same batch.

The writer runs in this process on a database of its own (``gp_audit``, guardproxy's
schema migrated in). Each hostile value is first shown to be refused by Postgres when
written raw, so the test proves the writer's handling, not a harmless input.
"""

from __future__ import annotations

import json
import random
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import shop
from conftest import wait_until
from pgcluster import PgCluster, free_port
from proofkit import metric, superuser
from shop import FULFILLMENT, SHOP_DB, SUPPORT, launch_proxy

from guardproxy.metrics import StatsRegistry
from guardproxy.store import migrate
from guardproxy.store.audit_writer import ALTERED_TAG, COLUMNS, AuditEvent, AuditLog

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline
clean_shop = shop.clean_shop

AUDIT_DB = "gp_audit"
# 1,000 random four-byte characters (CJK extension B): 4,000 bytes that do not compress,
# so an index entry of them passes Postgres' limit of about 2,700 bytes
_RNG = random.Random(7)
INCOMPRESSIBLE = "".join(chr(0x20000 + _RNG.randrange(40000)) for _ in range(1000))


@pytest.fixture(scope="module")
def audit_dsn(pg: PgCluster) -> str:
    pg.psql(f"DROP DATABASE IF EXISTS {AUDIT_DB} WITH (FORCE)", dbname="postgres")
    pg.psql(f"CREATE DATABASE {AUDIT_DB} OWNER app_owner", dbname="postgres")
    dsn = pg.dsn(dbname=AUDIT_DB)
    migrate.upgrade(dsn)
    return dsn


def ordinary(marker: str, n: int) -> AuditEvent:
    return AuditEvent(
        f"agent-{n}",
        "support",
        f"UPDATE orders SET status = 'packed' WHERE id = {n} /* {marker} */",
        "allowed",
        task=f"{marker}-task-{n}",
        rows=1,
    )


def hostile(marker: str) -> list[AuditEvent]:
    """Values Postgres (or the COPY encoder) refuses raw, one kind each."""
    return [
        AuditEvent("support-1", "support", f"UPDATE t SET x = 1 /* {marker} */", "allowed",
                   task="ship\x00"),
        AuditEvent("support-1", "support", f"UPDATE t SET x = 'a\x00' /* {marker} */", "allowed"),
        AuditEvent("support-1", "support", f"SELECT 1 /* {marker} */", "denied",
                   step="bad\udcffutf8"),
        AuditEvent("support-1", "support", f"SELECT 2 /* {marker} */", "denied",
                   task=INCOMPRESSIBLE),  # over the btree index entry limit
        AuditEvent("support-1", "support", f"SELECT 3 /* {marker} */", "denied",
                   tags={"trace": "x\x00y"}),
    ]  # fmt: skip


async def rows_for(dsn: str, marker: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        found = await conn.fetch(
            "SELECT * FROM guardproxy.audit_events WHERE statement LIKE $1 ORDER BY id",
            f"%{marker}%",
        )
        return [dict(r) for r in found]
    finally:
        await conn.close()


async def write_raw(dsn: str, record: tuple[Any, ...]) -> BaseException | None:
    """What Postgres says to the record written as it is, unsanitised."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.copy_records_to_table(
            "audit_events", records=[record], columns=COLUMNS, schema_name="guardproxy"
        )
    except Exception as exc:
        return exc
    finally:
        await conn.close()
    return None


def raw_record(e: AuditEvent) -> tuple[Any, ...]:
    return (
        e.agent_id,
        e.agent_type,
        e.task,
        e.step,
        list(e.principals) or None,
        e.statement,
        e.decision,
        e.rule,
        e.reason,
        e.rows,
        e.duration_ms,
        json.dumps(e.tags) if e.tags else None,
    )


async def test_each_hostile_value_is_refused_by_postgres_when_written_raw(audit_dsn: str) -> None:
    marker = f"raw-{uuid.uuid4().hex[:8]}"
    for event in hostile(marker):
        assert await write_raw(audit_dsn, raw_record(event)) is not None, event.statement
    assert await rows_for(audit_dsn, marker) == []


async def test_a_batch_with_poisoned_events_keeps_every_other_event(audit_dsn: str) -> None:
    marker = f"batch-{uuid.uuid4().hex[:8]}"
    stats = StatsRegistry()
    log = AuditLog(audit_dsn, stats, batch=50, linger=0.2)
    events = [ordinary(marker, n) for n in range(6)]
    events[2:2] = hostile(marker)
    # one no sanitising can save: a row count out of bigint range (the COPY encoder refuses it)
    events.insert(
        9,
        AuditEvent(
            "fulfillment-1", "fulfillment", f"DELETE /* {marker} */", "allowed", rows=1 << 70
        ),
    )
    log.start()
    try:
        for event in events:  # all within one linger: one batch
            assert log.record(event)
        await log.flush(20)
    finally:
        await log.close()
    rows = await rows_for(audit_dsn, marker)
    assert len(rows) == len(events), [r["statement"] for r in rows]
    assert stats.audit_events_lost == 0 and stats.audit_events_rejected == 1 and log.healthy
    by_task = {r["task"]: r for r in rows}
    for n in range(6):  # the ordinary events exactly as they were
        row = by_task[f"{marker}-task-{n}"]
        assert (row["agent_id"], row["rows"], row["tags"]) == (f"agent-{n}", 1, None)
    # the hostile ones, kept, escaped visibly, and marked
    assert json.loads(by_task["ship\\x00"]["tags"]) == {ALTERED_TAG: "task"}
    escaped = [r for r in rows if r["statement"].startswith("UPDATE t SET x = 'a\\x00'")]
    assert len(escaped) == 1 and json.loads(escaped[0]["tags"]) == {ALTERED_TAG: "statement"}
    assert any(r["step"] == "bad\\udcffutf8" for r in rows)
    long_task = next(r for r in rows if r["statement"].startswith("SELECT 2"))
    assert INCOMPRESSIBLE.startswith(long_task["task"].split("...[cut")[0])
    assert long_task["task"].endswith("characters]")
    tagged = next(r for r in rows if r["statement"].startswith("SELECT 3"))
    assert json.loads(tagged["tags"]) == {"trace": "x\\x00y", ALTERED_TAG: "tags"}
    # the one the store refused even alone: a placeholder that says so
    placeholder = next(r for r in rows if r["agent_id"] == "fulfillment-1")
    assert placeholder["decision"] == "allowed" and placeholder["rows"] is None
    assert "refused this event" in placeholder["reason"]
    assert json.loads(placeholder["tags"]) == {ALTERED_TAG: "event"}
    # the query docs/observability.md gives (GuardproxyAuditEventsRejected) finds it
    conn = await asyncpg.connect(audit_dsn, timeout=10)
    try:
        found = await conn.fetch(
            "SELECT * FROM guardproxy.audit_events WHERE tags->>'guardproxy.altered' = 'event'"
        )
    finally:
        await conn.close()
    assert placeholder["id"] in [r["id"] for r in found]


async def test_a_store_that_refuses_everything_counts_events_lost_not_rejected(
    audit_dsn: str,
) -> None:
    """A missing table is the store's fault: no per-event storm, no false rejection."""
    stats = StatsRegistry()
    log = AuditLog(audit_dsn, stats, linger=0.05)
    log.start()
    try:
        conn = await asyncpg.connect(audit_dsn, timeout=10)
        try:
            await conn.execute(
                "ALTER TABLE guardproxy.audit_events RENAME TO audit_events_elsewhere"
            )
            for n in range(3):
                assert log.record(ordinary("missing", n))
            await log.flush(10)
        finally:
            await conn.execute(
                "ALTER TABLE guardproxy.audit_events_elsewhere RENAME TO audit_events"
            )
            await conn.close()
    finally:
        await log.close()
    assert stats.audit_events_lost == 3 and stats.audit_events_rejected == 0
    assert not log.healthy


# ---------------------------------------------------------------- through the proxy


@pytest.fixture
def proxy(clean_shop: PgCluster, tmp_path: Path) -> Iterator[tuple[shop.ShopProxy, int]]:
    metrics_port = free_port()
    with launch_proxy(clean_shop, tmp_path / "guardproxy.log", metrics_port=metrics_port) as h:
        yield h, metrics_port


def test_hostile_context_of_one_agent_costs_no_other_agent_its_audit_events(
    proxy: tuple[shop.ShopProxy, int], clean_shop: PgCluster
) -> None:
    handle, metrics_port = proxy
    pg = clean_shop
    marker = f"thru-{uuid.uuid4().hex[:8]}"
    done: list[int] = []
    errors: list[BaseException] = []

    def fulfillment_writes() -> None:
        try:
            with handle.connect(FULFILLMENT, autocommit=True) as conn:
                for n in range(20):
                    conn.execute(
                        f"UPDATE orders SET tracking_number = 'TRK-{marker}-{n}' WHERE id = 3 "
                        f"/* task='{marker}-f' */"
                    )
                    done.append(n)
        except BaseException as exc:
            errors.append(exc)

    before = pg.psql("SELECT fulfillment_status FROM orders WHERE id = 4", dbname=SHOP_DB)
    worker = threading.Thread(target=fulfillment_writes)
    worker.start()
    hostile_outcome: str | None = None  # refused at the door (22023) once the relay checks
    with handle.connect(SUPPORT, autocommit=True) as conn:
        # a denied read is always audited, with the context it carries
        with pytest.raises(psycopg.Error):
            conn.execute(f"SELECT * FROM payments /* task='ship%00{marker}' */")
        try:
            conn.execute(
                "UPDATE orders SET fulfillment_status = 'packed' WHERE id = 4 "
                f"/* task='ship%00{marker}' */"
            )
        except psycopg.Error as exc:
            hostile_outcome = exc.sqlstate
    worker.join(60)
    assert not errors and done == list(range(20)), errors

    def stored() -> list[tuple[str, str, str | None]]:
        with superuser(pg) as conn:
            return conn.execute(
                "SELECT agent_id, coalesce(task, ''), tags::text FROM guardproxy.audit_events "
                "WHERE statement LIKE %s OR task LIKE %s ORDER BY id",
                (f"%{marker}%", f"%{marker}%"),
            ).fetchall()

    try:
        wait_until(lambda: len([r for r in stored() if r[0] == FULFILLMENT]) >= 20, 10)
    except AssertionError:
        pass  # the assertion below shows what is missing
    rows = stored()
    # every committed write of the other agent has its event
    assert len([r for r in rows if r[0] == FULFILLMENT]) == 20, rows
    after = pg.psql("SELECT fulfillment_status FROM orders WHERE id = 4", dbname=SHOP_DB)
    mine = [r for r in rows if r[0] == SUPPORT]
    print(f"\nhostile write: {hostile_outcome or 'committed'}; its events: {mine}")
    assert mine, "the denied read of the hostile agent is not on record"
    if after != before:  # the hostile write committed: it must be on record too
        assert hostile_outcome is None and len(mine) == 2, mine
    for _, task, tags in mine:  # what was recorded of it: storable, escaped and marked
        assert "\x00" not in task
        if "ship" in task:
            assert task == f"ship\\x00{marker}" and ALTERED_TAG in (tags or ""), (task, tags)
    assert metric(metrics_port, "guardproxy_audit_events_lost") == 0
    assert metric(metrics_port, "guardproxy_audit_events_rejected") == 0
