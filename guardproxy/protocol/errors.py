"""One error hierarchy for the proxy: every error carries the SQLSTATE a client sees."""

from __future__ import annotations


class GuardError(Exception):
    """Base class. ``sqlstate`` and ``hint`` go into the ErrorResponse sent to the client."""

    sqlstate = "XX000"
    severity = "ERROR"

    def __init__(
        self, message: str, *, hint: str | None = None, sqlstate: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if sqlstate:
            self.sqlstate = sqlstate


class Denied(GuardError):
    """The policy (or a limit the proxy enforces) refuses a statement; ``rule`` names the
    rule, for the audit log and the metrics."""

    sqlstate = "42501"

    def __init__(
        self,
        message: str,
        *,
        rule: str,
        hint: str | None = None,
        sqlstate: str | None = None,
        kind: str | None = None,
        counted_as: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint, sqlstate=sqlstate)
        self.rule = rule
        self.kind = kind  # read or write, when known: the metrics label of the refusal
        # the denials metric's rule label, when it says more than ``rule`` (a token's
        # refusal is counted by its kind: delegation.expired, ...)
        self.counted_as = counted_as


class ProtocolViolation(GuardError):
    """The peer broke the wire protocol; the connection cannot go on."""

    sqlstate = "08P01"
    severity = "FATAL"


class AuthFailed(GuardError):
    sqlstate = "28P01"
    severity = "FATAL"


class UpstreamError(GuardError):
    """The upstream Postgres could not be reached or refused us."""

    sqlstate = "08006"


class PoolTimeout(GuardError):
    """No server connection became free within pool_acquire_timeout."""

    sqlstate = "53300"


class ConfigError(Exception):
    """A configuration file or setting is invalid; the message names the key."""
