"""limits.max_rows_returned through the real proxy where a single result is not the
whole story: cursors read in several FETCHes, and the error mode inside a transaction."""

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

CAP = 1000  # policies/analytics.yaml, limits.max_rows_returned


def _add_customers(pg: PgCluster, count: int) -> None:
    pg.psql(
        "insert into customers (name, email) select 'c' || g, 'cap' || g || '@x' "
        f"from generate_series(1, {count}) g",
        dbname=SHOP_DB,
    )


@pytest.fixture
def proxy(clean_shop: PgCluster, tmp_path: Path) -> Iterator[ShopProxy]:
    _add_customers(clean_shop, 1500)
    with launch_proxy(clean_shop, tmp_path / "guardproxy.log") as handle:
        yield handle


@pytest.fixture
def erroring_proxy(clean_shop: PgCluster, tmp_path: Path) -> Iterator[ShopProxy]:
    _add_customers(clean_shop, 1500)
    policies = policies_with(tmp_path, analytics={"limits": {"on_rows_returned_over": "error"}})
    with launch_proxy(clean_shop, tmp_path / "guardproxy.log", policies=policies) as handle:
        yield handle


def test_a_cursor_delivers_at_most_the_cap_over_all_its_fetches(proxy) -> None:
    notices: list[str] = []
    with proxy.connect("analytics-1") as a:
        a.add_notice_handler(lambda d: notices.append(d.message_primary))
        a.execute("DECLARE c CURSOR FOR SELECT id FROM customers WHERE id > 0 ORDER BY id")
        counts = []
        for _ in range(4):
            cur = a.execute("FETCH 600 FROM c")
            counts.append(len(cur.fetchall()))
        assert counts == [600, CAP - 600, 0, 0]
        assert cur.statusmessage == "FETCH 0"
        assert any(f"truncated to {CAP} rows" in n for n in notices), notices
        a.rollback()
        # a new cursor of the same name starts counting again
        a.execute("DECLARE c CURSOR FOR SELECT id FROM customers WHERE id > 0 ORDER BY id")
        assert len(a.execute("FETCH 10 FROM c").fetchall()) == 10


async def test_a_cursor_cap_holds_in_the_extended_protocol(proxy) -> None:
    conn = await asyncpg.connect(proxy.dsn("analytics-2"), timeout=10)
    try:
        async with conn.transaction():
            await conn.execute("DECLARE k CURSOR FOR SELECT id FROM customers WHERE id > 0")
            got = [len(await conn.fetch("FETCH 700 FROM k")) for _ in range(3)]
        assert got == [700, CAP - 700, 0]
    finally:
        await conn.close()


def test_over_the_cap_in_error_mode_aborts_the_transaction_like_any_error(
    erroring_proxy, clean_shop
) -> None:
    with erroring_proxy.connect("analytics-3") as a:
        with pytest.raises(psycopg.Error) as exc:
            a.execute("SELECT id FROM customers WHERE id > 0").fetchall()
        assert exc.value.sqlstate == "54000" and "max_rows_returned" in str(exc.value)
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            a.execute("SELECT id FROM customers WHERE id = 1")
        a.rollback()
        assert a.execute("SELECT id FROM customers WHERE id = 1").fetchall() == [(1,)]
    # in autocommit there is no transaction to abort: the next statement just runs
    with erroring_proxy.connect("analytics-4", autocommit=True) as a:
        with pytest.raises(psycopg.Error):
            a.execute("SELECT id FROM customers WHERE id > 0").fetchall()
        assert a.execute("SELECT id FROM customers WHERE id = 2").fetchall() == [(2,)]


def test_in_error_mode_a_commit_sent_right_after_a_refused_read_does_not_commit(
    erroring_proxy,
) -> None:
    """A capped read the proxy refuses and a COMMIT pipelined right behind it: as after
    any error in Postgres, the COMMIT finds the transaction aborted and rolls back."""
    with shop.RawAgent(erroring_proxy.port, "analytics-6") as agent:
        assert not agent.query("BEGIN").errors
        read, commit = (
            shop._cstr("SELECT id FROM customers WHERE id > 0"),
            shop._cstr("COMMIT"),
        )
        agent.sock.sendall(
            b"Q"
            + struct.pack("!i", 4 + len(read))
            + read
            + b"Q"
            + struct.pack("!i", 4 + len(commit))
            + commit
        )
        first = agent._read_until_ready()
        second = agent._read_until_ready()
        assert first.error["C"] == "54000" and first.status == "E", first.errors
        assert second.tags == ["ROLLBACK"], (second.tags, second.errors)
        assert agent.query("SELECT 1 FROM customers WHERE id = 1").rows == [["1"]]


def test_in_error_mode_a_capped_read_cannot_hide_statements_behind_it(erroring_proxy) -> None:
    with shop.RawAgent(erroring_proxy.port, "analytics-7") as agent:
        reply = agent.query("SELECT id FROM customers WHERE id > 0; SELECT 1")
        assert reply.error["C"] == "0A000" and reply.rows == [], reply.errors
        assert "statement of its own" in reply.error["M"]


def test_a_cursor_name_used_again_in_a_later_transaction_counts_from_zero(proxy) -> None:
    with proxy.connect("analytics-8") as a:
        a.execute("DECLARE c CURSOR FOR SELECT id FROM customers WHERE id > 0 ORDER BY id")
        assert len(a.execute("FETCH 900 FROM c").fetchall()) == 900
        a.commit()
        # declared in the same message as BEGIN: the proxy does not see it as its own
        # statement, and the count of the old cursor must not carry over
        with a.cursor() as cur:
            cur.execute(
                "DECLARE c CURSOR FOR SELECT id FROM customers WHERE id > 0 ORDER BY id; "
                "SELECT 1 FROM customers WHERE id = 1",
                prepare=False,
            )
        assert len(a.execute("FETCH 500 FROM c").fetchall()) == 500
