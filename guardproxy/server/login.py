"""The login conversation with a client: SSL/GSS refusals, cancel requests,
protocol version negotiation, the agent's identity and its authentication.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from guardproxy.protocol import codec
from guardproxy.protocol.errors import AuthFailed, GuardError, ProtocolViolation
from guardproxy.protocol.scram import MECHANISM, MECHANISM_PLUS, ServerExchange
from guardproxy.server.admin import ADMIN_DATABASE

if TYPE_CHECKING:
    from guardproxy.server.session import ClientSession

log = logging.getLogger("guardproxy.login")


async def login_exchange(session: ClientSession) -> codec.Startup | None:
    """Runs the login; returns the startup packet, or None when the connection was a cancel."""
    proxy = session.proxy
    while True:
        _, body = await session.recv_startup(typed=False)
        startup = codec.parse_startup(body)
        if startup.code == codec.SSL_REQUEST and proxy.tls is not None and not session.tls:
            await session.start_tls(proxy.tls.context())
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
    session.apply_startup(startup.params)
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
