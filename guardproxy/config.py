"""Settings: defaults < YAML config file < GUARDPROXY_* env vars < command-line flags.

Validated by pydantic; a bad value produces a ConfigError that names the key,
where it came from, and what is expected.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from guardproxy.protocol.errors import ConfigError

ENV_PREFIX = "GUARDPROXY_"

#: Signature algorithms of delegation tokens (docs/delegation.md); ``none`` never.
TokenAlgorithm = Literal["EdDSA", "ES256", "RS256", "HS256"]
TOKEN_ALGORITHMS: tuple[TokenAlgorithm, ...] = ("EdDSA", "ES256", "RS256", "HS256")


class DelegationIssuer(BaseModel):
    """One application whose delegation tokens guardproxy trusts (``delegation_issuers``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    issuer: str = Field(
        min_length=1, max_length=256, description="the `iss` claim of this application's tokens"
    )
    key_file: Path | None = Field(
        None,
        description="PEM public key (EdDSA, ES256, RS256), or a file holding an HMAC secret of "
        "at least 32 bytes (HS256); re-read when it changes",
    )
    jwks_file: Path | None = Field(
        None, description="JWKS document (JSON) of the issuer's keys; re-read when it changes"
    )
    audiences: list[str] = Field(
        default_factory=lambda: ["guardproxy"],
        min_length=1,
        description="`aud` values accepted (a token must name one of them)",
    )
    algorithms: list[TokenAlgorithm] = Field(
        default_factory=lambda: list(TOKEN_ALGORITHMS),
        min_length=1,
        description="signature algorithms accepted from this issuer",
    )
    max_ttl: float = Field(
        3600.0,
        gt=0,
        le=7 * 86400,
        description="longest token lifetime (exp - iat) accepted, seconds",
    )

    @field_validator("audiences", mode="before")
    @classmethod
    def _one_audience(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_key_source(self) -> DelegationIssuer:
        if (self.key_file is None) == (self.jwks_file is None):
            raise ValueError(f"issuer {self.issuer!r}: set exactly one of key_file and jwks_file")
        return self


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    listen_host: str = Field("127.0.0.1", description="address to listen on")
    listen_port: int = Field(6432, ge=0, le=65535, description="port to listen on")
    upstream: str | None = Field(
        None, description="upstream Postgres DSN; unset = start the embedded private cluster"
    )
    pool_mode: Literal["transaction", "session"] = Field(
        "transaction",
        description="transaction: a server connection is lent per transaction; session: per "
        "client connection",
    )
    pool_size: int = Field(20, ge=1, le=10000, description="server connections per upstream role")
    reserve_pool_size: int = Field(0, ge=0, le=10000, description="extra connections for waiters")
    reserve_pool_timeout: float = Field(
        3.0, gt=0, description="seconds a client waits before the reserve opens"
    )
    max_client_conn: int = Field(1000, ge=1, description="client connections accepted at once")
    pool_acquire_timeout: float = Field(
        10.0, gt=0, description="seconds to wait for a server connection before SQLSTATE 53300"
    )
    server_connect_timeout: float = Field(
        5.0, gt=0, description="seconds to connect and log in to the upstream"
    )
    server_idle_timeout: float = Field(
        600.0, ge=0, description="close servers idle this long; 0 = never"
    )
    server_lifetime: float = Field(
        3600.0, ge=0, description="close servers this old when idle; 0 = never"
    )
    client_login_timeout: float = Field(
        15.0, gt=0, description="seconds a client has to finish its login"
    )
    client_startup_timeout: float = Field(
        5.0,
        gt=0,
        description="seconds a new connection has to send its startup packet; a silent "
        "socket is closed then",
    )
    max_pending_logins: int = Field(
        100,
        ge=1,
        description="connections still logging in at once; one more closes the oldest of "
        "them (they do not count against max_client_conn, which is for logged-in clients)",
    )
    auth_mode: Literal["trust", "scram", "cert"] = Field(
        "trust",
        description="trust (only on a loopback listen_host), scram (auth_file) or cert "
        "(tls_client_ca_file)",
    )
    tls_cert_file: Path | None = Field(
        None, description="server certificate (PEM) for TLS towards clients"
    )
    tls_key_file: Path | None = Field(None, description="its private key (PEM)")
    tls_client_ca_file: Path | None = Field(
        None, description="CA of client certificates; their CN must be the agent id"
    )
    tls_mode: Literal["disable", "allow", "require"] = Field(
        "allow", description="require: refuse clients that do not use TLS"
    )
    auth_max_failures: int = Field(
        5,
        ge=1,
        description="failed logins per minute from one address for one agent id (4 times as "
        "many from one address for any agent ids) before that address is refused a while",
    )
    auth_file: Path | None = Field(
        None, description="SCRAM verifiers written by `guardproxy passwd`"
    )
    max_message_size: int = Field(
        64 * 1024 * 1024, ge=1024, description="largest client message in bytes"
    )
    max_statement_size: int = Field(
        1024 * 1024,
        ge=1024,
        description="longest statement (Query or Parse text) an agent may send, in bytes; "
        "longer ones are refused before they are parsed (SQLSTATE 54000)",
    )
    judge_offload_above: int = Field(
        16 * 1024,
        ge=0,
        description="statements longer than this many bytes (or with more than 256 "
        "parentheses) are judged in a judge worker process, off the event loop that serves "
        "every agent; 0: always on the loop",
    )
    judge_workers: int = Field(
        1, ge=1, le=16, description="judge worker processes for large statements (per worker)"
    )
    judge_timeout: float = Field(
        2.0,
        gt=0,
        le=60,
        description="seconds the analysis of one large statement may take; past it the "
        "statement is refused (fail closed) and its judge worker replaced",
    )
    auto_prepare_after: int = Field(
        2,
        ge=0,
        description="an unnamed extended-protocol statement sent this many times by an "
        "agent type is prepared once per server connection and reused (0 = off)",
    )
    max_prepared_statements: int = Field(
        200,
        ge=1,
        description="statements prepared per server connection; past it the least "
        "recently prepared one is closed",
    )
    workers: int = Field(
        1, ge=1, le=64, description="processes sharing the listen port (SO_REUSEPORT)"
    )
    client_idle_timeout: float = Field(
        0.0, ge=0, description="close clients that sent nothing for this long; 0 = never"
    )
    audit_queue_size: int = Field(
        10000, ge=1, description="audit events held in memory before loss"
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="seconds SIGTERM waits for transactions"
    )
    advertise_address: str | None = Field(
        None,
        description="host:port where other guardproxy instances reach this one with cancel "
        "requests; unset = listen_host:port, or this machine's address on a wildcard listen_host",
    )
    instance_heartbeat_interval: float = Field(
        10.0, gt=0, le=3600, description="seconds between heartbeats of the instance registry"
    )
    instance_stale_after: float = Field(
        60.0, gt=0, description="seconds without a heartbeat before a registry slot is reclaimed"
    )
    upstream_allow_cleartext: bool = Field(
        False,
        description="answer an upstream that asks for the password in cleartext (pg_hba "
        "'password'), and only over TLS (sslmode require or stronger; verify-full names the "
        "server it goes to); false: such a login is refused and the password never sent",
    )
    upstream_credentials_dir: Path | None = Field(
        None, description="files named after upstream roles holding their passwords (secrets)"
    )
    policies: Path | None = Field(
        None, description="directory of policy YAML files, one per agent type"
    )
    admin_users: list[str] = Field(
        default_factory=list,
        description="agent ids allowed into the admin console (database guardproxy)",
    )
    metrics_host: str = Field("127.0.0.1", description="address of /metrics, /healthz, /readyz")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="port of /metrics; unset = off"
    )
    delegation_issuers: list[DelegationIssuer] = Field(
        default_factory=list,
        description="applications whose delegation tokens are trusted, each with its keys and "
        "audiences (docs/delegation.md); a JSON list in env vars and flags",
    )
    delegation_clock_skew: float = Field(
        30.0, ge=0, le=300, description="seconds of clock difference tolerated on iat/nbf/exp"
    )
    delegation_revocations_refresh: float = Field(
        5.0, gt=0, le=60, description="seconds between reads of the token revocation list"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="debug, info, warning or error"
    )
    embedded_data_dir: Path | None = Field(None, description="data dir of the embedded cluster")

    @field_validator("admin_users", mode="before")
    @classmethod
    def _split_users(cls, value: object) -> object:
        return (
            [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        )

    @field_validator("delegation_issuers", mode="before")
    @classmethod
    def _issuers_json(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value) if value.strip() else []
        except json.JSONDecodeError as exc:
            raise ValueError(
                'expected a JSON list such as [{"issuer": "shop", "key_file": "/etc/shop.pub"}]: '
                f"{exc}"
            ) from None

    @field_validator("delegation_issuers")
    @classmethod
    def _distinct_issuers(cls, value: list[DelegationIssuer]) -> list[DelegationIssuer]:
        names = [i.issuer for i in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"issuer {twice[0]!r} is listed twice; list each issuer once")
        return value

    @field_validator("advertise_address")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        host, port = parse_address(value.strip())
        return join_address(host, port)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.instance_stale_after < 2 * self.instance_heartbeat_interval:
            raise ValueError(
                f"instance_stale_after ({self.instance_stale_after:g}s) must be at least twice "
                f"instance_heartbeat_interval ({self.instance_heartbeat_interval:g}s), or a live "
                "instance's slot could be taken between two of its heartbeats"
            )
        if self.auth_mode == "trust" and not is_loopback_host(self.listen_host):
            raise ValueError(
                f"auth_mode 'trust' is refused on listen_host {self.listen_host!r}: "
                "trust is only allowed on loopback; use auth_mode 'scram' with an auth_file"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_mode == "require" and self.tls_cert_file is None:
            raise ValueError("tls_mode 'require' needs tls_cert_file and tls_key_file")
        if self.auth_mode == "cert" and self.tls_client_ca_file is None:
            raise ValueError(
                "auth_mode 'cert' needs tls_client_ca_file (the CA that signs agents' certificates)"
            )
        if self.auth_mode == "scram" and self.auth_file is None:
            raise ValueError(
                "auth_mode 'scram' needs auth_file (create it with `guardproxy passwd NAME`)"
            )
        if self.upstream is not None:
            parse_dsn(self.upstream)
        return self


_HOST_CHARS = re.compile(r"^[A-Za-z0-9._:%-]+$")


def parse_address(text: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a bare IPv6 address with a port after its last colon.

    Raises ValueError saying what is expected. The host is letters, digits and ``.-_:%``
    only (a DNS name or an IP address), so it can be stored and quoted safely.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"{text!r} is not host:port (for example 10.0.3.7:6432)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is outside 1..65535")
    if not _HOST_CHARS.match(host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or an IP address")
    return host, port


def join_address(host: str, port: int) -> str:
    """The inverse of parse_address (IPv6 addresses in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Upstream(BaseModel):
    model_config = ConfigDict(frozen=True)
    host: str
    port: int
    user: str
    password: str | None
    database: str
    sslmode: str = "prefer"
    sslrootcert: str | None = None


def parse_dsn(dsn: str) -> Upstream:
    """Parses a postgresql:// URL; raises ValueError saying what is wrong."""
    u = urlparse(dsn)
    if u.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"upstream must be a postgresql:// URL, got scheme {u.scheme!r}")
    if not u.username:
        raise ValueError("upstream DSN needs a user name (postgresql://USER:PASSWORD@HOST:PORT/DB)")
    database = unquote(u.path.lstrip("/")) or u.username
    query = dict(parse_qsl(u.query))
    sslmode = query.get("sslmode", "prefer")  # as libpq
    if sslmode not in ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"):
        raise ValueError(
            f"upstream sslmode {sslmode!r} is not one of disable, prefer, require, verify-ca, verify-full"
        )
    return Upstream(
        sslmode=sslmode,
        sslrootcert=query.get("sslrootcert"),
        host=u.hostname or "127.0.0.1",
        port=u.port or 5432,
        user=unquote(u.username),
        password=unquote(u.password) if u.password is not None else None,
        database=database,
    )


def _env_values() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = os.environ.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            out[name] = value
    return out


def load_settings(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"config file {config_file}: cannot read it as YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file}: expected a mapping of setting: value")
        data.update(loaded)
        origin.update({k: f"config file {config_file}" for k in loaded})
    env = _env_values()
    data.update(env)
    origin.update({k: f"env {ENV_PREFIX}{k.upper()}" for k in env})
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
            origin[key] = f"flag --{key.replace('_', '-')}"
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None


def _describe(exc: ValidationError, origin: dict[str, str]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(settings)"
        where = origin.get(str(err["loc"][0]), "") if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown setting; known settings are: {', '.join(Settings.model_fields)}"
        if not err["loc"]:  # a model check: settings that do not fit together
            lines.append(f"settings that do not fit together: {msg}")
            continue
        lines.append(f"setting {key!r}{f' (from {where})' if where else ''}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
