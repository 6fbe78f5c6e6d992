"""Rows larger than a read are streamed through the proxy, not buffered whole, and
stay exact: content, order, the row cap and the session afterwards."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import shop
from pgcluster import PgCluster
from proofkit import policies_with
from shop import SHOP_DB, ShopProxy, launch_proxy

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline
clean_shop = shop.clean_shop


def _big_customers(pg: PgCluster, sizes: list[int]) -> list[int]:
    ids = []
    for i, size in enumerate(sizes):
        # md5 chains: content that differs all along, so a lost or repeated chunk shows
        ids.append(
            int(
                pg.psql(
                    "insert into customers (name, email) select string_agg(md5(g::text), '' "
                    f"order by g), 'big{i}@x' from generate_series(1, {size // 32}) g "
                    "returning id",
                    dbname=SHOP_DB,
                )
            )
        )
    return ids


def _expected(pg: PgCluster, ident: int) -> str:
    return pg.psql(f"select md5(name) from customers where id = {ident}", dbname=SHOP_DB)


@pytest.fixture
def capped_proxy(clean_shop: PgCluster, tmp_path: Path) -> Iterator[ShopProxy]:
    policies = policies_with(tmp_path, analytics={"limits": {"max_rows_returned": 2}})
    with launch_proxy(clean_shop, tmp_path / "guardproxy.log", policies=policies) as handle:
        yield handle


def test_a_row_of_many_megabytes_arrives_intact(clean_shop, tmp_path) -> None:
    (ident,) = _big_customers(clean_shop, [8 << 20])
    with (
        launch_proxy(clean_shop, tmp_path / "guardproxy.log") as proxy,
        proxy.connect("analytics-1", autocommit=True) as a,
    ):
        for _ in range(2):  # twice: the stream leaves nothing behind for the next
            row = a.execute("SELECT name FROM customers WHERE id = %s", (ident,)).fetchone()
            assert row is not None and len(row[0]) == 8 << 20
            assert hashlib.md5(row[0].encode()).hexdigest() == _expected(clean_shop, ident)
        assert a.execute("SELECT id FROM customers WHERE id = 1").fetchall() == [(1,)]


def test_the_row_cap_cuts_large_rows_and_the_session_goes_on(capped_proxy, clean_shop) -> None:
    ids = _big_customers(clean_shop, [300_000, 200_000, 400_000, 100_000])
    notices: list[str] = []
    with capped_proxy.connect("analytics-2", autocommit=True) as a:
        a.add_notice_handler(lambda d: notices.append(d.message_primary))
        cur = a.execute(
            "SELECT id, name FROM customers WHERE id >= %s ORDER BY id", (ids[0],), prepare=False
        )
        rows = cur.fetchall()
        assert [r[0] for r in rows] == ids[:2]
        for ident, name in rows:
            assert hashlib.md5(name.encode()).hexdigest() == _expected(clean_shop, ident)
        assert any("truncated to 2 rows" in n for n in notices), notices
        assert a.execute("SELECT id FROM customers WHERE id = %s", (ids[3],)).fetchall() == [
            (ids[3],)
        ]
    with psycopg.connect(capped_proxy.dsn("analytics-3"), autocommit=True) as b:
        assert b.execute("SELECT 1 FROM customers WHERE id = 1").fetchall() == [(1,)]
