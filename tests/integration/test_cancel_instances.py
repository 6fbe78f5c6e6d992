"""Cancel requests across guardproxy instances: each instance holds a slot in
guardproxy.proxy_instances, the slot is in every backend key it hands out, and a
cancel request that reaches another instance is forwarded to the owner.

Every instance is a real ``guardproxy serve`` process on loopback in front of the
same database (its own, ``cancel_routing``, so the registry holds only the
instances of these tests); every wait is bounded.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from pgcluster import PgCluster, free_port
from wirekit import (
    WireClient,
    data_rows,
    errors_in,
    eventually,
    start_proxy_with_deadline,  # noqa: F401  (the start_proxy fixture, with a deadline)
)

from guardproxy.protocol import codec
from guardproxy.server.cancel import new_cancel_key, slot_of, worker_of
from guardproxy.server.instances import claim_sql
from guardproxy.store import migrate

DB = "cancel_routing"
NO_REGISTRY_DB = "cancel_no_registry"
FORWARDED = "forwarded to"
DROPPED = "never forwarded again"
UNKNOWN = "unknown session ignored"


@pytest.fixture(scope="module")
def registry_db(pg: PgCluster) -> Iterator[str]:
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)", dbname="postgres")
    pg.psql(f"CREATE DATABASE {DB} OWNER app_owner", dbname="postgres")
    dsn = pg.dsn(dbname=DB)
    migrate.upgrade(dsn)
    yield dsn
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)", dbname="postgres")


@pytest.fixture(autouse=True)
def empty_registry(pg: PgCluster, registry_db: str) -> None:
    pg.psql("DELETE FROM guardproxy.proxy_instances", dbname=DB)


def registry(pg: PgCluster) -> dict[int, tuple[str, str]]:
    """slot -> (address, owner) of the rows in the registry."""
    out = pg.psql(
        "SELECT string_agg(slot || ' ' || address || ' ' || owner, E'\\n' ORDER BY slot) "
        "FROM guardproxy.proxy_instances",
        dbname=DB,
    )
    rows = [line.split(" ") for line in out.splitlines() if line]
    return {int(r[0]): (r[1], r[2]) for r in rows}


def slot_at(pg: PgCluster, port: int) -> int | None:
    for slot, (address, _) in registry(pg).items():
        if address == f"127.0.0.1:{port}":
            return slot
    return None


def running(pg: PgCluster, marker: str) -> bool:
    return (
        pg.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
            f"AND query LIKE '%pg_sleep%{marker}%' AND pid <> pg_backend_pid()",
            dbname=DB,
        )
        != "0"
    )


async def send_cancel(port: int, pid: int, secret: int, code: int = codec.CANCEL_REQUEST) -> None:
    """One cancel packet, as a client sends it; the proxy answers nothing and closes."""
    async with await WireClient.connect(port) as raw:
        await raw.send(codec.build_cancel(pid, secret, code))
        assert await raw.read_until_eof(5) == []


async def sleeping(port: int, agent: str, seconds: float) -> tuple[WireClient, str]:
    """A client logged in on ``port`` whose pg_sleep is running on the server."""
    client = await WireClient.connect(port)
    await client.login(user=agent, database=DB)
    marker = f"m{uuid.uuid4().hex[:12]}"
    await client.send(codec.build_query(f"SELECT pg_sleep({seconds}) /* {marker} */"))
    return client, marker


def count(log: str, text: str) -> int:
    return len(re.findall(re.escape(text), log))


def assert_healthy(*proxies: Any) -> None:
    for proxy in proxies:
        assert proxy.alive()
        assert "Traceback" not in proxy.log(), proxy.log()[-3000:]
        with psycopg.connect(proxy.dsn("health", dbname=DB), connect_timeout=5) as conn:
            assert conn.execute("select 1").fetchone() == (1,)


# ---------------------------------------------------------------- routing


async def cancel_through(pg: PgCluster, owner: Any, other: Any, agent: str) -> int:
    """A client of ``owner`` sleeps; its key goes to ``other``; returns the key's worker."""
    client, marker = await sleeping(owner.port, agent, 30)
    async with client:
        assert client.backend_key is not None
        pid, secret = client.backend_key
        assert slot_of(pid) == slot_at(pg, owner.port)
        await eventually(lambda: running(pg, marker), 10, "pg_sleep to run")
        started = time.monotonic()
        await send_cancel(other.port, pid, secret)
        msgs = await client.read_until(b"Z", timeout=10)
        took = time.monotonic() - started
        assert [e["C"] for e in errors_in(msgs)] == ["57014"], msgs
        assert took < 5, f"the cancel took {took:.1f}s"
        await eventually(lambda: not running(pg, marker), 5, "pg_sleep to stop")
        assert await client.scalar("select 'still here'") == "still here"  # the session goes on
    return worker_of(pid)


async def test_a_cancel_sent_to_another_instance_stops_the_query(start_proxy, pg) -> None:
    a = start_proxy(upstream=pg.dsn(dbname=DB))
    b = start_proxy(upstream=pg.dsn(dbname=DB), workers=2, listen_port=free_port())
    await eventually(lambda: len(registry(pg)) == 2, 15, "both instances to register")
    assert slot_at(pg, a.port) not in (None, slot_at(pg, b.port))
    # A's key sent to B: whichever of B's workers takes it forwards it to A
    for i in range(4):
        await cancel_through(pg, a, b, f"a-sleeper-{i}")
    # B's keys (both workers' sessions) sent to A: A forwards to B, whichever B worker
    # takes the relayed request hands it to the worker that owns the session
    workers: set[int] = set()
    for i in range(12):
        workers.add(await cancel_through(pg, b, a, f"b-sleeper-{i}"))
        if workers == {0, 1}:
            break
    assert workers == {0, 1}
    assert count(a.log(), FORWARDED) >= 2 and count(b.log(), FORWARDED) >= 4
    assert_healthy(a, b)


async def test_bogus_and_relayed_keys_are_not_forwarded_in_circles(start_proxy, pg) -> None:
    a = start_proxy(upstream=pg.dsn(dbname=DB))
    b = start_proxy(upstream=pg.dsn(dbname=DB))
    await eventually(lambda: len(registry(pg)) == 2, 15, "both instances to register")
    slot_a, slot_b = slot_at(pg, a.port), slot_at(pg, b.port)
    # a stale view of the world: slot 250 points at B itself, slot 251 at A (whose slot
    # it is not); both rows have a fresh heartbeat, so they are believed
    pg.psql(
        "INSERT INTO guardproxy.proxy_instances (slot, address, owner) VALUES "
        f"(250, '127.0.0.1:{b.port}', 'fake'), (251, '127.0.0.1:{a.port}', 'fake')",
        dbname=DB,
    )
    client, marker = await sleeping(a.port, "a-survivor", 4)
    async with client:
        assert client.backend_key is not None
        pid, secret = client.backend_key
        await eventually(lambda: running(pg, marker), 10, "pg_sleep to run")
        # 1. A's slot, wrong secret: B forwards it once, A ignores it
        await send_cancel(b.port, pid, secret ^ 1)
        # 2. a slot nobody holds: ignored by B
        await send_cancel(b.port, new_cancel_key(200, 0)[0], secret)
        # 3. the relayed code with A's real key, sent to B: B must not forward it
        await send_cancel(b.port, pid, secret, codec.RELAYED_CANCEL_REQUEST)
        # 4. slot 250 -> B itself: B relays it to itself once and drops it there
        await send_cancel(b.port, new_cancel_key(250, 0)[0], secret)
        # 5. slot 251 -> A, which is not slot 251: A drops it
        await send_cancel(b.port, new_cancel_key(251, 0)[0], secret)

        def settled() -> bool:
            return (
                count(b.log(), FORWARDED) == 3
                and count(b.log(), DROPPED) == 2
                and count(a.log(), DROPPED) == 1
                and count(a.log(), UNKNOWN) == 1
                and "slot 200 ignored" in b.log()
            )

        await eventually(settled, 5, "every cancel request to be handled once")
        # the query was never cancelled: it ends by itself, with its row
        msgs = await client.read_until(b"Z", timeout=10)
        assert not errors_in(msgs), errors_in(msgs)
        assert data_rows(msgs) == [[""]]
    await asyncio.sleep(1.0)  # nothing goes round: the counts stay where they were
    assert settled(), (a.log()[-2000:], b.log()[-2000:])
    assert slot_a != slot_b
    assert_healthy(a, b)


# ---------------------------------------------------------------- the registry


async def test_instances_get_different_slots_a_stale_one_is_reclaimed_and_shutdown_frees_it(
    start_proxy, pg
) -> None:
    pg.psql(
        "INSERT INTO guardproxy.proxy_instances (slot, address, owner, started_at, heartbeat_at) "
        "VALUES (1, 'gone.invalid:1', 'dead', now() - interval '2 hours', now() - interval '1 hour'),"
        " (2, 'alive.invalid:1', 'alive', now(), now())",
        dbname=DB,
    )
    a = start_proxy(upstream=pg.dsn(dbname=DB))
    b = start_proxy(upstream=pg.dsn(dbname=DB))
    rows = registry(pg)
    assert rows[1][0] == f"127.0.0.1:{a.port}" and rows[1][1] != "dead"  # the stale slot
    assert rows[2] == ("alive.invalid:1", "alive")  # a live slot is never taken
    assert rows[3][0] == f"127.0.0.1:{b.port}"
    fresh = pg.psql(
        "SELECT started_at > now() - interval '1 minute' FROM guardproxy.proxy_instances "
        "WHERE slot = 1",
        dbname=DB,
    )
    assert fresh == "t"
    with psycopg.connect(a.dsn("keyed", dbname=DB), connect_timeout=5) as conn:
        assert slot_of(conn.info.backend_pid) == 1
    with psycopg.connect(b.dsn("keyed", dbname=DB), connect_timeout=5) as conn:
        assert slot_of(conn.info.backend_pid) == 3
    assert a.stop() == 0
    assert sorted(registry(pg)) == [2, 3]  # released on graceful shutdown
    assert "slot 1 released" in a.log()


async def test_concurrent_claims_each_get_their_own_slot(pg, registry_db) -> None:
    """The claim statement itself, twelve at once on twelve connections, one try each."""
    conns = [await asyncpg.connect(registry_db, timeout=10) for _ in range(12)]
    try:
        await asyncio.wait_for(
            asyncio.gather(
                *(
                    c.execute(claim_sql(f"10.0.0.{i}:6432", f"o{i}", 60))
                    for i, c in enumerate(conns)
                )
            ),
            30,
        )
    finally:
        for c in conns:
            await c.close()
    rows = registry(pg)
    assert sorted(rows) == list(range(1, 13))
    assert sorted(owner for _, owner in rows.values()) == sorted(f"o{i}" for i in range(12))


async def test_heartbeat_keeps_the_slot_and_a_taken_slot_is_replaced(start_proxy, pg) -> None:
    a = start_proxy(
        upstream=pg.dsn(dbname=DB), instance_heartbeat_interval=0.3, instance_stale_after=1
    )
    slot = slot_at(pg, a.port)
    assert slot is not None

    def heartbeat() -> float:
        return float(
            pg.psql(
                "SELECT extract(epoch FROM heartbeat_at) FROM guardproxy.proxy_instances "
                f"WHERE slot = {slot}",
                dbname=DB,
            )
        )

    first = heartbeat()
    await eventually(lambda: heartbeat() > first, 5, "a heartbeat")
    # another instance took the slot over (as after missed heartbeats): A claims another
    pg.psql(
        "UPDATE guardproxy.proxy_instances SET owner = 'thief', address = 'thief.invalid:1', "
        f"heartbeat_at = now() + interval '1 hour' WHERE slot = {slot}",
        dbname=DB,
    )
    await eventually(lambda: slot_at(pg, a.port) not in (None, slot), 5, "a new slot")
    new = slot_at(pg, a.port)
    assert "was taken over by another instance" in a.log()
    with psycopg.connect(a.dsn("after", dbname=DB), connect_timeout=5) as conn:
        assert slot_of(conn.info.backend_pid) == new
    assert_healthy(a)


async def test_without_a_registry_the_proxy_serves_cancels_locally_and_joins_later(
    start_proxy, pg
) -> None:
    pg.psql(f"DROP DATABASE IF EXISTS {NO_REGISTRY_DB} WITH (FORCE)", dbname="postgres")
    pg.psql(f"CREATE DATABASE {NO_REGISTRY_DB} OWNER app_owner", dbname="postgres")
    try:
        dsn = pg.dsn(dbname=NO_REGISTRY_DB)
        a = start_proxy(upstream=dsn, instance_heartbeat_interval=0.3, instance_stale_after=1)
        log = a.log()
        assert count(log, "instance registry unavailable") == 1, log
        assert "guardproxy db upgrade" in log
        conn = await psycopg.AsyncConnection.connect(
            a.dsn("local", dbname=NO_REGISTRY_DB), autocommit=True, connect_timeout=5
        )
        async with conn:
            assert slot_of(conn.info.backend_pid) == 0
            loop = asyncio.get_running_loop()
            loop.call_later(0.5, conn.cancel)  # the key reaches its own instance: still works
            with pytest.raises(psycopg.errors.QueryCanceled):
                await asyncio.wait_for(conn.execute("select pg_sleep(20)"), 10)
        # the schema arrives: the next heartbeat claims a slot, and new sessions carry it
        await asyncio.to_thread(migrate.upgrade, dsn)
        await eventually(lambda: "slot 1 claimed" in a.log(), 5, "the late claim")
        with psycopg.connect(a.dsn("later", dbname=NO_REGISTRY_DB), connect_timeout=5) as c:
            assert slot_of(c.info.backend_pid) == 1
        assert count(a.log(), "instance registry unavailable") == 1  # one warning, no more
        assert a.stop() == 0
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {NO_REGISTRY_DB} WITH (FORCE)", dbname="postgres")


async def test_a_malformed_relayed_cancel_is_fatal_like_a_malformed_cancel(start_proxy, pg) -> None:
    a = start_proxy(upstream=pg.dsn(dbname=DB))
    async with await WireClient.connect(a.port) as raw:
        body = codec.build_cancel(1, 2, codec.RELAYED_CANCEL_REQUEST)[4:] + b"\x00\x00\x00\x00"
        await raw.send((len(body) + 4).to_bytes(4, "big") + body)
        msgs = await raw.read_until_eof(5)
        fatal = [e for e in errors_in(msgs) if e.get("S") == "FATAL"]
        assert fatal and fatal[0]["C"] == "08P01" and "relayed CancelRequest" in fatal[0]["M"]
    assert_healthy(a)
