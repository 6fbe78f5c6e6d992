"""Starting ``guardproxy mcp``: logging, policies, metrics, then stdio or HTTP.

`run_stdio(options, agent)` serves one agent on stdin / stdout (stdout carries only
the protocol: every log line goes to stderr). `run_http(options, settings)` serves
the Streamable HTTP endpoint. Both raise `ConfigError` for settings that cannot work
(no policy for the agent, unsafe bind, unreadable tokens file...), before serving.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio

from ..policy import PolicyError, PolicySet, load_policy_set
from ..protocol.errors import ConfigError
from .config import HttpSettings, check_http, check_proxy_url
from .gateway import Gateway, GatewayConfig
from .metrics import McpMetrics

# Libraries whose info lines are not for operators (sessions opened, requests served).
QUIET = ("mcp", "uvicorn", "httpx", "httpcore", "sse_starlette")


@dataclass(frozen=True)
class Options:
    proxy_url: str
    policies: Path
    gateway: GatewayConfig
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    log_level: str = "warning"


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level.lower() != "debug":
        for name in QUIET:
            logging.getLogger(name).setLevel(logging.WARNING)


def _policies(directory: Path) -> PolicySet:
    try:
        return load_policy_set(directory)
    except PolicyError as exc:
        raise ConfigError(str(exc)) from None


def _metrics(options: Options, transport: str) -> McpMetrics:
    metrics = McpMetrics(transport)
    if options.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(options.metrics_port, options.metrics_host, registry=metrics.registry)
    return metrics


def run_stdio(options: Options, agent: str) -> None:
    from .tools import build_server

    check_proxy_url(options.proxy_url)
    policies = _policies(options.policies)
    policy = policies.match(agent)
    if policy is None:
        raise ConfigError(
            f"agent {agent!r} matches no agent type in {options.policies}: "
            "give --agent an id that one policy lists under agents"
        )
    gateway = Gateway(options.gateway, policies, _metrics(options, "stdio"), stdio_agent=agent)
    logging.getLogger(__name__).info("serving MCP on stdio as agent %s (%s)", agent, policy.name)
    anyio.run(build_server(gateway, policy).run_stdio_async)


def run_http(options: Options, settings: HttpSettings) -> None:
    from .http import build_app, serve
    from .tokens import TokenFileVerifier

    check_proxy_url(options.proxy_url)
    check_http(settings)
    assert settings.tokens_file is not None
    policies = _policies(options.policies)
    verifier = TokenFileVerifier(settings.tokens_file)
    for agent in sorted(verifier.agents()):
        if policies.match(agent) is None:
            logging.getLogger(__name__).warning(
                "tokens file: agent %s matches no agent type; its calls will be refused", agent
            )
    gateway = Gateway(options.gateway, policies, _metrics(options, "http"))
    app = build_app(gateway, verifier, settings)
    scheme = "https" if settings.tls else "http"
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(
        f"guardproxy mcp: Streamable HTTP on {scheme}://{host}:{settings.port}{settings.path} "
        f"for {len(verifier.agents())} agents of the tokens file, through {options.proxy_url}",
        file=sys.stderr,
        flush=True,
    )
    anyio.run(serve, app, settings)
