"""Settings of ``guardproxy mcp``, checked before anything listens. Pure.

* `check_proxy_url(url)`: the proxy's listen address as a ``postgresql://`` URL with
  no user name or password (each call logs in as its agent; passwords come from
  ``PGPASSWORD`` or a libpq password file);
* `HttpSettings` + `check_http(settings, delegation)`: the HTTP endpoint needs a
  tokens file or delegation issuers (``config_file``, the proxy's settings) to know
  anyone; it binds loopback unless told otherwise, and then only with TLS (or
  `allow_insecure_bind`, for a TLS-terminating proxy in front);
  `transport_security(settings)` is the ``Host`` /
  ``Origin`` allow-list that defeats DNS rebinding: the loopback names by default,
  plus the hosts and origins given.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from mcp.server.transport_security import TransportSecuritySettings

from ..protocol.errors import ConfigError

DEFAULT_PROXY_URL = "postgresql://127.0.0.1:6432/app"
LOOPBACK_HOSTS = ("127.0.0.1:*", "localhost:*", "[::1]:*")
LOOPBACK_ORIGINS = tuple(
    f"{scheme}://{host}" for scheme in ("http", "https") for host in LOOPBACK_HOSTS
)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_proxy_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("postgresql", "postgres") or not parsed.hostname:
        raise ConfigError(
            f"--proxy must be the proxy's address as postgresql://HOST:PORT/DATABASE, got {url!r}"
        )
    if parsed.username or parsed.password:
        raise ConfigError(
            "--proxy takes no user name or password: every call logs in as its agent "
            "(passwords come from PGPASSWORD or a libpq password file)"
        )
    return url


@dataclass(frozen=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8808
    path: str = "/mcp"
    tokens_file: Path | None = None
    config_file: Path | None = None  # the proxy's settings: delegation_issuers
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    allow_insecure_bind: bool = False
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    max_request_bytes: int = 1024 * 1024
    max_sessions: int = 1000
    session_idle_timeout: float = 1800.0

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


def check_http(settings: HttpSettings, delegation: bool = False) -> None:
    """Raise ConfigError when the endpoint would be unsafe or cannot start.
    `delegation`: delegation issuers are configured (their tokens are credentials)."""
    if settings.tokens_file is None and not delegation:
        raise ConfigError(
            "the HTTP endpoint needs --tokens-file (create tokens with "
            "`guardproxy mcp token AGENT --tokens-file FILE`), or delegation_issuers in "
            "the settings (--config FILE or GUARDPROXY_DELEGATION_ISSUERS) to accept "
            "delegation tokens"
        )
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        raise ConfigError("--tls-cert-file and --tls-key-file go together: give both or neither")
    if not is_loopback(settings.host) and not settings.tls and not settings.allow_insecure_bind:
        raise ConfigError(
            f"refusing to listen on {settings.host}: it is not a loopback address and there is "
            "no TLS, so bearer tokens and results would cross the network in clear. Give "
            "--tls-cert-file and --tls-key-file, or --allow-insecure-bind when a TLS-terminating "
            "proxy stands in front"
        )
    if not settings.path.startswith("/"):
        raise ConfigError(f"--path must start with '/', got {settings.path!r}")


def transport_security(settings: HttpSettings) -> TransportSecuritySettings:
    hosts = list(LOOPBACK_HOSTS)
    origins = list(LOOPBACK_ORIGINS)
    if not is_loopback(settings.host) and settings.host not in ("0.0.0.0", "::"):
        hosts.append(f"{settings.host}:*")
    hosts += settings.allowed_hosts
    origins += settings.allowed_origins
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )
