"""Verification of delegation tokens: `Verifier.verify(token, agent_id, now) -> Delegation`.

Order of checks, each failure a `TokenError` whose message says what was wrong:

1. shape: at most 16 KB, three base64url parts, a JSON header with a string ``alg``;
2. algorithm: ``none`` and anything but EdDSA, ES256, RS256, HS256 are refused before
   any key is looked at;
3. issuer: the (still unverified) ``iss`` must be a configured issuer that accepts
   this algorithm;
4. signature: PyJWT checks it with the issuer's keys *of that algorithm* (a key is
   bound to one algorithm, keys.py); with a ``kid`` in the header, keys of that kid
   (and keys without one) are tried, otherwise every key of the algorithm;
5. claims (claims.py), then times with ``delegation_clock_skew``: ``exp`` passed,
   ``nbf`` or ``iat`` in the future, a lifetime ``exp - iat`` beyond the issuer's
   ``max_ttl``; the audience; ``sub`` matches the agent id (an id or a glob);
6. revocation (revocations.py), when the verifier has a revocation list.

`Verifier.check(delegation, now)` repeats the expiry and revocation checks; the proxy
calls it before every statement of a delegated session. No token is ever logged:
messages and logs name its ``jti`` or its fingerprint (claims.fingerprint).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
from jwt.exceptions import DecodeError, InvalidSignatureError, InvalidTokenError, PyJWTError

from guardproxy.config import TOKEN_ALGORITHMS, DelegationIssuer, Settings
from guardproxy.policy.globs import matches

from .claims import Claims, Delegation, fingerprint, parse_claims, when
from .errors import KeyFileError, TokenError
from .keys import KeySource, VerificationKey

if TYPE_CHECKING:
    from .revocations import RevocationCache

MAX_TOKEN = 16 * 1024
MAX_KEYS_TRIED = 8
_FRESH_HINT = "present a fresh token: SET guard.token = '<token>' (or reconnect with it)"
# PyJWT checks the signature only; every claim is checked here, against `now`
_SIGNATURE_ONLY: Any = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
    "require": [],
}


@dataclass
class Issuer:
    settings: DelegationIssuer
    source: KeySource

    @classmethod
    def of(cls, settings: DelegationIssuer) -> Issuer:
        if settings.jwks_file is not None:
            return cls(settings, KeySource(settings.jwks_file, jwks=True))
        assert settings.key_file is not None
        return cls(settings, KeySource(settings.key_file, jwks=False))


class Verifier:
    """Verifies tokens of the configured issuers (see the module docstring)."""

    def __init__(
        self,
        issuers: Sequence[DelegationIssuer],
        clock_skew: float = 30.0,
        revocations: RevocationCache | None = None,  # None: no revocation list
    ) -> None:
        self.issuers = {i.issuer: Issuer.of(i) for i in issuers}
        self.clock_skew = clock_skew
        self.revocations = revocations

    @classmethod
    def from_settings(
        cls, settings: Settings, revocations: RevocationCache | None = None
    ) -> Verifier:
        return cls(settings.delegation_issuers, settings.delegation_clock_skew, revocations)

    def key_problems(self) -> list[str]:
        """Why some issuer's keys cannot be read (empty: all fine); for startup and reload."""
        problems = []
        for name, issuer in self.issuers.items():
            try:
                issuer.source.keys()
            except KeyFileError as exc:
                problems.append(f"delegation issuer {name!r}: {exc}")
        return problems

    # -- verification ------------------------------------------------------------

    def verify(self, token: str, agent_id: str, now: float | None = None) -> Delegation:
        now = time.time() if now is None else now
        token = token.strip()
        header = _header(token)
        claims = self._verified_claims(token, header)
        self._check_claims(claims, agent_id, now)
        delegation = Delegation(
            agent_id=agent_id,
            subject=claims.subject,
            issuer=claims.issuer,
            token_id=claims.token_id,
            principals=claims.principals,
            task=claims.task,
            issued_at=claims.issued_at,
            expires_at=claims.expires_at,
            narrowing=claims.narrowing,
            fingerprint=fingerprint(token),
        )
        self._check_revoked(delegation, now)
        return delegation

    def check(self, delegation: Delegation, now: float | None = None) -> None:
        """Still valid: not expired, not revoked. Before every statement of the session."""
        now = time.time() if now is None else now
        if delegation.expired(now, self.clock_skew):
            raise _expired(delegation.token_id, delegation.expires_at, now)
        self._check_revoked(delegation, now)

    def _verified_claims(self, token: str, header: dict[str, Any]) -> Claims:
        alg = header["alg"]
        unverified = _unverified_payload(token)
        iss = unverified.get("iss")
        issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            trusted = ", ".join(sorted(self.issuers)) or "none configured"
            raise TokenError(
                "issuer",
                f"delegation token from issuer {iss!r}, which guardproxy does not trust "
                f"(trusted issuers: {trusted})",
                hint="the operator lists trusted applications in delegation_issuers",
            )
        if alg not in issuer.settings.algorithms:
            raise TokenError(
                "algorithm",
                f"delegation token signed with {alg}; issuer {iss!r} uses "
                f"{', '.join(issuer.settings.algorithms)}",
            )
        try:
            keys = issuer.source.keys()
        except KeyFileError as exc:
            raise TokenError(
                "keys",
                f"delegation token of issuer {iss!r} cannot be verified: its keys cannot be "
                f"used ({exc})",
                hint="the operator must fix the issuer's key_file / jwks_file",
            ) from None
        payload = _check_signature(token, alg, header.get("kid"), keys, str(iss))
        return parse_claims(payload)

    def _check_claims(self, claims: Claims, agent_id: str, now: float) -> None:
        issuer = self.issuers[claims.issuer].settings
        skew = self.clock_skew
        jti = claims.token_id
        if now > claims.expires_at + skew:
            raise _expired(jti, claims.expires_at, now)
        for name, at in (("nbf", claims.not_before), ("iat", claims.issued_at)):
            if at is not None and at > now + skew:
                raise TokenError(
                    "not_yet_valid",
                    f"delegation token {jti} is not valid before {when(at)} ({name}); it is "
                    f"{when(now)} here",
                    hint="check the clock of the application that mints the tokens",
                    token_id=jti,
                )
        if claims.expires_at - claims.issued_at > issuer.max_ttl:
            raise TokenError(
                "lifetime",
                f"delegation token {jti} lives {claims.expires_at - claims.issued_at:.0f}s "
                f"(iat to exp); issuer {claims.issuer!r} allows at most {issuer.max_ttl:.0f}s "
                "(max_ttl)",
                hint="mint shorter-lived tokens, and a fresh one per agent run",
                token_id=jti,
            )
        if not set(claims.audiences) & set(issuer.audiences):
            raise TokenError(
                "audience",
                f"delegation token {jti} is for audience {', '.join(claims.audiences)}, not "
                f"for this guardproxy ({', '.join(issuer.audiences)})",
                token_id=jti,
            )
        if not matches(claims.subject, agent_id):
            raise TokenError(
                "agent",
                f"delegation token {jti} is for agent {claims.subject!r}, not for {agent_id!r}",
                hint="each agent presents a token minted for its own agent id",
                token_id=jti,
            )

    def _check_revoked(self, delegation: Delegation, now: float) -> None:
        if self.revocations is None:
            return
        revocation = self.revocations.revoked(delegation, now)  # may raise RevocationsUnavailable
        if revocation is not None:
            raise TokenError(
                "revoked",
                f"delegation token {delegation.token_id} was revoked: {revocation.describe()}",
                hint="ask the application for a new token; an operator revoked this one",
                token_id=delegation.token_id,
            )


def _expired(token_id: str, expires_at: float, now: float) -> TokenError:
    return TokenError(
        "expired",
        f"delegation token {token_id} expired at {when(expires_at)} ({now - expires_at:.0f}s ago)",
        hint=_FRESH_HINT,
        token_id=token_id,
    )


def _malformed(what: str) -> TokenError:
    return TokenError(
        "malformed",
        f"not a delegation token: {what}",
        hint="a delegation token is a signed JWT (three base64url parts joined by dots)",
    )


def _header(token: str) -> dict[str, Any]:
    if len(token) > MAX_TOKEN:
        raise _malformed(f"{len(token)} characters, more than {MAX_TOKEN}")
    if token.count(".") != 2:
        raise _malformed("expected three base64url parts joined by dots")
    try:
        header = jwt.get_unverified_header(token)
    except DecodeError as exc:
        raise _malformed(f"its header cannot be read ({exc})") from None
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise _malformed("its header names no algorithm")
    if alg.lower() == "none":
        raise TokenError(
            "algorithm",
            "delegation token with alg 'none' (unsigned): refused",
            hint=f"tokens must be signed with one of {', '.join(TOKEN_ALGORITHMS)}",
        )
    if alg not in TOKEN_ALGORITHMS:
        raise TokenError(
            "algorithm",
            f"delegation token signed with {alg!r}: guardproxy accepts "
            f"{', '.join(TOKEN_ALGORITHMS)}",
        )
    return header


def _unverified_payload(token: str) -> dict[str, Any]:
    """The payload before its signature is checked: only to find the issuer."""
    try:
        payload = jwt.decode(token, options={"verify_signature": False})
    except (DecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _malformed(f"its payload cannot be read ({exc})") from None
    if not isinstance(payload, dict):
        raise _malformed("its payload is not a JSON object")
    return payload


def _check_signature(
    token: str, alg: str, kid: object, keys: list[VerificationKey], issuer: str
) -> dict[str, Any]:
    candidates = [k for k in keys if k.algorithm == alg]
    if isinstance(kid, str):
        candidates = [k for k in candidates if k.kid in (kid, None)]
    if not candidates:
        named = f" with kid {kid!r}" if isinstance(kid, str) else ""
        raise TokenError(
            "signature",
            f"delegation token signed with {alg}{named}: issuer {issuer!r} has no such key",
            hint="the issuer's keys may have rotated: ask for a fresh token",
        )
    for key in candidates[:MAX_KEYS_TRIED]:
        try:
            payload: dict[str, Any] = jwt.decode(
                token, key.key, algorithms=[alg], options=_SIGNATURE_ONLY
            )
        except InvalidSignatureError:
            continue
        except InvalidTokenError as exc:
            raise _malformed(str(exc)) from None
        except PyJWTError as exc:  # a key PyJWT will not use (InvalidKeyError)
            raise TokenError(
                "keys", f"a key of issuer {issuer!r} cannot verify {alg} tokens: {exc}"
            ) from None
        return payload
    raise TokenError(
        "signature",
        f"delegation token of issuer {issuer!r}: the signature does not verify with its {alg} keys",
        hint="the token was altered, or signed with a key the issuer does not publish",
    )
