"""The runtime behind the MCP tools: who calls, under which task, how many at once.

One `Gateway` per ``guardproxy mcp`` process, shared by the per-agent-type servers
(`guardproxy.mcp.tools`). For each tool call it:

1. finds the caller (`Caller`): the one agent of a stdio server, or the agent id the
   HTTP layer authenticated (`AccessToken.client_id`). A caller that authenticated
   with a delegation token (`delegation.Presented`) presents that token to the proxy
   on every call, so the proxy binds its principals, task and narrowing; the policy
   the tools describe and explain with is the type's, narrowed by the token. Its
   metrics count under ``agent="*"``: its agent id is not bounded by a tokens file;
2. admits it under the per-agent concurrency limit (refusal, not a queue: the agent
   is told how many of its calls run);
3. runs it under the call timeout, through `ProxyClient` only: the proxy enforces;
4. turns the outcome into the tool result or a tool error carrying the proxy's
   message and hint, and counts it in `McpMetrics`.

Task state: the ``task`` tool sets the task and step of the following calls of one
MCP session (HTTP: per ``Mcp-Session-Id``; stdio, or HTTP without a session: per
agent, or per token for a delegation token). A call's own ``task`` / ``step``
arguments take precedence. A delegation token that names a task decides it: another
one is refused (`InputRefused`), as the proxy would refuse it.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError

from ..delegation.binding import effective_policy
from ..policy import PolicySet
from ..policy.agent import AgentPolicy
from .delegation import Presented, presented
from .metrics import McpMetrics
from .results import Bounds
from .statements import InputRefused
from .wire import CallContext, DatabaseError, ProxyClient, ProxyUnavailable

log = logging.getLogger(__name__)

MAX_TASK_SESSIONS = 10_000
T = TypeVar("T")


@dataclass(frozen=True)
class GatewayConfig:
    proxy_url: str
    bounds: Bounds = field(default_factory=Bounds)
    call_timeout: float = 120.0
    connect_timeout: float = 10.0
    max_calls_per_agent: int = 4


@dataclass(frozen=True)
class Caller:
    agent_id: str
    policy: AgentPolicy  # the agent type's, narrowed by the caller's delegation token
    session_key: tuple[str, str]
    presented: Presented | None = None  # the delegation token the caller authenticated with

    @property
    def metric_agent(self) -> str:
        """The ``agent`` label: agent ids of delegation tokens share ``*``."""
        return "*" if self.presented is not None else self.agent_id


@dataclass
class TaskState:
    task: str | None = None
    step: str | None = None


@dataclass
class Gateway:
    config: GatewayConfig
    policies: PolicySet
    metrics: McpMetrics
    stdio_agent: str | None = None  # set: every call is this agent's (stdio)
    client: ProxyClient = field(init=False)
    _running: dict[str, int] = field(default_factory=dict)
    _tasks: OrderedDict[tuple[str, str], TaskState] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.client = ProxyClient(self.config.proxy_url, self.config.connect_timeout)

    # -- who calls -----------------------------------------------------------------

    def caller(self, ctx: Context[Any, Any]) -> Caller:
        token: Presented | None = None
        session = ""
        if self.stdio_agent is not None:
            agent_id = self.stdio_agent
        else:
            request = ctx.request_context.request
            user = getattr(request, "scope", {}).get("user") if request is not None else None
            if not isinstance(user, AuthenticatedUser):
                raise ToolError("this call carries no authenticated agent; send a bearer token")
            agent_id = user.access_token.client_id
            token = presented(user.access_token)
            headers = ctx.headers or {}
            session = headers.get("mcp-session-id", "")
            if not session and token is not None:
                session = "token:" + token.delegation.token_id
        policy = self.policies.match(agent_id)
        if policy is None:
            raise ToolError(f"agent {agent_id!r} matches no agent type of the policies")
        if token is not None:
            policy = effective_policy(policy, token.delegation)
        return Caller(agent_id, policy, (agent_id, session), token)

    # -- task state ----------------------------------------------------------------

    def task_state(self, caller: Caller) -> TaskState:
        state = self._tasks.get(caller.session_key)
        if state is None:
            state = self._tasks[caller.session_key] = TaskState()
            while len(self._tasks) > MAX_TASK_SESSIONS:
                self._tasks.popitem(last=False)
        else:
            self._tasks.move_to_end(caller.session_key)
        return state

    def call_context(
        self,
        caller: Caller,
        task: str | None = None,
        step: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> CallContext:
        state = self.task_state(caller)
        # the session's step belongs to the session's task, not to one a call names
        same_task = not task or task == state.task
        task = task or state.task
        token = caller.presented
        if token is not None and token.delegation.task is not None:
            decided = token.delegation.task
            if task not in (None, decided):
                raise InputRefused(
                    f"the task is {decided}, named by your delegation token: a call cannot "
                    f"name another ({task}). Nothing was run. Leave task out, or ask for a "
                    "token minted for that task"
                )
            task = None  # the proxy takes it from the token
        return CallContext(
            agent_id=caller.agent_id,
            task=task,
            step=step or (state.step if same_task else None),
            tags={k: v for k, v in (tags or {}).items() if v},
            token=token.token if token is not None else None,
        )

    @staticmethod
    def task_of(caller: Caller, call: CallContext) -> str | None:
        """The task the proxy runs a call under: the token's, or the call's."""
        token = caller.presented
        if token is not None and token.delegation.task is not None:
            return token.delegation.task
        return call.task

    # -- running a call ------------------------------------------------------------

    async def call(
        self, tool: str, ctx: Context[Any, Any], body: Callable[[Caller], Awaitable[T]]
    ) -> T:
        """Run one tool call for its caller (see the module docstring)."""
        caller = self.caller(ctx)
        agent, agent_type, label = caller.agent_id, caller.policy.name, caller.metric_agent
        started = time.monotonic()
        outcome = "error"
        limit = self.config.max_calls_per_agent
        if self._running.get(agent, 0) >= limit:
            self.metrics.observe(agent_type, label, tool, "refused", 0.0)
            raise ToolError(
                f"agent {agent} already has {limit} calls running (the limit per agent); "
                "wait for one to finish, then call again. Nothing was run."
            )
        self._running[agent] = self._running.get(agent, 0) + 1
        self.metrics.running(agent_type, label, 1)
        try:
            with anyio.fail_after(self.config.call_timeout):
                result = await body(caller)
            cut = isinstance(result, dict) and result.get("complete") is False
            outcome = "cut" if cut else "ok"
            return result
        except InputRefused as exc:
            outcome = "refused"
            raise ToolError(str(exc)) from None
        except DatabaseError as exc:
            outcome = "denied" if exc.denied else "error"
            raise ToolError(exc.text()) from None
        except ProxyUnavailable as exc:
            raise ToolError(str(exc)) from None
        except TimeoutError:
            raise ToolError(
                f"the call ran longer than {self.config.call_timeout:g}s and was stopped; "
                "its session was closed, so no transaction of it stays open"
            ) from None
        finally:
            self._running[agent] -= 1
            if not self._running[agent]:
                del self._running[agent]
            self.metrics.running(agent_type, label, -1)
            self.metrics.observe(agent_type, label, tool, outcome, time.monotonic() - started)
