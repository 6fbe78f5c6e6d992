"""Starting ``guardproxy mcp``: logging, policies, metrics, then stdio or HTTP.

`run_stdio(options, agent)` serves one agent on stdin / stdout (stdout carries only
the protocol: every log line goes to stderr). `run_http(options, settings)` serves
the Streamable HTTP endpoint, to the agents of the tokens file and, when the
settings (``--config``, ``GUARDPROXY_*``) name ``delegation_issuers``, to agents
with a delegation token (`delegation.DelegationBearer`). Both raise `ConfigError`
for settings that cannot work (no policy for the agent, unsafe bind, unreadable
tokens file or issuer keys...), before serving. Log lines never hold a token: the
formatter replaces any JWS by its fingerprint.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio

from ..config import load_settings
from ..delegation.binding import redact
from ..policy import PolicyError, PolicySet, load_policy_set
from ..protocol.errors import ConfigError
from .config import HttpSettings, check_http, check_proxy_url
from .delegation import DelegationBearer, check_proxy_transport
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


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactingFormatter(logging.Formatter):
    """Log lines with every delegation token replaced by ``<token FINGERPRINT>``."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT, stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(RedactingFormatter(LOG_FORMAT))
    if level.lower() != "debug":
        for name in QUIET:
            logging.getLogger(name).setLevel(logging.WARNING)


def _policies(directory: Path) -> PolicySet:
    try:
        return load_policy_set(directory)
    except PolicyError as exc:
        raise ConfigError(str(exc)) from None


def _metrics(options: Options, transport: str, metrics: McpMetrics | None = None) -> McpMetrics:
    metrics = metrics or McpMetrics(transport)
    if options.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(options.metrics_port, options.metrics_host, registry=metrics.registry)
    return metrics


def _delegation(
    settings: HttpSettings, policies: PolicySet, metrics: McpMetrics
) -> DelegationBearer | None:
    """The verifier of delegation tokens, when the settings name issuers."""
    proxy_settings = load_settings(settings.config_file)
    if not proxy_settings.delegation_issuers:
        if settings.config_file is not None:
            raise ConfigError(
                f"{settings.config_file} names no delegation_issuers: --config is read for "
                "them only (the endpoint accepts delegation tokens of those issuers)"
            )
        return None
    return DelegationBearer.from_settings(proxy_settings, policies, metrics.token_refused)


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
    from mcp.server.auth.provider import TokenVerifier

    from .http import build_app, serve
    from .tokens import AnyOf, TokenFileVerifier

    check_proxy_url(options.proxy_url)
    policies = _policies(options.policies)
    metrics = McpMetrics("http")
    delegation = _delegation(settings, policies, metrics)
    check_http(settings, delegation is not None)
    verifiers: list[TokenVerifier] = []
    who: list[str] = []
    if settings.tokens_file is not None:
        tokens = TokenFileVerifier(settings.tokens_file)
        for agent in sorted(tokens.agents()):
            if policies.match(agent) is None:
                logging.getLogger(__name__).warning(
                    "tokens file: agent %s matches no agent type; its calls will be refused", agent
                )
        verifiers.append(tokens)
        who.append(f"{len(tokens.agents())} agents of the tokens file")
    if delegation is not None:
        check_proxy_transport(options.proxy_url)
        verifiers.append(delegation)
        who.append(f"delegation tokens of {', '.join(delegation.issuers)}")
    gateway = Gateway(options.gateway, policies, _metrics(options, "http", metrics))
    app = build_app(gateway, AnyOf(verifiers), settings)
    scheme = "https" if settings.tls else "http"
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(
        f"guardproxy mcp: Streamable HTTP on {scheme}://{host}:{settings.port}{settings.path} "
        f"for {' and '.join(who)}, through {options.proxy_url}",
        file=sys.stderr,
        flush=True,
    )
    anyio.run(serve, app, settings)
