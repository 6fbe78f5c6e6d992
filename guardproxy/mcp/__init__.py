"""The MCP front door: agents that speak the Model Context Protocol, judged like any other.

``guardproxy mcp stdio`` (one agent, an agent runtime's subprocess) and ``guardproxy
mcp http`` (Streamable HTTP, many agents with bearer tokens) serve the tools
``query``, ``describe``, ``explain`` and ``task``. Every tool call runs as a session
of the calling agent through the guardproxy listener, so the policy of the agent's
type, its rewrites, caps, idempotency, budgets, tags, metrics and audit apply exactly
as to a Postgres client: there is no second enforcement path here.

Modules, one job each:

* `results`: a statement's rows as bounded JSON, every cut announced (pure);
* `statements`: what the tools accept as SQL, and how its rows are read (pure);
* `describe`: the agent type's policy in words, for tool descriptions and ``describe`` (pure);
* `config`: settings checks, the Host / Origin allow-list (pure);
* `wire`: sessions of an agent at the proxy (psycopg);
* `gateway`: callers, task state, concurrency limits, timeouts, metrics;
* `tools`: the MCP server of one agent type (the SDK's `MCPServer`);
* `tokens`: the tokens file and its bearer-token verifier;
* `http`: the Streamable HTTP app (Host / Origin, bearer auth, routing by agent type);
* `metrics`: Prometheus metrics with agent and transport labels;
* `run`, `cli`: starting it.
"""
