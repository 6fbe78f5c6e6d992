"""What guardproxy's own upstream login needs, granted by ``guardproxy roles`` and
checked by ``guardproxy serve`` before it listens.

The proxy logs in with the user of its ``upstream`` DSN and:

* becomes each agent type's ``upstream_role`` with ``SET ROLE`` (unless the role has a
  password in ``upstream_credentials_dir``, then it logs in as it): it must be a
  member of those roles;
* reads ``guardproxy.alembic_version`` at start (is the schema new enough?);
* writes the audit log (``audit_events``, COPY and INSERT), the idempotency ledger
  (``idempotency_keys``: INSERT ... ON CONFLICT DO UPDATE, SELECT, UPDATE) when a
  policy uses idempotency, task budgets (``task_budgets``: upsert with RETURNING)
  when a policy has budgets, and the instance registry (``proxy_instances``).

`login_needs(policy_set, ...)` lists them (`Need`); `grant_sql` writes the GRANTs;
`check_login(query, ...)` runs one query through any ``query(sql) -> rows`` callable
(the pool's server connection in ``serve``) and raises `ConfigError` naming every
missing privilege and the GRANT that adds it. Without guardproxy's schema, or its
``alembic_version`` table, it checks nothing: the schema version check that follows
says to run ``guardproxy db upgrade``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from ..policy.agent import AgentPolicy
from ..policy.names import quote_ident, quote_literal
from ..protocol.errors import ConfigError

SCHEMA = "guardproxy"
log = logging.getLogger("guardproxy.privileges")


@dataclass(frozen=True)
class Need:
    kind: str  # schema, table, sequence, role
    name: str  # schema.table for tables and sequences
    privilege: str  # USAGE, SELECT, INSERT, UPDATE, DELETE, MEMBER
    why: str
    required: bool = True  # serve refuses to start without it

    def grant(self, login: str) -> str:
        who = quote_ident(login)
        if self.kind == "role":
            return f"GRANT {quote_ident(self.name)} TO {who};"
        target = ".".join(quote_ident(p) for p in self.name.split(".", 1))
        on = {"schema": "SCHEMA ", "sequence": "SEQUENCE ", "table": ""}[self.kind]
        return f"GRANT {self.privilege} ON {on}{target} TO {who};"


def _has_password(role: str, credentials_dir: Path | None) -> bool:
    """Does the proxy log in as `role` itself (as `server.app.role_password` decides)?"""
    env = "GUARDPROXY_ROLE_PASSWORD_" + re.sub(r"[^A-Za-z0-9]", "_", role).upper()
    if os.environ.get(env):
        return True
    return credentials_dir is not None and (credentials_dir / role).is_file()


def login_needs(
    policies: Iterable[AgentPolicy],
    login: str,
    credentials_dir: Path | None = None,
) -> list[Need]:
    """Every privilege the login needs for these policies (see the module docstring)."""
    chosen = list(policies)
    needs = [
        Need("schema", SCHEMA, "USAGE", "guardproxy's own schema"),
        Need("table", f"{SCHEMA}.alembic_version", "SELECT", "the schema version check at start"),
        Need("table", f"{SCHEMA}.audit_events", "INSERT", "the audit log"),
        Need("sequence", f"{SCHEMA}.audit_events_id_seq", "USAGE", "the audit log's ids"),
    ]
    if any(p.idempotency_mode != "off" for p in chosen):
        needs += [
            Need("table", f"{SCHEMA}.idempotency_keys", priv, "the idempotency ledger")
            for priv in ("SELECT", "INSERT", "UPDATE")
        ]
    if any(p.max_writes_per_task or p.max_statements_per_task for p in chosen):
        needs += [
            Need("table", f"{SCHEMA}.task_budgets", priv, "task budgets")
            for priv in ("SELECT", "INSERT", "UPDATE")
        ]
    needs += [
        Need(
            "table",
            f"{SCHEMA}.proxy_instances",
            priv,
            "the instance registry (cancel requests across instances)",
            required=False,
        )
        for priv in ("SELECT", "INSERT", "UPDATE", "DELETE")
    ]
    for policy in chosen:
        role = policy.upstream_role
        if role != login and not _has_password(role, credentials_dir):
            needs.append(
                Need("role", role, "MEMBER", f"SET ROLE {role} for agent type {policy.name}")
            )
    return needs


def grant_sql(needs: list[Need], login: str) -> list[str]:
    """The GRANTs of `needs`; those in guardproxy's schema only when it exists (a NOTICE
    says to run the script again after ``guardproxy db upgrade`` otherwise)."""
    roles = [n for n in needs if n.kind == "role"]
    lines = [n.grant(login) for n in roles]
    inside = [n for n in needs if n.kind != "role"]
    if not inside:
        return lines
    lines += [
        "DO $guard$ BEGIN",
        f"    IF to_regnamespace({quote_literal(SCHEMA)}) IS NOT NULL THEN",
    ]
    grouped: dict[tuple[str, str], list[Need]] = {}
    for need in inside:
        grouped.setdefault((need.kind, need.name), []).append(need)
    for (kind, name), group in grouped.items():
        privileges = ", ".join(n.privilege for n in group)
        grant = Need(kind, name, privileges, group[0].why).grant(login)
        if kind == "schema":
            lines.append(f"        {grant}")
            continue
        lines += [
            f"        IF to_regclass({quote_literal(name)}) IS NOT NULL THEN",
            f"            {grant}  -- {group[0].why}",
            "        END IF;",
        ]
    message = (
        f"the {SCHEMA} schema does not exist yet: run `guardproxy db upgrade`, then this "
        "script again"
    )
    lines += [
        "    ELSE",
        f"        RAISE NOTICE {quote_literal(message)};",
        "    END IF;",
        "END $guard$;",
    ]
    return lines


def check_query(needs: list[Need]) -> str:
    """One query: (kind, name, privilege, granted) per need; granted NULL when the object
    does not exist. Looks objects up by name in the catalogs (no error for a missing one
    or a schema the login may not use)."""
    rows = ", ".join(
        f"({quote_literal(n.kind)}, {quote_literal(n.name)}, {quote_literal(n.privilege)})"
        for n in needs
    )
    return f"""SELECT need.kind, need.name, need.privilege, CASE need.kind
  WHEN 'schema' THEN (SELECT pg_catalog.has_schema_privilege(n.oid, need.privilege)
                      FROM pg_catalog.pg_namespace n WHERE n.nspname = need.name)
  WHEN 'role' THEN (SELECT pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER')
                    FROM pg_catalog.pg_roles r WHERE r.rolname = need.name)
  WHEN 'sequence' THEN (SELECT pg_catalog.has_sequence_privilege(c.oid, need.privilege)
                        FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                        WHERE n.nspname || '.' || c.relname = need.name)
  ELSE (SELECT pg_catalog.has_table_privilege(c.oid, need.privilege)
        FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname || '.' || c.relname = need.name)
END
FROM (VALUES {rows}) AS need(kind, name, privilege)"""


Rows = list[list[str | None]]


async def check_login(
    query: Callable[[str], Awaitable[Rows]],
    policies: Iterable[AgentPolicy],
    login: str,
    credentials_dir: Path | None = None,
) -> list[str]:
    """Raise `ConfigError` naming each missing required privilege and its GRANT; log a
    warning for each optional one and return them (see the module docstring)."""
    present = await query(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
        f"ON n.oid = c.relnamespace WHERE n.nspname = {quote_literal(SCHEMA)} "
        "AND c.relname = 'alembic_version')"
    )
    if not present or present[0][0] != "t":
        return []  # no schema yet: the version check says what to do
    needs = login_needs(policies, login, credentials_dir)
    rows = await query(check_query(needs))
    missing: list[tuple[Need, str]] = []
    by_key = {(n.kind, n.name, n.privilege): n for n in needs}
    for kind, name, privilege, granted in rows:
        need = by_key.get((str(kind), str(name), str(privilege)))
        if need is None or granted == "t":
            continue
        state = "does not exist" if granted is None else "is not granted"
        missing.append((need, state))
    grouped: dict[tuple[str, str, str, bool], list[Need]] = {}
    for need, state in missing:
        grouped.setdefault((need.kind, need.name, state, need.required), []).append(need)
    problems = [
        (
            required,
            _problem(
                replace(group[0], privilege=", ".join(n.privilege for n in group)), state, login
            ),
        )
        for (_, _, state, required), group in grouped.items()
    ]
    errors = [text for required, text in problems if required]
    warnings = [text for required, text in problems if not required]
    for warning in warnings:
        log.warning("guardproxy's upstream login %s lacks %s", login, warning)
    if errors:
        raise ConfigError(
            f"guardproxy's upstream login {login} lacks what it needs:\n  "
            + "\n  ".join(errors)
            + "\n`guardproxy roles --policies DIR --upstream DSN` prints every grant; run it as "
            "the owner of the tables (with CREATEROLE) or a superuser"
        )
    return warnings


def _problem(need: Need, state: str, login: str) -> str:
    if need.kind == "role" and state == "does not exist":
        return (
            f"role {need.name} ({need.why}) does not exist: create it with the script of "
            "`guardproxy roles`"
        )
    if state == "does not exist":
        return f"{need.kind} {need.name} ({need.why}) does not exist: run `guardproxy db upgrade`"
    if need.kind == "role":
        return f"membership in role {need.name} ({need.why}): {need.grant(login)}"
    return f"{need.privilege} on {need.kind} {need.name} ({need.why}): {need.grant(login)}"
