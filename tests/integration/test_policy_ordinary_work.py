"""The example agents' ordinary work passes through the proxy with the example policies.

Reads (joins, CTEs, window functions, subqueries, EXPLAIN), transactions, the writes
each policy allows (support: orders.fulfillment_status, order_state_log, deleting an
order; fulfillment: its three shipping columns), and the introspection the three
client libraries do on their own (psycopg, asyncpg, SQLAlchemy 2) for every example
agent type, on the tables it may read. Results are compared with the same query run
straight on Postgres as superuser; writes are read back the same way.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
import shop
from pgcluster import PG_BINDIR
from psycopg import errors
from psycopg.types import TypeInfo
from psycopg.types.composite import CompositeInfo, register_composite
from shop import (
    ANALYTICS,
    FULFILLMENT,
    SUPPORT,
    RawAgent,
    ShopProxy,
    assert_names,
    assert_no_secret,
    launch_proxy,
    snapshot,
)
from sqlalchemy import MetaData, create_engine, inspect, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

pytestmark = pytest.mark.timeout(60)

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline

AGENT_TYPES = ("analytics", "support", "fulfillment")
# What each example type may read (table -> readable columns), from policies/*.yaml.
READABLE = {
    "analytics": {
        "customers": ["id", "name", "created_at"],
        "orders": None,  # every column
    },
    "support": {"customers": None, "orders": None, "order_state_log": None},
    "fulfillment": {"orders": None},
}
IO_TIMEOUT = 10


@pytest.fixture(scope="module")
def proxy(shop_db, tmp_path_factory) -> Iterator[ShopProxy]:
    with launch_proxy(shop_db, tmp_path_factory.mktemp("ordinary") / "guardproxy.log") as handle:
        yield handle


@pytest.fixture(autouse=True)
def _each_test(request, proxy, shop_db, shop_baseline) -> Iterator[None]:
    since = len(proxy.log())
    yield
    shop.dump_log_on_failure(request, proxy, since)
    if snapshot(shop_db) != shop_baseline:
        shop.restore_shop(shop_db)


@pytest.fixture
def direct(shop_db) -> Iterator[psycopg.Connection[Any]]:
    """Straight to Postgres as superuser: the reference results."""
    with psycopg.connect(shop_db.dsn(user="postgres", dbname="shop"), autocommit=True) as conn:
        yield conn


def agent_conn(proxy: ShopProxy, kind: str, **kwargs: Any) -> psycopg.Connection[Any]:
    return proxy.connect(shop.AGENT_OF[kind], **kwargs)


# ---------------------------------------------------------------- reads

QUERIES: dict[str, list[str]] = {
    "analytics": [
        # join
        "select o.id, c.name, o.fulfillment_status from orders o "
        "join customers c on c.id = o.customer_id order by o.id",
        # outer join + aggregate
        "select c.name, count(o.id) as n from customers c left join orders o "
        "on o.customer_id = c.id group by c.name order by c.name",
        # CTE, also recursive
        "with per_customer as (select customer_id, count(*) as n from orders group by customer_id) "
        "select c.name, p.n from per_customer p join customers c on c.id = p.customer_id order by 1",
        "with recursive r(n) as (select 1 union all select n + 1 from r where n < 5) "
        "select n, (select count(*) from orders where id <= n) from r",
        # window functions
        "select id, customer_id, row_number() over (partition by customer_id order by id) as rn, "
        "count(*) over () as total, lag(fulfillment_status) over (order by id) from orders order by id",
        "select name, rank() over (order by created_at desc) from customers order by 2, 1",
        # subqueries, LATERAL, set operations, VALUES
        "select name from customers c where exists (select 1 from orders o where o.customer_id = c.id "
        "and o.requires_signature) order by name",
        "select c.name, last.id from customers c, lateral (select id from orders o "
        "where o.customer_id = c.id order by id desc limit 1) last order by 1",
        "select id from orders where fulfillment_status = 'pending' union all "
        "select id from orders where fulfillment_status = 'packed' order by 1",
        "select * from (values (1, 'a'), (2, 'b')) v(n, s) order by n",
        # star on a table without denied columns, TABLE, date functions
        "select * from orders where id = 2",
        "table orders",
        "select date_trunc('month', created_at) as m, count(*) from customers group by 1 order by 1",
        "select id, name from customers natural join (select id from orders) o order by id",
    ],
    "support": [
        "select o.id, c.name, c.email, o.fulfillment_status from orders o "
        "join customers c on c.id = o.customer_id where o.id = 1",
        "select l.order_id, l.new_status, l.changed_by, c.email from order_state_log l "
        "join orders o on o.id = l.order_id join customers c on c.id = o.customer_id order by l.id",
        "with history as (select order_id, max(changed_at) as last_change from order_state_log "
        "group by order_id) select o.id, o.fulfillment_status, h.last_change from orders o "
        "left join history h on h.order_id = o.id order by o.id",
        "select order_id, new_status, lead(new_status) over (partition by order_id order by changed_at) "
        "from order_state_log order by id",
        "select * from customers order by id",
        "select c from customers c where id = 1",
    ],
    "fulfillment": [
        "select a.id, b.id from orders a join orders b on a.customer_id = b.customer_id "
        "and a.id < b.id order by 1, 2",
        "with todo as (select id from orders where fulfillment_status in ('pending', 'packed')) "
        "select id from todo order by id",
        "select id, fulfillment_status, dense_rank() over (order by fulfillment_status) from orders "
        "order by id",
        "select fulfillment_status, count(*) filter (where requires_signature) from orders group by 1 "
        "order by 1",
        "select o from orders o where id = 3",
        "select id, tracking_number from orders where shipped_at is not null order by id",
    ],
}


@pytest.mark.parametrize("kind", AGENT_TYPES)
def test_reads_return_what_postgres_returns(proxy, direct, kind) -> None:
    with agent_conn(proxy, kind, autocommit=True) as conn:
        for sql in QUERIES[kind]:
            got = conn.execute(sql).fetchall()
            want = direct.execute(sql).fetchall()
            assert got == want, sql
            assert got, f"no rows for {sql}"


@pytest.mark.parametrize("kind", AGENT_TYPES)
def test_explain_of_reads(proxy, kind) -> None:
    with agent_conn(proxy, kind, autocommit=True) as conn:
        plan = conn.execute("explain select id from orders where id = 1").fetchall()
        assert any("orders" in row[0] for row in plan), plan
        (doc,) = conn.execute("explain (format json) select id from orders").fetchone() or (None,)
        assert doc[0]["Plan"]["Relation Name"] == "orders"
        analyzed = conn.execute("explain analyze select count(*) from orders").fetchall()
        assert any("actual time" in row[0] for row in analyzed), analyzed
        verbose = conn.execute("explain (costs off, verbose) select id from orders").fetchall()
        assert verbose


def test_explain_without_analyze_of_an_allowed_write(proxy, shop_db) -> None:
    before = snapshot(shop_db)
    with agent_conn(proxy, "support", autocommit=True) as conn:
        plan = conn.execute(
            "explain update orders set fulfillment_status = 'packed' where id = 4"
        ).fetchall()
        assert any("Update on orders" in row[0] for row in plan), plan
    with agent_conn(proxy, "fulfillment", autocommit=True) as conn:
        plan = conn.execute(
            "explain update orders set tracking_number = 'T' where id = 3"
        ).fetchall()
        assert plan
    assert snapshot(shop_db) == before


def test_a_function_with_a_column_definition_list(proxy) -> None:
    """Set-returning functions with a column definition list are ordinary SQL."""
    with agent_conn(proxy, "analytics", autocommit=True) as conn:
        rows = conn.execute(
            'select x.id, x.label from jsonb_to_recordset(\'[{"id": 1, "label": "a"}]\'::jsonb) '
            "as x(id int, label text)"
        ).fetchall()
        assert rows == [(1, "a")]


# ---------------------------------------------------------------- transactions


def test_analytics_transactions_and_savepoints(proxy) -> None:
    with agent_conn(proxy, "analytics") as conn:
        assert conn.execute("select count(*) from orders").fetchone() == (6,)
        conn.execute("savepoint a")
        with pytest.raises(errors.DivisionByZero):
            conn.execute("select 1 / (select count(*) - 6 from orders)")
        conn.execute("rollback to savepoint a")
        assert conn.execute("select name from customers where id = %s", [2]).fetchone() == (
            "Grace Hopper",
        )
        conn.commit()
        with conn.transaction():
            assert conn.execute("show transaction_read_only").fetchone() == ("on",)
    with agent_conn(proxy, "analytics", autocommit=True) as conn:
        for begin in (
            "begin read only",
            "begin isolation level repeatable read",
            "start transaction isolation level serializable, read only, deferrable",
        ):
            conn.execute(begin)
            assert conn.execute("select count(*) from customers").fetchone() == (4,)
            conn.execute("commit")
        conn.execute("set statement_timeout = '2s'")  # lowering is allowed
        assert conn.execute("show statement_timeout").fetchone() == ("2s",)
        conn.execute("set application_name = 'weekly report'")
        conn.execute("set timezone = 'Europe/Paris'")
        assert conn.execute("show timezone").fetchone() == ("Europe/Paris",)


def test_support_fixes_a_status_and_logs_why(proxy, shop_db) -> None:
    with agent_conn(proxy, "support") as conn:
        with conn.transaction():
            (previous,) = conn.execute(
                "select fulfillment_status from orders where id = %s", [4]
            ).fetchone() or (None,)
            cur = conn.execute(
                "update orders set fulfillment_status = %s where id = %s and fulfillment_status = %s",
                ["cancelled", 4, previous],
            )
            assert cur.rowcount == 1
            (log_id,) = conn.execute(
                "insert into order_state_log (order_id, previous_status, new_status, changed_by, "
                "reason, idempotency_key) values (%s, %s, %s, %s, %s, %s) returning id",
                [4, previous, "cancelled", SUPPORT, "customer asked", "support-1-T1"],
            ).fetchone() or (None,)
        assert previous == "pending"
        # a second transaction: the change is committed and visible
        assert conn.execute("select fulfillment_status from orders where id = 4").fetchone() == (
            "cancelled",
        )
        conn.commit()
    assert (
        shop_db.psql("select fulfillment_status from orders where id = 4", dbname="shop")
        == "cancelled"
    )
    row = shop_db.psql(
        f"select order_id, previous_status, new_status, changed_by, reason from order_state_log "
        f"where id = {log_id}",
        dbname="shop",
    )
    assert row == "4|pending|cancelled|support-1|customer asked"


def test_support_rolls_back_and_deletes_an_order(proxy, shop_db) -> None:
    with agent_conn(proxy, "support") as conn:
        conn.execute("update orders set fulfillment_status = 'returned' where id = 2")
        conn.rollback()
        assert conn.execute("delete from orders where id = %s", [5]).rowcount == 1
        conn.commit()
        # gone for the agent (removed, or marked deleted by a soft-delete policy)
        assert conn.execute("select count(*) from orders where id = 5").fetchone() == (0,)
        conn.commit()
    assert (
        shop_db.psql("select fulfillment_status from orders where id = 2", dbname="shop")
        == "shipped"
    )
    assert (
        shop_db.psql(
            "select count(*) from orders where id = 5 and deleted_at is null", dbname="shop"
        )
        == "0"
    )


def test_support_copies_log_rows_in(proxy, shop_db) -> None:
    with (
        agent_conn(proxy, "support", autocommit=True) as conn,
        conn.cursor().copy(
            "copy order_state_log (order_id, new_status, changed_by, reason) from stdin"
        ) as copy,
    ):
        copy.write_row((3, "shipped", SUPPORT, "bulk fix"))
        copy.write_row((2, "delivered", SUPPORT, "bulk fix"))
    assert (
        shop_db.psql(
            "select count(*) from order_state_log where reason = 'bulk fix'", dbname="shop"
        )
        == "2"
    )


def test_fulfillment_ships_an_order(proxy, shop_db) -> None:
    shipped_at = dt.datetime(2024, 6, 1, 9, 30, tzinfo=dt.UTC)
    with agent_conn(proxy, "fulfillment") as conn:
        cur = conn.execute(
            "update orders set fulfillment_status = %s, shipped_at = %s, tracking_number = %s "
            "where id = %s returning id, fulfillment_status",
            ["shipped", shipped_at, "TRK-2003", 3],
        )
        assert cur.fetchall() == [(3, "shipped")]
        conn.commit()
        with conn.transaction():
            conn.execute(
                "update orders set fulfillment_status = 'delivered' where id = %s",
                [3],
                prepare=True,
            )
    row = shop_db.psql(
        "select fulfillment_status, shipped_at = '2024-06-01 09:30+00', tracking_number "
        "from orders where id = 3",
        dbname="shop",
    )
    assert row == "delivered|t|TRK-2003"


# ---------------------------------------------------------------- psycopg


@pytest.mark.parametrize("kind", AGENT_TYPES)
def test_psycopg_types_and_introspection(proxy, direct, kind) -> None:
    with agent_conn(proxy, kind, autocommit=True) as conn:
        doc = conn.execute(
            "select jsonb_build_object('id', id, 'status', fulfillment_status) from orders "
            "where id = %s",
            [2],
        ).fetchone()
        assert doc == ({"id": 2, "status": "shipped"},)
        ids = conn.execute("select array_agg(id order by id) from orders").fetchone()
        assert ids == ([1, 2, 3, 4, 5, 6],)
        avg = conn.execute("select avg(id)::numeric(10, 2) from orders").fetchone()
        assert avg == (decimal.Decimal("3.50"),)
        stamps = conn.execute(
            "select array_agg(last_modified_at order by id) from orders where id <= %s", [2]
        ).fetchone()
        assert stamps is not None and isinstance(stamps[0][0], dt.datetime)
        # types fetched from the catalog, including a table's row type
        for name in ("jsonb", "numeric", "text"):
            info = TypeInfo.fetch(conn, name)
            assert info is not None and info.name == name
        info = CompositeInfo.fetch(conn, "orders")
        assert info is not None and "fulfillment_status" in info.field_names
        register_composite(info, conn)
        row = conn.execute("select o from orders o where o.id = %s", [1]).fetchone()
        assert row is not None and row[0].tracking_number == "TRK-1001"
        # prepared statements, explicit and automatic
        for i in range(1, 4):
            got = conn.execute("select id from orders where id = %s", [i], prepare=True).fetchone()
            assert got == (i,)
        conn.prepare_threshold = 0
        for i in range(1, 4):
            assert conn.execute(
                "select fulfillment_status from orders where id = %s", [i]
            ).fetchone()
        want = direct.execute("select id, fulfillment_status from orders order by id").fetchall()
        assert (
            conn.execute("select id, fulfillment_status from orders order by id").fetchall() == want
        )


@pytest.mark.parametrize("kind", AGENT_TYPES)
async def test_psycopg_async_reads(proxy, kind) -> None:
    async with await psycopg.AsyncConnection.connect(
        proxy.dsn(shop.AGENT_OF[kind]), autocommit=True, connect_timeout=IO_TIMEOUT
    ) as conn:
        async with asyncio.timeout(IO_TIMEOUT):
            cur = await conn.execute("select id, requires_signature from orders order by id")
            rows = await cur.fetchall()
        assert [r[0] for r in rows] == [1, 2, 3, 4, 5, 6]
        assert rows[1] == (2, True)


# ---------------------------------------------------------------- asyncpg


async def asyncpg_connect(proxy: ShopProxy, kind: str) -> asyncpg.Connection:
    # the default statement cache: every query is a named prepared statement
    return await asyncpg.connect(proxy.dsn(shop.AGENT_OF[kind]), timeout=IO_TIMEOUT)


@pytest.mark.parametrize("kind", AGENT_TYPES)
async def test_asyncpg_types_prepared_statements_and_introspection(proxy, kind) -> None:
    conn = await asyncpg_connect(proxy, kind)
    try:
        async with asyncio.timeout(IO_TIMEOUT * 2):
            row = await conn.fetchrow(
                "select array_agg(id order by id) as ids, avg(id)::numeric(10, 2) as avg, "
                "jsonb_build_object('n', count(*)) as doc, max(last_modified_at) as last from orders"
            )
            assert row["ids"] == [1, 2, 3, 4, 5, 6]
            assert row["avg"] == decimal.Decimal("3.50")
            assert row["doc"] == '{"n": 6}'
            assert isinstance(row["last"], dt.datetime)
            # a non-builtin type: asyncpg introspects the row type of orders by itself
            rows = await conn.fetch("select o from orders o where o.id = $1", 2)
            assert rows[0][0]["tracking_number"] == "TRK-1002"
            # and a codec by name (asyncpg's TYPE_BY_NAME introspection)
            await conn.set_type_codec(
                "jsonb", encoder=lambda v: v, decoder=lambda v: f"decoded:{v}", schema="pg_catalog"
            )
            assert await conn.fetchval(
                "select jsonb_build_object('id', id) from orders where id = 1"
            ) == ('decoded:{"id": 1}')
            stmt = await conn.prepare("select id, fulfillment_status from orders where id = $1")
            for i in range(1, 7):
                got = await stmt.fetchrow(i)
                assert got is not None and got["id"] == i
            async with conn.transaction():
                assert await conn.fetchval("select count(*) from orders") == 6
                assert await conn.fetchval("select count(*) from orders where id > $1", 3) == 3
            async with conn.transaction(readonly=True, isolation="repeatable_read"):
                assert await conn.fetchval("select min(id) from orders") == 1
    finally:
        await conn.close(timeout=IO_TIMEOUT)


@pytest.mark.parametrize("kind", AGENT_TYPES)
async def test_asyncpg_pool_with_its_reset_query(proxy, kind) -> None:
    async with asyncio.timeout(IO_TIMEOUT * 3):
        pool = await asyncpg.create_pool(
            proxy.dsn(shop.AGENT_OF[kind]), min_size=1, max_size=3, timeout=IO_TIMEOUT
        )
        try:

            async def work(i: int) -> int:
                async with pool.acquire() as conn:
                    return await conn.fetchval("select id from orders where id = $1", i)

            for _ in range(3):  # release runs asyncpg's reset query each time
                assert await asyncio.gather(*(work(i) for i in range(1, 7))) == [1, 2, 3, 4, 5, 6]
        finally:
            await pool.close()


async def test_asyncpg_support_writes(proxy, shop_db) -> None:
    conn = await asyncpg_connect(proxy, "support")
    try:
        async with asyncio.timeout(IO_TIMEOUT), conn.transaction():
            await conn.execute(
                "update orders set fulfillment_status = $1 where id = $2", "packed", 4
            )
            await conn.executemany(
                "insert into order_state_log (order_id, previous_status, new_status, changed_by) "
                "values ($1, $2, $3, $4)",
                [(4, "pending", "packed", SUPPORT), (4, "packed", "packed", SUPPORT)],
            )
    finally:
        await conn.close(timeout=IO_TIMEOUT)
    assert (
        shop_db.psql("select fulfillment_status from orders where id = 4", dbname="shop")
        == "packed"
    )
    assert (
        shop_db.psql("select count(*) from order_state_log where order_id = 4", dbname="shop")
        == "2"
    )


# ---------------------------------------------------------------- SQLAlchemy


def engine_for(proxy: ShopProxy, kind: str):
    url = proxy.dsn(shop.AGENT_OF[kind]).replace("postgresql://", "postgresql+psycopg://", 1)
    return create_engine(url, pool_size=2, max_overflow=0)


class _Base(DeclarativeBase):
    pass


class Order(_Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int]
    fulfillment_status: Mapped[str]
    tracking_number: Mapped[str | None]


class Customer(_Base):
    """Only the columns every type that reads customers may read."""

    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


@pytest.mark.parametrize("kind", AGENT_TYPES)
def test_sqlalchemy_inspection_reflection_and_selects(proxy, direct, kind) -> None:
    engine = engine_for(proxy, kind)
    try:
        insp = inspect(engine)
        tables = set(insp.get_table_names())
        assert set(READABLE[kind]) <= tables, tables
        columns = [c["name"] for c in insp.get_columns("orders")]
        assert columns == [
            "id",
            "customer_id",
            "fulfillment_status",
            "requires_signature",
            "shipped_at",
            "tracking_number",
            "last_modified_at",
            "deleted_at",
            "deleted_by",
            "delete_reason",
        ]
        assert insp.get_pk_constraint("orders")["constrained_columns"] == ["id"]
        assert [fk["referred_table"] for fk in insp.get_foreign_keys("orders")] == ["customers"]
        assert {ix["name"] for ix in insp.get_indexes("orders")} >= {"orders_customer_id_idx"}
        assert insp.has_table("orders")

        meta = MetaData()
        meta.reflect(bind=engine, only=sorted(READABLE[kind]))
        orders = meta.tables["orders"]
        with engine.connect() as conn:
            rows = conn.execute(
                select(orders.c.id, orders.c.fulfillment_status)
                .where(orders.c.id <= 3)
                .order_by(orders.c.id)
            ).all()
            assert [tuple(r) for r in rows] == [(1, "delivered"), (2, "shipped"), (3, "packed")]
            for table, cols in READABLE[kind].items():
                t = meta.tables[table]
                chosen = [t.c[c] for c in cols] if cols else list(t.c)
                got = conn.execute(select(*chosen).order_by(t.c.id)).all()
                names = ", ".join(c.name for c in chosen)
                want = direct.execute(f"select {names} from {table} order by id").fetchall()
                assert [tuple(r) for r in got] == want, table

        with Session(engine) as session:
            order = session.get(Order, 2)
            assert order is not None and order.tracking_number == "TRK-1002"
            pending = session.scalars(
                select(Order).where(Order.fulfillment_status == "pending").order_by(Order.id)
            ).all()
            assert [o.id for o in pending] == [4, 5]
            if "customers" in READABLE[kind]:
                names = session.scalars(select(Customer.name).order_by(Customer.id)).all()
                assert names[0] == "Ada Lovelace"
    finally:
        engine.dispose()


def test_sqlalchemy_orm_update_by_fulfillment(proxy, shop_db) -> None:
    engine = engine_for(proxy, "fulfillment")
    try:
        with Session(engine) as session, session.begin():
            order = session.get(Order, 4)
            assert order is not None
            order.fulfillment_status = "packed"
            order.tracking_number = "TRK-4004"
    finally:
        engine.dispose()
    row = shop_db.psql(
        "select fulfillment_status, tracking_number from orders where id = 4", dbname="shop"
    )
    assert row == "packed|TRK-4004"


# ---------------------------------------------------------------- catalogs


@pytest.mark.parametrize("kind", AGENT_TYPES)
def test_catalog_queries_for_permitted_tables(proxy, kind) -> None:
    with agent_conn(proxy, kind, autocommit=True) as conn:
        for table, readable in READABLE[kind].items():
            cols = [
                r[0]
                for r in conn.execute(
                    "select column_name from information_schema.columns "
                    "where table_schema = 'public' and table_name = %s order by ordinal_position",
                    [table],
                )
            ]
            if readable is not None:
                # the database role's column grants show through information_schema too
                assert cols == readable
            else:
                assert "id" in cols
            atts = conn.execute(
                "select a.attname, format_type(a.atttypid, a.atttypmod) from pg_catalog.pg_attribute a "
                "where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped "
                "order by a.attnum",
                [table],
            ).fetchall()
            assert atts[0] == ("id", "bigint")
        rels = conn.execute(
            "select c.relname from pg_catalog.pg_class c join pg_catalog.pg_namespace n "
            "on n.oid = c.relnamespace where n.nspname = 'public' and c.relkind = 'r' order by 1"
        ).fetchall()
        assert {r[0] for r in rels} >= set(READABLE[kind])
        assert conn.execute(
            "select table_name from information_schema.tables where table_schema = 'public' "
            "and table_name = 'orders'"
        ).fetchall() == [("orders",)]
        assert conn.execute(
            "select pg_get_indexdef(indexrelid) from pg_index where indrelid = 'orders'::regclass "
            "order by 1 limit 1"
        ).fetchone()
        assert conn.execute(
            "select rolname from pg_roles where rolname = current_user"
        ).fetchone() == (f"guard_{kind}",)
        assert conn.execute(
            "select current_schema(), version() like 'PostgreSQL 15%'"
        ).fetchone() == (
            "public",
            True,
        )


@pytest.mark.parametrize("kind", AGENT_TYPES)
def test_psql_describe_commands(proxy, kind) -> None:
    """psql's own catalog queries (\\dt, \\d orders) as a person or a Text-to-SQL agent runs them."""
    out = subprocess.run(
        [
            f"{PG_BINDIR}/psql",
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            proxy.dsn(shop.AGENT_OF[kind]),
            "-c",
            "\\dt",
            "-c",
            "\\d orders",
            "-c",
            "\\df pg_catalog.lower",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "orders_customer_id_idx" in out.stdout
    assert "fulfillment_status" in out.stdout
    assert "customers" in out.stdout


@pytest.mark.parametrize("kind", AGENT_TYPES)
@pytest.mark.parametrize(
    ("catalog", "sql"),
    [
        ("pg_authid", "select rolname, rolpassword from pg_authid"),
        ("pg_shadow", "select usename, passwd from pg_catalog.pg_shadow"),
        ("pg_user_mappings", "select * from pg_user_mappings"),
        ("pg_statistic", "select * from pg_statistic"),
    ],
)
def test_sensitive_catalogs_are_denied(proxy, kind, catalog, sql) -> None:
    with RawAgent(proxy.port, shop.AGENT_OF[kind]) as agent:
        reply = agent.query(sql)
        err = reply.error
        assert err["C"] == "42501", err
        assert_names(err["M"], kind, "sensitive catalogs", catalog)
        assert reply.rows == []
        assert "SCRAM-SHA-256$" not in reply.text and "md5" not in reply.text
        assert_no_secret(reply.text)
        assert agent.scalar("select 1") == "1"


def test_the_hint_of_a_catalog_denial_names_readable_alternatives(proxy) -> None:
    """An LLM follows the HINT: every catalog it names as an alternative must be readable."""
    with RawAgent(proxy.port, ANALYTICS) as agent:
        hints = [
            agent.query(f"select * from {c}").error.get("H", "")
            for c in ("pg_authid", "pg_statistic")
        ]
        alternatives = set()
        for hint in hints:
            alternatives.update(re.findall(r"(pg_\w+) instead of", hint))
        assert alternatives, hints
        for name in sorted(alternatives):
            reply = agent.query(f"select count(*) from pg_catalog.{name}")
            assert not reply.errors, f"the hint suggests {name}, which is denied: {reply.errors}"


def test_every_example_agent_reads_through_one_proxy_at_once(proxy) -> None:
    """The three types side by side: each one's upstream role and timeouts."""
    expected = {
        ANALYTICS: ("guard_analytics", "5s", "on"),
        SUPPORT: ("guard_support", "10s", "off"),
        FULFILLMENT: ("guard_fulfillment", "10s", "off"),
    }
    conns = {agent: proxy.connect(agent, autocommit=True) for agent in expected}
    try:
        for agent, conn in conns.items():
            row = conn.execute(
                "select current_user, current_setting('statement_timeout'), "
                "current_setting('default_transaction_read_only'), count(*) from orders"
            ).fetchone()
            assert row == (*expected[agent], 6)
    finally:
        for conn in conns.values():
            conn.close()


@pytest.mark.parametrize("value", ["UTF8", "utf-8", "'utf-8'", "unicode"])
def test_startup_client_encoding_as_clients_send_it(proxy, value) -> None:
    """asyncpg sends client_encoding='utf-8' quoted; Postgres reads every one of these as UTF8."""
    with RawAgent(proxy.port, ANALYTICS, client_encoding=value) as agent:
        assert not agent.login.errors, agent.login.errors
        assert agent.scalar("show client_encoding") == "UTF8"
