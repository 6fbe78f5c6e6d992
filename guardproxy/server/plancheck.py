"""Plan limits at run time (``limits.max_plan_cost`` / ``limits.max_plan_rows``).

Before a read the judge marked ``plan_check`` runs, the proxy asks Postgres for its
plan on the server the statement will run on, in a savepoint (or a transaction of
its own) that is rolled back, and refuses the statement when the estimate passes
the policy. A runaway join is refused before it starts.

A statement with parameters (``$1``) is explained as a *generic* plan: prepared,
then ``EXPLAIN EXECUTE`` with NULLs under ``plan_cache_mode = force_generic_plan``,
so the estimate does not depend on one call's values. Estimates are cached per
agent type and statement shape, so a shape costs one EXPLAIN until the catalog
changes or the cache turns over.

When Postgres cannot plan the statement (a missing table, no privilege), there is
no estimate and the statement goes on: it fails by itself with Postgres's own error.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from guardproxy.policy.plans import (
    PlanEstimate,
    explain_statements,
    parameter_count,
    plan_estimate,
    plan_violation,
)
from guardproxy.protocol.errors import GuardError, UpstreamError

if TYPE_CHECKING:
    from guardproxy.pool.server import ServerConn
    from guardproxy.server.guard import SessionGuard
    from guardproxy.server.session import ClientSession

log = logging.getLogger("guardproxy.plans")

CACHE_SIZE = 10000  # estimates kept per agent type
_PREFIX = "EXPLAIN (FORMAT JSON) "
_STATEMENT = "guardproxy_plan"
_PREPARABLE = ("SELECT", "VALUES", "WITH", "TABLE", "(")


class PlanChecks:
    def __init__(self, session: ClientSession) -> None:
        self.session = session

    def judged(self, kind: int, raw: bytes, guard: SessionGuard) -> bool:
        """After the guard allowed a read with a plan check; True when this took the message."""
        shape = guard.last_plan_check
        assert shape is not None
        cached = self.session.pool.plan_estimates.get((guard.policy.name, shape))
        if cached is not None and cached[0] is guard.judge_engine.catalog:
            return self._refused(kind, guard, cached[1])
        session = self.session
        session.blocked = True
        if session.transport is not None:
            session.transport.pause_reading()
        session.spawn(self._run(kind, raw, guard, shape, guard.last_sql))
        return True

    def _refused(self, kind: int, guard: SessionGuard, estimates: tuple[PlanEstimate, ...]) -> bool:
        for estimate in estimates:
            violation = plan_violation(guard.policy, estimate)
            if violation is not None:
                guard.last_rule = violation.rule
                self.session.stats.denials[violation.rule] += 1
                log.info(
                    "denied %s (%s): %s", guard.context.agent_id, violation.rule, violation.reason
                )
                self.session.deny(
                    kind,
                    GuardError(violation.reason, hint=violation.hint, sqlstate=violation.sqlstate),
                )
                return True
        return False

    async def _run(self, kind: int, raw: bytes, guard: SessionGuard, shape: str, sql: str) -> None:
        session = self.session
        try:
            # internal mode: the client sees none of this
            server = await session.server_for_internal_use("the plan check")
            estimates = await estimate(server, sql)
            server.client = session
            session.unnamed_on = None  # our simple queries dropped the server's unnamed statement
        except (GuardError, ConnectionError, OSError) as exc:
            session.internal_use_failed(exc)
            self._resume()
            return
        except asyncio.CancelledError as exc:
            session.internal_use_failed(exc)
            raise
        if estimates is not None:
            cache = session.pool.plan_estimates
            if len(cache) >= CACHE_SIZE:
                del cache[next(iter(cache))]
            # kept with the catalog it was made under: after DDL, plans are asked for again
            cache[(guard.policy.name, shape)] = (guard.judge_engine.catalog, estimates)
            if self._refused(kind, guard, estimates):
                self._resume()
                return
        if not session.after_judge(kind, raw):
            session.held = (kind, raw)
        self._resume()

    def _resume(self) -> None:
        self.session.blocked = False
        self.session.resume()


async def estimate(server: ServerConn, sql: str) -> tuple[PlanEstimate, ...] | None:
    """The plan estimate of each read in ``sql``, or None when Postgres cannot plan one."""
    out = []
    for text in explain_statements(sql):
        one = await _estimate_one(server, text.removeprefix(_PREFIX).strip())
        if one is None:
            return None
        out.append(one)
    return tuple(out)


async def _estimate_one(server: ServerConn, statement: str) -> PlanEstimate | None:
    inside = server.status == b"T"
    if server.status == b"E":
        return None  # the client's transaction is aborted: the statement fails anyway
    params = parameter_count(statement)
    if params and not statement.lstrip().upper().startswith(_PREPARABLE):
        return None  # a DECLARE or EXECUTE with parameters has no generic plan to ask for
    await server.query(
        (f"SAVEPOINT {_STATEMENT}" if inside else "BEGIN")
        + "; SET LOCAL plan_cache_mode = force_generic_plan"
    )
    prepared = False
    try:
        if params:
            await server.query(f"PREPARE {_STATEMENT} AS {statement}")
            prepared = True
            nulls = ", ".join(["NULL"] * params)
            rows = await server.query(f"{_PREFIX}EXECUTE {_STATEMENT}({nulls})")
        else:
            rows = await server.query(_PREFIX + statement)
        return plan_estimate(str(rows[0][0]))
    except (UpstreamError, ValueError, IndexError) as exc:
        log.info("no plan estimate for a statement (%s); it runs unchecked", exc)
        return None
    finally:
        await server.query(
            f"ROLLBACK TO SAVEPOINT {_STATEMENT}; RELEASE SAVEPOINT {_STATEMENT}"
            if inside
            else "ROLLBACK"
        )
        if prepared:
            await server.query(f"DEALLOCATE {_STATEMENT}")
