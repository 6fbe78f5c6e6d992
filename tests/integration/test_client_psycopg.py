"""psycopg 3 (sync and async) through the proxy, in transaction pooling mode.

Effects are read back through the proxy and, where it matters, checked on the
real server with ``pg.psql`` (superuser, straight to Postgres). Tests that prove
pooling is invisible run more clients than ``pool_size`` and force each client
onto several server connections (seen as different ``pg_backend_pid()``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors, sql

pytestmark = pytest.mark.timeout(90)

CONNECT_TIMEOUT = 10


def connect(proxy, agent: str, **kwargs) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(agent), connect_timeout=CONNECT_TIMEOUT, **kwargs)


async def aconnect(proxy, agent: str, **kwargs) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(
        proxy.dsn(agent), connect_timeout=CONNECT_TIMEOUT, **kwargs
    )


def backend_pid(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def table(pg) -> Iterator[str]:
    name = f"pg3_{uuid.uuid4().hex[:10]}"
    yield name
    pg.psql(f"DROP TABLE IF EXISTS {name}")


def make_table(pg, name: str, columns: str) -> None:
    pg.psql(f"CREATE TABLE {name} ({columns}); GRANT ALL ON {name} TO app_owner")


# ---------------------------------------------------------------- basics


def test_autocommit_statements_are_committed_one_by_one(proxy, pg, table) -> None:
    with connect(proxy, "pg3-auto", autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text, at timestamptz)")
        at = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
        for i in range(1, 21):
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s, %s)", (i, f"row {i}", at))
        # visible to the server right away: every statement committed on its own
        assert pg.psql(f"SELECT count(*), sum(id) FROM {table}") == "20|210"
        rows = conn.execute(
            f"SELECT id, name, at FROM {table} WHERE id IN (3, 17) ORDER BY id"
        ).fetchall()
        assert rows == [(3, "row 3", at), (17, "row 17", at)]
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_transactions_commit_and_rollback(proxy, pg, table) -> None:
    make_table(pg, table, "id int PRIMARY KEY")
    with connect(proxy, "pg3-tx") as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1), (2)")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        # not committed yet: the server shows nothing to others
        assert pg.psql(f"SELECT count(*) FROM {table}") == "0"
        conn.commit()
        assert pg.psql(f"SELECT string_agg(id::text, ',' ORDER BY id) FROM {table}") == "1,2"

        conn.execute(f"INSERT INTO {table} VALUES (3)")
        conn.rollback()
        assert pg.psql(f"SELECT string_agg(id::text, ',' ORDER BY id) FROM {table}") == "1,2"

        with pytest.raises(errors.UniqueViolation):
            conn.execute(f"INSERT INTO {table} VALUES (4), (1)")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()

        conn.autocommit = True
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} VALUES (5)")
            with pytest.raises(errors.DivisionByZero), conn.transaction():  # a savepoint
                conn.execute(f"INSERT INTO {table} VALUES (6)")
                conn.execute("SELECT 1/0")
            conn.execute(f"INSERT INTO {table} VALUES (7)")
        with pytest.raises(RuntimeError, match="boom"), conn.transaction():
            conn.execute(f"INSERT INTO {table} VALUES (8)")
            raise RuntimeError("boom")
        got = conn.execute(f"SELECT array_agg(id ORDER BY id) FROM {table}").fetchone()
    assert got == ([1, 2, 5, 7],)
    assert pg.psql(f"SELECT string_agg(id::text, ',' ORDER BY id) FROM {table}") == "1,2,5,7"


async def test_async_autocommit_and_transactions(proxy, pg, table) -> None:
    make_table(pg, table, "id int PRIMARY KEY, v text")
    async with asyncio.timeout(60):
        conn = await aconnect(proxy, "pg3-async", autocommit=True)
        async with conn:
            await conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (1, "auto"))
            assert pg.psql(f"SELECT v FROM {table} WHERE id = 1") == "auto"
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (2, "tx"))
                cur = await conn.execute(f"SELECT count(*) FROM {table}")
                assert await cur.fetchone() == (2,)
            with pytest.raises(errors.UniqueViolation):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (3, 'gone')")
                    await conn.execute(f"INSERT INTO {table} VALUES (1, 'dup')")
            await conn.set_autocommit(False)
            await conn.execute(f"UPDATE {table} SET v = 'changed' WHERE id = 2")
            await conn.rollback()
            await conn.execute(f"UPDATE {table} SET v = 'kept' WHERE id = 1")
            await conn.commit()
            cur = await conn.execute(f"SELECT id, v FROM {table} ORDER BY id")
            rows = await cur.fetchall()
            await conn.commit()
    assert rows == [(1, "kept"), (2, "tx")]
    assert pg.psql(f"SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM {table}") == (
        "1:kept,2:tx"
    )


# ---------------------------------------------------------------- auto-prepare


def servers_holding_statement(holder: psycopg.Connection, other: psycopg.Connection, marker: str):
    """(pid, prepared count) on two different servers: one held in a transaction, one not."""
    check = "SELECT pg_backend_pid(), count(*) FROM pg_prepared_statements WHERE statement LIKE %s"
    pattern = f"%{marker}%"
    with holder.transaction():
        on_held = holder.execute(check, (pattern,)).fetchone()
        on_other = other.execute(check, (pattern,)).fetchone()
    return on_held, on_other


def test_auto_prepare_over_few_server_connections(start_proxy, pg) -> None:
    proxy = start_proxy(pool_size=2)
    marker = f"autoprep_{uuid.uuid4().hex[:8]}"
    query = f"SELECT %s::int * 2 AS doubled, %s::text AS tag /* {marker} */"
    conns = [connect(proxy, f"pg3-prep-{i}", autocommit=True) for i in range(6)]
    holder = connect(proxy, "pg3-prep-holder", autocommit=True)
    try:
        assert all(c.prepare_threshold == 5 for c in conns)
        pids: dict[int, set[int]] = {i: set() for i in range(len(conns))}
        for n in range(12):
            for i, conn in enumerate(conns):
                if (n + i) % 2:
                    # another client holds a server, so this one runs on a different one
                    with holder.transaction():
                        holder.execute("SELECT 1")
                        row = conn.execute(query + ", pg_backend_pid()", (n, f"c{i}")).fetchone()
                else:
                    with conn.transaction():
                        row = conn.execute(query + ", pg_backend_pid()", (n, f"c{i}")).fetchone()
                assert row is not None
                assert row[:2] == (n * 2, f"c{i}")
                pids[i].add(row[2])
        # every client really ran on more than one server connection
        assert all(len(p) >= 2 for p in pids.values()), pids
        assert len(set().union(*pids.values())) == 2
        # psycopg prepared the statement after 5 runs: it exists on both servers
        on_held, on_other = servers_holding_statement(holder, conns[0], marker)
        assert on_held[0] != on_other[0]
        assert on_held[1] >= 1 and on_other[1] >= 1, (on_held, on_other)
    finally:
        for c in [*conns, holder]:
            c.close()


def test_auto_prepare_with_eviction_and_explicit_prepare(start_proxy, pg, table) -> None:
    make_table(pg, table, "id int PRIMARY KEY, v int")
    proxy = start_proxy(pool_size=2)
    with connect(proxy, "pg3-evict", autocommit=True) as a, connect(proxy, "pg3-evict-b") as b:
        a.prepared_max = 2  # psycopg closes its oldest prepared statements as it goes
        queries = [
            (f"INSERT INTO {table} VALUES (%s, %s) RETURNING v", lambda k: (k, k * 10)),
            (f"SELECT v FROM {table} WHERE id = %s", lambda k: (k,)),
            (f"UPDATE {table} SET v = v + 1 WHERE id = %s RETURNING v", lambda k: (k,)),
            (f"SELECT count(*)::int + 0 * %s FROM {table}", lambda k: (k,)),
        ]
        expected_count = 0
        for k in range(1, 10):
            for q, args in queries:
                # b keeps a server busy every other round so a moves between servers
                if k % 2:
                    b.execute("SELECT 1")
                row = a.execute(q, args(k)).fetchone()
                if k % 2:
                    b.commit()
                if q.startswith("INSERT"):
                    expected_count += 1
                    assert row == (k * 10,)
                elif q.startswith("SELECT v"):
                    assert row == (k * 10,)
                elif q.startswith("UPDATE"):
                    assert row == (k * 10 + 1,)
                else:
                    assert row == (expected_count,)
        # explicit prepare=True: prepared at once, reused on the other server
        for k in range(1, 10):
            if k % 2:
                b.execute("SELECT 1")
            assert a.execute(
                f"SELECT v FROM {table} WHERE id = %s", (k,), prepare=True
            ).fetchone() == (k * 10 + 1,)
            if k % 2:
                b.commit()
    assert (
        pg.psql(f"SELECT count(*), sum(v) FROM {table}")
        == f"9|{sum(k * 10 + 1 for k in range(1, 10))}"
    )


def test_auto_prepared_statement_after_own_alter_table(start_proxy, pg, table) -> None:
    # psycopg forgets its prepared statements (DEALLOCATE ALL) after an ALTER on its
    # connection and prepares them again; straight to Postgres the new shape is seen.
    pg.psql(
        f"CREATE TABLE {table} (a int); INSERT INTO {table} VALUES (1); ALTER TABLE {table} OWNER TO app_owner"
    )
    proxy = start_proxy(pool_size=2)
    query = f"SELECT * FROM {table} WHERE a = %s"
    with (
        connect(proxy, "pg3-alter", autocommit=True) as conn,
        connect(proxy, "pg3-alter-holder") as holder,
    ):

        def run_on_both_servers() -> list[tuple]:
            rows = conn.execute(query, (1,)).fetchall()
            holder.execute("SELECT 1")
            rows += conn.execute(query, (1,)).fetchall()
            holder.commit()
            return rows

        for _ in range(5):  # prepared from the 6th run on, on both servers
            assert run_on_both_servers() == [(1,), (1,)]
        conn.execute(f"ALTER TABLE {table} ADD COLUMN b int DEFAULT 7")
        seen = [run_on_both_servers() for _ in range(6)]
    assert seen == [[(1, 7), (1, 7)]] * 6


async def test_async_auto_prepare_many_clients_few_servers(start_proxy, pg, table) -> None:
    make_table(pg, table, "client int, n int, PRIMARY KEY (client, n)")
    proxy = start_proxy(pool_size=2)

    async def client(i: int) -> tuple[list[tuple[int, int]], set[int]]:
        conn = await aconnect(proxy, f"pg3-aprep-{i}", autocommit=True)
        got, pids = [], set()
        async with conn:
            for n in range(12):
                if n % 3 == 0:
                    async with conn.transaction():
                        await conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, n))
                        cur = await conn.execute(
                            f"SELECT client, n, pg_backend_pid() FROM {table} WHERE client = %s AND n = %s",
                            (i, n),
                        )
                else:
                    await conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, n))
                    cur = await conn.execute(
                        f"SELECT client, n, pg_backend_pid() FROM {table} WHERE client = %s AND n = %s",
                        (i, n),
                    )
                row = await cur.fetchone()
                assert row is not None
                got.append(row[:2])
                pids.add(row[2])
        return got, pids

    async with asyncio.timeout(60):
        results = await asyncio.gather(*(client(i) for i in range(10)))
    for i, (got, _) in enumerate(results):
        assert got == [(i, n) for n in range(12)]
    all_pids = set().union(*(p for _, p in results))
    assert len(all_pids) <= 2
    assert pg.psql(f"SELECT count(*), count(DISTINCT client) FROM {table}") == "120|10"


# ---------------------------------------------------------------- COPY


def test_copy_in_and_out(proxy, pg, table) -> None:
    make_table(pg, table, "id int PRIMARY KEY, name text, score numeric, tags text[]")
    with connect(proxy, "pg3-copy") as conn, conn.cursor() as cur:
        with cur.copy(f"COPY {table} (id, name, score, tags) FROM STDIN") as copy:
            for i in range(1, 3001):
                copy.write_row((i, f"name\t{i}", i / 4, ["a", f"t{i % 3}"]))
        conn.commit()
        assert pg.psql(f"SELECT count(*), sum(id), sum(score) FROM {table}") == (
            f"3000|{sum(range(1, 3001))}|{sum(range(1, 3001)) / 4:.2f}"
        )
        assert pg.psql(f"SELECT name FROM {table} WHERE id = 7") == "name\t7"

        with cur.copy(
            f"COPY (SELECT id, name, tags FROM {table} WHERE id <= 100 ORDER BY id) TO STDOUT"
        ) as copy:
            copy.set_types(["int4", "text", "text[]"])
            out = list(copy.rows())
        assert out == [(i, f"name\t{i}", ["a", f"t{i % 3}"]) for i in range(1, 101)]

        # binary COPY both ways
        with cur.copy(f"COPY {table} (id, name) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "text"])
            for i in range(5001, 5011):
                copy.write_row((i, f"bin{i}"))
        with cur.copy(
            f"COPY (SELECT id, name FROM {table} WHERE id > 5000 ORDER BY id) TO STDOUT (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int4", "text"])
            assert list(copy.rows()) == [(i, f"bin{i}") for i in range(5001, 5011)]
        conn.commit()

        # a COPY the client aborts: nothing lands, the connection goes on
        with pytest.raises(errors.QueryCanceled), cur.copy(f"COPY {table} (id) FROM STDIN") as copy:
            copy.write_row((9001,))
            raise errors.QueryCanceled("client gave up")  # psycopg sends CopyFail
        conn.rollback()
        assert cur.execute(f"SELECT count(*) FROM {table} WHERE id > 9000").fetchone() == (0,)
        conn.commit()
    assert pg.psql(f"SELECT count(*) FROM {table}") == "3010"


def test_copy_with_bad_data_reports_the_error_and_the_session_goes_on(proxy, pg, table) -> None:
    make_table(pg, table, "id int PRIMARY KEY")
    with connect(proxy, "pg3-copy-bad", autocommit=True) as conn, conn.cursor() as cur:
        with (
            pytest.raises(errors.InvalidTextRepresentation),
            cur.copy(f"COPY {table} FROM STDIN") as copy,
        ):
            copy.write(b"1\n2\nthree\n4\n")
        assert cur.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
        with cur.copy(f"COPY {table} FROM STDIN") as copy:
            copy.write(b"1\n2\n")
        assert cur.execute(f"SELECT array_agg(id ORDER BY id) FROM {table}").fetchone() == ([1, 2],)
    assert pg.psql(f"SELECT string_agg(id::text, ',' ORDER BY id) FROM {table}") == "1,2"


async def test_async_copy_in_and_out(start_proxy, pg, table) -> None:
    make_table(pg, table, "id int PRIMARY KEY, v text")
    proxy = start_proxy(pool_size=2)

    async def load(k: int) -> list[tuple[int, str]]:
        conn = await aconnect(proxy, f"pg3-acopy-{k}")
        async with conn:
            cur = conn.cursor()
            async with cur.copy(f"COPY {table} (id, v) FROM STDIN") as copy:
                for i in range(k * 1000, k * 1000 + 500):
                    await copy.write_row((i, f"v{i}"))
            await conn.commit()
            async with cur.copy(
                sql.SQL(
                    "COPY (SELECT id, v FROM {} WHERE id / 1000 = {} ORDER BY id) TO STDOUT"
                ).format(sql.Identifier(table), k)
            ) as copy:
                copy.set_types(["int4", "text"])
                rows = [row async for row in copy.rows()]
            await conn.commit()
            return rows

    async with asyncio.timeout(60):
        results = await asyncio.gather(*(load(k) for k in range(1, 6)))
    for k, rows in enumerate(results, start=1):
        assert rows == [(i, f"v{i}") for i in range(k * 1000, k * 1000 + 500)]
    assert pg.psql(f"SELECT count(*), count(DISTINCT id / 1000) FROM {table}") == "2500|5"


# ---------------------------------------------------------------- pipeline mode


def test_pipeline_with_an_error_in_the_middle(proxy, pg, table) -> None:
    make_table(pg, table, "id int PRIMARY KEY")
    with connect(proxy, "pg3-pipe", autocommit=True) as conn:
        with pytest.raises(errors.DivisionByZero), conn.pipeline() as p:
            first = conn.execute(f"INSERT INTO {table} VALUES (%s) RETURNING id", (1,))
            second = conn.execute(f"INSERT INTO {table} VALUES (%s) RETURNING id", (2,))
            p.sync()
            assert first.fetchone() == (1,)
            assert second.fetchone() == (2,)
            # one batch: its statements share an implicit transaction, undone by the error
            conn.execute(f"INSERT INTO {table} VALUES (%s)", (3,))
            conn.execute("SELECT 1/0")
            conn.execute(f"INSERT INTO {table} VALUES (%s)", (4,))
        # the connection is usable after the aborted pipeline, and so is a new pipeline
        with conn.pipeline():
            a = conn.execute(f"INSERT INTO {table} VALUES (%s) RETURNING id", (5,))
            b = conn.execute(f"SELECT array_agg(id ORDER BY id) FROM {table}")
        assert a.fetchone() == (5,)
        assert b.fetchone() == ([1, 2, 5],)

    # in a transaction: the error leaves the transaction failed until rollback
    with connect(proxy, "pg3-pipe-tx") as conn:
        with pytest.raises(errors.UniqueViolation), conn.pipeline():
            conn.execute(f"INSERT INTO {table} VALUES (%s)", (10,))
            conn.execute(f"INSERT INTO {table} VALUES (%s)", (1,))
            conn.execute(f"INSERT INTO {table} VALUES (%s)", (11,))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        with conn.pipeline():
            conn.execute(f"INSERT INTO {table} VALUES (%s)", (12,))
        conn.commit()
    assert pg.psql(f"SELECT string_agg(id::text, ',' ORDER BY id) FROM {table}") == "1,2,5,12"


async def test_async_pipeline_many_statements(start_proxy, pg, table) -> None:
    make_table(pg, table, "id int PRIMARY KEY, sq int")
    proxy = start_proxy(pool_size=2)

    async def run(k: int) -> list[tuple[int]]:
        conn = await aconnect(proxy, f"pg3-apipe-{k}", autocommit=True)
        async with conn:
            async with conn.pipeline():
                cur = conn.cursor()
                await cur.executemany(
                    f"INSERT INTO {table} VALUES (%s, %s) RETURNING sq",
                    [(k * 100 + i, (k * 100 + i) ** 2) for i in range(50)],
                    returning=True,
                )
            got = []
            while True:
                got.append(await cur.fetchone())
                if not cur.nextset():
                    break
            return got

    async with asyncio.timeout(60):
        results = await asyncio.gather(*(run(k) for k in range(1, 5)))
    for k, got in enumerate(results, start=1):
        assert got == [((k * 100 + i) ** 2,) for i in range(50)]
    assert pg.psql(f"SELECT count(*) FROM {table}") == "200"


# ---------------------------------------------------------------- NOTIFY / NOTICE


def test_listen_notify_pins_and_delivers(start_proxy, pg) -> None:
    proxy = start_proxy(pool_size=2)
    chan = f"chan_{uuid.uuid4().hex[:8]}"
    with (
        connect(proxy, "pg3-listener", autocommit=True) as listener,
        connect(proxy, "pg3-sender", autocommit=True) as sender,
        connect(proxy, "pg3-busy", autocommit=True) as busy,
    ):
        listener.execute(f"LISTEN {chan}")
        listener_pid = backend_pid(listener)
        # more clients than servers keep working while the listener holds one
        for n in range(10):
            assert sender.execute("SELECT %s::int + 1", (n,)).fetchone() == (n + 1,)
            assert busy.execute("SELECT pg_backend_pid()").fetchone() != (listener_pid,)
        sender.execute("SELECT pg_notify(%s, %s)", (chan, "through the proxy"))
        with sender.transaction():
            sender.execute(f"NOTIFY {chan}, 'at commit'")
        pg.psql(f"NOTIFY {chan}, 'from the server itself'")
        got = list(listener.notifies(timeout=10, stop_after=3))
        assert sorted(n.payload for n in got) == [
            "at commit",
            "from the server itself",
            "through the proxy",
        ]
        assert all(n.channel == chan for n in got)
        # still on the same backend, still listening
        assert backend_pid(listener) == listener_pid
        assert listener.execute("SELECT pg_listening_channels()").fetchall() == [(chan,)]
        pg.psql(f"NOTIFY {chan}, 'again'")
        assert [n.payload for n in listener.notifies(timeout=10, stop_after=1)] == ["again"]


async def test_async_listen_notify(start_proxy, pg) -> None:
    proxy = start_proxy(pool_size=2)
    chan = f"achan_{uuid.uuid4().hex[:8]}"
    async with asyncio.timeout(30):
        listener = await aconnect(proxy, "pg3-alistener", autocommit=True)
        sender = await aconnect(proxy, "pg3-asender", autocommit=True)
        async with listener, sender:
            await listener.execute(f"LISTEN {chan}")
            for i in range(3):
                await sender.execute("SELECT pg_notify(%s, %s)", (chan, f"msg {i}"))
            got = [n.payload async for n in listener.notifies(timeout=10, stop_after=3)]
    assert got == ["msg 0", "msg 1", "msg 2"]


def test_server_notices_reach_the_notice_handler(proxy, table) -> None:
    notices: list[tuple[str | None, str | None]] = []
    with connect(proxy, "pg3-notice", autocommit=True) as conn:
        # a Diagnostic is only valid inside the handler
        conn.add_notice_handler(lambda d: notices.append((d.severity, d.message_primary)))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$")
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        with conn.transaction():
            conn.execute("DO $$ BEGIN RAISE WARNING 'careful: %', 'inside a transaction'; END $$")
        conn.execute("SET client_min_messages = warning")
        conn.execute("DO $$ BEGIN RAISE NOTICE 'filtered out'; RAISE WARNING 'kept'; END $$")
        # the setting survives on whichever server runs the next statement
        conn.execute("DO $$ BEGIN RAISE NOTICE 'filtered again'; END $$")
    assert notices == [
        ("NOTICE", "hello 42"),
        ("NOTICE", f'table "{table}" does not exist, skipping'),
        ("WARNING", "careful: inside a transaction"),
        ("WARNING", "kept"),
    ]


# ---------------------------------------------------------------- session state


def test_session_settings_survive_across_server_connections(start_proxy, pg) -> None:
    proxy = start_proxy(pool_size=2)
    tag = uuid.uuid4().hex[:8]
    zones = ["Asia/Tokyo", "America/New_York", "Europe/Berlin", "Asia/Kolkata"]
    # 2024-01-01 00:00 UTC as Postgres shows it in each zone, and the UTC offset psycopg sees
    shown = {
        "Asia/Tokyo": "2024-01-01 09:00:00+09",
        "America/New_York": "2023-12-31 19:00:00-05",
        "Europe/Berlin": "2024-01-01 01:00:00+01",
        "Asia/Kolkata": "2024-01-01 05:30:00+05:30",
    }
    offsets = {
        "Asia/Tokyo": dt.timedelta(hours=9),
        "America/New_York": dt.timedelta(hours=-5),
        "Europe/Berlin": dt.timedelta(hours=1),
        "Asia/Kolkata": dt.timedelta(hours=5, minutes=30),
    }
    schemas = [f"sp_{tag}_{i}" for i in range(len(zones))]
    for i, schema in enumerate(schemas):
        pg.psql(
            f"CREATE SCHEMA {schema} AUTHORIZATION app_owner; "
            f"CREATE TABLE {schema}.whoami (v text); INSERT INTO {schema}.whoami VALUES ('client {i}'); "
            f"GRANT ALL ON {schema}.whoami TO app_owner"
        )
    clients = [connect(proxy, f"pg3-set-{i}", autocommit=True) for i in range(len(zones))]
    holder = connect(proxy, "pg3-set-holder")
    try:
        for i, conn in enumerate(clients):
            conn.execute(f"SET search_path = {schemas[i]}, public")
            conn.execute(f"SET timezone = '{zones[i]}'")
            conn.execute(f"SET application_name = 'app-{i}-{tag}'")
        pids: dict[int, set[int]] = {i: set() for i in range(len(clients))}
        for round_ in range(4):
            for i, conn in enumerate(clients):
                for hold in (False, True):
                    if hold:  # the server this client just used is now taken by someone else
                        holder.execute("SELECT 1")
                    if round_ % 2:
                        with conn.transaction():
                            search_path = conn.execute("SHOW search_path").fetchone()
                            row = conn.execute(
                                "SELECT current_setting('TimeZone'), current_setting('application_name'), "
                                "(SELECT v FROM whoami), "
                                "'2024-01-01 00:00:00+00'::timestamptz::text, pg_backend_pid()"
                            ).fetchone()
                    else:
                        search_path = conn.execute("SHOW search_path").fetchone()
                        row = conn.execute(
                            "SELECT current_setting('TimeZone'), current_setting('application_name'), "
                            "(SELECT v FROM whoami), "
                            "'2024-01-01 00:00:00+00'::timestamptz::text, pg_backend_pid()"
                        ).fetchone()
                    if hold:
                        holder.commit()
                    assert search_path == (f"{schemas[i]}, public",)
                    assert row is not None
                    # on the server, application_name names the agent first (pg_stat_activity)
                    assert row[:3] == (zones[i], f"pg3-set-{i}/app-{i}-{tag}", f"client {i}")
                    assert row[3] == shown[zones[i]]
                    pids[i].add(row[4])
                    # what the client was told by ParameterStatus is what the server uses
                    assert conn.info.parameter_status("application_name") == f"app-{i}-{tag}"
                    assert conn.info.parameter_status("TimeZone") == zones[i]
                    # timestamptz values come back in the client's own time zone
                    value = conn.execute("SELECT '2024-01-01 00:00:00+00'::timestamptz").fetchone()
                    assert value is not None
                    assert value[0].utcoffset() == offsets[zones[i]]
        assert all(len(p) >= 2 for p in pids.values()), pids
    finally:
        for c in [*clients, holder]:
            c.close()
        pg.psql("; ".join(f"DROP SCHEMA IF EXISTS {s} CASCADE" for s in schemas))


def test_client_that_set_nothing_sees_server_defaults_after_others_set_things(
    start_proxy, pg
) -> None:
    proxy = start_proxy(pool_size=2)
    defaults = ('"$user", public', pg.psql("SHOW timezone"), "0")
    query = (
        "SELECT current_setting('search_path'), current_setting('TimeZone'), "
        "current_setting('statement_timeout')"
    )
    with (
        connect(proxy, "pg3-dirty-a", autocommit=True) as a,
        connect(proxy, "pg3-dirty-b", autocommit=True) as b,
        connect(proxy, "pg3-plain", autocommit=True) as plain,
        connect(proxy, "pg3-plain-holder") as holder,
    ):
        # both servers get used by clients that change settings
        with b.transaction():
            b.execute("SELECT 1")
            a.execute(
                "SET search_path = pg_catalog; SET timezone = 'Asia/Tokyo'; SET statement_timeout = '7s'"
            )
            a.execute("SET application_name = 'dirty-a'")
        b.execute(
            "SET search_path = public; SET timezone = 'Europe/Paris'; SET statement_timeout = '9s'"
        )
        b.execute("SET application_name = 'dirty-b'")
        told = plain.info.parameter_status("application_name")
        for hold in (False, True, False, True):
            if hold:
                holder.execute("SELECT 1")
            got = plain.execute(query).fetchone()
            app = plain.execute("SELECT current_setting('application_name')").fetchone()
            if hold:
                holder.commit()
            assert got == defaults
            # the server names the agent and nothing of the others' names leaks
            assert app == ("pg3-plain",), (
                f"current_setting('application_name') is {app[0]!r}, expected the agent id alone"
            )
        assert told == ""  # the client itself was told what it set: nothing


def test_same_prepared_text_under_different_search_paths(start_proxy, pg) -> None:
    # Schema-per-tenant: the same query text means different tables for different clients.
    # Each client's prepared statement must keep resolving in its own search_path.
    proxy = start_proxy(pool_size=1)
    tag = uuid.uuid4().hex[:8]
    a, b = f"tenant_a_{tag}", f"tenant_b_{tag}"
    pg.psql(
        f"CREATE SCHEMA {a} AUTHORIZATION app_owner; CREATE SCHEMA {b} AUTHORIZATION app_owner; "
        f"CREATE TABLE {a}.items (id int, v text); INSERT INTO {a}.items VALUES (1, 'a'); "
        f"CREATE TABLE {b}.items (id int, v text, extra int); INSERT INTO {b}.items VALUES (1, 'b', 42); "
        f"ALTER TABLE {a}.items OWNER TO app_owner; ALTER TABLE {b}.items OWNER TO app_owner"
    )
    try:
        with (
            connect(proxy, "pg3-tenant-a", autocommit=True, options=f"-c search_path={a}") as ca,
            connect(proxy, "pg3-tenant-b", autocommit=True) as cb,
        ):
            cb.execute(f"SET search_path = {b}")
            seen_a, seen_b = [], []
            for _ in range(8):  # prepared from the 6th run on
                seen_a.append(ca.execute("SELECT * FROM items WHERE id = %s", (1,)).fetchall())
                seen_b.append(cb.execute("SELECT * FROM items WHERE id = %s", (1,)).fetchall())
        assert seen_a == [[(1, "a")]] * 8
        assert seen_b == [[(1, "b", 42)]] * 8
    finally:
        pg.psql(f"DROP SCHEMA IF EXISTS {a} CASCADE; DROP SCHEMA IF EXISTS {b} CASCADE")


def test_set_local_rolled_back_set_and_reset_do_not_leak(start_proxy) -> None:
    proxy = start_proxy(pool_size=2)
    with (
        connect(proxy, "pg3-setlocal", autocommit=True) as conn,
        connect(proxy, "pg3-setlocal-holder") as holder,
    ):

        def seen() -> tuple[str, str]:
            out = []
            for hold in (False, True):
                if hold:
                    holder.execute("SELECT 1")
                row = conn.execute(
                    "SELECT current_setting('search_path'), current_setting('statement_timeout')"
                ).fetchone()
                if hold:
                    holder.commit()
                out.append(row)
            assert out[0] == out[1], out
            return out[0]

        with conn.transaction():  # a SET inside a transaction that commits stays
            conn.execute("SET statement_timeout = '42s'")
        assert seen() == ('"$user", public', "42s")
        with conn.transaction():
            conn.execute("SET LOCAL search_path = pg_catalog")
            assert conn.execute("SHOW search_path").fetchone() == ("pg_catalog",)
        assert seen() == ('"$user", public', "42s")
        with pytest.raises(RuntimeError), conn.transaction():
            conn.execute("SET search_path = rolled_back_schema")
            raise RuntimeError("roll back")
        assert seen() == ('"$user", public', "42s")
        conn.execute("SELECT set_config('search_path', 'via_set_config, public', false)")
        assert seen() == ("via_set_config, public", "42s")
        conn.execute("RESET statement_timeout")
        assert seen() == ("via_set_config, public", "0")
        conn.execute("RESET ALL")
        assert seen() == ('"$user", public', "0")


def test_startup_parameters_survive_across_server_connections(start_proxy) -> None:
    proxy = start_proxy(pool_size=2)
    with (
        connect(
            proxy,
            "pg3-startup",
            autocommit=True,
            application_name="from-startup",
            options="-c search_path=pg_catalog,public -c statement_timeout=12345",
        ) as conn,
        connect(proxy, "pg3-startup-holder") as holder,
    ):
        assert conn.info.parameter_status("application_name") == "from-startup"
        for hold in (False, True, False, True):
            if hold:
                holder.execute("SELECT 1")
            row = conn.execute(
                "SELECT current_setting('application_name'), current_setting('search_path'), "
                "current_setting('statement_timeout')"
            ).fetchone()
            if hold:
                holder.commit()
            # as Postgres keeps a startup option: verbatim (a SET would normalize it)
            assert row == ("pg3-startup/from-startup", "pg_catalog,public", "12345ms")


def test_temp_table_pins_the_client_to_its_server(start_proxy, pg) -> None:
    proxy = start_proxy(pool_size=3)
    name = f"tmp_{uuid.uuid4().hex[:8]}"
    with (
        connect(proxy, "pg3-temp", autocommit=True) as owner,
        connect(proxy, "pg3-temp-holder") as holder,
        connect(proxy, "pg3-temp-a", autocommit=True) as a,
        connect(proxy, "pg3-temp-b", autocommit=True) as b,
    ):
        owner.execute(f"CREATE TEMP TABLE {name} (v int)")
        owner.execute(f"INSERT INTO {name} SELECT generate_series(1, 3)")
        owner_pid = backend_pid(owner)
        for n in range(6):
            holder.execute("SELECT 1")  # one server held by another client
            for other in (a, b):
                # others run elsewhere and cannot see the temp table
                pid, visible = other.execute(
                    "SELECT pg_backend_pid(), to_regclass(%s)", (name,)
                ).fetchone()
                assert pid != owner_pid
                assert visible is None
            with owner.transaction():
                owner.execute(f"INSERT INTO {name} VALUES (%s)", (10 + n,))
            holder.commit()
            assert backend_pid(owner) == owner_pid
        total = owner.execute(f"SELECT count(*), sum(v) FROM {name}").fetchone()
        assert total == (9, 6 + sum(10 + n for n in range(6)))


def test_server_side_cursors_with_and_without_hold(start_proxy, pg, table) -> None:
    make_table(pg, table, "id int")
    pg.psql(f"INSERT INTO {table} SELECT generate_series(1, 100)")
    proxy = start_proxy(pool_size=2)
    with (
        connect(proxy, "pg3-cursor") as conn,
        connect(proxy, "pg3-cursor-other", autocommit=True) as other,
    ):
        # a plain named cursor lives inside one transaction
        with conn.cursor("plain_cur") as cur:
            cur.execute(f"SELECT id FROM {table} ORDER BY id")
            assert cur.fetchmany(10) == [(i,) for i in range(1, 11)]
            assert cur.fetchone() == (11,)
        conn.commit()
        # WITH HOLD survives commit: the client is pinned to keep it
        cur = conn.cursor("held_cur", withhold=True)
        cur.execute(f"SELECT id FROM {table} ORDER BY id")
        conn.commit()
        got = []
        for _ in range(5):
            assert other.execute("SELECT 1").fetchone() == (1,)
            got += cur.fetchmany(20)
            conn.commit()
        cur.close()
        conn.commit()
    assert got == [(i,) for i in range(1, 101)]
