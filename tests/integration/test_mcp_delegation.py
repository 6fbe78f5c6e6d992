"""Delegation tokens as the bearer credential of `guardproxy mcp http`, with the MCP SDK's
own client, against a real proxy that verifies the same tokens (docs/mcp.md, "Delegation
tokens: agents acting for people").

One proxy for the module in SCRAM mode, trusting one issuer, its support type
`delegation: required` with a row filter on the token's principals; support-1 has a
password in the proxy's auth file (the MCP server finds it in its password file),
support-7 has none and logs in with its token. One MCP HTTP server (a subprocess, as
deployed) started as docs/mcp.md says, with the proxy's settings file and a tokens file
for analytics-1. What an agent sees through MCP is compared with what the proxy gives
a direct client presenting the same token; every refused token is checked by its
effect: no rows, nothing changed, the token in no log.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import jwt
import psycopg
import pytest
import shop
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from pgcluster import PgCluster, free_port, wait_for_port
from prometheus_client.parser import text_string_to_metric_families
from proofkit import policies_with
from shop import ROOT, SHOP_DB, ShopProxy, launch_proxy, snapshot

from guardproxy.delegation.claims import fingerprint
from guardproxy.delegation.mint import SigningKey, generate_key, mint
from guardproxy.mcp.tokens import new_token
from guardproxy.protocol.scram import write_verifier

pytestmark = pytest.mark.timeout(90)

DOC = (ROOT / "docs" / "mcp.md").read_text()
SECTION = DOC.split("## Delegation tokens: agents acting for people", 1)[1].split("\n## ", 1)[0]
ISSUER = "shop-app"
PASSWORDS = {"support-1": "support-pw", "analytics-1": "analytics-pw", "admin": "admin-pw"}
REQUIRED = {
    "delegation": "required",
    "row_filters": {"orders": "customer_id = ANY({principals})"},
}
ALL_ORDERS = "SELECT id FROM orders WHERE id > 0 ORDER BY id"

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline


def section_block(language: str) -> str:
    [block] = re.findall(rf"^```{language}\n(.*?)```", SECTION, re.S | re.M)
    return str(block)


@dataclass
class Setup:
    proxy: ShopProxy
    key: SigningKey
    port: int
    metrics_port: int
    analytics_token: str
    tokens_file: Path
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def token(self, principals: list[str], agent: str = "support-7", **kw: Any) -> str:
        return mint(self.key, agent=agent, principals=principals, issuer=ISSUER, **kw)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx2.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


@pytest.fixture(scope="module")
def setup(shop_db: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("mcp-delegation")
    private, public = generate_key("EdDSA")
    (work / "shop.pub").write_bytes(public)
    key = SigningKey("EdDSA", serialization.load_pem_private_key(private, None), None)
    auth = work / "agents.auth"
    for agent, password in PASSWORDS.items():
        write_verifier(auth, agent, password)
    issuers = [{"issuer": ISSUER, "key_file": str(work / "shop.pub"), "audiences": ["guardproxy"]}]
    policies = policies_with(work, support=REQUIRED)
    with launch_proxy(
        shop_db,
        work / "guardproxy.log",
        policies=policies,
        auth_mode="scram",
        auth_file=auth,
        admin_users="admin",
        delegation_issuers=json.dumps(issuers),
        delegation_revocations_refresh=1,
    ) as proxy:
        # the proxy's settings file, as the MCP server reads it (--config)
        settings = work / "guardproxy.yaml"
        settings.write_text(yaml.safe_dump({"delegation_issuers": issuers}))
        passfile = work / "pgpass"
        passfile.write_text(
            "".join(f"127.0.0.1:{proxy.port}:{SHOP_DB}:{a}:{p}\n" for a, p in PASSWORDS.items())
        )
        passfile.chmod(0o600)
        tokens_file = work / "mcp.tokens"
        analytics_token = new_token(tokens_file, "analytics-1")
        # docs/mcp.md's command, with this test's files and ports
        command = shlex.split(section_block("sh").replace("\\\n", " "))
        assert command[:3] == ["guardproxy", "mcp", "http"]
        values = {
            "--config": str(settings),
            "--proxy": f"postgresql://127.0.0.1:{proxy.port}/{SHOP_DB}",
            "--policies": str(policies),
        }
        args = [
            values.get(prev, word) for prev, word in zip(["", *command[:-1]], command, strict=True)
        ]
        port, metrics_port = free_port(), free_port()
        args += ["--tokens-file", str(tokens_file), "--port", str(port)]
        args += ["--metrics-port", str(metrics_port), "--log-level", "debug"]
        log_path = work / "mcp.log"
        env = dict(os.environ, PGPASSFILE=str(passfile), PYTHONUNBUFFERED="1")
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
            )
        handle = Setup(proxy, key, port, metrics_port, analytics_token, tokens_file, proc, log_path)
        try:
            wait_for_port("127.0.0.1", port, timeout=30)
            yield handle
        finally:
            proc.terminate()
            proc.wait(15)


@pytest.fixture(autouse=True)
def _each_test(
    request: pytest.FixtureRequest, setup: Setup, shop_db: PgCluster, shop_baseline: Any
) -> Iterator[None]:
    since, mcp_since = len(setup.proxy.log()), len(setup.log())
    yield
    shop.dump_log_on_failure(request, setup.proxy, since)
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"\n----- guardproxy mcp http log -----\n{setup.log()[mcp_since:][-4000:]}")
    if snapshot(shop_db) != shop_baseline:
        shop.restore_shop(shop_db)


@contextlib.asynccontextmanager
async def connect(setup: Setup, token: str, mode: str = "auto") -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(streamable_http_client(setup.url, http_client=http), mode=mode) as client,
    ):
        yield client


async def call(client: Client, tool: str, **arguments: Any) -> tuple[bool, str, Any]:
    result = await client.call_tool(tool, arguments)
    text = "".join(getattr(block, "text", "") for block in result.content)
    return bool(result.is_error), text, result.structured_content


async def ok(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    is_error, text, data = await call(client, tool, **arguments)
    assert not is_error, text
    return dict(data)


async def refused(client: Client, tool: str, **arguments: Any) -> str:
    is_error, text, data = await call(client, tool, **arguments)
    assert is_error, f"expected a tool error, got {text}"
    assert not data or not data.get("rows"), data
    return text


def direct_ids(setup: Setup, token: str, agent: str = "support-7") -> list[int]:
    """What the proxy gives a Postgres client presenting the token itself."""
    password = PASSWORDS.get(agent, token)
    with psycopg.connect(
        setup.proxy.dsn(agent),
        password=password,
        options=f"-c guard.token={token}",
        autocommit=True,
        connect_timeout=10,
    ) as conn:
        return [row[0] for row in conn.execute(ALL_ORDERS)]


def initialize(setup: Setup, token: str) -> httpx2.Response:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "raw-test", "version": "0"},
        },
    }
    return httpx2.post(
        setup.url,
        json=body,
        headers={
            "Accept": "application/json, text/event-stream",
            "Authorization": f"Bearer {token}",
        },
        timeout=30,
    )


def ids(result: dict[str, Any]) -> list[int]:
    return [row[0] for row in result["rows"]]


# ---------------------------------------------------------------- what a token grants


async def test_the_docs_config_serves_an_agent_its_tokens_principals_and_no_more(
    setup: Setup,
) -> None:
    config = json.loads(section_block("json"))["mcpServers"]["shop-db"]
    url = config["url"].replace("127.0.0.1:8808", f"127.0.0.1:{setup.port}")
    token = setup.token(["1"])
    headers = {
        name: value.replace("eyJ_THE_DELEGATION_TOKEN_OF_THIS_RUN", token)
        for name, value in config["headers"].items()
    }
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        mine = await ok(client, "query", sql=ALL_ORDERS)
        described = await ok(client, "describe")
        # another customer's order is out of the token's reach: nothing changes
        other = await ok(
            client, "query", sql="UPDATE orders SET fulfillment_status = 'packed' WHERE id = 4"
        )
    assert ids(mine) == [1, 2] == direct_ids(setup, token)
    assert described["agent"] == "support-7"
    assert other["command"] == "UPDATE 0"
    other_token = setup.token(["2"])
    async with connect(setup, other_token) as client:
        theirs = await ok(client, "query", sql=ALL_ORDERS)
    assert ids(theirs) == [3, 6] == direct_ids(setup, other_token)


async def test_an_agent_with_a_password_of_its_own_presents_its_token_too(
    setup: Setup, shop_db: PgCluster
) -> None:
    """support-1 logs in to the proxy with SCRAM (its password file line) and presents the
    token in the options; the token is never offered as its password."""
    token = setup.token(["4"], agent="support-1", token_id="jti-mcp-scram")
    async with connect(setup, token) as client:
        for _ in range(2):  # the second call goes straight to SCRAM
            assert ids(await ok(client, "query", sql=ALL_ORDERS)) == [5]
    assert direct_ids(setup, token, "support-1") == [5]
    assert "password authentication failed" not in setup.proxy.log()
    assert setup.metrics()  # the MCP server is up; the proxy counted no failed login
    # the tokens-file agent next to them: unchanged
    async with connect(setup, setup.analytics_token) as client:
        assert ids(await ok(client, "query", sql=ALL_ORDERS)) == [1, 2, 3, 4, 5, 6]


async def test_the_proxy_binds_the_token_for_audit_and_row_level_security(
    setup: Setup, shop_db: PgCluster
) -> None:
    token = setup.token(["2"], token_id="jti-mcp-audit", task="T-mcp")
    async with connect(setup, token) as client:
        seen = await ok(
            client,
            "query",
            sql="SELECT current_setting('guard.principals') AS p, "
            "current_setting('guard.token_id') AS t FROM orders WHERE id = 3",
        )
        deleted = await ok(client, "query", sql="DELETE FROM orders WHERE id = 3")
        outside = await ok(client, "query", sql="DELETE FROM orders WHERE id = 1")
    assert seen["rows"] == [["2", "jti-mcp-audit"]]
    assert deleted["command"] == "DELETE 1" and deleted["task"] == "T-mcp"
    assert outside["command"] == "DELETE 0"  # customer 1's order: not the token's
    deadline = time.monotonic() + 10
    while True:
        row = shop_db.psql(
            "SELECT principals::text || '|' || coalesce(task, '') FROM guardproxy.audit_events "
            "WHERE tags->>'token_id' = 'jti-mcp-audit' AND statement LIKE '%WHERE id = 3 AND%'",
            dbname=SHOP_DB,
        )
        if row or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert row == "{2}|T-mcp"


async def test_a_narrowed_token_and_its_task_are_the_proxys_to_enforce(
    setup: Setup, shop_db: PgCluster
) -> None:
    before = snapshot(shop_db)
    token = setup.token(["1"], task="T-read", narrow={"statements": ["read"]})
    async with connect(setup, token) as client:
        denied = await refused(client, "query", sql="DELETE FROM orders WHERE id = 1")
        other_task = await refused(client, "query", sql=ALL_ORDERS, task="T-other")
        switch = await refused(client, "task", task="T-other")
        same = await ok(client, "task", task="T-read", step="s1")
        read = await ok(client, "query", sql=ALL_ORDERS)
        described = await ok(client, "describe")
        explained = await ok(client, "explain", sql="DELETE FROM orders WHERE id = 1")
    assert denied.startswith("Error executing tool query: ERROR [42501]")
    assert "narrowed by a delegation token" in denied or "may not" in denied
    assert "named by your delegation token" in other_task and "Nothing was run" in other_task
    assert "named by your delegation token" in switch
    assert same["task"] == "T-read" and same["step"] == "s1"
    assert (ids(read), read["task"], read["step"]) == ([1, 2], "T-read", "s1")
    assert described["tables"] and all(
        "delete" not in t["you_may"] and "update" not in t["you_may"] for t in described["tables"]
    )
    assert explained["decision"] == "deny"
    assert snapshot(shop_db) == before


async def test_a_required_type_without_a_token_gets_nothing_as_from_the_proxy(
    setup: Setup, shop_db: PgCluster
) -> None:
    """support-1 of the tokens file (no delegation token): its type requires one, so the
    proxy refuses every statement, and explain says so without asking the proxy."""
    plain = new_token(setup.tokens_file, "support-1")  # the file is read again
    before = snapshot(shop_db)
    async with connect(setup, plain) as client:
        read = await refused(client, "query", sql=ALL_ORDERS)
        delete = await refused(client, "query", sql="DELETE FROM orders WHERE id = 1")
        explained = await ok(client, "explain", sql=ALL_ORDERS)
    for text in (read, delete):
        assert "[28000]" in text and "needs a delegation token" in text, text
    assert (explained["decision"], explained["rule"]) == ("deny", "delegation")
    assert "needs a delegation token" in explained["reason"] and explained["plan"] is None
    assert snapshot(shop_db) == before


# ---------------------------------------------------------------- bad tokens: no effect


async def test_bad_tokens_are_refused_at_the_door_with_the_reason(
    setup: Setup, shop_db: PgCluster
) -> None:
    good = setup.token(["1"])
    header, claims, signature = good.split(".")
    payload = json.loads(jwt.utils.base64url_decode(claims))
    payload["principals"] = ["1", "2", "3", "4"]
    widened = ".".join(
        (header, jwt.utils.base64url_encode(json.dumps(payload).encode()).decode(), signature)
    )
    forger = SigningKey("EdDSA", ed25519.Ed25519PrivateKey.generate(), None)
    bad = {
        "expired": setup.token(["1"], now=time.time() - 3600, ttl=60),
        "signature": widened,
        "forged": mint(forger, agent="support-7", principals=["1", "2"], issuer=ISSUER),
        "unsigned": jwt.encode({**payload, "exp": int(time.time()) + 600}, None, algorithm="none"),
        "audience": setup.token(["1"], audience="someone-else"),
        "glob": setup.token(["1"], agent="support-*"),
        "off": setup.token(["1"], agent="analytics-9"),  # analytics: delegation off
    }
    before = snapshot(shop_db)
    said = {}
    for name, token in bad.items():
        reply = initialize(setup, token)
        assert reply.status_code == 401, (name, reply.text)
        assert reply.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
        said[name] = reply.json()["error_description"]
        assert token not in reply.text and token not in reply.headers["www-authenticate"]
    assert "expired at" in said["expired"]
    assert "signature does not verify" in said["signature"]
    assert "signature does not verify" in said["forged"]
    assert "alg 'none'" in said["unsigned"]
    assert "audience" in said["audience"]
    assert "a glob" in said["glob"]
    assert "does not take delegation tokens" in said["off"]
    assert snapshot(shop_db) == before
    for token in bad.values():
        assert token not in setup.log() and token not in setup.proxy.log()
    assert fingerprint(bad["expired"]) in setup.log()  # named by its fingerprint
    refusals = {
        dict(labels)["reason"]: value
        for (name, labels), value in setup.metrics().items()
        if name == "guardproxy_mcp_token_refusals_total"
    }
    assert refusals["expired"] >= 1 and refusals["signature"] >= 2
    assert {"algorithm", "audience", "agent", "issuer"} <= set(refusals)


async def test_a_revoked_token_passes_the_door_but_the_proxy_refuses_every_call(
    setup: Setup, shop_db: PgCluster
) -> None:
    token = setup.token(["1"], token_id="jti-mcp-revoke")
    try:
        async with connect(setup, token) as client:
            assert ids(await ok(client, "query", sql=ALL_ORDERS)) == [1, 2]
            with psycopg.connect(
                f"postgresql://admin@127.0.0.1:{setup.proxy.port}/guardproxy",
                password=PASSWORDS["admin"],
                autocommit=True,
            ) as admin:
                admin.execute("REVOKE TOKEN 'jti-mcp-revoke' REASON 'leaked'")
            deadline = time.monotonic() + 15
            while True:
                is_error, text, data = await call(client, "query", sql=ALL_ORDERS)
                if is_error or time.monotonic() > deadline:
                    break
                assert ids(data) == [1, 2]
                await anyio.sleep(0.2)
        assert is_error and "was revoked" in text, text
        assert token not in text
        with pytest.raises(psycopg.OperationalError, match="revoked"):
            direct_ids(setup, token)  # as the proxy answers a direct client
    finally:
        shop_db.psql(
            "DELETE FROM guardproxy.token_revocations WHERE value = 'jti-mcp-revoke'",
            dbname=SHOP_DB,
        )


async def test_an_mcp_session_belongs_to_the_token_that_opened_it(setup: Setup) -> None:
    first, second = setup.token(["1"]), setup.token(["2"])
    opened = initialize(setup, first)
    assert opened.status_code == 200, opened.text
    session = opened.headers["mcp-session-id"]
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
    stolen = httpx2.post(
        setup.url,
        json=listing,
        headers={
            "Accept": "application/json, text/event-stream",
            "Authorization": f"Bearer {second}",
            "Mcp-Session-Id": session,
            "Mcp-Protocol-Version": "2025-06-18",
        },
        timeout=30,
    )
    assert stolen.status_code == 404


async def test_calls_of_delegation_tokens_count_under_a_bounded_agent_label(setup: Setup) -> None:
    async with connect(setup, setup.token(["1"], agent="support-42")) as client:
        await ok(client, "query", sql=ALL_ORDERS)
    agents = {
        dict(labels)["agent"]
        for (name, labels), _ in setup.metrics().items()
        if name == "guardproxy_mcp_tool_calls_total" and dict(labels)["agent_type"] == "support"
    }
    assert "*" in agents and "support-42" not in agents and "support-7" not in agents
