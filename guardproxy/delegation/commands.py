"""The ``guardproxy token ...`` commands, and ``guardproxy explain --token``.

Thin like the rest of the CLI: arguments in, a call into the package, text out.

* ``token keygen --alg EdDSA --out NAME``: NAME.key (private, mode 0600) and NAME.pub
  (for ``delegation_issuers[].key_file``); HS256 writes one secret file, NAME.key.
* ``token mint --key FILE --agent A --principals 42,43 [--task T] [--ttl 15m]
  [--issuer I] [--audience A] [--tables orders:select,customers] [--statements read]``:
  prints a token. For development and tests; applications mint their own.
* ``token revoke|unrevoke (--jti ID | --principal P) [--issuer I] [--reason R]`` and
  ``token list``: the revocation list in the upstream database (``--upstream DSN``).
* ``token rls TABLE --column C [--type bigint]``: the RLS policy of a table with a
  principal column, for the roles of the agent types that list it (``guardproxy roles
  --rls`` ends its script with the same).
* `explain_token()`: the effective (narrowed) rules of an agent with a token, and what
  the token asks for that the policy does not grant; with SQL, the decision on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:  # the package is imported by each command, so `guardproxy --help` stays quick
    from .claims import Delegation
    from .verify import Verifier

token_app = typer.Typer(
    no_args_is_help=True, help="Delegation tokens: mint (development), revoke, list."
)
Opt = typer.Option
DEV_ISSUER = "guardproxy-dev"
UpstreamOpt = Annotated[
    str | None,
    Opt("--upstream", envvar="GUARDPROXY_UPSTREAM", help="upstream DSN (guardproxy's schema)"),
]


def _fail(message: str) -> None:
    typer.echo(f"guardproxy: {message}", err=True)
    raise typer.Exit(2)


@token_app.command("keygen")
def keygen(
    out: Annotated[Path, Opt("--out", help="file name without extension")],
    alg: Annotated[str, Opt("--alg", help="EdDSA | ES256 | RS256 | HS256")] = "EdDSA",
) -> None:
    """Write a new signing key: OUT.key (keep it with the application) and OUT.pub (guardproxy's)."""
    from .mint import generate_key

    try:
        private, public = generate_key(alg)
    except ValueError as exc:
        _fail(str(exc))
        return
    key_file = out.with_name(out.name + ".key")
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    if alg == "HS256":
        typer.echo(f"wrote the HMAC secret {key_file}: the application and guardproxy share it")
        return
    out.with_name(out.name + ".pub").write_bytes(public)
    typer.echo(f"wrote {key_file} (private: the application signs with it) and {out.name}.pub")


@token_app.command("mint")
def mint_command(
    key: Annotated[Path, Opt("--key", help="private key PEM, or HMAC secret file")],
    agent: Annotated[str, Opt("--agent", help="agent id, or a glob such as support-*")],
    principals: Annotated[str, Opt("--principals", help="comma-separated ids: 42,43")] = "",
    task: Annotated[str | None, Opt("--task", help="task id")] = None,
    ttl: Annotated[str, Opt("--ttl", help="lifetime: 90s, 15m, 1h")] = "15m",
    issuer: Annotated[str, Opt("--issuer", help="the iss claim")] = DEV_ISSUER,
    audience: Annotated[str, Opt("--audience", help="the aud claim")] = "guardproxy",
    tables: Annotated[
        str | None, Opt("--tables", help="narrowing: orders:select+update,customers")
    ] = None,
    statements: Annotated[
        str | None, Opt("--statements", help="narrowing: statement classes, e.g. read")
    ] = None,
    kid: Annotated[str | None, Opt("--kid", help="key id for the header")] = None,
    jti: Annotated[str | None, Opt("--jti", help="token id (default: random)")] = None,
) -> None:
    """Print a signed delegation token (for development and tests)."""
    from guardproxy.store.audit_queries import parse_since

    from .errors import KeyFileError
    from .mint import load_signing_key, mint, parse_tables

    try:
        lifetime = parse_since(ttl).total_seconds()
        narrow: dict[str, Any] = {}
        if tables is not None:
            narrow["tables"] = parse_tables(tables)
        if statements is not None:
            narrow["statements"] = [s.strip() for s in statements.split(",") if s.strip()]
        signing = load_signing_key(key, kid)
    except (ValueError, KeyFileError) as exc:
        _fail(str(exc).replace("--since", "--ttl"))
        return
    token = mint(
        signing,
        agent=agent,
        principals=[p.strip() for p in principals.split(",") if p.strip()],
        issuer=issuer,
        audience=audience,
        task=task,
        ttl=lifetime,
        narrow=narrow or None,
        token_id=jti,
    )
    typer.echo(token)


def _revocation_call(upstream: str | None, call: Any) -> Any:
    from .revocations import RevocationStore

    if not upstream:
        _fail("give --upstream DSN (or GUARDPROXY_UPSTREAM): the database with guardproxy's schema")
    store = RevocationStore(str(upstream))

    async def run() -> Any:
        try:
            return await call(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except Exception as exc:  # asyncpg's errors, OSError: say which and stop
        _fail(f"cannot use the revocation list: {type(exc).__name__}: {exc}")


def _target(jti: str | None, principal: str | None) -> tuple[str, str]:
    if (jti is None) == (principal is None):
        _fail("give exactly one of --jti ID and --principal P")
    return ("token", str(jti)) if jti is not None else ("principal", str(principal))


@token_app.command("revoke")
def revoke(
    jti: Annotated[str | None, Opt("--jti", help="revoke this token")] = None,
    principal: Annotated[
        str | None, Opt("--principal", help="revoke every token issued so far for P")
    ] = None,
    issuer: Annotated[str, Opt("--issuer", help="only tokens of this issuer")] = "",
    reason: Annotated[str | None, Opt("--reason", help="why (kept in the list)")] = None,
    upstream: UpstreamOpt = None,
) -> None:
    """Revoke a token, or every token issued so far for a principal; every instance honours it within seconds."""
    kind, value = _target(jti, principal)
    by = f"cli:{os.environ.get('USER', 'unknown')}"
    revocation = _revocation_call(
        upstream, lambda s: s.revoke(kind, value, by=by, issuer=issuer, reason=reason)
    )
    typer.echo(revocation.describe())


@token_app.command("unrevoke")
def unrevoke(
    jti: Annotated[str | None, Opt("--jti")] = None,
    principal: Annotated[str | None, Opt("--principal")] = None,
    issuer: Annotated[str, Opt("--issuer")] = "",
    upstream: UpstreamOpt = None,
) -> None:
    """Remove a revocation."""
    kind, value = _target(jti, principal)
    removed = _revocation_call(upstream, lambda s: s.unrevoke(kind, value, issuer))
    typer.echo(f"{kind} {value}: " + ("revocation removed" if removed else "was not revoked"))
    raise typer.Exit(0 if removed else 1)


@token_app.command("list")
def list_revocations(
    as_json: Annotated[bool, Opt("--json", help="JSON for scripts")] = False,
    upstream: UpstreamOpt = None,
) -> None:
    """The revocation list, newest first."""
    revocations = _revocation_call(upstream, lambda s: s.list())
    rows = [r.row() for r in revocations]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"revoked delegation tokens ({len(rows)})")
    columns = ["kind", "value", "issuer", "revoked_at", "revoked_by", "reason"]
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    Console().print(table)


@token_app.command("rls")
def rls(
    table: Annotated[str, typer.Argument(help="table with a principal column, [schema.]name")],
    column: Annotated[str, Opt("--column", help="the column holding the principal id")],
    column_type: Annotated[
        str | None, Opt("--type", help="its type (bigint, uuid, ...): compares without a cast")
    ] = None,
    policies: Annotated[Path, Opt("--policies", envvar="GUARDPROXY_POLICIES")] = Path("policies"),
) -> None:
    """Print the row-level security of TABLE: the principals' rows for the agent types with delegation tokens, every row for the others."""
    from guardproxy.policy import PolicyError, load_policy_set

    from .postgres import rls_for_policy_set

    try:
        text = rls_for_policy_set(load_policy_set(policies), table, column, column_type)
    except (ValueError, PolicyError) as exc:
        _fail(str(exc))
        return
    typer.echo(text, nl=False)


# -- explain --token -------------------------------------------------------------


def _read_token(path: Path) -> str:
    text = typer.get_text_stream("stdin").read() if str(path) == "-" else path.read_text()
    return text.strip()


def _unverified(token: str) -> dict[str, Any]:
    import jwt

    from .errors import TokenError

    try:
        payload = jwt.decode(token, options={"verify_signature": False})
    except jwt.exceptions.DecodeError as exc:
        raise TokenError("malformed", f"not a delegation token: {exc}") from None
    if not isinstance(payload, dict):
        raise TokenError("malformed", "not a delegation token: the payload is not an object")
    return payload


def _verifier(token: str, config: Path | None, key: Path | None) -> Verifier | None:
    """With --key: that key, for whatever issuer and audience the token names (the
    operator vouches for the key); with --config: the issuers of the settings."""
    from guardproxy.config import DelegationIssuer, load_settings

    from .claims import parse_claims
    from .verify import Verifier

    if key is not None:
        claims = parse_claims(_unverified(token))
        issuer = DelegationIssuer(
            issuer=claims.issuer,
            key_file=key,
            jwks_file=None,
            audiences=list(claims.audiences),
            max_ttl=7 * 86400,
        )
        return Verifier([issuer])
    if config is not None:
        return Verifier.from_settings(load_settings(config))
    return None


def _delegation(token: str, agent: str, verifier: Verifier | None) -> tuple[Delegation, str]:
    """The token's delegation and how far it was checked."""
    from .claims import Delegation, fingerprint, parse_claims

    if verifier is not None:
        return verifier.verify(token, agent), "signature, expiry, audience and agent verified"
    claims = parse_claims(_unverified(token))
    delegation = Delegation(
        agent_id=agent,
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
    return delegation, "NOT verified (give --key FILE or --config FILE to check the signature)"


def explain_token(
    policy_set: Any,
    agent: str,
    token_file: Path,
    sql: str | None,
    catalog: Any,
    config: Path | None = None,
    key: Path | None = None,
) -> tuple[int, str]:
    """(exit code, text): the effective rules of AGENT with the token, or the decision on SQL."""
    from guardproxy.policy.context import SessionContext
    from guardproxy.policy.tools import explain, explain_text
    from guardproxy.protocol.errors import ConfigError

    from .claims import when
    from .errors import TokenError
    from .narrowing import narrow_policy, narrowing_notes

    policy = policy_set.match(agent)
    if policy is None:
        return 1, f"agent {agent!r} matches no agent type: no policy lists it in agents"
    try:
        token = _read_token(token_file)
        delegation, checked = _delegation(token, agent, _verifier(token, config, key))
    except (OSError, ConfigError) as exc:
        return 2, f"cannot read the token or the settings: {exc}"
    except TokenError as exc:
        return 1, f"token refused: {exc.message}" + (f"\nhint: {exc.hint}" if exc.hint else "")
    effective = narrow_policy(policy, delegation.narrowing)
    expires = when(delegation.expires_at)
    left = delegation.expires_at - time.time()
    lines = [
        f"token {delegation.token_id} of {delegation.issuer}: {checked}",
        f"  for agents {delegation.subject}; acting for "
        f"{', '.join(delegation.principals) or 'nobody'}; task {delegation.task or '-'}",
        f"  expires {expires} " + (f"(in {left:.0f}s)" if left > 0 else "(EXPIRED)"),
        f"  delegation in policy {policy.name}: {policy.document.delegation}",
    ]
    if delegation.narrowing is not None:
        lines.append(f"  narrowing: {delegation.narrowing.describe()}")
    lines += [f"  not granted: {note}" for note in narrowing_notes(policy, delegation.narrowing)]
    if sql is None:
        lines.append("effective rules:")
        lines.append(effective.summary())
        return 0, "\n".join(lines)
    ctx = SessionContext(agent_id=agent, principals=delegation.principals, task=delegation.task)
    result = explain(_single(policy_set, effective), agent, sql, catalog, ctx)
    lines.append(explain_text(result))
    return (1 if result["decision"] == "deny" else 0), "\n".join(lines)


def _single(policy_set: Any, effective: Any) -> Any:
    """The policy set with the agent's type replaced by its narrowed policy."""
    from dataclasses import replace

    return replace(
        policy_set,
        policies=tuple(effective if p.name == effective.name else p for p in policy_set),
        _matches={},
    )
