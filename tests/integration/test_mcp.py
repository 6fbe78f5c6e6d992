"""`guardproxy mcp stdio` with the MCP SDK's own client, against a real proxy and Postgres.

The shop database and the example policies (tests/integration/shop.py); each MCP
server is a subprocess started by the SDK's stdio client, as an agent runtime starts
it. Every security check looks at the effect: the shop's rows and objects
(`shop.snapshot`), the audit log, what the agent was shown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import shop
from mcp import Client, StdioServerParameters
from shop import POLICIES, ROOT, SECRETS, SHOP_DB, ShopProxy, launch_proxy, snapshot

from guardproxy.mcp.results import Bounds, ResultBuilder
from guardproxy.mcp.wire import CallContext, ProxyClient, ProxyUnavailable
from guardproxy.protocol.scram import write_verifier

pytestmark = pytest.mark.timeout(90)

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline
DOC = ROOT / "docs" / "mcp.md"


@pytest.fixture(scope="module")
def proxy(shop_db, tmp_path_factory) -> Iterator[ShopProxy]:
    with launch_proxy(shop_db, tmp_path_factory.mktemp("mcp") / "guardproxy.log") as handle:
        yield handle


@pytest.fixture(autouse=True)
def _each_test(request, proxy, shop_db, shop_baseline) -> Iterator[None]:
    since = len(proxy.log())
    yield
    shop.dump_log_on_failure(request, proxy, since)
    if snapshot(shop_db) != shop_baseline:
        shop.restore_shop(shop_db)


def stdio(proxy: ShopProxy, agent: str, *extra: str, env: dict[str, str] | None = None) -> Client:
    """An SDK client that starts `guardproxy mcp stdio --agent AGENT` in front of `proxy`."""
    args = ["-m", "guardproxy", "mcp", "stdio", "--agent", agent]
    args += ["--proxy", f"postgresql://127.0.0.1:{proxy.port}/{SHOP_DB}"]
    args += ["--policies", str(POLICIES), *extra]
    params = StdioServerParameters(
        command=sys.executable, args=args, env={**os.environ, **(env or {})}, cwd=str(ROOT)
    )
    return Client(params, read_timeout_seconds=30)


async def call(client: Client, tool: str, **arguments: Any) -> tuple[bool, str, Any]:
    """(is_error, text, structured content) of one tool call."""
    result = await client.call_tool(tool, arguments)
    text = "".join(getattr(block, "text", "") for block in result.content)
    return bool(result.is_error), text, result.structured_content


async def ok(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    is_error, text, data = await call(client, tool, **arguments)
    assert not is_error, text
    assert isinstance(data, dict) and json.loads(text) == data
    return data


async def refused(client: Client, tool: str, **arguments: Any) -> str:
    is_error, text, _ = await call(client, tool, **arguments)
    assert is_error, f"expected a tool error, got {text}"
    return text


def audit_rows(pg, where: str, expect: int, timeout: float = 10.0) -> list[str]:
    """Audit events matching `where`, once at least `expect` are there (written in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        out = pg.psql(
            "select decision || '|' || coalesce(task, '') || '|' || coalesce(step, '') || '|' "
            f"|| coalesce(rule, '') from guardproxy.audit_events where {where} order by id",
            dbname=SHOP_DB,
        )
        rows = [line for line in out.splitlines() if line]
        if len(rows) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


# ---------------------------------------------------------------- what an agent sees


def doc_blocks(language: str) -> list[str]:
    """The fenced code blocks of docs/mcp.md whose fence names `language` ("" for none)."""
    blocks: list[str] = []
    fence: str | None = None
    lines: list[str] = []
    for line in DOC.read_text().splitlines():
        if line.startswith("```") and fence is None:
            fence, lines = line[3:].strip(), []
        elif line.startswith("```"):
            if fence == language:
                blocks.append("\n".join(lines) + "\n")
            fence = None
        elif fence is not None:
            lines.append(line)
    return blocks


def from_doc_config(proxy: ShopProxy) -> Client:
    """The stdio configuration of docs/mcp.md, pointed at this test's proxy and policies."""
    config = json.loads(doc_blocks("json")[0])["mcpServers"]["shop-db"]
    args = [
        arg.replace("127.0.0.1:6432/app", f"127.0.0.1:{proxy.port}/{SHOP_DB}").replace(
            "/etc/guardproxy/policies", str(POLICIES)
        )
        for arg in config["args"]
    ]
    command = str(Path(sys.executable).parent / config["command"])
    params = StdioServerParameters(
        command=command, args=args, env={**os.environ, **config["env"]}, cwd=str(ROOT)
    )
    return Client(params, read_timeout_seconds=30)


async def test_analytics_lists_only_what_it_may_see(proxy) -> None:
    async with from_doc_config(proxy) as client:  # analytics-7, registered as docs/mcp.md says
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        described = await ok(client, "describe")
        policy = await client.read_resource("guardproxy://policy")
        policy_text = "".join(getattr(c, "text", "") for c in policy.contents)
    assert set(tools) == {"query", "describe", "explain", "task"}
    query_text = tools["query"].description or ""
    assert "read customers" in query_text and "read orders" in query_text
    assert "read-only" in query_text
    assert tools["query"].annotations and tools["query"].annotations.read_only_hint is True
    assert described["agent"] == "analytics-7" and described["agent_type"] == "analytics"
    assert [t["table"] for t in described["tables"]] == ["customers", "orders"]
    customers = described["tables"][0]
    assert [c["name"] for c in customers["columns"]] == ["id", "name", "created_at"]
    assert customers["columns"][0] == {
        "name": "id",
        "type": "bigint",
        "primary_key": True,
        "not_null": True,
        "read": True,
    }
    assert any("SELECT *" in rule for rule in customers["rules"])
    assert described["limits"]["max_rows_returned"] == 1000
    seen = json.dumps([t.model_dump() for t in tools.values()]) + json.dumps(described)
    seen += policy_text
    for hidden in ("payments", "email", "card_last4", "order_state_log", "amount"):
        assert hidden not in seen, f"analytics is shown {hidden!r}"


# ---------------------------------------------------------------- reads and writes


async def test_analytics_reads_and_a_delete_is_refused_with_the_policy_hint(proxy, shop_db) -> None:
    before = snapshot(shop_db)
    async with stdio(proxy, "analytics-1") as client:
        data = await ok(
            client,
            "query",
            sql="SELECT id, name FROM customers ORDER BY id LIMIT 2",
            task="report-7",
        )
        one = await ok(
            client,
            "query",
            sql="SELECT id, fulfillment_status FROM orders WHERE id = $1",
            params=["3"],
        )
        same = await ok(
            client,
            "query",
            sql="SELECT id, fulfillment_status FROM orders WHERE id = $1",
            params=[3],
        )
        stamp = await ok(client, "query", sql="SELECT created_at FROM customers WHERE id = 1")
        empty = await ok(client, "query", sql="SELECT id FROM orders WHERE false")
        text = await refused(client, "query", sql="DELETE FROM orders WHERE id = 6")
    # the result and the refusal are the ones docs/mcp.md shows
    assert data == json.loads(doc_blocks("json")[2])
    assert text == "Error executing tool query: " + doc_blocks("")[1].strip()
    assert one["rows"] == [[3, "packed"]] == same["rows"]
    assert stamp["columns"] == [{"name": "created_at", "type": "timestamptz"}]
    assert stamp["rows"][0][0].startswith("2024-01-05T09:00:00")
    assert empty["rows"] == [] and empty["columns"] == [{"name": "id", "type": "int8"}]
    assert snapshot(shop_db) == before
    rows = audit_rows(shop_db, "agent_id = 'analytics-1' and decision = 'denied'", 1)
    assert "denied|||statements" in rows


async def test_a_support_delete_is_soft_and_audited(proxy, shop_db) -> None:
    total = shop_db.psql("select count(*) from orders", dbname=SHOP_DB)
    async with stdio(proxy, "support-1") as client:
        opened = await ok(client, "task", task="mcp-refund-1", step="2")
        deleted = await ok(
            client, "query", sql="DELETE FROM orders WHERE id = $1", params=[6], reason="duplicate"
        )
        after = await ok(client, "query", sql="SELECT count(*) AS n FROM orders WHERE id = 6")
    assert opened == {"task": "mcp-refund-1", "step": "2", "applies_to": "agent support-1"}
    assert deleted["command"] == "DELETE 1"
    assert deleted["task"] == "mcp-refund-1" and deleted["step"] == "2"
    assert after["rows"] == [[0]]  # support no longer sees it
    assert shop_db.psql("select count(*) from orders", dbname=SHOP_DB) == total  # still there
    assert (
        shop_db.psql(
            "select deleted_by || '|' || delete_reason from orders where id = 6 "
            "and deleted_at is not null",
            dbname=SHOP_DB,
        )
        == "support-1|duplicate"
    )
    assert (
        shop_db.psql(
            "select agent_id || '|' || task || '|' || step || '|' || reason || '|' || "
            "(primary_key->>'id') from guardproxy.deleted_rows",
            dbname=SHOP_DB,
        )
        == "support-1|mcp-refund-1|2|duplicate|6"
    )
    rows = audit_rows(shop_db, "agent_id = 'support-1' and task = 'mcp-refund-1'", 1)
    assert rows[0].startswith("rewritten|mcp-refund-1|2|")


async def test_a_retried_write_with_the_same_task_and_step_replays(proxy, shop_db) -> None:
    insert = (
        "INSERT INTO order_state_log (order_id, previous_status, new_status, changed_by) "
        "VALUES ($1, 'pending', 'packed', 'support-1') RETURNING id"
    )
    async with stdio(proxy, "support-1") as client:
        first = await ok(client, "query", sql=insert, params=[4], task="mcp-retry", step="1")
        retry = await ok(client, "query", sql=insert, params=[4], task="mcp-retry", step="1")
        next_step = await ok(client, "query", sql=insert, params=[4], task="mcp-retry", step="2")
    assert first["command"] == retry["command"] == "INSERT 0 1"
    assert retry["rows"] == first["rows"]
    assert not first["notices"]
    assert any("replayed" in notice for notice in retry["notices"]), retry
    assert next_step["rows"] != first["rows"]  # another step is another write
    count = shop_db.psql(
        "select count(*) from order_state_log where order_id = 4 and changed_by = 'support-1'",
        dbname=SHOP_DB,
    )
    assert count == "2"
    assert "replayed|mcp-retry|1|idempotency" in audit_rows(
        shop_db, "task = 'mcp-retry' and decision = 'replayed'", 1
    )


# ---------------------------------------------------------------- bypass classes

BYPASSES = [
    ("select 1; delete from orders", "one statement per call"),
    ("commit; delete from orders where id = 1", "one statement per call"),
    ("COMMIT", "COMMIT is not used here"),
    ("begin read write", "BEGIN is not used here"),
    ("select set_config('default_transaction_read_only', 'off', false)", "ERROR [42501]"),
    ("with d as (delete from orders where id = 6 returning id) select * from d", "42501"),
    ("select pg_read_file('/etc/passwd')", "pg_read_file"),
    ("select query_to_xml('select card_last4 from payments', true, false, '')", "query_to_xml"),
]


async def test_bypass_classes_as_stdio_tool_calls_change_nothing(proxy, shop_db) -> None:
    """More of them, for every example agent type, over HTTP in test_mcp_http.py."""
    baseline = snapshot(shop_db)
    async with stdio(proxy, "analytics-1") as client:
        for sql, expected in BYPASSES:
            text = await refused(client, "query", sql=sql)
            assert expected in text, f"{sql!r}: {text}"
            assert snapshot(shop_db) == baseline, f"{sql!r} changed the database"
            for secret in SECRETS:
                assert secret not in text
        # the agent can go on after the refusals
        assert (await ok(client, "query", sql="SELECT count(*) AS n FROM orders"))["rows"]


# ---------------------------------------------------------------- malformed JSON-RPC


def _exchange(args: list[str], messages: list[str], last_id: int) -> dict[Any, Any]:
    """Writes `messages` to a stdio server, reads replies until the one with `last_id`."""
    with subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("\n".join(messages) + "\n")
        proc.stdin.flush()
        replies: dict[Any, Any] = {}
        while last_id not in replies:
            line = proc.stdout.readline()  # bounded by the test's timeout
            assert line, f"the server closed stdout; replies so far: {replies}"
            reply = json.loads(line)
            replies[reply.get("id")] = reply
        proc.stdin.close()
        proc.wait(15)
    return replies


def test_malformed_json_rpc_runs_nothing_and_the_server_goes_on(proxy, shop_db) -> None:
    """A line that is not JSON-RPC is dropped by the SDK's stdio transport (there is no
    id to answer); a request with bad params gets a JSON-RPC error; the server goes on."""
    before = snapshot(shop_db)
    args = [sys.executable, "-m", "guardproxy", "mcp", "stdio", "--agent", "support-1"]
    args += ["--proxy", f"postgresql://127.0.0.1:{proxy.port}/{SHOP_DB}"]
    args += ["--policies", str(POLICIES)]
    init = {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"},
    }
    delete = {"name": "query", "arguments": {"sql": "delete from orders where id = 6"}}
    messages = [
        '{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "query", "argu',
        "[1, 2, 3]",
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}),
        json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": "not an object"}),
        json.dumps({"jsonrpc": "2.0", "id": 3, "method": "no/such/method", "params": {}}),
        json.dumps({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": 5}}),
        json.dumps({"jsonrpc": "1.0", "id": 5, "method": "tools/call", "params": delete}),
        json.dumps({"jsonrpc": "2.0", "id": 6, "method": "tools/list", "params": {}}),
    ]
    replies = _exchange(args, messages, last_id=6)
    assert set(replies) == {1, 3, 4, 6}, replies  # nothing for what is not JSON-RPC 2.0
    assert replies[1]["result"]["serverInfo"]["name"] == "guardproxy"
    assert replies[3]["error"]["code"] == -32601
    assert replies[4]["error"]["code"] == -32602
    assert {tool["name"] for tool in replies[6]["result"]["tools"]} == {
        "query",
        "describe",
        "explain",
        "task",
    }
    assert snapshot(shop_db) == before


# ---------------------------------------------------------------- credentials and identity


async def test_the_session_names_itself_and_a_password_comes_from_libpq(
    shop_db, tmp_path, monkeypatch
) -> None:
    """What the MCP server does for every call, here in-process: log in to the proxy
    as the agent, with the password libpq finds for it (a password file)."""
    auth = tmp_path / "auth"
    write_verifier(auth, "support-3", "s3cret")
    settings = {"auth_mode": "scram", "auth_file": str(auth)}
    with launch_proxy(shop_db, tmp_path / "scram.log", **settings) as scram:
        client = ProxyClient(f"postgresql://127.0.0.1:{scram.port}/{SHOP_DB}")
        sql = "SELECT current_setting('application_name') AS app, current_user AS role"
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"127.0.0.1:{scram.port}:{SHOP_DB}:support-3:s3cret\n")
        passfile.chmod(0o600)
        monkeypatch.setenv("PGPASSFILE", str(passfile))
        who = await client.run(CallContext("support-3"), sql, [], ResultBuilder(Bounds()), True)
        monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
        with pytest.raises(ProxyUnavailable) as refusal:
            await client.run(CallContext("support-3"), sql, [], ResultBuilder(Bounds()), True)
    assert who["rows"] == [["support-3/guardproxy-mcp", "guard_support"]]
    assert "cannot open a session of support-3 at guardproxy" in str(refusal.value)
    assert "password" in str(refusal.value)


# ---------------------------------------------------------------- the demo


def test_the_demo_has_an_mcp_section(proxy, shop_db) -> None:
    from guardproxy import demo

    lines: list[str] = []
    demo.play_mcp(proxy.port, SHOP_DB, Path(POLICIES), lines.append)
    text = "\n".join(lines)
    assert "== MCP" in text
    assert "describe              -> tables customers, orders" in text
    assert "delete an order       -> refused [42501]" in text
    assert "delete order 5        -> DELETE 1" in text
    assert "stacked statements    -> refused: send one statement per call" in text
