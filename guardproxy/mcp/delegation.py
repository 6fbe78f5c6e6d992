"""Delegation tokens as the bearer credential of the MCP HTTP endpoint.

An agent acting for people (docs/delegation.md) sends the delegation token its
application minted as ``Authorization: Bearer <token>``. `DelegationBearer` is the
SDK's `TokenVerifier` for it; it checks the token with guardproxy's own verifier
(`guardproxy.delegation.verify.Verifier`, built from the same ``delegation_issuers``
and ``delegation_clock_skew`` settings as the proxy):

* signature, issuer, audience, expiry, not-before and lifetime, as the proxy does;
* ``sub`` names the agent: it must be one agent id, not a glob (the endpoint logs in
  to the proxy as that agent), and its agent type must take delegation tokens;
* the token is refused with `BearerRefused` (the HTTP layer answers 401 with the
  reason) or accepted as an `AccessToken` whose ``client_id`` is the agent id,
  ``subject`` the token id (the SDK binds an MCP session to it: another token gets
  404 for that session) and ``claims[PRESENTED]`` the `Presented` token.

This check only opens the door. Every tool call then presents the very same token
to the proxy for the agent's session (`wire.CallContext.token`), and the proxy
verifies it again, revocation list included, binds its principals, task and
narrowing, and refuses exactly as it would a direct client: the MCP side never
grants more than the proxy. The endpoint reads no revocation list of its own (it
holds no database credentials): a revoked token still passes this door, and every
call it makes is refused by the proxy.

`check_proxy_transport(url)`: a token is a bearer secret, so it travels to the proxy
only over loopback or TLS (``sslmode=require`` or stronger).

Tokens are never logged: logs name the token id or its fingerprint.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse

import jwt
from mcp.server.auth.provider import AccessToken, TokenVerifier

from ..config import Settings
from ..delegation import binding
from ..delegation.claims import Delegation, fingerprint
from ..delegation.errors import TokenError
from ..delegation.verify import Verifier
from ..policy import PolicySet
from ..protocol.errors import ConfigError
from .config import is_loopback

log = logging.getLogger(__name__)

PRESENTED = "guardproxy_delegation"  # the AccessToken claim holding the `Presented` token
GLOB_CHARACTERS = frozenset("*?[")
SAFE_SSLMODES = ("require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class Presented:
    """A verified delegation token and what it grants; the token itself is never shown."""

    token: str = field(repr=False)
    delegation: Delegation


class BearerRefused(Exception):
    """A delegation token sent as the bearer credential was refused; the message (never
    the token) says why. ``kind`` is the `TokenError` kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def presented(token: AccessToken) -> Presented | None:
    """The delegation token an authenticated request carries, if it carries one."""
    value = (token.claims or {}).get(PRESENTED)
    return value if isinstance(value, Presented) else None


class DelegationBearer(TokenVerifier):
    """Delegation tokens of the configured issuers (see the module docstring)."""

    def __init__(
        self,
        verifier: Verifier,
        policies: PolicySet,
        refused: Callable[[str], None] | None = None,
    ) -> None:
        self.verifier = verifier
        self.policies = policies
        self.refused = refused or (lambda _kind: None)

    @classmethod
    def from_settings(
        cls, settings: Settings, policies: PolicySet, refused: Callable[[str], None] | None = None
    ) -> DelegationBearer:
        verifier = Verifier.from_settings(settings)
        problems = verifier.key_problems()
        if problems:
            raise ConfigError("delegation issuers: " + "; ".join(problems))
        return cls(verifier, policies, refused)

    @property
    def issuers(self) -> list[str]:
        return sorted(self.verifier.issuers)

    async def verify_token(self, token: str) -> AccessToken | None:
        """None for what is not a delegation token (another verifier may know it);
        `BearerRefused` for a delegation token that is not accepted."""
        if not binding.looks_like_token(token.strip()):
            return None
        token = token.strip()
        try:
            delegation = self._verify(token, time.time())
        except TokenError as exc:
            self.refused(exc.kind)
            log.info(
                "bearer delegation token refused (fingerprint %s): %s",
                fingerprint(token),
                exc.message,
            )
            raise BearerRefused(exc.kind, exc.message) from None
        return AccessToken(
            token=delegation.fingerprint,
            client_id=delegation.agent_id,
            scopes=[],
            expires_at=int(delegation.expires_at + self.verifier.clock_skew),
            subject=delegation.token_id,
            claims={"iss": delegation.issuer, PRESENTED: Presented(token, delegation)},
        )

    def _verify(self, token: str, now: float) -> Delegation:
        agent = _unverified_subject(token)
        policy = self.policies.match(agent)
        if policy is None:
            # verified all the same; the endpoint then answers 403 (no agent type)
            delegation = self.verifier.verify(token, agent, now)
        else:
            delegation = binding.present(policy, self.verifier, token, agent, now)
        if GLOB_CHARACTERS & set(delegation.subject):
            raise TokenError(
                "agent",
                f"delegation token {delegation.token_id} is for agents {delegation.subject!r}, "
                "a glob: the MCP endpoint logs in to guardproxy as one agent",
                hint="mint the token for one agent id (sub)",
                token_id=delegation.token_id,
            )
        return delegation


def _unverified_subject(token: str) -> str:
    """The ``sub`` before the signature is checked: only to know which agent to verify
    the token for (the verifier then checks that ``sub`` names it). Empty when it
    cannot be read: the verifier then says what is wrong with the token."""
    try:
        payload: Any = jwt.decode(token, options={"verify_signature": False})
    except (jwt.exceptions.PyJWTError, ValueError):
        return ""
    sub = payload.get("sub") if isinstance(payload, dict) else None
    return sub if isinstance(sub, str) else ""


def check_proxy_transport(url: str) -> None:
    """ConfigError unless tokens would reach the proxy over loopback or TLS."""
    parsed = urlparse(url)
    if parsed.hostname is None or is_loopback(parsed.hostname):
        return
    mode = parse_qs(parsed.query).get("sslmode", [os.environ.get("PGSSLMODE", "prefer")])[-1]
    if mode not in SAFE_SSLMODES:
        raise ConfigError(
            f"--proxy {parsed.hostname} is not a loopback address and sslmode is {mode!r}: "
            "delegation tokens are bearer secrets and would cross the network in clear. "
            "Add ?sslmode=verify-full (or require) to --proxy"
        )
