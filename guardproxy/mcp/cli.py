"""``guardproxy mcp stdio | http | token``: thin; builds options and calls `run`.

The SDK is imported only when a server starts, so the rest of the CLI stays quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..protocol.errors import ConfigError

if TYPE_CHECKING:
    from .run import Options

mcp_app = typer.Typer(
    no_args_is_help=True,
    help="An MCP server in front of guardproxy: agents' tool calls run through the proxy.",
)
Opt = typer.Option

ProxyOpt = Annotated[
    str,
    Opt(
        "--proxy",
        envvar="GUARDPROXY_MCP_PROXY",
        help="the proxy's listen address, postgresql://HOST:PORT/DATABASE (no user)",
    ),
]
PoliciesOpt = Annotated[
    Path,
    Opt("--policies", envvar="GUARDPROXY_POLICIES", help="the proxy's policy directory"),
]
MaxRowsOpt = Annotated[int, Opt(min=1, max=100_000, help="rows shown per result")]
MaxBytesOpt = Annotated[int, Opt(min=1024, max=64 * 1024 * 1024, help="JSON bytes per result")]
MaxCellOpt = Annotated[int, Opt(min=16, max=1024 * 1024, help="characters per cell")]
CallTimeoutOpt = Annotated[float, Opt(min=1, help="seconds before a call is stopped")]
ConcurrencyOpt = Annotated[int, Opt(min=1, max=1000, help="calls running at once per agent")]
MetricsPortOpt = Annotated[
    int | None, Opt(help="port of /metrics (Prometheus) for the MCP metrics; unset = off")
]
LogLevelOpt = Annotated[str, Opt(help="debug | info | warning | error")]


def _fail(message: str) -> None:
    typer.echo(f"guardproxy mcp: {message}", err=True)
    raise typer.Exit(2)


def _options(
    proxy: str,
    policies: Path,
    max_rows: int,
    max_bytes: int,
    max_cell_chars: int,
    call_timeout: float,
    max_calls_per_agent: int,
    metrics_port: int | None,
    log_level: str,
) -> Options:
    from .gateway import GatewayConfig
    from .results import Bounds
    from .run import Options

    gateway = GatewayConfig(
        proxy_url=proxy,
        bounds=Bounds(max_rows, max_bytes, max_cell_chars),
        call_timeout=call_timeout,
        max_calls_per_agent=max_calls_per_agent,
    )
    return Options(proxy, policies, gateway, metrics_port=metrics_port, log_level=log_level)


@mcp_app.command()
def stdio(
    agent: Annotated[
        str, Opt("--agent", envvar="GUARDPROXY_MCP_AGENT", help="the agent id every call runs as")
    ],
    proxy: ProxyOpt = "postgresql://127.0.0.1:6432/app",
    policies: PoliciesOpt = Path("policies"),
    max_rows: MaxRowsOpt = 100,
    max_bytes: MaxBytesOpt = 65536,
    max_cell_chars: MaxCellOpt = 1000,
    call_timeout: CallTimeoutOpt = 120.0,
    max_calls_per_agent: ConcurrencyOpt = 4,
    metrics_port: MetricsPortOpt = None,
    log_level: LogLevelOpt = "warning",
) -> None:
    """Serve MCP on stdin/stdout for one agent (an agent runtime starts this as a subprocess)."""
    from .run import run_stdio, setup_logging

    options = _options(
        proxy, policies, max_rows, max_bytes, max_cell_chars, call_timeout,
        max_calls_per_agent, metrics_port, log_level,
    )  # fmt: skip
    setup_logging(log_level)
    try:
        run_stdio(options, agent)
    except ConfigError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        pass


@mcp_app.command()
def http(
    tokens_file: Annotated[
        Path | None,
        Opt(envvar="GUARDPROXY_MCP_TOKENS_FILE", help="agent tokens from `guardproxy mcp token`"),
    ] = None,
    config: Annotated[
        Path | None,
        Opt(
            "--config",
            help="the proxy's settings file: its delegation_issuers make delegation tokens "
            "bearer credentials too (GUARDPROXY_DELEGATION_ISSUERS does as well)",
        ),
    ] = None,
    host: Annotated[str, Opt(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, Opt(min=1, max=65535, help="port to listen on")] = 8808,
    path: Annotated[str, Opt(help="URL path of the endpoint")] = "/mcp",
    proxy: ProxyOpt = "postgresql://127.0.0.1:6432/app",
    policies: PoliciesOpt = Path("policies"),
    tls_cert_file: Annotated[Path | None, Opt(help="certificate (PEM) for HTTPS")] = None,
    tls_key_file: Annotated[Path | None, Opt(help="its private key (PEM)")] = None,
    allow_insecure_bind: Annotated[
        bool, Opt(help="listen on a non-loopback address without TLS (a TLS proxy in front)")
    ] = False,
    allowed_host: Annotated[
        list[str] | None, Opt(help="Host header also accepted, e.g. mcp.example.com:443")
    ] = None,
    allowed_origin: Annotated[
        list[str] | None, Opt(help="Origin header also accepted, e.g. https://app.example.com")
    ] = None,
    max_rows: MaxRowsOpt = 100,
    max_bytes: MaxBytesOpt = 65536,
    max_cell_chars: MaxCellOpt = 1000,
    call_timeout: CallTimeoutOpt = 120.0,
    max_calls_per_agent: ConcurrencyOpt = 4,
    max_request_bytes: Annotated[int, Opt(min=1024, help="largest request body")] = 1024 * 1024,
    metrics_port: MetricsPortOpt = None,
    log_level: LogLevelOpt = "warning",
) -> None:
    """Serve MCP over Streamable HTTP for the agents of a tokens file, and agents with a delegation token."""
    from .config import HttpSettings
    from .run import run_http, setup_logging

    options = _options(
        proxy, policies, max_rows, max_bytes, max_cell_chars, call_timeout,
        max_calls_per_agent, metrics_port, log_level,
    )  # fmt: skip
    settings = HttpSettings(
        host=host,
        port=port,
        path=path,
        tokens_file=tokens_file,
        config_file=config,
        tls_cert_file=tls_cert_file,
        tls_key_file=tls_key_file,
        allow_insecure_bind=allow_insecure_bind,
        allowed_hosts=tuple(allowed_host or ()),
        allowed_origins=tuple(allowed_origin or ()),
        max_request_bytes=max_request_bytes,
    )
    setup_logging(log_level)
    try:
        run_http(options, settings)
    except ConfigError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        pass


@mcp_app.command()
def token(
    agent: Annotated[str, typer.Argument(help="the agent id the token logs in as")],
    tokens_file: Annotated[
        Path, Opt(envvar="GUARDPROXY_MCP_TOKENS_FILE", help="file of token hashes")
    ] = Path("guardproxy-mcp.tokens"),
) -> None:
    """Make a bearer token for AGENT: its hash goes into the tokens file, the token to stdout once."""
    from .tokens import new_token

    try:
        typer.echo(new_token(tokens_file, agent))
    except ConfigError as exc:
        _fail(str(exc))
    typer.echo(f"added a token of {agent} to {tokens_file} (only its hash is kept)", err=True)
