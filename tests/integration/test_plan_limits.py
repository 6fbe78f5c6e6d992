"""limits.max_plan_rows / max_plan_cost through the real proxy: a read whose EXPLAIN
estimate passes the policy is refused before it starts, in the simple and the
extended protocol, with the estimate in the message; reads under the limit run."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
import shop
from pgcluster import PgCluster
from proofkit import policies_with
from shop import SHOP_DB, ShopProxy, launch_proxy

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline
clean_shop = shop.clean_shop

# Two series of 100,000 rows joined on nothing: 10^10 rows estimated. Run, it would
# outlast the analytics statement_timeout (5 s) by far; refused, it answers at once.
RUNAWAY = (
    "SELECT a.x, b.y FROM generate_series(1, 100000) a(x), generate_series(1, 100000) b(y) "
    "WHERE a.x > 0"
)


@pytest.fixture
def proxy(clean_shop: PgCluster, tmp_path: Path) -> Iterator[ShopProxy]:
    policies = policies_with(
        tmp_path, analytics={"limits": {"max_plan_rows": 50000, "max_plan_cost": 100000000}}
    )
    with launch_proxy(clean_shop, tmp_path / "guardproxy.log", policies=policies) as handle:
        yield handle


def test_a_read_estimated_past_max_plan_rows_is_refused_before_it_runs(proxy) -> None:
    with proxy.connect("analytics-1", autocommit=True) as a:
        with pytest.raises(psycopg.Error) as exc:
            a.execute(RUNAWAY)
        # 54000, not the 57014 of a statement that ran into statement_timeout
        assert exc.value.sqlstate == "54000", exc.value
        message = str(exc.value)
        assert "max_plan_rows = 50000" in message and "estimated to produce" in message
        assert "policy analytics" in message
        # the same shape again is refused from the cache of estimates, and the session works
        with pytest.raises(psycopg.Error) as again:
            a.execute(RUNAWAY.replace("100000", "200000"))
        assert again.value.sqlstate == "54000"
        assert a.execute("SELECT id FROM customers WHERE id = 1").fetchall() == [(1,)]


def test_a_parameterized_read_is_judged_by_its_generic_plan(proxy) -> None:
    with proxy.connect("analytics-2", autocommit=True) as a:
        with pytest.raises(psycopg.Error) as exc:
            a.execute(
                "SELECT a.x FROM generate_series(1, 100000) a(x), "
                "generate_series(1, 100000) b(y) WHERE a.x > %s",
                (5,),
                prepare=True,
            )
        assert exc.value.sqlstate == "54000", exc.value
        # a bounded parameterized read still runs, and its rows come back
        rows = a.execute("SELECT id FROM customers WHERE id = %s", (1,)).fetchall()
        assert rows == [(1,)]


def test_a_refused_read_aborts_the_agents_transaction_as_postgres_would(proxy) -> None:
    with proxy.connect("analytics-3") as a:
        assert a.execute("SELECT count(*) FROM customers WHERE id > 0").fetchone() is not None
        with pytest.raises(psycopg.Error) as exc:
            a.execute(RUNAWAY)
        assert exc.value.sqlstate == "54000"
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            a.execute("SELECT 1 FROM customers WHERE id = 1")
        a.rollback()
        assert a.execute("SELECT id FROM customers WHERE id = 1").fetchall() == [(1,)]


async def test_asyncpg_reads_under_the_limits_run_and_runaway_ones_do_not(proxy) -> None:
    conn = await asyncpg.connect(proxy.dsn("analytics-4"), timeout=10)
    try:
        assert await conn.fetchval("SELECT name FROM customers WHERE id = $1", 1) is not None
        with pytest.raises(asyncpg.PostgresError) as exc:
            await conn.fetch(RUNAWAY)
        assert exc.value.sqlstate == "54000"
        assert await conn.fetchval("SELECT count(*) FROM orders WHERE id > $1", 0) >= 0
    finally:
        await conn.close()


def test_the_plan_check_leaves_no_prepared_statement_or_setting_behind(proxy, clean_shop) -> None:
    with proxy.connect("analytics-5", autocommit=True) as a:
        a.execute("SELECT a.x FROM generate_series(1, 10) a(x) WHERE a.x > %s", (1,), prepare=False)
        with pytest.raises(psycopg.Error):
            a.execute(RUNAWAY)
        # a second parameterized text is prepared under the same name on the same server:
        # had the first check left its statement behind, this one could not be estimated
        got = a.execute(
            "SELECT a.x FROM generate_series(1, 10) a(x) WHERE a.x < %s", (3,), prepare=False
        ).fetchall()
        assert got == [(1,), (2,)]
        # the same server connection (pool of 4, nothing else running) answers these
        assert a.execute("SHOW plan_cache_mode").fetchone() == ("auto",)
    left = clean_shop.psql(
        "select count(*) from pg_stat_activity where query like '%guardproxy_plan%' "
        "and state = 'idle in transaction'",
        dbname=SHOP_DB,
    )
    assert left == "0"


def test_a_cheap_variant_of_a_statement_does_not_vouch_for_an_expensive_one(proxy) -> None:
    cheap = RUNAWAY.replace("100000", "10")  # the same shape: only its constants differ
    with proxy.connect("analytics-6", autocommit=True) as a:
        assert len(a.execute(cheap).fetchall()) == 100
        with pytest.raises(psycopg.Error) as exc:
            a.execute(RUNAWAY)
        assert exc.value.sqlstate == "54000" and "max_plan_rows" in str(exc.value)


def test_a_read_postgres_cannot_plan_is_refused_with_what_postgres_said(proxy) -> None:
    with proxy.connect("analytics-7", autocommit=True) as a:
        with pytest.raises(psycopg.Error) as exc:
            a.execute("SELECT x FROM generate_series(1, 3) g(x) WHERE x > 'abc'::int")
        assert exc.value.sqlstate == "22P02", exc.value  # Postgres's own code
        assert "could not plan it" in str(exc.value) and "max_plan" in str(exc.value)
        assert a.execute("SELECT id FROM customers WHERE id = 1").fetchall() == [(1,)]


def test_a_read_pipelined_after_another_is_checked_and_the_pool_stays_sound(proxy) -> None:
    """Two Query messages in one write: both are answered, in order, the second checked
    on the server the first just used, and the session and the pool go on working."""
    first, second = (
        shop._cstr("SELECT id FROM customers WHERE id = 1"),
        shop._cstr(RUNAWAY),
    )
    for round_ in range(3):
        with shop.RawAgent(proxy.port, f"analytics-8{round_}") as agent:
            agent.sock.sendall(
                b"Q"
                + struct.pack("!i", 4 + len(first))
                + first
                + b"Q"
                + struct.pack("!i", 4 + len(second))
                + second
            )
            one = agent._read_until_ready()
            two = agent._read_until_ready()
            assert one.rows == [["1"]] and not one.errors, one
            assert two.error["C"] == "54000" and two.status == "I", two.errors
            # meanwhile other sessions of the type work on the same small pool
            with proxy.connect(f"analytics-9{round_}", autocommit=True) as b:
                assert b.execute("SELECT id FROM customers WHERE id = 2").fetchall() == [(2,)]
            assert agent.query("SELECT id FROM customers WHERE id = 3").rows == [["3"]]
