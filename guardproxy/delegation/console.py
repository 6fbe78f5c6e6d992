"""Admin console commands for delegation tokens (database ``guardproxy``).

::

    SHOW TOKENS                                   -- tokens of the live sessions
    SHOW REVOCATIONS                              -- the revocation list
    REVOKE TOKEN <jti> [ISSUER <iss>] [REASON '<why>']
    REVOKE TOKENS FOR PRINCIPAL <id> [ISSUER <iss>] [REASON '<why>']
    UNREVOKE TOKEN <jti> [ISSUER <iss>]
    UNREVOKE TOKENS FOR PRINCIPAL <id> [ISSUER <iss>]

Values are bare words or single-quoted strings (``''`` for a quote). `parse()` returns
a `Command`, or None for text that is none of these (the console then tries its own
commands); a malformed token command raises GuardError 42601 saying the syntax.
`run()` executes one against the store, refreshes this instance's revocation cache
at once (the others follow within seconds), and returns ``(columns, rows, tag)``
for the console to send as a result set.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

from guardproxy.protocol.errors import GuardError

from .claims import Delegation, when
from .revocations import RevocationCache, RevocationStore

Rows = list[list[str | None]]
SYNTAX = (
    "SHOW TOKENS | SHOW REVOCATIONS | REVOKE TOKEN <jti> [ISSUER <iss>] [REASON '<why>'] | "
    "REVOKE TOKENS FOR PRINCIPAL <id> [ISSUER <iss>] [REASON '<why>'] | UNREVOKE TOKEN <jti> | "
    "UNREVOKE TOKENS FOR PRINCIPAL <id>"
)
_VALUE = r"(?:'(?:[^']|'')*'|[^\s;']+)"
_HEAD = re.compile(r"^\s*(show\s+tokens|show\s+revocations|revoke|unrevoke)\b(.*)$", re.I | re.S)
_TARGET = re.compile(
    rf"^\s*(?:token\s+(?P<jti>{_VALUE})|tokens\s+for\s+principal\s+(?P<principal>{_VALUE}))"
    rf"(?:\s+issuer\s+(?P<issuer>{_VALUE}))?(?:\s+reason\s+(?P<reason>{_VALUE}))?\s*;?\s*$",
    re.I | re.S,
)


@dataclass(frozen=True)
class Command:
    verb: str  # show_tokens, show_revocations, revoke, unrevoke
    kind: str = ""  # token or principal
    value: str = ""
    issuer: str = ""
    reason: str | None = None


def _unquote(text: str | None) -> str | None:
    if text is None:
        return None
    return text[1:-1].replace("''", "'") if text.startswith("'") else text


def parse(sql: str) -> Command | None:
    head = _HEAD.match(sql)
    if head is None:
        return None
    verb = " ".join(head.group(1).lower().split())
    rest = head.group(2)
    if verb.startswith("show"):
        if rest.strip().rstrip(";").strip():
            return None  # SHOW TOKENS something: not ours
        return Command(verb.replace(" ", "_"))
    target = _TARGET.match(rest)
    if target is None or (verb == "unrevoke" and target.group("reason")):
        raise GuardError(f"cannot read {sql.strip()[:80]!r}", hint=SYNTAX, sqlstate="42601")
    kind = "token" if target.group("jti") is not None else "principal"
    value = _unquote(target.group("jti") or target.group("principal")) or ""
    return Command(
        verb,
        kind,
        value,
        _unquote(target.group("issuer")) or "",
        _unquote(target.group("reason")),
    )


async def run(
    command: Command,
    store: RevocationStore,
    cache: RevocationCache | None,
    by: str,
    delegations: Iterable[Delegation] = (),
) -> tuple[list[str], Rows, str]:
    """Executes `command` for admin user `by`; `delegations` are the live sessions' tokens."""
    if command.verb == "show_tokens":
        return show_tokens(delegations, cache, time.time())
    if command.verb == "show_revocations":
        revocations = await store.list()
        columns = ["kind", "value", "issuer", "revoked_at", "revoked_by", "reason"]
        rows: Rows = [[str(r.row()[c]) for c in columns] for r in revocations]
        return columns, rows, f"SHOW {len(rows)}"
    if command.verb == "revoke":
        revocation = await store.revoke(
            command.kind, command.value, by=by, issuer=command.issuer, reason=command.reason
        )
        if cache is not None:
            await cache.load()
        return ["revoked"], [[revocation.describe()]], "REVOKE"
    removed = await store.unrevoke(command.kind, command.value, command.issuer)
    if cache is not None:
        await cache.load()
    what = f"{command.kind} {command.value}" + (f" of {command.issuer}" if command.issuer else "")
    message = f"{what}: revocation removed" if removed else f"{what} was not revoked"
    return ["unrevoked"], [[message]], "UNREVOKE"


def show_tokens(
    delegations: Iterable[Delegation], cache: RevocationCache | None, now: float
) -> tuple[list[str], Rows, str]:
    """One row per token in use: who, on behalf of whom, until when, revoked or not."""
    columns = [
        "token_id",
        "issuer",
        "agent",
        "principals",
        "task",
        "expires_at",
        "sessions",
        "state",
        "fingerprint",
    ]
    seen: dict[tuple[str, str, str], tuple[Delegation, int]] = {}
    for d in delegations:
        key = (d.issuer, d.token_id, d.agent_id)
        seen[key] = (d, seen.get(key, (d, 0))[1] + 1)
    rows: Rows = []
    for d, sessions in seen.values():
        state = "expired" if d.expired(now) else "valid"
        if cache is not None and cache.current.match(d) is not None:
            state = "revoked"
        rows.append(
            [
                d.token_id,
                d.issuer,
                d.agent_id,
                ",".join(d.principals),
                d.task,
                when(d.expires_at),
                str(sessions),
                state,
                d.fingerprint,
            ]
        )
    return columns, rows, f"SHOW {len(rows)}"
