"""Delegation against the real Postgres: the revocation list in guardproxy's schema, seen
by two caches as two instances would, and the row-level security that guard.principals
feeds (the statement the proxy sends, then the agent role's reads and writes)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from pgcluster import PgCluster

from guardproxy.delegation.claims import Delegation
from guardproxy.delegation.postgres import rls_policy_sql, settings_sql
from guardproxy.delegation.revocations import RevocationCache, RevocationStore
from guardproxy.store import migrate

DB = "delegation_store"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dsn(pg: PgCluster) -> Iterator[str]:
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)", dbname="postgres")
    pg.psql(f"CREATE DATABASE {DB} OWNER app_owner", dbname="postgres")
    url = pg.dsn(dbname=DB)
    migrate.upgrade(url)
    yield url
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)", dbname="postgres")


def delegation(token_id: str, principals: tuple[str, ...], issued_at: float) -> Delegation:
    return Delegation(
        agent_id="support-1",
        subject="support-1",
        issuer="shop-app",
        token_id=token_id,
        principals=principals,
        task="T-1",
        issued_at=issued_at,
        expires_at=issued_at + 900,
        narrowing=None,
        fingerprint="f" * 16,
    )


async def wait_for(predicate: object, what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_revocation_reaches_another_instance(dsn: str) -> None:
    admin = RevocationStore(dsn)  # the instance whose console or CLI revokes
    other = RevocationCache(RevocationStore(dsn), refresh=60.0)  # a second instance
    try:
        await other.start()
        assert other.loaded_at is not None and len(other.current) == 0
        running = delegation("run-1", ("42", "43"), issued_at=other.loaded_at - 60)
        assert other.revoked(running, other.loaded_at) is None
        revocation = await admin.revoke("token", "run-1", by="admin", reason="leaked")
        assert (revocation.kind, revocation.value, revocation.issuer) == ("token", "run-1", "")
        # the refresh is a minute away: the notification brings it
        await wait_for(lambda: len(other.current) == 1, "the second instance to see it")
        found = other.current.match(running)
        assert found is not None and found.reason == "leaked"
        assert other.current.match(delegation("run-2", ("42",), running.issued_at)) is None
        await admin.revoke("principal", "43", by="admin", issuer="shop-app")
        await wait_for(lambda: len(other.current) == 2, "the principal revocation")
        assert other.current.match(delegation("run-3", ("7", "43"), running.issued_at))
        minted_later = delegation("run-4", ("43",), issued_at=running.issued_at + 3600)
        assert other.current.match(minted_later) is None  # tokens minted after it still work
        listed = await admin.list()
        assert [(r.kind, r.value) for r in listed] == [("principal", "43"), ("token", "run-1")]
        assert await admin.unrevoke("token", "run-1") is True
        assert await admin.unrevoke("token", "run-1") is False
        await wait_for(lambda: len(other.current) == 1, "the removal")
        assert other.current.match(running) is not None  # still: principal 43 is revoked
        assert other.current.match(delegation("run-1", ("42",), running.issued_at)) is None
    finally:
        await admin.close()
        await other.close()


async def test_a_cache_closed_as_a_notification_arrives_stops(dsn: str) -> None:
    """close() must not lose its cancel to a change notification that wakes the background
    task at the same moment: the task would wait out its refresh and reload forever, and
    close() with it (10 s stand for "never": a close takes milliseconds)."""
    for _ in range(3):
        cache = RevocationCache(RevocationStore(dsn), refresh=60.0)
        await cache.start()
        await asyncio.sleep(0)  # the task waits for a notification or its refresh
        task = cache._task
        cache._notified()  # what asyncpg calls when the notification arrives
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10) as bound:
                await cache.close()
        assert not bound.expired(), "close() did not return"
        assert task is not None and task.cancelled()


async def test_revoking_twice_moves_the_cut_off(dsn: str) -> None:
    store = RevocationStore(dsn)
    try:
        first = await store.revoke("principal", "77", by="a")
        conn = await asyncpg.connect(dsn)
        try:  # as if the first revocation were an hour old
            await conn.execute(
                "UPDATE guardproxy.token_revocations SET revoked_at = revoked_at - interval '1h' "
                "WHERE value = '77'"
            )
        finally:
            await conn.close()
        again = await store.revoke("principal", "77", by="b", reason="again")
        assert again.revoked_at >= first.revoked_at and again.revoked_by == "b"
        assert [r.value for r in await store.list()].count("77") == 1
        with pytest.raises(ValueError, match="kind"):
            await store.revoke("user", "1", by="a")
        with pytest.raises(asyncpg.CheckViolationError):
            conn = await store.connection()
            await conn.execute(
                "INSERT INTO guardproxy.token_revocations (kind, value, revoked_by) "
                "VALUES ('everything', 'x', 'a')"
            )
    finally:
        await store.unrevoke("principal", "77")
        await store.close()


async def test_an_unreadable_list_is_reported_once_and_fails_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = RevocationCache(RevocationStore("postgresql://nobody@127.0.0.1:1/none"), refresh=1.0)
    assert await cache.load() is False and await cache.load() is False
    assert len([r for r in caplog.records if "cannot read the token revocation" in r.message]) == 1
    with pytest.raises(Exception, match="never been read"):
        cache.revoked(delegation("x", ("1",), 0.0), 0.0)
    await cache.close()


def test_the_cli_revokes_and_lists(dsn: str) -> None:
    def gp(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "guardproxy", "token", *args, "--upstream", dsn],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=False,
        )

    out = gp("revoke", "--jti", "cli-run", "--reason", "test")
    assert out.returncode == 0, out.stderr
    assert "token cli-run revoked by cli:" in out.stdout
    listed = gp("list", "--json")
    assert listed.returncode == 0 and '"value": "cli-run"' in listed.stdout
    assert gp("revoke", "--jti", "a", "--principal", "b").returncode == 2
    assert gp("unrevoke", "--jti", "cli-run").returncode == 0
    assert gp("unrevoke", "--jti", "cli-run").returncode == 1


RLS_SETUP = """
CREATE ROLE rls_agent;
CREATE TABLE rls_orders (id int PRIMARY KEY, customer_id bigint NOT NULL, note text);
INSERT INTO rls_orders VALUES (1, 42, 'a'), (2, 43, 'b'), (3, 99, 'c');
GRANT SELECT, INSERT, UPDATE, DELETE ON rls_orders TO rls_agent;
"""


def test_rls_sees_only_the_verified_principals(dsn: str, pg: PgCluster) -> None:
    """The generated policy, fed by the statement the proxy sends: the agent's role reads
    and changes only its principals' rows; no token (empty settings) means no rows."""
    pg.psql(RLS_SETUP, dbname=DB)
    pg.psql(rls_policy_sql("rls_orders", "customer_id", ["rls_agent"], "bigint"), dbname=DB)

    def as_agent(d: Delegation | None, sql: str) -> str:
        return pg.psql(f"SET ROLE rls_agent; {settings_sql(d)}; {sql}", dbname=DB)

    token = delegation("run-9", ("42", "43"), 0.0)
    assert as_agent(token, "SELECT string_agg(id::text, ',' ORDER BY id) FROM rls_orders") == "1,2"
    assert as_agent(None, "SELECT count(*) FROM rls_orders") == "0"
    assert as_agent(token, "UPDATE rls_orders SET note = 'x' RETURNING id") == "1\n2"
    with pytest.raises(RuntimeError, match="row-level security"):
        as_agent(token, "INSERT INTO rls_orders VALUES (4, 99, 'forged')")
    assert as_agent(token, "SELECT current_setting('guard.token_id')") == "run-9"
    assert pg.psql("SELECT note FROM rls_orders WHERE id = 3", dbname=DB) == "c"
