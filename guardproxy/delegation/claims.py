"""The claims of a delegation token, checked for shape, and what a verified token grants.

`parse_claims(payload)` takes the JSON payload of a token whose signature has already
been verified and returns `Claims`, or raises `TokenError` (kind ``malformed``) naming
the claim that is missing or of the wrong type. It checks shapes only; times,
audience, agent id and revocation are the verifier's (verify.py).

Claims (docs/delegation.md):

==============  =====================================================================
``iss``         the issuing application, one of ``delegation_issuers`` (required)
``sub``         the agent id, or a glob of agent ids such as ``support-*`` (required)
``aud``         a string or a list; one must be an audience of the issuer (required)
``jti``         the token id: revocation, audit, ``guard.token_id`` (required)
``iat, exp``    issue and expiry time, seconds since the epoch (required)
``nbf``         not before (optional)
``principals``  the people (or accounts) the agent acts for: a list of strings or
                integers, each 1..256 printable characters without a comma; may be
                empty (row filters then match nothing)
``task``        the task id (optional): row filters' ``{task}``, budgets, audit
``narrow``      optional: ``{"tables": {...} or [...], "statements": [...]}``; only
                ever removes from what the policy allows (narrowing.py)
==============  =====================================================================

Unknown top-level claims are ignored (JWT practice); unknown keys *inside* ``narrow``
are refused, since ignoring a restriction would grant more than the issuer meant.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from guardproxy.analysis.model import Op, StatementClass
from guardproxy.policy.names import parse_relation_name

from .errors import TokenError

MAX_PRINCIPALS = 1000
MAX_PRINCIPAL = 256
MAX_TASK = 1024  # as the session context keeps it
MAX_ID = 256  # jti, sub, iss
TABLE_OPS = ("select", "insert", "update", "delete", "truncate", "ddl", "references", "maintain")


@dataclass(frozen=True)
class TableNarrowing:
    """One table a token allows: as written, parsed like a policy key, and its ops."""

    key: str
    schema: str | None
    name: str
    ops: frozenset[Op] | None  # None: whatever the policy allows on it


@dataclass(frozen=True)
class Narrowing:
    """What a token lets its agent use, on top of (inside) the policy."""

    tables: tuple[TableNarrowing, ...] | None = None  # None: the policy's tables
    statements: frozenset[StatementClass] | None = None  # None: the policy's classes

    def table(self, schema: str | None, name: str) -> TableNarrowing | None:
        for entry in self.tables or ():
            if (entry.schema, entry.name) == (schema, name):
                return entry
        return None

    def describe(self) -> str:
        parts = []
        if self.statements is not None:
            parts.append("statements " + (", ".join(sorted(self.statements)) or "(none)"))
        if self.tables is not None:
            tables = [
                t.key + ("" if t.ops is None else f" ({', '.join(sorted(t.ops))})")
                for t in self.tables
            ]
            parts.append("tables " + ("; ".join(tables) or "(none)"))
        return ", ".join(parts) or "nothing"


@dataclass(frozen=True)
class Claims:
    issuer: str
    subject: str
    audiences: tuple[str, ...]
    token_id: str
    issued_at: float
    expires_at: float
    not_before: float | None
    principals: tuple[str, ...]
    task: str | None
    narrowing: Narrowing | None


@dataclass(frozen=True)
class Delegation:
    """A verified token: for which agent, on behalf of whom, for what, until when."""

    agent_id: str  # the agent it was verified for
    subject: str  # the sub claim (an id or a glob)
    issuer: str
    token_id: str
    principals: tuple[str, ...]
    task: str | None
    issued_at: float
    expires_at: float
    narrowing: Narrowing | None
    fingerprint: str  # first 16 hex digits of the token's SHA-256: logs, never the token

    def expired(self, now: float, skew: float = 0.0) -> bool:
        return now > self.expires_at + skew

    def describe(self) -> str:
        """One line for logs and messages; never the token."""
        who = ", ".join(self.principals) if self.principals else "nobody"
        task = f", task {self.task}" if self.task else ""
        return (
            f"token {self.token_id} of {self.issuer} (fingerprint {self.fingerprint}) for "
            f"{self.agent_id} on behalf of {who}{task}, expires {when(self.expires_at)}"
        )

    def audit_tags(self) -> dict[str, str]:
        """Tags for audit events and statement tags (principals have their own column)."""
        return {"token_id": self.token_id, "token_issuer": self.issuer}


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:16]


def when(epoch: float) -> str:
    """``2026-11-22 14:05:00 UTC``: how times appear in messages."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _bad(claim: str, expected: str, got: object) -> TokenError:
    shown = type(got).__name__ if got is not None else "nothing"
    return TokenError(
        "malformed",
        f"delegation token: claim {claim!r} must be {expected}; got {shown}",
        hint="the application that mints the tokens must fix them (docs/delegation.md)",
    )


def _text(payload: Mapping[str, Any], claim: str, limit: int, required: bool = True) -> str | None:
    value = payload.get(claim)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= limit or not value.isprintable():
        raise _bad(claim, f"a string of 1..{limit} printable characters", value)
    return value


def _time(payload: Mapping[str, Any], claim: str, required: bool = True) -> float | None:
    value = payload.get(claim)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise _bad(claim, "a number of seconds since 1970-01-01 UTC", value)
    return float(value)


def parse_claims(payload: Mapping[str, Any]) -> Claims:
    """Claims of a verified payload, or TokenError naming the first bad one."""
    issuer = _text(payload, "iss", MAX_ID)
    subject = _text(payload, "sub", MAX_ID)
    token_id = _text(payload, "jti", MAX_ID)
    assert issuer is not None and subject is not None and token_id is not None
    aud = payload.get("aud")
    audiences = (aud,) if isinstance(aud, str) else aud
    if (
        not isinstance(audiences, list | tuple)
        or not audiences
        or not all(isinstance(a, str) and a for a in audiences)
    ):
        raise _bad("aud", "a string or a list of strings", aud)
    issued_at = _time(payload, "iat")
    expires_at = _time(payload, "exp")
    assert issued_at is not None and expires_at is not None
    task = _text(payload, "task", MAX_TASK, required=False)
    return Claims(
        issuer=issuer,
        subject=subject,
        audiences=tuple(audiences),
        token_id=token_id,
        issued_at=issued_at,
        expires_at=expires_at,
        not_before=_time(payload, "nbf", required=False),
        principals=parse_principals(payload.get("principals")),
        task=task,
        narrowing=parse_narrowing(payload.get("narrow")),
    )


def parse_principals(value: object) -> tuple[str, ...]:
    expected = (
        f"a list of at most {MAX_PRINCIPALS} ids (strings or integers, "
        f"1..{MAX_PRINCIPAL} printable characters, no comma)"
    )
    if not isinstance(value, list) or len(value) > MAX_PRINCIPALS:
        raise _bad("principals", expected, value)
    out: list[str] = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            text = str(item)
        elif isinstance(item, str):
            text = item
        else:
            raise _bad("principals", expected, item)
        if not 1 <= len(text) <= MAX_PRINCIPAL or "," in text or not text.isprintable():
            raise _bad("principals", expected, item)
        if text not in out:
            out.append(text)
    return tuple(out)


def parse_narrowing(value: object) -> Narrowing | None:
    """The ``narrow`` claim; None when absent. Unknown keys are refused (see module doc)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("narrow", 'an object such as {"tables": {"orders": ["select"]}}', value)
    unknown = sorted(set(value) - {"tables", "statements"})
    if unknown:
        raise TokenError(
            "malformed",
            f"delegation token: narrow.{unknown[0]} is not understood (narrow takes tables "
            "and statements); the token is refused rather than grant more than it says",
        )
    statements = None
    if "statements" in value:
        raw = value["statements"]
        names = {c.value for c in StatementClass}
        if not isinstance(raw, list) or not all(isinstance(s, str) and s in names for s in raw):
            raise _bad("narrow.statements", f"a list of {', '.join(sorted(names))}", raw)
        statements = frozenset(StatementClass(s) for s in raw)
    tables = _tables(value["tables"]) if "tables" in value else None
    return Narrowing(tables=tables, statements=statements)


def _tables(raw: object) -> tuple[TableNarrowing, ...]:
    expected = 'a list of table names or an object {"orders": ["select", ...]}'
    if isinstance(raw, list):
        items: list[tuple[object, object]] = [(name, None) for name in raw]
    elif isinstance(raw, dict):
        items = list(raw.items())
    else:
        raise _bad("narrow.tables", expected, raw)
    out: list[TableNarrowing] = []
    for key, ops in items:
        if not isinstance(key, str) or not key or len(key) > MAX_ID:
            raise _bad("narrow.tables", expected, key)
        try:
            schema, name = parse_relation_name(key)
        except ValueError as exc:
            raise TokenError("malformed", f"delegation token: narrow.tables: {exc}") from None
        if ops is not None and (
            not isinstance(ops, list) or not all(isinstance(o, str) and o in TABLE_OPS for o in ops)
        ):
            raise _bad(f"narrow.tables.{key}", f"a list of {', '.join(TABLE_OPS)}", ops)
        parsed = None if ops is None else frozenset(Op(o) for o in ops)
        out.append(TableNarrowing(key=key, schema=schema, name=name, ops=parsed))
    return tuple(out)
