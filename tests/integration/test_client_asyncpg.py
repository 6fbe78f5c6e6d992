"""asyncpg through the proxy: it prepares every statement and caches them by default.

Effects are read back through the proxy and checked on the real server with
``pg.psql``. Every await on the network is bounded with ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from conftest import wait_until

pytestmark = pytest.mark.timeout(90)

CONNECT_TIMEOUT = 10


async def connect(proxy, agent: str, **kwargs) -> asyncpg.Connection:
    # statement_cache_size is left at its default (on): every query is a named prepared statement
    return await asyncpg.connect(proxy.dsn(agent), timeout=CONNECT_TIMEOUT, **kwargs)


@pytest.fixture
def table(pg) -> Iterator[str]:
    name = f"apg_{uuid.uuid4().hex[:10]}"
    yield name
    pg.psql(f"DROP TABLE IF EXISTS {name}")


def make_table(pg, name: str, columns: str) -> None:
    pg.psql(f"CREATE TABLE {name} ({columns}); GRANT ALL ON {name} TO app_owner")


async def test_fetch_fetchrow_fetchval_executemany(proxy, pg, table) -> None:
    make_table(
        pg,
        table,
        "id int PRIMARY KEY, name text, amount numeric(10,2), at timestamptz, tags text[], ref uuid",
    )
    at = dt.datetime(2024, 2, 29, 12, 30, tzinfo=dt.UTC)
    rows = [
        (
            i,
            f"item {i}",
            decimal.Decimal(i) / 4,
            at + dt.timedelta(days=i),
            [f"t{i % 3}"],
            uuid.UUID(int=i),
        )
        for i in range(1, 201)
    ]
    async with asyncio.timeout(60):
        conn = await connect(proxy, "apg-basic")
        try:
            status = await conn.execute(
                f"INSERT INTO {table} VALUES (0, 'zero', 0, $1, '{{}}', NULL)", at
            )
            assert status == "INSERT 0 1"
            await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2, $3, $4, $5, $6)", rows)
            fetched = await conn.fetch(f"SELECT * FROM {table} WHERE id > $1 ORDER BY id", 0)
            one = await conn.fetchrow(f"SELECT name, amount, tags FROM {table} WHERE id = $1", 42)
            count = await conn.fetchval(f"SELECT count(*) FROM {table}")
            missing = await conn.fetchrow(f"SELECT * FROM {table} WHERE id = $1", -1)
            # the same statements again: served from asyncpg's statement cache
            again = await conn.fetchval(f"SELECT count(*) FROM {table}")
        finally:
            await asyncio.wait_for(conn.close(), 10)
    assert [tuple(r) for r in fetched] == rows
    assert tuple(one) == ("item 42", decimal.Decimal("10.50"), ["t0"])
    assert count == again == 201
    assert missing is None
    assert pg.psql(f"SELECT count(*), sum(amount) FROM {table}") == (
        f"201|{sum(decimal.Decimal(i) / 4 for i in range(1, 201)):.2f}"
    )


async def test_transactions_commit_rollback_savepoints(proxy, pg, table) -> None:
    make_table(pg, table, "id int PRIMARY KEY")
    async with asyncio.timeout(60):
        conn = await connect(proxy, "apg-tx")
        try:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
                assert pg.psql(f"SELECT count(*) FROM {table}") == "0"  # not committed yet
                try:
                    async with conn.transaction():  # savepoint
                        await conn.execute(f"INSERT INTO {table} VALUES (2)")
                        await conn.execute(f"INSERT INTO {table} VALUES (1)")
                except asyncpg.UniqueViolationError:
                    pass
                await conn.execute(f"INSERT INTO {table} VALUES (3)")
            assert pg.psql(f"SELECT string_agg(id::text, ',' ORDER BY id) FROM {table}") == "1,3"

            with pytest.raises(ZeroDivisionError):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (4)")
                    raise ZeroDivisionError

            tr = conn.transaction(isolation="serializable")
            await tr.start()
            await conn.execute(f"INSERT INTO {table} VALUES (5)")
            assert (
                await conn.fetchval("SELECT current_setting('transaction_isolation')")
                == "serializable"
            )
            await tr.rollback()

            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                async with conn.transaction(readonly=True):
                    await conn.execute(f"INSERT INTO {table} VALUES (6)")

            tr = conn.transaction()
            await tr.start()
            await conn.execute(f"INSERT INTO {table} VALUES (7)")
            await tr.commit()
            assert not conn.is_in_transaction()
            got = await conn.fetchval(f"SELECT array_agg(id ORDER BY id) FROM {table}")
        finally:
            await asyncio.wait_for(conn.close(), 10)
    assert got == [1, 3, 7]
    assert pg.psql(f"SELECT string_agg(id::text, ',' ORDER BY id) FROM {table}") == "1,3,7"


async def test_copy_records_to_table_and_copy_from_query(proxy, pg, table, tmp_path: Path) -> None:
    make_table(pg, table, "id int PRIMARY KEY, name text, score float8")
    records = [(i, f"n{i}", i * 1.5) for i in range(1, 5001)]
    async with asyncio.timeout(60):
        conn = await connect(proxy, "apg-copy")
        try:
            status = await conn.copy_records_to_table(
                table, records=records, columns=["id", "name", "score"]
            )
            assert status == "COPY 5000"
            buf = io.BytesIO()
            status = await conn.copy_from_query(
                f"SELECT id, name, score FROM {table} WHERE id <= $1 ORDER BY id",
                20,
                output=buf,
                format="csv",
            )
            assert status == "COPY 20"
            out_file = tmp_path / "all.tsv"
            status = await conn.copy_from_table(table, output=str(out_file), columns=["id", "name"])
            assert status == "COPY 5000"
            # COPY back in from a file, inside a transaction that commits
            src = tmp_path / "more.csv"
            src.write_text("".join(f"{i},m{i},{i}\n" for i in range(10001, 10101)))
            async with conn.transaction():
                status = await conn.copy_to_table(table, source=str(src), format="csv")
            assert status == "COPY 100"
            # and one inside a transaction that rolls back
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await conn.copy_records_to_table(table, records=[(20001, "x", 0.0)])
                    raise RuntimeError("undo")
            count = await conn.fetchval(f"SELECT count(*) FROM {table}")
        finally:
            await asyncio.wait_for(conn.close(), 10)
    assert buf.getvalue().decode() == "".join(f"{i},n{i},{i * 1.5:g}\n" for i in range(1, 21))
    lines = out_file.read_text().splitlines()
    assert len(lines) == 5000
    assert sorted(lines, key=lambda s: int(s.split("\t")[0]))[:3] == ["1\tn1", "2\tn2", "3\tn3"]
    assert count == 5100
    assert pg.psql(f"SELECT count(*), sum(id) FROM {table}") == (
        f"5100|{sum(range(1, 5001)) + sum(range(10001, 10101))}"
    )


async def test_prepared_statements_reused_over_many_transactions(start_proxy, pg, table) -> None:
    make_table(pg, table, "client int, n int, total int, PRIMARY KEY (client, n)")
    proxy = start_proxy(pool_size=2)

    async def client(i: int) -> tuple[list[int], set[int]]:
        conn = await connect(proxy, f"apg-prep-{i}")
        try:
            add = await conn.prepare("SELECT $1::int + $2::int AS total, pg_backend_pid() AS pid")
            assert [a.name for a in add.get_attributes()] == ["total", "pid"]
            assert [t.name for t in add.get_parameters()] == ["int4", "int4"]
            insert = await conn.prepare(f"INSERT INTO {table} VALUES ($1, $2, $3)")
            totals, pids = [], set()
            for n in range(20):
                if n % 2:
                    async with conn.transaction():
                        row = await add.fetchrow(i, n)
                        await insert.fetch(i, n, row["total"])
                else:
                    row = await add.fetchrow(i, n)
                    await conn.execute(
                        f"INSERT INTO {table} VALUES ($1, $2, $3)", i, n, row["total"]
                    )
                # the same text through the statement cache
                assert (
                    await conn.fetchval(
                        "SELECT $1::int + $2::int AS total, pg_backend_pid() AS pid", i, n
                    )
                    == i + n
                )
                totals.append(row["total"])
                pids.add(row["pid"])
            stored = await conn.fetchval(f"SELECT sum(total) FROM {table} WHERE client = $1", i)
            assert stored == sum(i + n for n in range(20))
            return totals, pids
        finally:
            await asyncio.wait_for(conn.close(), 10)

    async with asyncio.timeout(60):
        results = await asyncio.gather(*(client(i) for i in range(10)))
    for i, (totals, _) in enumerate(results):
        assert totals == [i + n for n in range(20)]
    all_pids = set().union(*(p for _, p in results))
    # ten busy clients over two servers: both servers served them, some clients ran on both
    assert len(all_pids) == 2
    assert any(len(p) == 2 for _, p in results)
    assert pg.psql(f"SELECT count(*), count(DISTINCT client) FROM {table}") == "200|10"


async def test_cursor_and_custom_types(start_proxy, pg) -> None:
    proxy = start_proxy(pool_size=2)
    enum = f"mood_{uuid.uuid4().hex[:8]}"
    pg.psql(
        f"CREATE TYPE {enum} AS ENUM ('sad', 'ok', 'happy'); ALTER TYPE {enum} OWNER TO app_owner"
    )
    try:
        async with asyncio.timeout(60):
            conn = await connect(proxy, "apg-types")
            other = await connect(proxy, "apg-types-other")
            try:
                # introspection of an unknown type runs its own prepared queries
                moods = await conn.fetchval(f"SELECT ARRAY['ok', 'happy']::{enum}[]")
                await conn.set_type_codec(
                    "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
                )
                doc = await conn.fetchval("SELECT $1::jsonb", {"a": [1, 2], "b": None})
                # a cursor fetches a portal in chunks (Execute with a row limit, PortalSuspended)
                seen = []
                async with conn.transaction():
                    async for rec in conn.cursor(
                        "SELECT g FROM generate_series(1, 500) g", prefetch=37
                    ):
                        seen.append(rec["g"])
                    cur = await conn.cursor("SELECT g FROM generate_series(1, 100) g")
                    first = await cur.fetch(10)
                    await cur.forward(80)
                    last = await cur.fetch(20)
                # the same, while another client keeps the other server busy
                async with other.transaction():
                    await other.fetchval("SELECT 1")
                    moods2 = await conn.fetchval(f"SELECT ARRAY['sad']::{enum}[]")
            finally:
                await asyncio.wait_for(conn.close(), 10)
                await asyncio.wait_for(other.close(), 10)
    finally:
        pg.psql(f"DROP TYPE IF EXISTS {enum}")
    assert moods == ["ok", "happy"]
    assert moods2 == ["sad"]
    assert doc == {"a": [1, 2], "b": None}
    assert seen == list(range(1, 501))
    assert [r["g"] for r in first] == list(range(1, 11))
    assert [r["g"] for r in last] == list(range(91, 101))


async def test_errors_leave_the_connection_usable(start_proxy, pg, table) -> None:
    proxy = start_proxy(pool_size=2)
    make_table(pg, table, "id int PRIMARY KEY")
    async with asyncio.timeout(60):
        conn = await connect(proxy, "apg-errors")
        try:
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.fetch("SELECT * FROM no_such_table_here")
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.prepare("SELECT * FROM no_such_table_here WHERE x = $1")
            with pytest.raises(asyncpg.PostgresSyntaxError):
                await conn.fetch("SELEC 1")
            with pytest.raises(asyncpg.DataError):
                await conn.fetchval("SELECT $1::int", "not an int")
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.executemany(f"INSERT INTO {table} VALUES ($1)", [(1,), (2,), (1,), (3,)])
            assert (
                await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
            )  # executemany is atomic
            assert await conn.fetchval("SELECT 40 + $1::int", 2) == 42
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
        finally:
            await asyncio.wait_for(conn.close(), 10)
    assert pg.psql(f"SELECT string_agg(id::text, ',') FROM {table}") == "1"


async def test_cached_statement_survives_ddl_from_another_client(start_proxy, pg, table) -> None:
    # asyncpg re-prepares a cached statement once when the server says its plan is stale
    # ("cached plan must not change result type"); straight to Postgres this just works.
    pg.psql(
        f"CREATE TABLE {table} (a int); INSERT INTO {table} VALUES (1); ALTER TABLE {table} OWNER TO app_owner"
    )
    proxy = start_proxy(pool_size=2)
    async with asyncio.timeout(60):
        conn = await connect(proxy, "apg-ddl")
        other = await connect(proxy, "apg-ddl-other")
        try:
            for _ in range(3):
                assert [tuple(r) for r in await conn.fetch(f"SELECT * FROM {table}")] == [(1,)]
                async with other.transaction():  # run once on each server
                    await other.fetchval("SELECT 1")
                    assert [tuple(r) for r in await conn.fetch(f"SELECT * FROM {table}")] == [(1,)]
            await other.execute(f"ALTER TABLE {table} ADD COLUMN b int DEFAULT 7")
            after = [tuple(r) for r in await conn.fetch(f"SELECT * FROM {table}")]
            async with other.transaction():
                await other.fetchval("SELECT 1")
                after_other_server = [tuple(r) for r in await conn.fetch(f"SELECT * FROM {table}")]
        finally:
            await asyncio.wait_for(conn.close(), 10)
            await asyncio.wait_for(other.close(), 10)
    assert after == [(1, 7)]
    assert after_other_server == [(1, 7)]


async def test_same_statement_text_under_different_search_paths(start_proxy, pg) -> None:
    # Schema-per-tenant: asyncpg prepares the same text on both connections; each must keep
    # resolving "items" in its own search_path, as it does straight to Postgres.
    proxy = start_proxy(pool_size=1)
    tag = uuid.uuid4().hex[:8]
    a, b = f"atenant_a_{tag}", f"atenant_b_{tag}"
    pg.psql(
        f"CREATE SCHEMA {a} AUTHORIZATION app_owner; CREATE SCHEMA {b} AUTHORIZATION app_owner; "
        f"CREATE TABLE {a}.items (id int, v text); INSERT INTO {a}.items VALUES (1, 'a'); "
        f"CREATE TABLE {b}.items (id int, v text, extra int); INSERT INTO {b}.items VALUES (1, 'b', 42); "
        f"ALTER TABLE {a}.items OWNER TO app_owner; ALTER TABLE {b}.items OWNER TO app_owner"
    )
    try:
        async with asyncio.timeout(60):
            ca = await connect(proxy, "apg-tenant-a", server_settings={"search_path": a})
            cb = await connect(proxy, "apg-tenant-b", server_settings={"search_path": b})
            try:
                seen_a = [tuple(r) for r in await ca.fetch("SELECT * FROM items WHERE id = $1", 1)]
                seen_b = [tuple(r) for r in await cb.fetch("SELECT * FROM items WHERE id = $1", 1)]
            finally:
                await asyncio.wait_for(ca.close(), 10)
                await asyncio.wait_for(cb.close(), 10)
    finally:
        pg.psql(f"DROP SCHEMA IF EXISTS {a} CASCADE; DROP SCHEMA IF EXISTS {b} CASCADE")
    assert seen_a == [(1, "a")]
    assert seen_b == [(1, "b", 42)]


async def test_asyncpg_pool_over_fewer_server_connections(start_proxy, pg, table) -> None:
    # asyncpg's own pool resets each connection on release (RESET ALL, UNLISTEN *, CLOSE ALL, ...)
    make_table(pg, table, "worker int, n int, PRIMARY KEY (worker, n)")
    proxy = start_proxy(pool_size=2)

    async def worker(pool: asyncpg.Pool, w: int) -> list[str]:
        names = []
        for n in range(10):
            async with pool.acquire() as conn:
                if n % 2:
                    await conn.execute(f"SET application_name = 'w{w}-{n}'")
                names.append(await conn.fetchval("SELECT current_setting('application_name')"))
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", w, n)
        return names

    async with asyncio.timeout(60):
        pool = await asyncpg.create_pool(
            proxy.dsn("apg-pool"), min_size=2, max_size=6, timeout=CONNECT_TIMEOUT
        )
        try:
            results = await asyncio.gather(*(worker(pool, w) for w in range(8)))
        finally:
            await asyncio.wait_for(pool.close(), 15)
    for w, names in enumerate(results):
        # a setting made on a connection is seen right after it; reset never leaks one worker's name
        # the server names the agent first, then the client's own name
        assert all(name == f"apg-pool/w{w}-{n}" for n, name in enumerate(names) if n % 2), names
        assert all("/w" not in name for n, name in enumerate(names) if not n % 2), names
    assert pg.psql(f"SELECT count(*), count(DISTINCT worker) FROM {table}") == "80|8"


async def test_cancel_through_wait_for_timeout(start_proxy, pg) -> None:
    proxy = start_proxy(pool_size=2)
    marker = f"cancel_{uuid.uuid4().hex[:8]}"
    sleeping = (
        "SELECT count(*) FROM pg_stat_activity "
        f"WHERE query LIKE '%pg_sleep%{marker}%' AND state = 'active' AND pid <> pg_backend_pid()"
    )
    async with asyncio.timeout(60):
        conn = await connect(proxy, "apg-cancel")
        bystander = await connect(proxy, "apg-bystander")
        try:
            # another client's statement runs on the other server meanwhile: it must not be cancelled
            other = asyncio.create_task(bystander.fetchval("SELECT 'survived' FROM pg_sleep(1.5)"))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(conn.fetch(f"SELECT pg_sleep(10) /* {marker} */"), 0.5)
            # the connection goes on, and the sleep is gone from the server (not left running)
            assert await asyncio.wait_for(conn.fetchval("SELECT 'alive'"), 8) == "alive"
            wait_until(
                lambda: pg.psql(sleeping) == "0", timeout=5, what="the cancelled pg_sleep to end"
            )
            assert await other == "survived"
            # cancel again, this time inside a transaction: it is left failed, then rolled back
            tr = conn.transaction()
            await tr.start()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(conn.fetch(f"SELECT pg_sleep(10) /* {marker} */"), 0.5)
            await asyncio.wait_for(tr.rollback(), 8)
            assert await asyncio.wait_for(conn.fetchval("SELECT 2"), 8) == 2
            assert pg.psql(sleeping) == "0"
        finally:
            await asyncio.wait_for(conn.close(), 10)
            await asyncio.wait_for(bystander.close(), 10)
