"""The pure parts of the MCP front door: result bounds, SQL intake, policy in words,
tokens, settings, the startup context. No database, no sockets."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from pathlib import Path

import anyio
import pytest
from mcp.server.mcpserver.exceptions import ToolError

from guardproxy.mcp import config
from guardproxy.mcp.describe import capabilities, describe, policy_text
from guardproxy.mcp.gateway import Gateway, GatewayConfig
from guardproxy.mcp.metrics import McpMetrics
from guardproxy.mcp.results import Bounds, ResultBuilder, json_value
from guardproxy.mcp.run import Options, run_stdio
from guardproxy.mcp.statements import InputRefused, check_statement
from guardproxy.mcp.tokens import AnyOf, TokenFileVerifier, load_tokens, new_token, token_hash
from guardproxy.mcp.wire import CallContext
from guardproxy.policy import load_policy_set
from guardproxy.protocol.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
POLICIES = load_policy_set(ROOT / "policies")
DOC = (ROOT / "docs" / "mcp.md").read_text()

# ---------------------------------------------------------------- results


def test_values_become_json() -> None:
    assert json_value(Decimal("129.90")) == "129.90"
    assert json_value(float("nan")) == "nan" and json_value(1.5) == 1.5
    assert json_value(dt.datetime(2024, 1, 5, 9, tzinfo=dt.UTC)) == "2024-01-05T09:00:00+00:00"
    assert json_value(b"\x00\xff") == "\\x00ff"
    assert json_value(uuid.UUID(int=1)) == "00000000-0000-0000-0000-000000000001"
    assert json_value({"a": [Decimal("1.0"), None]}) == {"a": ["1.0", None]}
    assert json_value(dt.timedelta(hours=1)) == "1:00:00"


def fill(builder: ResultBuilder, rows: list[list[object]]) -> bool:
    """Adds rows until the builder wants no more; True when every row went in."""
    return all(builder.add(row) for row in rows)


def test_rows_past_the_bound_are_cut_and_said() -> None:
    builder = ResultBuilder(Bounds(max_rows=2))
    builder.set_columns([("g", "int4")])
    assert not fill(builder, [[1], [2], [3], [4]])
    result = builder.finish("SELECT", [], drained=False)
    assert result["rows"] == [[1], [2]] and result["complete"] is False
    assert result["cuts"] == [
        "only the first 2 rows are shown; the statement returned more (at most 2 rows per "
        "result: narrow the query, aggregate, or page with LIMIT / OFFSET)"
    ]


def test_a_drained_result_knows_its_total() -> None:
    builder = ResultBuilder(Bounds(max_rows=2))
    for row in ([1], [2], [3]):
        builder.add(row)
    result = builder.finish("UPDATE 3", [], drained=True)
    assert result["cuts"] == ["only the first 2 of 3 rows are shown (at most 2 rows per result)"]


def test_bytes_and_cells_are_bounded() -> None:
    builder = ResultBuilder(Bounds(max_rows=100, max_bytes=100, max_cell_chars=10))
    builder.set_columns([("body", "text"), ("doc", "jsonb")])
    assert builder.add(["x" * 20, {"k": "v"}])
    assert builder.add(["short", ["a" * 30]])
    assert not fill(builder, [["y" * 10, None]] * 10)
    result = builder.finish("SELECT", [], drained=False)
    assert result["rows"][0] == ["x" * 10 + "…", {"k": "v"}]
    assert result["rows"][1] == ["short", '["' + "a" * 8 + "…"]
    assert any("passed 100 bytes" in cut for cut in result["cuts"])
    assert any(
        "2 cell(s) were cut to 10 characters" in cut and "row 1 column 'body'" in cut
        for cut in result["cuts"]
    )


def test_the_cut_messages_of_the_docs() -> None:
    marker = "<!-- checked-by: tests/unit/test_mcp_units.py -->"
    block = DOC.split(f"and `complete` is false:\n\n{marker}\n```\n", 1)[1]
    lines = block.split("```", 1)[0].splitlines()
    rows = ResultBuilder(Bounds())
    fill(rows, [[n] for n in range(101)])
    cells = ResultBuilder(Bounds())
    cells.set_columns([("body", "text")])
    cells.add(["b" * 1001])
    assert rows.cuts(None) == [lines[0]]
    assert cells.cuts(None) == [lines[1]]


# ---------------------------------------------------------------- SQL intake


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("", "holds no statement"),
        ("-- only a comment", "holds no statement"),
        ("select 1; select 2", "holds 2 statements"),
        ("commit; drop table t", "holds 2 statements"),
        ("select $$a;b$$; select 1", "holds 2 statements"),
        ("BEGIN", "BEGIN is not used here"),
        ("rollback", "ROLLBACK is not used here"),
        ("savepoint s", "is not used here"),
        ("copy orders to stdout", "COPY is not available"),
        ("copy orders from program 'x'", "COPY is not available"),
    ],
)
def test_what_the_tools_refuse_before_sending(sql: str, message: str) -> None:
    with pytest.raises(InputRefused, match=message):
        check_statement(sql)


@pytest.mark.parametrize(
    ("sql", "cursor", "plannable"),
    [
        ("select 1", True, True),
        ("values (1)", True, True),
        ("table orders", True, True),
        ("select $$a;b$$", True, True),
        ("with d as (delete from t returning *) select * from d", False, True),
        ("select * into t2 from t", False, True),
        ("delete from t where id = 1", False, True),
        ("explain select 1", False, False),
        ("show search_path", False, False),
        ("set guard.task = 'x'", False, False),
    ],
)
def test_how_rows_are_read(sql: str, cursor: bool, plannable: bool) -> None:
    shape = check_statement(sql)
    assert shape is not None and (shape.cursor, shape.plannable) == (cursor, plannable)


def test_sql_that_does_not_parse_goes_to_the_proxy() -> None:
    assert check_statement("selec 1") is None


# ---------------------------------------------------------------- policy in words

CUSTOMERS = [
    ("public", "customers", name, pk, kind, nn, None, "the shop's customers")
    for name, pk, kind, nn in (
        ("id", 1, "bigint", True),
        ("name", None, "text", True),
        ("email", None, "text", True),
        ("created_at", None, "timestamp with time zone", True),
    )
]


def test_describe_lists_only_what_the_policy_allows() -> None:
    analytics = POLICIES.get("analytics")
    assert analytics is not None
    out = describe(analytics, "analytics-3", CUSTOMERS, ["public"])
    customers, orders = out["tables"]
    assert customers["comment"] == "the shop's customers"
    assert [c["name"] for c in customers["columns"]] == ["id", "name", "created_at"]
    assert orders["columns"].startswith("unknown")
    text = str(out) + capabilities(analytics) + policy_text(analytics)
    assert "email" not in text and "payments" not in text


def test_support_writes_in_words() -> None:
    support = POLICIES.get("support")
    assert support is not None
    text = capabilities(support)
    assert "update orders (only fulfillment_status)" in text
    assert "deletes are soft" in text and "append-only" in text and "runs once" in text
    words = policy_text(support)
    assert "a statement changing more than 100 rows is rolled back" in words
    assert "max_writes_per_task: 500" in words


# ---------------------------------------------------------------- tokens


async def test_tokens_are_kept_as_hashes_and_verified(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    token = new_token(path, "support-1")
    assert token not in path.read_text()
    assert load_tokens(path) == {token_hash(token): "support-1"}
    verifier = TokenFileVerifier(path)
    found = await verifier.verify_token(token)
    assert found is not None and found.client_id == "support-1" and found.token != token
    assert await verifier.verify_token(token + "x") is None
    later = new_token(path, "analytics-1")  # the file is read again when it changes
    assert (await AnyOf([verifier]).verify_token(later)).client_id == "analytics-1"
    path.write_text("broken line\n")
    assert (await verifier.verify_token(later)).client_id == "analytics-1"


@pytest.mark.parametrize(
    "line", ["agent", "agent:md5:abc", "agent:sha256:xyz", ":sha256:" + "0" * 64]
)
def test_a_bad_tokens_file_names_its_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n{line}\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_tokens(path)


def test_agent_ids_of_tokens_are_checked(tmp_path: Path) -> None:
    for bad in ("", "a:b", "a b"):
        with pytest.raises(ConfigError):
            new_token(tmp_path / "tokens", bad)


# ---------------------------------------------------------------- settings


def test_the_proxy_url_names_no_user() -> None:
    assert config.check_proxy_url("postgresql://127.0.0.1:6432/app")
    for url in ("postgresql://a@h/app", "postgresql://:pw@h/app", "http://h/app", "h:6432"):
        with pytest.raises(ConfigError):
            config.check_proxy_url(url)


def test_the_http_endpoint_binds_loopback_unless_told(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    config.check_http(config.HttpSettings(tokens_file=tokens))
    with pytest.raises(ConfigError, match="not a loopback address and there is no TLS"):
        config.check_http(config.HttpSettings(host="0.0.0.0", tokens_file=tokens))
    config.check_http(
        config.HttpSettings(host="0.0.0.0", tokens_file=tokens, allow_insecure_bind=True)
    )
    config.check_http(
        config.HttpSettings(
            host="10.0.0.5", tokens_file=tokens, tls_cert_file=tokens, tls_key_file=tokens
        )
    )
    with pytest.raises(ConfigError, match="go together"):
        config.check_http(config.HttpSettings(tokens_file=tokens, tls_cert_file=tokens))
    with pytest.raises(ConfigError, match="needs --tokens-file"):
        config.check_http(config.HttpSettings())


def test_host_and_origin_allow_lists() -> None:
    local = config.transport_security(config.HttpSettings())
    assert "127.0.0.1:*" in local.allowed_hosts and "http://localhost:*" in local.allowed_origins
    public = config.transport_security(
        config.HttpSettings(
            host="10.0.0.5", allowed_hosts=("mcp.example.com:443",), allowed_origins=("https://x",)
        )
    )
    assert {"10.0.0.5:*", "mcp.example.com:443"} <= set(public.allowed_hosts)
    assert "https://x" in public.allowed_origins


def test_a_stdio_server_is_refused_for_an_agent_without_a_policy() -> None:
    options = Options(
        "postgresql://127.0.0.1:6432/app",
        ROOT / "policies",
        GatewayConfig("postgresql://127.0.0.1:6432/app"),
    )
    with pytest.raises(ConfigError, match="matches no agent type"):
        run_stdio(options, "nobody-1")


# ---------------------------------------------------------------- startup context


def test_context_travels_as_escaped_startup_options() -> None:
    ctx = CallContext(
        "support-1",
        task="T 1",
        step="a\\b",
        tags={"reason": "dup order"},
        token="eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJzdXBwb3J0LTEifQ.c2ln",
    )
    assert ctx.options() == (
        "-c guard.task=T\\ 1 -c guard.step=a\\\\b -c guard.reason=dup\\ order "
        "-c guard.token=eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJzdXBwb3J0LTEifQ.c2ln"
    )
    assert "eyJ" not in repr(ctx)  # a delegation token is never shown
    assert CallContext("a").options() == ""


# ---------------------------------------------------------------- the gateway


def gateway(**config: float) -> Gateway:
    settings = GatewayConfig("postgresql://127.0.0.1:6432/app", **config)
    return Gateway(settings, POLICIES, McpMetrics("stdio"), stdio_agent="analytics-1")


async def test_a_call_past_its_timeout_is_stopped_and_said() -> None:
    async def slow(_caller: object) -> dict[str, object]:
        await anyio.sleep(10)
        return {}

    with pytest.raises(ToolError, match=r"ran longer than 0\.2s and was stopped"):
        await gateway(call_timeout=0.2).call("query", None, slow)


async def test_calls_past_the_agent_limit_are_refused_and_counted() -> None:
    gw = gateway(max_calls_per_agent=1)
    release = anyio.Event()
    refusals: list[str] = []

    async def held(_caller: object) -> dict[str, object]:
        await release.wait()
        return {"complete": True}

    async def second() -> None:
        with pytest.raises(ToolError) as exc:
            await gw.call("query", None, held)
        refusals.append(str(exc.value))
        release.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(gw.call, "query", None, held)
        await anyio.sleep(0.05)
        tg.start_soon(second)
    assert refusals == [
        "agent analytics-1 already has 1 calls running (the limit per agent); wait for one "
        "to finish, then call again. Nothing was run."
    ]
    sample = gw.metrics.registry.get_sample_value(
        "guardproxy_mcp_tool_calls_total",
        {"agent_type": "analytics", "agent": "analytics-1", "transport": "stdio",
         "tool": "query", "outcome": "refused"},
    )  # fmt: skip
    assert sample == 1.0


async def test_refused_input_is_a_tool_error_with_its_reason() -> None:
    async def body(_caller: object) -> dict[str, object]:
        check_statement("select 1; select 2")
        return {}

    with pytest.raises(ToolError, match="send one statement per call"):
        await gateway().call("query", None, body)


def test_a_call_names_its_own_task_and_step() -> None:
    gw = gateway()
    caller = gw.caller(None)
    state = gw.task_state(caller)
    state.task, state.step = "T-1", "2"
    assert (gw.call_context(caller).task, gw.call_context(caller).step) == ("T-1", "2")
    assert gw.call_context(caller, step="3").step == "3"
    other = gw.call_context(caller, task="T-9")
    assert (other.task, other.step) == ("T-9", None)
