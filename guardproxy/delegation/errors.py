"""Errors of delegation tokens, each with the SQLSTATE a client sees.

`TokenError` (28000, invalid_authorization_specification) is raised for every token
that is not accepted: malformed, wrongly signed, expired, for another agent, revoked,
or unverifiable because its issuer's keys cannot be read. Its ``kind`` is one of
`KINDS`: a short, bounded word fit for a metrics label. Messages never quote the
token itself (it is a bearer secret); they name the token id (``jti``) or the
fingerprint once the token has been parsed.

`RevocationsUnavailable` (57P03) is raised when the revocation list could not be read
for too long: delegated statements are refused rather than run with a stale list.
`KeyFileError` is a problem with an issuer's key file or JWKS document; the verifier
turns it into a `TokenError` of kind ``keys``.
"""

from __future__ import annotations

from guardproxy.protocol.errors import GuardError

SQLSTATE_INVALID_AUTHORIZATION = "28000"

#: Every `TokenError.kind`.
KINDS = (
    "malformed",  # not a JWS compact token, bad JSON, claims of the wrong type
    "algorithm",  # alg none, or an algorithm this issuer does not use
    "issuer",  # iss missing or not trusted
    "keys",  # the issuer's key file / JWKS cannot be read or has no usable key
    "signature",  # no key of the issuer verifies it
    "expired",
    "not_yet_valid",  # nbf or iat in the future
    "lifetime",  # exp - iat longer than the issuer's max_ttl
    "audience",
    "agent",  # sub does not match the agent id
    "revoked",
    "missing",  # a delegation-required agent type without a token
)


class TokenError(GuardError):
    """A delegation token was not accepted; the message says why and what to do."""

    sqlstate = SQLSTATE_INVALID_AUTHORIZATION

    def __init__(
        self, kind: str, message: str, *, hint: str | None = None, token_id: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        assert kind in KINDS, kind
        self.kind = kind
        self.token_id = token_id


class RevocationsUnavailable(GuardError):
    """The revocation list could not be read recently enough to trust it."""

    sqlstate = "57P03"


class KeyFileError(Exception):
    """An issuer's key file or JWKS document cannot be used; the message says why."""
