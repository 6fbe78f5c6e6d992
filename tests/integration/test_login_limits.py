"""Failed-login limits through the real proxy: peers that cannot authenticate never
lock out an agent, or the admin, logging in from another address.

Each attacker is a distinct loopback address (127.0.0.2, 127.0.0.3, ...: Linux routes
all of 127/8 to lo) with a raw SCRAM client bound to it; the real agent and the
admin log in from 127.0.0.1 with psycopg and psql's library. The proxy runs with
``auth_mode: scram`` and ``auth_max_failures: 2`` (so 8 per source).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import scramp
from pgcluster import PgCluster
from wirekit import TIMEOUT, WireClient, errors_in, launched_proxy, startup_packet

from guardproxy.protocol import codec
from guardproxy.protocol.scram import write_verifier

PASSWORDS = {"agent-a": "right-a", "agent-b": "right-b", "ops": "right-ops"}
REFUSED = "too many failed logins recently"


@pytest.fixture(scope="module")
def proxy(pg: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp_path: Path = tmp_path_factory.mktemp("login-limits")
    auth_file = tmp_path / "agents.auth"
    for agent, password in PASSWORDS.items():
        write_verifier(auth_file, agent, password)
    with launched_proxy(
        pg,
        tmp_path,
        auth_mode="scram",
        auth_file=auth_file,
        auth_max_failures=2,
        admin_users="ops",
    ) as handle:
        yield handle


async def login_from(port: int, source: str, agent: str, password: str) -> str:
    """A SCRAM login from ``source``: "ok", or the error message the proxy sent."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), TIMEOUT
    )
    async with WireClient(reader, writer) as raw:
        await raw.send(startup_packet({"user": agent, "database": "app"}))
        msg = await raw.read_message()
        if msg.kind == b"E":
            return errors_in([msg])[0]["M"]
        assert codec.auth_code(msg.raw) == 10
        client = scramp.ScramClient(["SCRAM-SHA-256"], agent, password)
        await raw.send(
            codec.build_sasl_initial("SCRAM-SHA-256", client.get_client_first().encode())
        )
        msg = await raw.read_message()
        assert codec.auth_code(msg.raw) == 11, errors_in([msg])
        client.set_server_first(msg.raw[9:].decode())
        await raw.send(codec.build_password(client.get_client_final().encode()))
        msgs = await raw.read_until(b"ZE")
        return "ok" if msgs[-1].kind == b"Z" else errors_in(msgs)[0]["M"]


def psycopg_login(proxy: Any, agent: str, dbname: str = "app") -> None:
    dsn = proxy.dsn(agent, PASSWORDS[agent], dbname=dbname)
    with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as conn:
        if dbname == "guardproxy":
            assert conn.execute("SHOW STATS").fetchall()
        else:
            assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_guessing_from_many_addresses_does_not_lock_out_the_agent_or_the_admin(
    proxy: Any,
) -> None:
    port = proxy.port
    attackers = [f"127.0.0.{n}" for n in range(2, 7)]
    for source in attackers:  # 5 addresses, each past its limit, for the agent and the admin
        for agent in ("agent-a", "ops"):
            outcomes = [await login_from(port, source, agent, "guess") for _ in range(3)]
            assert "password authentication failed" in outcomes[0], outcomes
            assert REFUSED in outcomes[2], outcomes  # the limit holds for that address
    # the real agent and the admin, from their own address, with their passwords
    await asyncio.to_thread(psycopg_login, proxy, "agent-a")
    await asyncio.to_thread(psycopg_login, proxy, "ops", "guardproxy")
    assert await login_from(port, "127.0.0.1", "agent-a", PASSWORDS["agent-a"]) == "ok"
    # the guessing address stays refused even with the right password ...
    assert REFUSED in await login_from(port, attackers[0], "agent-a", PASSWORDS["agent-a"])
    # ... but may still log in another agent (its source is under 8 failures: 4 so far)
    assert await login_from(port, attackers[0], "agent-b", PASSWORDS["agent-b"]) == "ok"


async def test_one_address_spraying_agent_ids_is_refused_for_all_of_them(proxy: Any) -> None:
    port, source = proxy.port, "127.0.0.20"
    for n in range(8):  # one guess each for eight made-up agent ids: the source's limit
        outcome = await login_from(port, source, f"made-up-{n}", "guess")
        assert "password authentication failed" in outcome, outcome
    assert REFUSED in await login_from(port, source, "agent-b", PASSWORDS["agent-b"])
    assert await login_from(port, "127.0.0.21", "agent-b", PASSWORDS["agent-b"]) == "ok"
    # an unknown agent id gets the same answer as a known one: nothing learnt
    assert await login_from(port, source, "nobody", "x") == await login_from(
        port, source, "agent-a", "x"
    )
