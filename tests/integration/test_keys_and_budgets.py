"""Idempotency keys and budgets belong to an agent, through the real proxy: another agent
cannot squat or replay a key, a derived key never swallows a deliberate repeat, and a
loop over fresh task names is stopped by the budgets per agent and per agent type."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import shop
from pgcluster import PgCluster
from proofkit import policies_with
from shop import SHOP_DB, ShopProxy, launch_proxy

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline
clean_shop = shop.clean_shop


@contextlib.contextmanager
def proxy_with(pg: PgCluster, tmp_path: Path, **changes: dict[str, Any]) -> Iterator[ShopProxy]:
    policies = policies_with(tmp_path, **changes)
    with launch_proxy(pg, tmp_path / "guardproxy.log", policies=policies) as proxy:
        try:
            yield proxy
        except BaseException:
            print(f"\n----- guardproxy log -----\n{proxy.log()[-6000:]}")
            raise


STATUSES = ("packed", "shipped", "delivered", "returned")
STATUS_OF_5 = "SELECT fulfillment_status FROM orders WHERE id = 5"


def log_rows(pg: PgCluster, who: str) -> int:
    return int(
        pg.psql(f"SELECT count(*) FROM order_state_log WHERE changed_by = '{who}'", dbname=SHOP_DB)
    )


def keyed(key: str, who: str, reason: str) -> str:
    return (
        f"/* idempotency_key='{key}' */ INSERT INTO order_state_log "
        "(order_id, previous_status, new_status, changed_by, reason) "
        f"VALUES (2, 'shipped', 'delivered', '{who}', '{reason}')"
    )


def test_another_agent_can_neither_squat_nor_replay_a_key(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    with (
        proxy_with(pg, tmp_path) as proxy,
        proxy.connect("support-a", autocommit=True) as a,
        proxy.connect("support-b", autocommit=True) as b,
        proxy.connect("support-c", autocommit=True) as c,
    ):
        a.execute(keyed("k-shared", "support-a", "first"))
        # the same key and the very statement of the first agent: not a replay of its answer
        notes: list[str] = []
        b.add_notice_handler(lambda d: notes.append(d.message_primary or ""))
        b.execute(keyed("k-shared", "support-a", "first"))
        assert not any("replayed" in n for n in notes), notes
        # the same key with another statement: not refused as taken, it runs
        c.execute(keyed("k-shared", "support-c", "other"))
        # and the first agent's own retry is replayed, as before
        a.execute(keyed("k-shared", "support-a", "first"))
    assert log_rows(pg, "support-a") == 2  # the first agent's once, the second agent's copy
    assert log_rows(pg, "support-c") == 1


def test_a_derived_key_never_swallows_a_deliberate_repeat(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    status = "SELECT fulfillment_status FROM orders WHERE id = 4"
    with (
        proxy_with(pg, tmp_path) as proxy,
        proxy.connect("support-rep", autocommit=True, options="-c guard.task=T-rep") as conn,
    ):
        for value in ("packed", "pending", "packed"):
            conn.execute(f"UPDATE orders SET fulfillment_status = '{value}' WHERE id = 4")
        assert pg.psql(status, dbname=SHOP_DB) == "packed"
        # with a step, the same attempt sent again is a retry: replayed, not run again
        conn.execute("SET guard.step = 's-1'")
        conn.execute("UPDATE orders SET fulfillment_status = 'shipped' WHERE id = 4")
        pg.psql("UPDATE orders SET fulfillment_status = 'returned' WHERE id = 4", dbname=SHOP_DB)
        notes: list[str] = []
        conn.add_notice_handler(lambda d: notes.append(d.message_primary or ""))
        conn.execute("UPDATE orders SET fulfillment_status = 'shipped' WHERE id = 4")
        assert any("replayed" in n for n in notes), notes
    assert pg.psql(status, dbname=SHOP_DB) == "returned"  # the retry did not run again


def test_a_loop_over_fresh_task_names_is_stopped_by_the_agents_budget(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    budgets = {"budgets": {"per_agent": {"max_statements": 3, "window": "1h"}}}
    with (
        proxy_with(pg, tmp_path, support=budgets) as proxy,
        proxy.connect("support-loop", autocommit=True) as conn,
    ):
        done = 0
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded) as stopped:
            for i in range(10):
                status = STATUSES[i % len(STATUSES)]
                conn.execute(
                    f"/* task='fresh-{i}',step='1' */ UPDATE orders "
                    f"SET fulfillment_status = '{status}' WHERE id = 5"
                )
                done += 1
        assert done == 3
        assert "budgets.per_agent" in str(stopped.value)
    assert pg.psql(STATUS_OF_5, dbname=SHOP_DB) == STATUSES[2]


def test_writes_without_a_task_count_against_the_sessions_task(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    pg = clean_shop
    with (
        proxy_with(pg, tmp_path, support={"budgets": {"max_statements_per_task": 2}}) as proxy,
        proxy.connect("support-notask", autocommit=True) as conn,
    ):
        for status in STATUSES[:2]:
            conn.execute(f"UPDATE orders SET fulfillment_status = '{status}' WHERE id = 5")
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded) as stopped:
            conn.execute(f"UPDATE orders SET fulfillment_status = '{STATUSES[2]}' WHERE id = 5")
        assert "max_statements_per_task" in str(stopped.value)
    assert pg.psql(STATUS_OF_5, dbname=SHOP_DB) == STATUSES[1]
