"""The login phase of a client connection: SSL/GSS refusals and the TLS upgrade,
cancel requests, protocol version negotiation, the agent's identity and its
authentication, its policy, and the ParameterStatus values it starts with.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING

from guardproxy.guard.sqltext import replay_sql
from guardproxy.policy import SessionContext
from guardproxy.policy.session_rules import split_options
from guardproxy.protocol import codec
from guardproxy.protocol.errors import AuthFailed, GuardError, ProtocolViolation
from guardproxy.protocol.scram import MECHANISM, MECHANISM_PLUS, ServerExchange
from guardproxy.server.admin import ADMIN_DATABASE
from guardproxy.server.guard import SessionGuard

if TYPE_CHECKING:
    from guardproxy.server.session import ClientSession

log = logging.getLogger("guardproxy.login")

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


async def run_login(session: ClientSession) -> None:
    try:
        async with asyncio.timeout(session.proxy.settings.client_login_timeout):
            startup = await login_exchange(session)
            if startup is None:
                return
            if session.proxy.policies is not None and not session.admin:
                bind_policy(session, startup.params)
            params = ADMIN_PARAMS if session.admin else await server_params(session)
    except GuardError as exc:
        session.fatal(exc)
        return
    except TimeoutError:
        session.fatal(
            ProtocolViolation("login did not finish within client_login_timeout", sqlstate="08006")
        )
        return
    except (ConnectionError, asyncio.CancelledError):
        return
    if session.closed:
        return
    assert session.transport is not None
    out = [codec.AUTH_OK]
    out += [codec.build_parameter_status(k, v) for k, v in params.items()]
    out.append(codec.build_backend_key(*session.cancel_key))
    out.append(codec.ready_for_query(b"I"))
    session.transport.writelines(out)
    session.logged_in = True
    session.proxy.register(session)
    if not session.admin:
        label = session.proxy.agent_label(session.agent_id)
        session.stats = session.proxy.stats.for_agent(session.agent_type, label)
        if session.guard is not None:
            session.guard.stats = session.stats
    session.stats.sessions += 1
    session.stats.sessions_total += 1
    log.debug("client %s logged in as agent %s", session.peer, session.agent_id)
    rest, session._startup_buf = session._startup_buf, b""
    if rest:
        session.data_received(rest)


async def start_tls(session: ClientSession, context: ssl.SSLContext) -> None:
    """Answers an SSLRequest with 'S' and continues the connection over TLS."""
    assert session.transport is not None
    session.transport.write(b"S")
    loop = asyncio.get_running_loop()
    new = await loop.start_tls(
        session.transport, session, context, server_side=True, ssl_handshake_timeout=10
    )
    if new is None:
        raise ConnectionResetError("TLS handshake failed")
    session.transport = new
    session.tls = True


def apply_startup(session: ClientSession, params: dict[str, str]) -> None:
    settings = {
        k: v for k, v in params.items() if k not in _NOT_SETTINGS and not k.startswith("_pq_.")
    }
    if "options" in params:
        settings.update(parse_options(params["options"]))
    # guard.* keys are the agent's context for the proxy, not settings for Postgres
    session.settings = tuple(
        sorted((k, v) for k, v in settings.items() if not k.startswith("guard."))
    )


def bind_policy(session: ClientSession, params: dict[str, str]) -> None:
    """Finds the agent's type; refuses agents no policy names, over their limits, or with bad parameters."""
    proxy = session.proxy
    assert proxy.policies is not None and proxy.judge is not None
    policy = proxy.policies.match(session.agent_id)
    if policy is None:
        patterns = ", ".join(p for pol in proxy.policies for p in pol.agents)
        raise AuthFailed(
            f'agent "{session.agent_id}" matches no agent type in the policies',
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
    session.agent_type = policy.name
    session.pool = proxy.pool_for(policy.name)
    context = SessionContext(agent_id=session.agent_id).with_updates(decision.context_updates)
    session.guard = SessionGuard(proxy.judge, policy, context, session.stats, proxy.stats)


async def server_params(session: ClientSession) -> dict[str, str]:
    """ParameterStatus values for this client, as a server with its settings reports them."""
    cached = session.pool.params_cache.get(session.settings)
    if cached is not None:
        return cached
    server = await session.pool.acquire()
    try:
        await server.query(replay_sql(session.settings, session.server_app_name))
    except BaseException:  # an error, a lost connection, a cancel: never reused
        session.pool.discard(server)
        raise
    server.settings_key = session.settings
    server.app_name = session.server_app_name
    params = dict(server.params)
    params.pop("application_name", None)
    if "application_name" in dict(session.settings):
        params["application_name"] = dict(session.settings)["application_name"]
    else:
        params["application_name"] = ""
    session.pool.params_cache[session.settings] = params
    session.pool.release(server)
    return params


def parse_options(options: str) -> dict[str, str]:
    """``options=-c a=b --c=d`` from a startup packet, split exactly as Postgres (and the judge) do."""
    settings = split_options(options)
    if settings is None:
        raise ProtocolViolation(f"startup options {options!r} are not supported; use -c name=value")
    return dict(settings)


async def login_exchange(session: ClientSession) -> codec.Startup | None:
    """Runs the login; returns the startup packet, or None when the connection was a cancel."""
    proxy = session.proxy
    while True:
        _, body = await session.recv_startup(typed=False)
        startup = codec.parse_startup(body)
        if startup.code == codec.SSL_REQUEST and proxy.tls is not None and not session.tls:
            await start_tls(session, proxy.tls.context())
            continue
        if startup.code in (codec.SSL_REQUEST, codec.GSSENC_REQUEST):
            session.write(codec.NO_SSL)
            continue
        if startup.code in codec.CANCEL_CODES:
            # a relayed cancel came from another guardproxy instance: never forwarded again
            relayed = startup.code == codec.RELAYED_CANCEL_REQUEST
            proxy.cancel(startup.cancel_pid, startup.cancel_secret, "peer" if relayed else "client")
            if session.transport is not None:
                session.transport.close()
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
        session.write(codec.build_negotiate_version(3 << 16, extensions))
    user = startup.params.get("user", "")
    if not user:
        raise GuardError(
            "no user name in the startup packet; connect as your agent id", sqlstate="28000"
        )
    if proxy.settings.tls_mode == "require" and not session.tls:
        raise AuthFailed(
            "guardproxy requires TLS: connect with sslmode=require or stronger", sqlstate="28000"
        )
    session.agent_id = user
    proxy.check_auth_rate(session.peer_host, user)
    if startup.params.get("replication"):
        raise GuardError(
            "replication connections are not supported by guardproxy", sqlstate="08004"
        )
    database = startup.params.get("database") or user
    upstream_db = proxy.upstream.database
    if database == ADMIN_DATABASE:
        if user not in proxy.settings.admin_users:
            raise AuthFailed(f'agent "{user}" may not use the admin console', sqlstate="28000")
        session.admin = True
    elif database != upstream_db:
        raise GuardError(
            f'database "{database}" does not exist behind this guardproxy',
            hint=f"connect to database {upstream_db!r}",
            sqlstate="3D000",
        )
    if proxy.at_client_limit():
        raise GuardError(
            f"too many client connections (max_client_conn = {proxy.settings.max_client_conn})",
            hint="close idle connections or share them; an operator can raise max_client_conn",
            sqlstate="53300",
        )
    apply_startup(session, startup.params)
    cert_agent = session.peer_common_name()
    if cert_agent is not None and cert_agent != user:
        # a client certificate names the agent: no logging in as anyone else with it
        proxy.auth_failed(session.peer_host, user)
        raise AuthFailed(f'certificate authentication failed for user "{user}"')
    if proxy.settings.auth_mode == "cert" and cert_agent is None:
        proxy.auth_failed(session.peer_host, user)
        raise AuthFailed(f'certificate authentication failed for user "{user}"', sqlstate="28000")
    if proxy.settings.auth_mode == "scram":
        await _scram(session, user)
    return startup


async def _scram(session: ClientSession, user: str) -> None:
    tls = session.proxy.tls
    binding = tls.end_point if tls is not None and session.tls else b""
    offered = ([MECHANISM_PLUS] if binding else []) + [MECHANISM]
    session.write(codec.auth_request(10, b"".join(codec.cstr(m) for m in offered) + b"\x00"))
    kind, raw = await session.recv_startup(typed=True)
    if kind != ord("p"):
        raise ProtocolViolation(f"expected SASLInitialResponse, got message type {chr(kind)!r}")
    mechanism, data = codec.parse_sasl_initial(raw)
    if mechanism not in offered:
        raise AuthFailed(
            f"SASL mechanism {mechanism!r} is not offered; use one of {offered}", sqlstate="28000"
        )
    exchange = ServerExchange(user, session.proxy.verifiers.get(user), mechanism, binding)
    session.write(codec.auth_request(11, exchange.first(data)))
    kind, raw = await session.recv_startup(typed=True)
    if kind != ord("p"):
        raise ProtocolViolation(f"expected SASLResponse, got message type {chr(kind)!r}")
    try:
        final = exchange.final(raw[5:])
    except AuthFailed:
        session.proxy.auth_failed(session.peer_host, user)
        log.info("failed login for agent %r from %s", user, session.peer)
        raise AuthFailed(f'password authentication failed for user "{user}"') from None
    session.write(codec.auth_request(12, final))
