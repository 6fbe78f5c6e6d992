"""Prometheus metrics of the MCP front door, on a registry of its own.

The proxy counts every statement the tools send under the agent's own labels (its
sessions name themselves ``guardproxy-mcp``, see `wire`); these say which agent
used which tool over which transport, with what outcome:

* ``guardproxy_mcp_tool_calls_total{agent_type, agent, transport, tool, outcome}``,
  outcome one of ``ok``, ``cut`` (ran, result bounded), ``denied`` (the policy
  refused it), ``error`` (the database or the proxy answered with an error),
  ``refused`` (bad input or a limit of the MCP server: nothing was sent);
* ``guardproxy_mcp_tool_duration_seconds{agent_type, agent, transport, tool}``;
* ``guardproxy_mcp_calls_in_flight{agent_type, agent, transport}``;
* ``guardproxy_mcp_token_refusals_total{transport, reason}``: delegation tokens
  refused as bearer credentials (HTTP answered 401), ``reason`` a
  `guardproxy.delegation.errors.KINDS` word. The proxy counts what it refuses itself
  (``guardproxy_delegation_refusals_total``).

Labels are bounded: agent ids are the ones of the tokens file (HTTP) or the one
agent of a stdio server, and ``*`` for every agent that authenticated with a
delegation token (their ids are not bounded by a file); tools, outcomes and reasons
are fixed sets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OUTCOMES = ("ok", "cut", "denied", "error", "refused")


class McpMetrics:
    def __init__(self, transport: str, registry: CollectorRegistry | None = None) -> None:
        self.transport = transport
        self.registry = registry or CollectorRegistry(auto_describe=True)
        labels = ["agent_type", "agent", "transport"]
        self.calls = Counter(
            "guardproxy_mcp_tool_calls",
            "MCP tool calls by agent, transport, tool and outcome",
            [*labels, "tool", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "guardproxy_mcp_tool_duration_seconds",
            "Time from an MCP tool call to its answer",
            [*labels, "tool"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "guardproxy_mcp_calls_in_flight",
            "MCP tool calls running now",
            labels,
            registry=self.registry,
        )
        self.token_refusals = Counter(
            "guardproxy_mcp_token_refusals",
            "Delegation tokens refused as bearer credentials, by reason",
            ["transport", "reason"],
            registry=self.registry,
        )

    def token_refused(self, reason: str) -> None:
        self.token_refusals.labels(self.transport, reason).inc()

    def observe(self, agent_type: str, agent: str, tool: str, outcome: str, seconds: float) -> None:
        self.calls.labels(agent_type, agent, self.transport, tool, outcome).inc()
        self.duration.labels(agent_type, agent, self.transport, tool).observe(seconds)

    def running(self, agent_type: str, agent: str, delta: int) -> None:
        self.in_flight.labels(agent_type, agent, self.transport).inc(delta)
