"""The login phase of a client connection: SSL/GSS refusals and the TLS upgrade,
cancel requests, protocol version negotiation, the agent's identity and its
authentication, its policy, and the ParameterStatus values it starts with.

A job: ``run_login(channel, proxy)`` speaks to the client through a
``LoginChannel`` (the session's socket, as little of it as login needs) and
returns a ``LoginResult`` that the session applies, or None for a cancel request.
It raises GuardError for a login that must be refused (the session sends it as a
FATAL and closes). Nothing here knows the session.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from guardproxy.config import is_loopback_host
from guardproxy.delegation import binding
from guardproxy.delegation.claims import Delegation
from guardproxy.delegation.errors import TokenError
from guardproxy.jobs.settings import replay_sql
from guardproxy.policy import AgentPolicy, SessionContext
from guardproxy.policy.context import CONTEXT_VALUE_SQLSTATE, context_value_problem
from guardproxy.policy.session_rules import split_options
from guardproxy.protocol import codec
from guardproxy.protocol.errors import AuthFailed, GuardError, ProtocolViolation
from guardproxy.protocol.scram import MECHANISM, MECHANISM_PLUS, ServerExchange

if TYPE_CHECKING:
    from guardproxy.pool.pool import Pool
    from guardproxy.server.services import ProxyServices

log = logging.getLogger("guardproxy.login")

ADMIN_DATABASE = "guardproxy"  # the database name that opens the admin console

ADMIN_PARAMS = {
    "server_version": "15.0 (guardproxy admin console)",
    "server_encoding": "UTF8",
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "integer_datetimes": "on",
    "standard_conforming_strings": "on",
    "application_name": "",
}
# startup parameters that are not settings to carry to the server
_NOT_SETTINGS = frozenset(("user", "database", "options", "replication"))


Settings = tuple[tuple[str, str], ...]


class LoginChannel(Protocol):
    """The part of a client connection the login speaks through."""

    tls: bool
    peer: str

    async def recv_startup(self, typed: bool) -> tuple[int, bytes]: ...
    def write(self, data: bytes) -> None: ...
    async def start_tls(self, context: ssl.SSLContext) -> None: ...
    def peer_common_name(self) -> str | None: ...


@dataclass
class LoginResult:
    agent_id: str
    admin: bool
    settings: Settings  # the client's session settings from its startup packet
    params: dict[str, str] = field(default_factory=dict)  # ParameterStatus values to send
    policy: AgentPolicy | None = None
    context: SessionContext | None = None
    delegation: Delegation | None = None  # a verified delegation token, if one came


def peer_host(peer: str) -> str:
    return peer.rpartition(":")[0]


def server_app_name(agent_id: str, settings: Settings) -> str:
    """application_name on a server lent to this client: the agent, then the client's own."""
    own = dict(settings).get("application_name", "")
    return f"{agent_id}/{own}" if own else agent_id


async def run_login(channel: LoginChannel, proxy: ProxyServices) -> LoginResult | None:
    """The whole login, bounded by client_login_timeout."""
    try:
        async with asyncio.timeout(proxy.settings.client_login_timeout):
            exchanged = await login_exchange(channel, proxy)
            if exchanged is None:
                return None
            startup, token = exchanged
            agent_id = startup.params.get("user", "")
            admin = startup.params.get("database") == ADMIN_DATABASE
            result = LoginResult(agent_id, admin, startup_settings(startup.params))
            if proxy.policies is not None and not admin:
                result.policy, result.context, result.delegation = bind_policy(
                    proxy, agent_id, startup.params, token
                )
            if admin:
                result.params = dict(ADMIN_PARAMS)
            else:
                pool = proxy.pool_for(result.policy.name if result.policy else "default")
                result.params = await server_params(pool, agent_id, result.settings)
            return result
    except TimeoutError:
        raise ProtocolViolation(
            "login did not finish within client_login_timeout", sqlstate="08006"
        ) from None


def startup_settings(params: dict[str, str]) -> Settings:
    """The client's session settings from its startup parameters (``options`` included)."""
    settings = {
        k: v for k, v in params.items() if k not in _NOT_SETTINGS and not k.startswith("_pq_.")
    }
    if "options" in params:
        settings.update(parse_options(params["options"]))
    # guard.* keys are the agent's context for the proxy, not settings for Postgres
    return tuple(sorted((k, v) for k, v in settings.items() if not k.startswith("guard.")))


def bind_policy(
    proxy: ProxyServices, agent_id: str, params: dict[str, str], token: str | None = None
) -> tuple[AgentPolicy, SessionContext, Delegation | None]:
    """Finds the agent's type; refuses agents no policy names, over their limits, or with
    bad parameters. Returns the policy, the context the startup parameters give, and the
    delegation of a token presented as password (``token``) or in the options."""
    assert proxy.policies is not None and proxy.judge is not None
    policy = proxy.policies.match(agent_id)
    if policy is None:
        patterns = ", ".join(p for pol in proxy.policies for p in pol.agents)
        raise AuthFailed(
            f'agent "{agent_id}" matches no agent type in the policies',
            hint=f"log in with an agent id matching one of: {patterns}",
            sqlstate="28000",
        )
    limit = policy.max_client_sessions
    if limit is not None and proxy.sessions_of_type(policy.name) >= limit:
        raise GuardError(
            f"{policy.name} already has {limit} client sessions (policy {policy.name}, "
            "limits.max_client_sessions)",
            hint="close idle sessions or share them, then retry",
            sqlstate="53300",
        )
    decision = proxy.judge.judge_startup(policy, params)
    if not decision.allowed:
        raise GuardError(decision.reason, hint=decision.hint, sqlstate=decision.sqlstate or "42501")
    in_options, updates = binding.take_token(decision.context_updates)
    for key, value in updates.items():
        problem = context_value_problem(key, value)
        if problem is not None:
            raise GuardError(problem, sqlstate=CONTEXT_VALUE_SQLSTATE)
    delegation = None
    presented = token or in_options
    if presented is not None:
        try:
            delegation = binding.present(policy, proxy.verifier, presented, agent_id, time.time())
        except GuardError as exc:
            if token is not None:  # the token was the login: a failed login
                proxy.auth_failed("token", agent_id)
            if isinstance(exc, TokenError):
                proxy.stats.token_refused(policy.name, exc.kind)
            raise
    binding.check_context_updates(policy, updates, delegation, "startup")
    context = SessionContext(agent_id=agent_id).with_updates(updates)
    return policy, context, delegation


async def server_params(pool: Pool, agent_id: str, settings: Settings) -> dict[str, str]:
    """ParameterStatus values for this client, as a server with its settings reports them."""
    cached = pool.params_cache.get(settings)
    if cached is not None:
        return cached
    app_name = server_app_name(agent_id, settings)
    server = await pool.acquire()
    try:
        await server.query(replay_sql(settings, app_name))
    except BaseException:  # an error, a lost connection, a cancel: never reused
        pool.discard(server)
        raise
    server.settings_key = settings
    server.app_name = app_name
    params = dict(server.params)
    params.pop("application_name", None)
    params["application_name"] = dict(settings).get("application_name", "")
    pool.params_cache[settings] = params
    pool.release(server)
    return params


def parse_options(options: str) -> dict[str, str]:
    """``options=-c a=b --c=d`` from a startup packet, split exactly as Postgres (and the judge) do."""
    settings = split_options(options)
    if settings is None:
        raise ProtocolViolation(f"startup options {options!r} are not supported; use -c name=value")
    return dict(settings)


async def login_exchange(
    channel: LoginChannel, proxy: ProxyServices
) -> tuple[codec.Startup, str | None] | None:
    """Runs the login; returns the startup packet and a delegation token the agent gave
    as its password (verified later, with its policy), or None for a cancel request."""
    while True:
        _, body = await channel.recv_startup(typed=False)
        startup = codec.parse_startup(body)
        if startup.code == codec.SSL_REQUEST and proxy.tls is not None and not channel.tls:
            await channel.start_tls(proxy.tls.context())
            continue
        if startup.code in (codec.SSL_REQUEST, codec.GSSENC_REQUEST):
            channel.write(codec.NO_SSL)
            continue
        if startup.code in codec.CANCEL_CODES:
            # a relayed cancel came from another guardproxy instance: never forwarded again
            relayed = startup.code == codec.RELAYED_CANCEL_REQUEST
            proxy.cancel(startup.cancel_pid, startup.cancel_secret, "peer" if relayed else "client")
            return None
        break
    major, minor = startup.code >> 16, startup.code & 0xFFFF
    if major != 3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {major}.{minor}: guardproxy speaks 3.0",
            sqlstate="08P01",
        )
    extensions = [k for k in startup.params if k.startswith("_pq_.")]
    if minor > 0 or extensions:
        channel.write(codec.build_negotiate_version(3 << 16, extensions))
    user = startup.params.get("user", "")
    if not user:
        raise GuardError(
            "no user name in the startup packet; connect as your agent id", sqlstate="28000"
        )
    if proxy.settings.tls_mode == "require" and not channel.tls:
        raise AuthFailed(
            "guardproxy requires TLS: connect with sslmode=require or stronger", sqlstate="28000"
        )
    host = peer_host(channel.peer)
    proxy.check_auth_rate(host, user)
    if startup.params.get("replication"):
        raise GuardError(
            "replication connections are not supported by guardproxy", sqlstate="08004"
        )
    if proxy.at_client_limit():
        raise GuardError(
            f"too many client connections (max_client_conn = {proxy.settings.max_client_conn})",
            hint="close idle connections or share them; an operator can raise max_client_conn",
            sqlstate="53300",
        )
    startup_settings(startup.params)  # refuses options it cannot carry, before any password
    cert_agent = channel.peer_common_name()
    if cert_agent is not None and cert_agent != user:
        # a client certificate names the agent: no logging in as anyone else with it
        proxy.auth_failed(host, user)
        raise AuthFailed(f'certificate authentication failed for user "{user}"')
    if proxy.settings.auth_mode == "cert" and cert_agent is None:
        proxy.auth_failed(host, user)
        raise AuthFailed(f'certificate authentication failed for user "{user}"', sqlstate="28000")
    token = None
    if proxy.settings.auth_mode == "scram":
        if user not in proxy.verifiers and proxy.verifier is not None and proxy.verifier.issuers:
            token = await _token_password(channel, proxy, user)  # verified with its policy
            if proxy.policies is None or startup.params.get("database") == ADMIN_DATABASE:
                # no agent type's policy will verify it: it is no login here
                proxy.auth_failed(host, user)
                raise AuthFailed(
                    f'password authentication failed for user "{user}": a delegation '
                    "token logs in an agent whose type's policy accepts it, never to the "
                    "admin console or a proxy without policies; give the user a password "
                    "in the auth file"
                )
        else:
            await _scram(channel, proxy, user)
            proxy.login_limits.succeeded(host, user)
    # only now, to an authenticated client, anything about what is behind the proxy
    database = startup.params.get("database") or user
    upstream_db = proxy.upstream.database
    if database == ADMIN_DATABASE:
        if user not in proxy.settings.admin_users:
            raise AuthFailed(f'agent "{user}" may not use the admin console', sqlstate="28000")
    elif database != upstream_db:
        raise GuardError(
            f'database "{database}" does not exist behind this guardproxy',
            hint=f"connect to database {upstream_db!r}",
            sqlstate="3D000",
        )
    return startup, token


async def _token_password(channel: LoginChannel, proxy: ProxyServices, user: str) -> str:
    """An agent with no password of its own logs in with a delegation token as its
    password: a bearer secret, so only over TLS (or on a loopback listener)."""
    if not channel.tls and not is_loopback_host(proxy.settings.listen_host):
        raise AuthFailed(
            f'agent "{user}" logs in with a delegation token, a bearer secret: connect with '
            "TLS (sslmode=require or stronger)",
            sqlstate="28000",
        )
    channel.write(codec.auth_request(3))
    kind, raw = await channel.recv_startup(typed=True)
    if kind != ord("p"):
        raise ProtocolViolation(f"expected a password message, got message type {chr(kind)!r}")
    token = raw[5:].rstrip(b"\x00").decode(errors="replace")
    if not binding.looks_like_token(token):
        proxy.auth_failed(peer_host(channel.peer), user)
        raise AuthFailed(
            f'password authentication failed for user "{user}": agent "{user}" has no '
            "password here and logs in with a delegation token as its password"
        )
    return token


async def _scram(channel: LoginChannel, proxy: ProxyServices, user: str) -> None:
    tls = proxy.tls
    binding = tls.end_point if tls is not None and channel.tls else b""
    offered = ([MECHANISM_PLUS] if binding else []) + [MECHANISM]
    channel.write(codec.auth_request(10, b"".join(codec.cstr(m) for m in offered) + b"\x00"))
    kind, raw = await channel.recv_startup(typed=True)
    if kind != ord("p"):
        raise ProtocolViolation(f"expected SASLInitialResponse, got message type {chr(kind)!r}")
    mechanism, data = codec.parse_sasl_initial(raw)
    if mechanism not in offered:
        raise AuthFailed(
            f"SASL mechanism {mechanism!r} is not offered; use one of {offered}", sqlstate="28000"
        )
    exchange = ServerExchange(user, proxy.verifiers.get(user), mechanism, binding)
    channel.write(codec.auth_request(11, exchange.first(data)))
    kind, raw = await channel.recv_startup(typed=True)
    if kind != ord("p"):
        raise ProtocolViolation(f"expected SASLResponse, got message type {chr(kind)!r}")
    try:
        final = exchange.final(raw[5:])
    except AuthFailed:
        proxy.auth_failed(peer_host(channel.peer), user)
        log.info("failed login for agent %r from %s", user, channel.peer)
        raise AuthFailed(f'password authentication failed for user "{user}"') from None
    channel.write(codec.auth_request(12, final))
