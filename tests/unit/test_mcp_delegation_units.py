"""Delegation tokens at the MCP HTTP endpoint, the pure parts: the bearer verifier, what a
call of a delegated caller sends to the proxy, the 401 it gets, the settings that must hold
before anything listens, and log lines without tokens. No database, no sockets (the
real thing: tests/integration/test_mcp_delegation.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from _tokens import ISSUER, key_pair
from starlette.authentication import AuthenticationError

from guardproxy.config import DelegationIssuer, Settings
from guardproxy.delegation.mint import SigningKey, mint
from guardproxy.delegation.verify import Verifier
from guardproxy.mcp.config import HttpSettings, check_http
from guardproxy.mcp.delegation import (
    PRESENTED,
    BearerRefused,
    DelegationBearer,
    Presented,
    check_proxy_transport,
    presented,
)
from guardproxy.mcp.gateway import Caller, Gateway, GatewayConfig
from guardproxy.mcp.http import refused_token
from guardproxy.mcp.metrics import McpMetrics
from guardproxy.mcp.run import Options, RedactingFormatter, run_http
from guardproxy.mcp.statements import InputRefused
from guardproxy.policy import PolicySet, load_policy_set
from guardproxy.protocol.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def policies(tmp_path: Path) -> PolicySet:
    """The example policies, support taking delegation tokens."""
    target = tmp_path / "policies"
    target.mkdir()
    for source in (ROOT / "policies").glob("*.yaml"):
        text = source.read_text()
        if source.name == "support.yaml":
            text = text.replace("\nstatements:", "\ndelegation: required\nstatements:", 1)
        (target / source.name).write_text(text)
    return load_policy_set(target)


@pytest.fixture
def signing(tmp_path: Path) -> tuple[SigningKey, Path]:
    return key_pair("EdDSA", tmp_path)


def bearer(
    public: Path, policies: PolicySet, refusals: list[str] | None = None
) -> DelegationBearer:
    issuer = DelegationIssuer.model_validate({"issuer": ISSUER, "key_file": public})
    sink = refusals if refusals is not None else []
    return DelegationBearer(Verifier([issuer]), policies, sink.append)


def token(key: SigningKey, agent: str = "support-7", **kw: object) -> str:
    return mint(key, agent=agent, principals=["42"], issuer=ISSUER, **kw)  # type: ignore[arg-type]


async def test_a_delegation_token_is_the_agent_its_sub_names(
    signing: tuple[SigningKey, Path], policies: PolicySet
) -> None:
    key, public = signing
    raw = token(key, task="T-1", token_id="run-1")
    access = await bearer(public, policies).verify_token(raw)
    assert access is not None
    assert (access.client_id, access.subject, access.scopes) == ("support-7", "run-1", [])
    assert access.token != raw and raw not in repr(access)  # the token is carried, not shown
    carried = presented(access)
    assert carried is not None and carried.token == raw
    assert (carried.delegation.principals, carried.delegation.task) == (("42",), "T-1")
    assert access.claims is not None and access.claims["iss"] == ISSUER
    assert access.expires_at is not None and access.expires_at >= carried.delegation.expires_at


async def test_what_is_no_delegation_token_is_left_to_the_other_verifiers(
    signing: tuple[SigningKey, Path], policies: PolicySet
) -> None:
    _, public = signing
    assert await bearer(public, policies).verify_token("gpmcp_abcdef") is None


async def test_refused_tokens_say_why_and_are_counted(
    signing: tuple[SigningKey, Path], policies: PolicySet
) -> None:
    key, public = signing
    refusals: list[str] = []
    verifier = bearer(public, policies, refusals)
    cases = {
        "expired": token(key, now=1_000_000.0, ttl=60),
        "agent": token(key, agent="support-*"),
        "issuer": token(key, agent="analytics-1"),  # analytics: delegation off
        "malformed": "eyJhbGciOiJFZERTQSJ9.bm90LWpzb24.bm9wZQ",  # payload: not-json
    }
    for kind, raw in cases.items():
        with pytest.raises(BearerRefused) as refused:
            await verifier.verify_token(raw)
        assert refused.value.kind == kind, str(refused.value)
        assert raw not in str(refused.value)
    assert refusals == list(cases)


async def test_a_token_of_an_agent_no_policy_lists_is_verified_then_left_to_the_router(
    signing: tuple[SigningKey, Path], policies: PolicySet
) -> None:
    key, public = signing
    access = await bearer(public, policies).verify_token(token(key, agent="nobody-1"))
    assert access is not None and access.client_id == "nobody-1"  # the endpoint answers 403
    forger, _ = key_pair("EdDSA", public.parent, "forger")
    with pytest.raises(BearerRefused, match="signature"):
        await bearer(public, policies).verify_token(token(forger, agent="nobody-1"))


def test_a_refused_token_gets_401_with_a_safe_reason() -> None:
    reason = "delegation token from issuer 'a\"b\\c\nd\u202e', which guardproxy does not trust"
    response = refused_token(None, AuthenticationError(reason))  # type: ignore[arg-type]
    assert response.status_code == 401
    header = response.headers["www-authenticate"]
    assert header.startswith('Bearer error="invalid_token", error_description="')
    assert '\\"' in header and "\\\\" in header and "\n" not in header and "\u202e" not in header
    assert b'"error": "invalid_token"' in bytes(response.body).replace(b'":"', b'": "')


# ---------------------------------------------------------------- what a call sends


def delegated(policies: PolicySet, task: str | None) -> tuple[Gateway, Caller]:
    from guardproxy.delegation.claims import Delegation

    gateway = Gateway(
        GatewayConfig("postgresql://127.0.0.1:6432/app"), policies, McpMetrics("http")
    )
    delegation = Delegation(
        agent_id="support-7",
        subject="support-7",
        issuer=ISSUER,
        token_id="run-1",
        principals=("42",),
        task=task,
        issued_at=0.0,
        expires_at=900.0,
        narrowing=None,
        fingerprint="0" * 16,
    )
    policy = policies.match("support-7")
    assert policy is not None
    caller = Caller("support-7", policy, ("support-7", "s1"), Presented("eyJ.x.y", delegation))
    return gateway, caller


def test_a_delegated_call_carries_the_token_and_the_tokens_task(policies: PolicySet) -> None:
    gateway, caller = delegated(policies, "T-1")
    call = gateway.call_context(caller, None, "step-1", {"reason": "dup"})
    assert call.token == "eyJ.x.y" and call.task is None and call.step == "step-1"
    assert "-c guard.token=eyJ.x.y" in call.options() and "guard.task" not in call.options()
    assert "eyJ" not in repr(call) and "eyJ" not in repr(caller.presented)
    assert gateway.task_of(caller, call) == "T-1"
    assert gateway.call_context(caller, "T-1").task is None  # repeating it is fine
    with pytest.raises(InputRefused, match="named by your delegation token"):
        gateway.call_context(caller, "T-2")
    assert caller.metric_agent == "*"


def test_without_a_task_in_the_token_the_call_names_it(policies: PolicySet) -> None:
    gateway, caller = delegated(policies, None)
    call = gateway.call_context(caller, "T-9")
    assert call.task == "T-9" and gateway.task_of(caller, call) == "T-9"
    assert "-c guard.task=T-9" in call.options()


# ---------------------------------------------------------------- settings


def test_the_endpoint_needs_a_tokens_file_or_delegation_issuers() -> None:
    with pytest.raises(ConfigError, match="delegation_issuers"):
        check_http(HttpSettings())
    check_http(HttpSettings(), delegation=True)


def test_tokens_reach_the_proxy_over_loopback_or_tls_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGSSLMODE", raising=False)
    check_proxy_transport("postgresql://127.0.0.1:6432/app")
    check_proxy_transport("postgresql://localhost:6432/app")
    check_proxy_transport("postgresql://db.internal:6432/app?sslmode=verify-full")
    with pytest.raises(ConfigError, match="bearer secrets"):
        check_proxy_transport("postgresql://db.internal:6432/app")
    with pytest.raises(ConfigError, match="'prefer'"):
        check_proxy_transport("postgresql://db.internal:6432/app?sslmode=prefer")
    monkeypatch.setenv("PGSSLMODE", "require")
    check_proxy_transport("postgresql://db.internal:6432/app")


def test_a_settings_file_without_issuers_is_refused(tmp_path: Path) -> None:
    settings = tmp_path / "guardproxy.yaml"
    settings.write_text("pool_size: 5\n")
    options = Options(
        "postgresql://127.0.0.1:6432/app",
        ROOT / "policies",
        GatewayConfig("postgresql://127.0.0.1:6432/app"),
    )
    with pytest.raises(ConfigError, match="names no delegation_issuers"):
        run_http(options, HttpSettings(config_file=settings))


def test_issuer_keys_that_cannot_be_read_stop_the_start(
    tmp_path: Path, policies: PolicySet
) -> None:
    settings = Settings.model_validate(
        {"delegation_issuers": [{"issuer": ISSUER, "key_file": str(tmp_path / "missing.pub")}]}
    )
    with pytest.raises(ConfigError, match=r"missing\.pub"):
        DelegationBearer.from_settings(settings, policies)


# ---------------------------------------------------------------- logs


def test_log_lines_never_hold_a_token(signing: tuple[SigningKey, Path]) -> None:
    key, _ = signing
    raw = token(key)
    record = logging.LogRecord("x", logging.INFO, "f", 1, "sent %s to the proxy", (raw,), None)
    line = RedactingFormatter("%(message)s").format(record)
    assert raw not in line and line.startswith("sent <token ") and line.endswith("> to the proxy")
    assert PRESENTED == "guardproxy_delegation"
