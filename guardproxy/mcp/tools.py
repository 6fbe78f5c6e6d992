"""The MCP server of one agent type: tools ``query``, ``describe``, ``explain``, ``task``
and the resource ``guardproxy://policy``, described from that type's policy.

`build_server(gateway, policy)` returns an SDK `MCPServer` whose tools run through
`Gateway.call` (and so through the proxy). Arguments are checked by the SDK against
the schemas below (types, lengths, counts): a call that does not fit is a tool error
and nothing is sent.

* ``query(sql, params, task, step, reason, idempotency_key, max_rows)``: one
  statement, ``$1``, ``$2``... parameters; the bounded result (`results`).
* ``describe()``: the tables, columns, functions and operations this agent may use
  (`describe.describe`), read through the proxy as the agent.
* ``explain(sql, params, task, step)``: the policy decision, judged in-process by the
  same `Judge` the proxy uses, with the catalog read through the proxy; when allowed,
  the plan estimate of ``EXPLAIN (FORMAT JSON)`` run through the proxy (which judges
  it as the statement it explains). The statement itself never runs.
* ``task(task, step)``: the task and step of the following calls.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from ..analysis import Op
from ..delegation import binding
from ..delegation.errors import TokenError
from ..policy import SessionContext
from ..policy import tools as policy_tools
from ..policy.agent import AgentPolicy
from . import describe as words
from .gateway import Caller, Gateway
from .results import Bounds, ResultBuilder
from .statements import InputRefused, check_statement
from .wire import DatabaseError

MAX_SQL_CHARS = 100_000
MAX_PARAMS = 100
MAX_PARAM_CHARS = 100_000
MAX_CONTEXT_CHARS = 200
MAX_ROWS_ASKED = 100_000
NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"

ParamValue = Annotated[str, Field(max_length=MAX_PARAM_CHARS)] | int | float | bool | None
Sql = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_SQL_CHARS,
        description="One SQL statement. Parameters are written $1, $2, ...",
    ),
]
Params = Annotated[
    list[ParamValue] | None,
    Field(max_length=MAX_PARAMS, description="Values of $1, $2, ... in order (scalars)"),
]
ContextValue = Annotated[str | None, Field(max_length=MAX_CONTEXT_CHARS, pattern=NO_CONTROL)]
Task = Annotated[
    str | None,
    Field(
        max_length=MAX_CONTEXT_CHARS,
        pattern=NO_CONTROL,
        description="Task id for this call (default: the one set with the task tool)",
    ),
]
Step = Annotated[
    str | None,
    Field(
        max_length=MAX_CONTEXT_CHARS,
        pattern=NO_CONTROL,
        description="Step id within the task (default: the one set with the task tool)",
    ),
]

POLICY_URI = "guardproxy://policy"


def _query_description(policy: AgentPolicy, bounds: Bounds) -> str:
    return (
        "Run one SQL statement on the database through guardproxy, which judges it against "
        "your policy. "
        + words.capabilities(policy)
        + f" Results come as typed columns and JSON rows: at most {bounds.max_rows} rows, "
        f"{bounds.max_bytes} bytes and {bounds.max_cell_chars} characters per cell; every cut "
        "is listed in 'cuts'. Each call is its own transaction. A refusal comes back as an "
        "error with the rule and a HINT saying what is allowed: correct the statement and "
        "call again. Give task and step (or call the task tool first) so that your writes are "
        "recorded under your task and a retried write is not run twice."
    )


def _is_destructive(policy: AgentPolicy) -> bool:
    return any(rule.ops & {Op.UPDATE, Op.DELETE, Op.TRUNCATE} for rule in policy.tables)


def build_server(gateway: Gateway, policy: AgentPolicy) -> MCPServer:
    """The MCP server agents of `policy`'s type see (see the module docstring)."""
    bounds = gateway.config.bounds
    server: MCPServer = MCPServer(
        name="guardproxy",
        instructions=(
            "A Postgres database behind guardproxy. " + words.capabilities(policy) + " Call "
            "describe first to see the tables and columns you may use; explain shows what the "
            "policy would do with a statement without running it."
        ),
        log_level="WARNING",
    )

    @server.tool(
        description=_query_description(policy, bounds),
        annotations=ToolAnnotations(
            read_only_hint=policy.read_only,
            destructive_hint=_is_destructive(policy),
            idempotent_hint=False,
            open_world_hint=False,
        ),
    )
    async def query(
        sql: Sql,
        ctx: Context,
        params: Params = None,
        task: Task = None,
        step: Step = None,
        reason: Annotated[
            ContextValue, Field(description="Why (recorded with soft deletes and audit)")
        ] = None,
        idempotency_key: Annotated[
            ContextValue, Field(description="Key of this write: a retry with it runs once")
        ] = None,
        max_rows: Annotated[
            int | None,
            Field(ge=1, le=MAX_ROWS_ASKED, description="Show at most this many rows (capped)"),
        ] = None,
    ) -> CallToolResult:
        async def body(caller: Caller) -> dict[str, Any]:
            shape = check_statement(sql)
            call = gateway.call_context(
                caller,
                task,
                step,
                {"reason": reason or "", "idempotency_key": idempotency_key or ""},
            )
            rows = min(max_rows or bounds.max_rows, bounds.max_rows)
            builder = ResultBuilder(Bounds(rows, bounds.max_bytes, bounds.max_cell_chars))
            result = await gateway.client.run(
                call, sql, params or [], builder, cursor=shape is not None and shape.cursor
            )
            result["task"], result["step"] = gateway.task_of(caller, call), call.step
            return result

        return _answer(await gateway.call("query", ctx, body))

    @server.tool(
        description=(
            "The tables, columns (with types and comments), functions and operations you may "
            "use, the row filters and soft-delete rules that apply to you, your limits, and what "
            "is refused. " + words.capabilities(policy)
        ),
        annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False),
    )
    async def describe(ctx: Context) -> CallToolResult:
        async def body(caller: Caller) -> dict[str, Any]:
            rows, path = await _catalog_rows(gateway, caller)
            return words.describe(caller.policy, caller.agent_id, rows, path)

        return _answer(await gateway.call("describe", ctx, body))

    @server.tool(
        description=(
            "What guardproxy would do with a statement, without running it: allow, rewrite "
            "(to what) or deny (by which rule, with a hint), and when allowed the planner's "
            "estimate of its cost and rows."
        ),
        annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False),
    )
    async def explain(
        sql: Sql, ctx: Context, params: Params = None, task: Task = None, step: Step = None
    ) -> CallToolResult:
        async def body(caller: Caller) -> dict[str, Any]:
            return await _explain(gateway, caller, sql, params or [], task, step)

        return _answer(await gateway.call("explain", ctx, body))

    @server.tool(
        name="task",
        description=(
            "Open or switch the task and step that your following calls belong to: writes are "
            "recorded under them, task budgets count them, and a write retried in the same "
            "task and step runs once. An empty task ends it."
        ),
        annotations=ToolAnnotations(
            read_only_hint=True, idempotent_hint=True, open_world_hint=False
        ),
    )
    async def set_task(ctx: Context, task: Task = None, step: Step = None) -> CallToolResult:
        async def body(caller: Caller) -> dict[str, Any]:
            state = gateway.task_state(caller)
            decided = caller.presented.delegation.task if caller.presented else None
            if decided is not None and task not in (None, "", decided):
                raise InputRefused(
                    f"the task is {decided}, named by your delegation token: it cannot be "
                    f"switched to {task}. Give only a step, or ask for a token minted for "
                    "that task"
                )
            state.task = task or decided
            state.step = (step or None) if state.task else None
            scope = "this MCP session" if caller.session_key[1] else f"agent {caller.agent_id}"
            return {"task": state.task, "step": state.step, "applies_to": scope}

        return _answer(await gateway.call("task", ctx, body))

    @server.resource(
        POLICY_URI,
        name="policy",
        description=f"What agent type {policy.name} may do, in words",
        mime_type="text/markdown",
    )
    def policy_resource() -> str:
        return words.policy_text(policy)

    return server


def _answer(result: dict[str, Any]) -> CallToolResult:
    """Compact JSON text for the model (indentation costs tokens), the same as structured content."""
    text = json.dumps(result, ensure_ascii=False, default=str)
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=result)


async def _catalog_rows(gateway: Gateway, caller: Caller) -> tuple[list[Any], list[str]]:
    """The policy's tables as the agent sees them in the catalog, and its search path."""
    ctx = gateway.call_context(caller)
    names = words.table_names(caller.policy)
    rows = await gateway.client.fetch_all(ctx, words.COLUMNS_QUERY, [names])
    path_rows = await gateway.client.fetch_all(ctx, words.SEARCH_PATH_QUERY)
    path = list(path_rows[0][0]) if path_rows and path_rows[0][0] else ["public"]
    return rows, path


async def _explain(
    gateway: Gateway,
    caller: Caller,
    sql: str,
    params: list[Any],
    task: str | None,
    step: str | None,
) -> dict[str, Any]:
    shape = check_statement(sql)
    call = gateway.call_context(caller, task, step)
    missing = _missing_token(caller)
    if missing is not None:
        return missing
    rows, path = await _catalog_rows(gateway, caller)
    token = caller.presented
    session = SessionContext(
        agent_id=caller.agent_id,
        task=gateway.task_of(caller, call),
        step=call.step,
        principals=token.delegation.principals if token is not None else (),
    )
    decision = policy_tools.explain(
        gateway.policies,
        caller.agent_id,
        sql,
        words.catalog_of(rows, path),
        session,
        policy=caller.policy,
    )
    out: dict[str, Any] = {
        "decision": decision["decision"],
        "rule": decision["rule"],
        "reason": decision["reason"],
        "hint": decision["hint"] or None,
        "sql_sent": decision["sql"],
        "monitor_mode": decision["monitored"],
        "plan": None,
    }
    if decision["decision"] == "deny":
        out["plan_note"] = "denied: no plan"
    elif shape is None or not shape.plannable:
        out["plan_note"] = "only SELECT, INSERT, UPDATE, DELETE and MERGE have a plan"
    else:
        out["plan"], out["plan_note"] = await _plan(gateway, call, sql, params)
    return out


def _missing_token(caller: Caller) -> dict[str, Any] | None:
    """The proxy's answer to every statement of a ``delegation: required`` type without a
    token, as explain's decision (the judge alone does not know it)."""
    if caller.presented is not None:
        return None  # the proxy checks the token's expiry and revocation on every call
    try:
        binding.gate(caller.policy, None, None, 0.0)
    except TokenError as exc:
        return {
            "decision": "deny",
            "rule": "delegation",
            "reason": exc.message,
            "hint": exc.hint,
            "sql_sent": None,
            "monitor_mode": False,
            "plan": None,
            "plan_note": "denied: no plan",
        }
    return None


async def _plan(gateway: Gateway, call: Any, sql: str, params: list[Any]) -> tuple[Any, str]:
    """The planner's estimate, through the proxy; EXPLAIN without ANALYZE runs nothing."""
    try:
        rows = await gateway.client.fetch_all(call, "EXPLAIN (FORMAT JSON) " + sql, params)
    except DatabaseError as exc:
        return None, "the plan could not be had: " + exc.text()
    document = rows[0][0] if rows else None
    if isinstance(document, str):
        document = json.loads(document)
    if not isinstance(document, list) or not document:
        raise ToolError("EXPLAIN returned no plan")
    top = document[0].get("Plan", {})
    plan = {
        "node": top.get("Node Type"),
        "total_cost": top.get("Total Cost"),
        "rows": top.get("Plan Rows"),
        "tree": _tree(top, gateway.config.bounds.max_bytes),
    }
    return plan, "estimate of the planner; the statement was not run"


def _tree(plan: dict[str, Any], budget: int) -> Any:
    text = json.dumps(plan)
    if len(text) <= budget:
        return plan
    return text[:budget] + "… (plan cut)"
