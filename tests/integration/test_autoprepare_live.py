"""Auto-prepare through the real proxy and a real Postgres: an unnamed statement a client
sends again is prepared once on its server and reused there, the client gets exactly
the answers it would get without it, a DDL that changes what the statement returns is
absorbed (prepared again, run again, no error), and the setting turns it off."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import shop
from pgcluster import PgCluster
from proofkit import launch, superuser
from shop import ShopProxy

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline
clean_shop = shop.clean_shop

QUERY = "SELECT * FROM autoprep_t WHERE id = %s"


@pytest.fixture
def table(clean_shop: PgCluster) -> Iterator[PgCluster]:
    with superuser(clean_shop) as su:
        su.execute("DROP TABLE IF EXISTS autoprep_t")
        su.execute("CREATE TABLE autoprep_t (id int PRIMARY KEY, a text)")
        su.execute("INSERT INTO autoprep_t VALUES (1, 'x'), (2, 'y')")
        su.execute("GRANT SELECT ON autoprep_t TO PUBLIC")
    try:
        yield clean_shop
    finally:
        with superuser(clean_shop) as su:
            su.execute("DROP TABLE IF EXISTS autoprep_t")


@contextlib.contextmanager
def pooling_only(pg: PgCluster, tmp_path: Path, **settings: Any) -> Iterator[ShopProxy]:
    with launch(pg, tmp_path / "guardproxy.log", None, pool_size=1, **settings) as proxy:  # type: ignore[arg-type]
        yield proxy


def unnamed(proxy: ShopProxy) -> psycopg.Connection[Any]:
    """A client that never prepares by itself: every execute is an unnamed statement."""
    return proxy.connect("app-1", autocommit=True, prepare_threshold=None)


def prepared_here(conn: psycopg.Connection[Any]) -> list[str]:
    """The statements the lent server has prepared that read autoprep_t (pool_size 1:
    the same server the client's statements ran on)."""
    rows = conn.execute(
        "SELECT name FROM pg_prepared_statements WHERE statement LIKE %s", ("%autoprep_t%",)
    ).fetchall()
    return [name for (name,) in rows]


def test_a_statement_sent_again_is_prepared_once_and_answers_stay_the_same(
    table: PgCluster, tmp_path: Path
) -> None:
    with pooling_only(table, tmp_path) as proxy, unnamed(proxy) as conn:
        answers = [conn.execute(QUERY, (n % 2 + 1,)).fetchall() for n in range(6)]
        assert answers == [[(1, "x")], [(2, "y")]] * 3
        names = prepared_here(conn)
        assert len(names) == 1 and names[0].startswith("gp_"), names
        # a wrong parameter fails as it would unprepared, and the statement stays usable
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            conn.execute("SELECT * FROM autoprep_t WHERE id = %s::int", ("abc",))
        assert conn.execute(QUERY, (1,)).fetchall() == [(1, "x")]


def test_a_ddl_that_changes_the_result_is_absorbed(table: PgCluster, tmp_path: Path) -> None:
    with pooling_only(table, tmp_path) as proxy, unnamed(proxy) as conn:
        for _ in range(3):
            assert conn.execute(QUERY, (1,)).fetchall() == [(1, "x")]
        assert prepared_here(conn)
        with superuser(table) as su:
            su.execute("ALTER TABLE autoprep_t ADD COLUMN b int DEFAULT 7")
        # Postgres says "cached plan must not change result type" to the proxy, not to
        # the client, which never prepared anything: it gets the new shape
        cur = conn.execute(QUERY, (1,))
        assert [d.name for d in cur.description or ()] == ["id", "a", "b"]
        assert cur.fetchall() == [(1, "x", 7)]
        assert conn.execute(QUERY, (2,)).fetchall() == [(2, "y", 7)]


def test_inside_a_transaction_a_stale_plan_fails_once_as_for_any_prepared_statement(
    table: PgCluster, tmp_path: Path
) -> None:
    with pooling_only(table, tmp_path) as proxy, unnamed(proxy) as conn:
        for _ in range(3):
            conn.execute(QUERY, (1,))
        with superuser(table) as su:
            su.execute("ALTER TABLE autoprep_t ADD COLUMN b int DEFAULT 7")
        # an open transaction cannot be run again by the proxy (docs/pooling.md): the
        # client gets Postgres's error, and the retried transaction works
        with (
            pytest.raises(psycopg.errors.FeatureNotSupported, match="must not change result"),
            conn.transaction(),
        ):
            conn.execute(QUERY, (1,))
        with conn.transaction():
            assert conn.execute(QUERY, (1,)).fetchall() == [(1, "x", 7)]


def test_it_can_be_turned_off(table: PgCluster, tmp_path: Path) -> None:
    with pooling_only(table, tmp_path, auto_prepare_after=0) as proxy, unnamed(proxy) as conn:
        for _ in range(4):
            assert conn.execute(QUERY, (1,)).fetchall() == [(1, "x")]
        assert prepared_here(conn) == []


def test_through_a_policy_reads_are_judged_and_prepared_alike(
    clean_shop: PgCluster, tmp_path: Path
) -> None:
    with (
        launch(clean_shop, tmp_path / "guardproxy.log", shop.POLICIES, pool_size=1) as proxy,
        proxy.connect("analytics-ap", autocommit=True, prepare_threshold=None) as conn,
    ):
        sql = "SELECT id, customer_id FROM orders WHERE id = %s"
        with superuser(clean_shop) as su:
            direct = [su.execute(sql, (n,)).fetchall() for n in (1, 2, 3, 1, 2, 3)]
        assert [conn.execute(sql, (n,)).fetchall() for n in (1, 2, 3, 1, 2, 3)] == direct
        # still judged every time: a column the policy hides stays hidden
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT email FROM customers WHERE id = %s", (1,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT email FROM customers WHERE id = %s", (1,))
