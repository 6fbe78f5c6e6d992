"""Plan limits at run time (``limits.max_plan_cost`` / ``limits.max_plan_rows``).

Before a read the judge marked ``plan_check`` runs, the proxy asks Postgres for its
plan on the server the statement will run on, in a savepoint (or a transaction of
its own) that is rolled back, and refuses the statement when the estimate passes
the policy. A runaway join is refused before it starts.

A statement with parameters (``$1``) is explained as a *generic* plan: prepared,
then ``EXPLAIN EXECUTE`` with NULLs under ``plan_cache_mode = force_generic_plan``,
so the estimate does not depend on one call's values. Estimates are cached per
agent type and exact statement text (not by shape: a selective variant of a
statement must not vouch for an expensive one), until the catalog changes; the
text a driver sends again and again (a Parse with ``$n``) is explained once.

Fail closed: a read whose plan cannot be estimated (Postgres cannot plan it, a
cursor or EXECUTE with parameters, an aborted transaction) is refused, with what
Postgres said. The check runs only between requests: a read in the middle of an
extended-protocol round (after a Bind or Execute, before its Sync) is refused.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from guardproxy.policy.plans import (
    PlanEstimate,
    explain_statements,
    parameter_count,
    plan_estimate,
    plan_violation,
)
from guardproxy.protocol.errors import Denied, UpstreamError

if TYPE_CHECKING:
    from guardproxy.analysis.catalog import Catalog
    from guardproxy.policy import AgentPolicy
    from guardproxy.pool.backend import Backend

EstimateCache = dict[tuple[str, str], tuple["Catalog", tuple[PlanEstimate, ...]]]

log = logging.getLogger("guardproxy.plans")

CACHE_SIZE = 10000  # estimates kept per agent type
_PREFIX = "EXPLAIN (FORMAT JSON) "
_STATEMENT = "guardproxy_plan"
_PREPARABLE = ("SELECT", "VALUES", "WITH", "TABLE", "(")


async def check(
    backend: Backend,
    policy: AgentPolicy,
    catalog: Catalog,
    sql: str,
    types: tuple[int, ...],
    cache: EstimateCache,
) -> Denied | None:
    """The policy's plan limits applied to ``sql`` on ``backend``: None when it may run,
    else the denial. Estimates are kept in ``cache`` per agent type and exact text, with
    the catalog they were made under."""
    cached = cache.get((policy.name, sql))
    if cached is not None and cached[0] is catalog:
        return _violation(policy, cached[1])
    try:
        estimates = await estimate(backend, sql, types)
    except NoEstimate as exc:
        return _refusal(policy.name, exc.reason, exc.sqlstate, exc.hint)
    if not any(text.startswith(_PREFIX + "EXECUTE") for text in explain_statements(sql)):
        # EXECUTE runs what the name means now: asked again every time
        if len(cache) >= CACHE_SIZE:
            del cache[next(iter(cache))]
        cache[(policy.name, sql)] = (catalog, estimates)
    return _violation(policy, estimates)


def _violation(policy: AgentPolicy, estimates: tuple[PlanEstimate, ...]) -> Denied | None:
    for one in estimates:
        violation = plan_violation(policy, one)
        if violation is not None:
            return Denied(
                violation.reason,
                rule=violation.rule,
                hint=violation.hint,
                sqlstate=violation.sqlstate,
            )
    return None


class NoEstimate(Exception):
    def __init__(self, reason: str, sqlstate: str = "54000", hint: str = "") -> None:
        super().__init__(reason)
        self.reason, self.sqlstate, self.hint = reason, sqlstate, hint


def _refusal(name: str, why: str, sqlstate: str, hint: str) -> Denied:
    return Denied(
        f"{name} may not run this read: its plan must be checked before it runs "
        f"(limits.max_plan_cost / max_plan_rows), and {why} (policy {name}, limits)",
        rule="limits.plan_check",
        hint=hint or "send the read as a statement of its own, outside an aborted transaction",
        sqlstate=sqlstate,
    )


async def estimate(
    server: Backend, sql: str, types: tuple[int, ...] = ()
) -> tuple[PlanEstimate, ...]:
    """The plan estimate of each read in ``sql``; NoEstimate when one cannot be had."""
    if server.status == b"E":
        raise NoEstimate(
            "the transaction is aborted",
            "25P02",
            "roll back (ROLLBACK) and send the statement again",
        )
    out = []
    for text in explain_statements(sql):
        out.append(await _estimate_one(server, text.removeprefix(_PREFIX).strip(), types))
    return tuple(out)


async def _estimate_one(server: Backend, statement: str, types: tuple[int, ...]) -> PlanEstimate:
    inside = server.status == b"T"
    params = parameter_count(statement)
    if params and not statement.lstrip().upper().startswith(_PREPARABLE):
        raise NoEstimate(
            "a cursor or EXECUTE with parameters has no generic plan to ask for",
            "0A000",
            "declare the cursor with values instead of parameters",
        )
    await server.query(
        (f"SAVEPOINT {_STATEMENT}" if inside else "BEGIN")
        + "; SET LOCAL plan_cache_mode = force_generic_plan"
    )
    prepared = False
    try:
        if params:
            declared = await _type_names(server, types) if len(types) == params else ""
            await server.query(f"PREPARE {_STATEMENT}{declared} AS {statement}")
            prepared = True
            nulls = ", ".join(["NULL"] * params)
            rows = await server.query(f"{_PREFIX}EXECUTE {_STATEMENT}({nulls})")
        else:
            rows = await server.query(_PREFIX + statement)
        return plan_estimate(str(rows[0][0]))
    except UpstreamError as exc:
        raise NoEstimate(
            f"Postgres could not plan it: {exc.message}", exc.sqlstate or "54000"
        ) from None
    except (ValueError, IndexError) as exc:
        raise NoEstimate(f"its plan could not be read ({exc})") from None
    finally:
        await server.query(
            f"ROLLBACK TO SAVEPOINT {_STATEMENT}; RELEASE SAVEPOINT {_STATEMENT}"
            if inside
            else "ROLLBACK"
        )
        if prepared:
            await server.query(f"DEALLOCATE {_STATEMENT}")


async def _type_names(server: Backend, types: tuple[int, ...]) -> str:
    """``(int4, text)`` for the parameter types a Parse declared; "" to let Postgres infer."""
    if not types or 0 in types:
        return ""
    oids = ",".join(str(t) for t in types)
    rows = await server.query(
        f"SELECT pg_catalog.format_type(t, NULL) FROM pg_catalog.unnest('{{{oids}}}'::pg_catalog.oid[])"
        " WITH ORDINALITY AS u(t, n) ORDER BY n"
    )
    return "(" + ", ".join(str(r[0]) for r in rows) + ")"
