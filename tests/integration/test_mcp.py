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

import anyio
import pytest
import shop
from mcp import Client, StdioServerParameters
from shop import POLICIES, ROOT, SECRETS, SHOP_DB, ShopProxy, launch_proxy, snapshot

pytestmark = pytest.mark.timeout(90)

shop_db = shop.shop_db
shop_baseline = shop.shop_baseline


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


async def test_analytics_lists_only_what_it_may_see(proxy) -> None:
    async with stdio(proxy, "analytics-1") as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert set(tools) == {"query", "describe", "explain", "task"}
        query_text = tools["query"].description or ""
        assert "read customers" in query_text and "read orders" in query_text
        assert "read-only" in query_text
        assert tools["query"].annotations and tools["query"].annotations.read_only_hint is True
        described = await ok(client, "describe")
        policy = await client.read_resource("guardproxy://policy")
        policy_text = "".join(getattr(c, "text", "") for c in policy.contents)
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
    for hidden in ("payments", "email", "card_last4", "order_state_log"):
        assert hidden not in seen, f"analytics is shown {hidden!r}"


async def test_support_sees_its_writes_described(proxy) -> None:
    async with stdio(proxy, "support-1") as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        described = await ok(client, "describe")
    text = tools["query"].description or ""
    assert "deletes are soft" in text and "runs once" in text
    assert tools["query"].annotations and tools["query"].annotations.destructive_hint is True
    orders = next(t for t in described["tables"] if t["table"] == "orders")
    status = next(c for c in orders["columns"] if c["name"] == "fulfillment_status")
    assert status["write"] == ["update"]
    deleted_at = next(c for c in orders["columns"] if c["name"] == "deleted_at")
    assert "write" not in deleted_at  # only guardproxy's rewrite sets it
    assert any("marks rows deleted" in rule for rule in orders["rules"])
    assert any("more than 100 rows" in rule for rule in orders["rules"])
    assert "payments" not in json.dumps(described)


# ---------------------------------------------------------------- reads and writes


async def test_reads_come_back_as_typed_columns_and_json_rows(proxy, shop_db) -> None:
    async with stdio(proxy, "analytics-1") as client:
        data = await ok(
            client, "query", sql="SELECT id, name, created_at FROM customers ORDER BY id"
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
        empty = await ok(client, "query", sql="SELECT id FROM orders WHERE false")
    assert data["columns"] == [
        {"name": "id", "type": "int8"},
        {"name": "name", "type": "text"},
        {"name": "created_at", "type": "timestamptz"},
    ]
    expected = shop_db.psql(
        "select json_agg(json_build_array(id, name) order by id) from customers", dbname=SHOP_DB
    )
    assert [row[:2] for row in data["rows"]] == json.loads(expected)
    assert data["rows"][0][2].startswith("2024-01-05T09:00:00")
    assert data["complete"] is True and data["cuts"] == []
    assert one["rows"] == [[3, "packed"]] == same["rows"]
    assert empty["rows"] == [] and empty["columns"] == [{"name": "id", "type": "int8"}]


async def test_a_delete_as_analytics_is_refused_with_the_policy_hint(proxy, shop_db) -> None:
    before = snapshot(shop_db)
    async with stdio(proxy, "analytics-1") as client:
        text = await refused(client, "query", sql="DELETE FROM orders WHERE id = 6")
    assert "ERROR [42501]: analytics may not delete from orders" in text
    assert "(policy analytics, statements)" in text
    assert "HINT: analytics may run: read statements" in text
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


# ---------------------------------------------------------------- explain


async def test_explain_gives_the_decision_and_the_plan_without_running(proxy, shop_db) -> None:
    before = snapshot(shop_db)
    async with stdio(proxy, "support-1") as client:
        soft = await ok(client, "explain", sql="DELETE FROM orders WHERE id = 6")
        denied = await ok(client, "explain", sql="SELECT amount FROM payments")
        analyze = await ok(client, "explain", sql="EXPLAIN ANALYZE DELETE FROM orders")
    assert snapshot(shop_db) == before  # nothing ran
    assert soft["decision"] == "rewrite" and soft["rule"] == "tables.orders.soft_delete"
    assert soft["sql_sent"].startswith("WITH guardproxy_deleted AS (UPDATE orders SET deleted_at")
    assert soft["plan"]["total_cost"] > 0 and soft["plan"]["rows"] >= 1
    assert "not run" in soft["plan_note"]
    assert denied["decision"] == "deny" and denied["rule"] == "tables"
    assert "payments" in denied["reason"] and denied["hint"] and denied["plan"] is None
    assert analyze["decision"] == "deny" and analyze["plan"] is None


# ---------------------------------------------------------------- bypass classes

BYPASSES = {
    "analytics-1": [
        ("select 1; delete from orders", "one statement per call"),
        ("commit; delete from orders where id = 1", "one statement per call"),
        ("COMMIT", "COMMIT is not used here"),
        ("begin read write", "BEGIN is not used here"),
        ("set default_transaction_read_only = off", "ERROR [42501]"),
        ("select set_config('default_transaction_read_only', 'off', false)", "ERROR [42501]"),
        ("with d as (delete from orders where id = 6 returning id) select * from d", "42501"),
        ("explain analyze delete from orders where id = 6", "ERROR [42501]"),
        ("select pg_read_file('/etc/passwd')", "pg_read_file"),
        ("select query_to_xml('select card_last4 from payments', true, false, '')", "query_to_xml"),
        ("select lo_import('/etc/passwd')", "lo_import"),
    ],
    "support-1": [
        ("commit; drop table payments", "one statement per call"),
        ("update orders set fulfillment_status = 'x' where id = 3; delete from orders", "one"),
        ("with d as (delete from orders where id = 5 returning id) select * from d", "42501"),
        (
            "with u as (update orders set fulfillment_status = 'cancelled' where id = 4 "
            "returning id) select * from u",
            "42501",
        ),  # fmt: skip
        ("select nextval('orders_id_seq')", "nextval"),
        ("select pg_sleep(0.1)", "pg_sleep"),
        ("select pg_terminate_backend(pid) from pg_stat_activity", "42501"),
        ("do $$ begin delete from orders; end $$", "ERROR [42501]"),
        ("delete from orders", "require_where"),
    ],
}


@pytest.mark.parametrize("agent", sorted(BYPASSES))
async def test_bypass_classes_as_tool_calls_change_nothing(proxy, shop_db, agent) -> None:
    baseline = snapshot(shop_db)
    async with stdio(proxy, agent) as client:
        for sql, expected in BYPASSES[agent]:
            text = await refused(client, "query", sql=sql)
            assert expected in text, f"{sql!r}: {text}"
            assert snapshot(shop_db) == baseline, f"{sql!r} changed the database"
            for secret in SECRETS:
                assert secret not in text
            # the agent can go on after every refusal
            assert (await ok(client, "query", sql="SELECT count(*) AS n FROM orders"))["rows"]


# ---------------------------------------------------------------- bad input and bounds


async def test_bad_arguments_are_tool_errors_and_run_nothing(proxy, shop_db) -> None:
    before = snapshot(shop_db)
    async with stdio(proxy, "support-1") as client:
        unknown = await client.call_tool("drop_everything", {"sql": "drop table orders"})
        not_text = await refused(client, "query", sql=5)
        a_list = await refused(client, "query", sql=["delete from orders where id = 1"])
        huge = await refused(client, "query", sql="select 1 " + "-" * 100_001)
        many = await refused(client, "query", sql="select $1", params=list(range(101)))
        nested = await refused(client, "query", sql="select $1", params=[{"a": 1}])
        control = await refused(client, "task", task="T\n1")
        empty = await refused(client, "query", sql="-- nothing")
        syntax = await refused(client, "query", sql="selec 1")
        copy = await refused(client, "query", sql="copy orders to stdout")
    assert unknown.is_error and "Unknown tool: drop_everything" in unknown.content[0].text  # type: ignore[union-attr]
    assert "valid string" in not_text and "valid string" in a_list
    assert "at most 100000 characters" in huge
    assert "at most 100 items" in many
    assert "params.0" in nested
    assert "pattern" in control
    assert "no statement" in empty
    assert "ERROR [42601]" in syntax and "HINT: fix the SQL syntax" in syntax
    assert "COPY is not available" in copy
    assert snapshot(shop_db) == before


async def test_too_large_results_are_cut_and_every_cut_is_said(proxy) -> None:
    bounds = ("--max-rows", "3", "--max-bytes", "2048", "--max-cell-chars", "40")
    async with stdio(proxy, "support-1", *bounds) as client:
        rows = await ok(client, "query", sql="SELECT g FROM generate_series(1, 1000000) g")
        fewer = await ok(client, "query", sql="SELECT id FROM orders ORDER BY id", max_rows=2)
        cell = await ok(client, "query", sql="SELECT repeat('x', 100) AS long, 'short' AS s")
        wide = await ok(
            client, "query", sql="SELECT repeat('y', 39) FROM generate_series(1, 3) g, orders"
        )
        written = await ok(
            client,
            "query",
            sql="UPDATE orders SET fulfillment_status = fulfillment_status WHERE id < 6 RETURNING id",
        )
    assert rows["rows"] == [[1], [2], [3]] and rows["complete"] is False
    assert rows["cuts"][0].startswith(
        "only the first 3 rows are shown; the statement returned more"
    )
    assert fewer["rows"] == [[1], [2]] and "first 2 rows" in fewer["cuts"][0]
    assert cell["rows"][0][0] == "x" * 40 + "…" and cell["rows"][0][1] == "short"
    assert "1 cell(s) were cut to 40 characters" in cell["cuts"][0]
    assert "row 1 column 'long'" in cell["cuts"][0]
    assert wide["complete"] is False and len(wide["rows"]) == 3
    assert written["command"] == "UPDATE 5" and len(written["rows"]) == 3
    assert written["cuts"] == ["only the first 3 of 5 rows are shown (at most 3 rows per result)"]


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
    shop_db, tmp_path, shop_baseline
) -> None:
    auth = tmp_path / "auth"
    out = subprocess.run(
        [sys.executable, "-m", "guardproxy", "passwd", "support-3", "--auth-file", str(auth),
         "--password-stdin"],
        input="s3cret\n", capture_output=True, text=True, timeout=30, cwd=ROOT, check=True,
    )  # fmt: skip
    assert out.returncode == 0
    with launch_proxy(
        shop_db, tmp_path / "scram.log", auth_mode="scram", auth_file=str(auth)
    ) as scram:
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"127.0.0.1:{scram.port}:{SHOP_DB}:support-3:s3cret\n")
        passfile.chmod(0o600)
        async with stdio(scram, "support-3", env={"PGPASSFILE": str(passfile)}) as client:
            who = await ok(
                client,
                "query",
                sql="SELECT current_setting('application_name') AS app",
            )
        async with stdio(scram, "support-3", env={"PGPASSFILE": str(tmp_path / "none")}) as c:
            text = await refused(c, "query", sql="SELECT 1")
    assert who["rows"] == [["support-3/guardproxy-mcp"]]
    assert "cannot open a session of support-3 at guardproxy" in text
    assert "password" in text


async def test_a_stdio_server_refuses_to_start_for_an_agent_without_a_policy(proxy) -> None:
    out = await anyio.run_process(
        [sys.executable, "-m", "guardproxy", "mcp", "stdio", "--agent", "nobody-1",
         "--policies", str(POLICIES)],
        check=False, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 2
    assert b"matches no agent type" in out.stderr
    assert out.stdout == b""


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
