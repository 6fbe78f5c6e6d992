"""The Streamable HTTP endpoint: many agents, each request authenticated by a bearer token.

One ASGI app (Starlette, served by uvicorn), in this order for every request:

1. ``Host`` and ``Origin`` are checked against the allow-list (`config.transport_security`):
   a page that rebinds its DNS name to 127.0.0.1 gets 421 / 403 before anything else;
2. the bearer token is verified (`tokens.TokenFileVerifier`, `delegation.DelegationBearer`,
   or any `TokenVerifier`): no token or an unknown one gets 401 with
   ``WWW-Authenticate: Bearer``; a delegation token that is refused gets 401 with
   ``error="invalid_token"`` and the reason (expired, signature, ...; never the token);
3. the agent's type picks the MCP server of that type (`tools.build_server`), whose SDK
   session manager serves the request; a session is bound to the token that opened it
   (the SDK answers 404 to anyone else).

Bodies larger than ``max_request_bytes`` get 413 before they are parsed. Sessions
idle for ``session_idle_timeout`` are closed. Each tool call opens and closes its own
proxy session (`wire`), so a client that goes away leaves no transaction open.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator

from mcp.server.auth.middleware.bearer_auth import (
    AuthenticatedUser,
    BearerAuthBackend,
    RequireAuthMiddleware,
)
from mcp.server.auth.provider import TokenVerifier
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationError, BaseUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .config import HttpSettings, transport_security
from .delegation import BearerRefused
from .gateway import Gateway
from .tools import build_server

log = logging.getLogger(__name__)


class HostOriginGuard:
    """Refuses requests whose Host or Origin is not allowed (DNS rebinding), first of all."""

    def __init__(self, app: ASGIApp, settings: TransportSecuritySettings) -> None:
        self.app = app
        self.check = TransportSecurityMiddleware(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = await self.check.validate_request(Request(scope), is_post=False)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BearerBackend(BearerAuthBackend):
    """The SDK's bearer check; a refused delegation token becomes an error with its reason."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        try:
            found: tuple[AuthCredentials, BaseUser] | None = await super().authenticate(conn)
        except BearerRefused as exc:
            raise AuthenticationError(str(exc)) from None
        return found


def refused_token(_conn: HTTPConnection, exc: Exception) -> Response:
    """401 for a delegation token that is not accepted, saying why (RFC 6750)."""
    reason = str(exc)
    quoted = re.sub(r"[^ -~]", "?", reason)[:400]  # printable ASCII only, in a header
    quoted = quoted.replace("\\", "\\\\").replace('"', '\\"')  # RFC 9110 quoted-string
    return JSONResponse(
        {"error": "invalid_token", "error_description": reason},
        status_code=401,
        headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{quoted}"'},
    )


class AgentRouter:
    """Hands an authenticated request to the MCP server of its agent's type."""

    def __init__(self, gateway: Gateway, servers: dict[str, MCPServer]) -> None:
        self.gateway = gateway
        self.servers = servers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user = scope.get("user")
        agent = user.access_token.client_id if isinstance(user, AuthenticatedUser) else ""
        policy = self.gateway.policies.match(agent)
        if policy is None or policy.name not in self.servers:
            response = JSONResponse(
                {"error": f"agent {agent!r} matches no agent type of the policies"},
                status_code=403,
            )
            await response(scope, receive, send)
            return
        await self.servers[policy.name].session_manager.handle_request(scope, receive, send)


def build_app(gateway: Gateway, verifier: TokenVerifier, settings: HttpSettings) -> Starlette:
    security = transport_security(settings)
    servers: dict[str, MCPServer] = {}
    for policy in gateway.policies:
        server = build_server(gateway, policy)
        # Builds the SDK's session manager (the Starlette app it returns is not used).
        server.streamable_http_app(
            streamable_http_path=settings.path,
            transport_security=security,
            max_request_body_size=settings.max_request_bytes,
            max_sessions=settings.max_sessions,
            session_idle_timeout=settings.session_idle_timeout,
            host=settings.host,
        )
        servers[policy.name] = server

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for server in servers.values():
                await stack.enter_async_context(server.session_manager.run())
            yield

    endpoint = RequireAuthMiddleware(AgentRouter(gateway, servers), required_scopes=[])
    return Starlette(
        routes=[Route(settings.path, endpoint=endpoint)],
        middleware=[
            Middleware(HostOriginGuard, settings=security),
            Middleware(
                AuthenticationMiddleware, backend=BearerBackend(verifier), on_error=refused_token
            ),
        ],
        lifespan=lifespan,
    )


async def serve(app: Starlette, settings: HttpSettings) -> None:
    """Serve until SIGINT / SIGTERM (uvicorn's handlers: a graceful stop)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=str(settings.tls_cert_file) if settings.tls_cert_file else None,
        ssl_keyfile=str(settings.tls_key_file) if settings.tls_key_file else None,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    await uvicorn.Server(config).serve()
