"""Large statements through the real proxy: refused past max_statement_size before they
are parsed; judged in a judge worker process above judge_offload_above (allowed,
rewritten or denied as on the loop); refused past judge_timeout, fail closed."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import shop
from pgcluster import PgCluster
from shop import launch_proxy

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline
clean_shop = shop.clean_shop


def many_ids(count: int) -> str:
    return ", ".join(str(i) for i in range(count))


def test_large_statements_are_judged_in_a_worker_like_any_other(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    with (
        launch_proxy(
            clean_shop,
            tmp_path / "guardproxy.log",
            judge_offload_above=1024,
            max_statement_size=200_000,
        ) as proxy,
        proxy.connect("analytics-large", autocommit=True) as conn,
    ):
        big = f"SELECT id FROM orders WHERE id IN ({many_ids(20_000)}) ORDER BY id"
        assert len(big) > 1024
        assert conn.execute(big).fetchall() == [(1,), (2,), (3,), (4,), (5,), (6,)]
        # denied as it would be on the loop, with the policy's own message
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as denied:
            conn.execute(f"SELECT email FROM customers WHERE id IN ({many_ids(20_000)})")
        assert "customers.email" in str(denied.value)
        # and as a Parse of the extended protocol
        rows = conn.execute(big.replace("ORDER BY id", "AND id > %s ORDER BY id"), (4,))
        assert rows.fetchall() == [(5,), (6,)]
        # past max_statement_size: refused before anything parses it
        with pytest.raises(psycopg.errors.ProgramLimitExceeded) as refused:
            conn.execute(f"SELECT id FROM orders WHERE id IN ({many_ids(40_000)})")
        assert "max_statement_size" in str(refused.value)
        assert conn.execute("SELECT 1 FROM orders WHERE id = 1").fetchone() == (1,)


def test_an_analysis_past_its_time_budget_is_refused(clean_shop: PgCluster, tmp_path: Path) -> None:
    with (
        launch_proxy(
            clean_shop,
            tmp_path / "guardproxy.log",
            judge_offload_above=1024,
            judge_timeout=0.01,
        ) as proxy,
        proxy.connect("analytics-slow", autocommit=True) as conn,
    ):
        # a first large statement starts the worker (its start is not on the budget)
        warm = f"SELECT id FROM orders WHERE id IN ({many_ids(1_000)}) ORDER BY id"
        assert len(conn.execute(warm).fetchall()) == 6
        terms = ", ".join(f"id + {i}" for i in range(60_000))
        with pytest.raises(psycopg.errors.ProgramLimitExceeded) as refused:
            conn.execute(f"SELECT {terms} FROM orders WHERE id = 1")
        assert "judge_timeout" in str(refused.value)
        # the session, and the proxy, go on
        assert conn.execute("SELECT id FROM orders WHERE id = 2").fetchone() == (2,)
