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
from guardproxy.protocol import codec
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
        self.running = False  # the session's server is in internal use: never release it

    def judged(self, kind: int, raw: bytes, guard: SessionGuard) -> bool:
        """After the guard allowed a read with a plan check; True when this took the message."""
        session = self.session
        if session.in_round:
            # our own statements would run inside the client's unfinished round
            session.deny(
                kind,
                _refusal(
                    guard,
                    "it comes in the middle of an extended-protocol request (before its Sync)",
                    "0A000",
                    "send Sync before this statement",
                ),
            )
            return True
        sql = guard.last_sql
        cached = session.pool.plan_estimates.get((guard.policy.name, sql))
        if cached is not None and cached[0] is guard.judge_engine.catalog:
            return self._refused(kind, guard, cached[1])
        session.blocked = self.running = True
        if session.transport is not None:
            session.transport.pause_reading()
        types = codec.parameter_types(codec.parse_parse(raw).tail) if kind == 80 else ()
        session.spawn(self._run(kind, raw, guard, sql, types))
        return True

    def _refused(self, kind: int, guard: SessionGuard, estimates: tuple[PlanEstimate, ...]) -> bool:
        for estimate in estimates:
            violation = plan_violation(guard.policy, estimate)
            if violation is not None:
                self._deny(
                    kind,
                    guard,
                    violation.rule,
                    GuardError(violation.reason, hint=violation.hint, sqlstate=violation.sqlstate),
                )
                return True
        return False

    def _deny(self, kind: int, guard: SessionGuard, rule: str, error: GuardError) -> None:
        guard.last_rule = rule
        self.session.stats.denials[rule] += 1
        log.info("denied %s (%s): %s", guard.context.agent_id, rule, error.message)
        self.session.deny(kind, error)

    async def _run(
        self, kind: int, raw: bytes, guard: SessionGuard, sql: str, types: tuple[int, ...]
    ) -> None:
        session = self.session
        try:
            # internal mode: the client sees none of this
            server = await session.server_for_internal_use("the plan check")
            try:
                estimates = await estimate(server, sql, types)
            except NoEstimate as exc:
                estimates = None
                refusal = _refusal(guard, exc.reason, exc.sqlstate, exc.hint)
            server.client = session
            session.unnamed_on = None  # our simple queries dropped the server's unnamed statement
        except asyncio.CancelledError as exc:
            self.running = False
            session.internal_use_failed(exc)
            raise
        except Exception as exc:  # never leave the session blocked, whatever went wrong
            if not isinstance(exc, GuardError | ConnectionError | OSError):
                log.exception("plan check failed")
            self.running = False
            session.internal_use_failed(exc, kind)
            self._resume()
            return
        self.running = False
        session.blocked = False
        if estimates is None:
            self._deny(kind, guard, "limits.plan_check", refusal)
        else:
            if not any(text.startswith(_PREFIX + "EXECUTE") for text in explain_statements(sql)):
                # EXECUTE runs what the name means now: asked again every time
                cache = session.pool.plan_estimates
                if len(cache) >= CACHE_SIZE:
                    del cache[next(iter(cache))]
                # kept with the catalog it was made under: after DDL, plans are asked again
                cache[(guard.policy.name, sql)] = (guard.judge_engine.catalog, estimates)
            if not self._refused(kind, guard, estimates) and not session.after_judge(kind, raw):
                session.held = (kind, raw)
        if not session.blocked:  # a managed write the message needs may have taken over
            session.resume()

    def _resume(self) -> None:
        self.session.blocked = False
        self.session.resume()


class NoEstimate(Exception):
    def __init__(self, reason: str, sqlstate: str = "54000", hint: str = "") -> None:
        super().__init__(reason)
        self.reason, self.sqlstate, self.hint = reason, sqlstate, hint


def _refusal(guard: SessionGuard, why: str, sqlstate: str, hint: str) -> GuardError:
    name = guard.policy.name
    return GuardError(
        f"{name} may not run this read: its plan must be checked before it runs "
        f"(limits.max_plan_cost / max_plan_rows), and {why} (policy {name}, limits)",
        hint=hint or "send the read as a statement of its own, outside an aborted transaction",
        sqlstate=sqlstate,
    )


async def estimate(
    server: ServerConn, sql: str, types: tuple[int, ...] = ()
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


async def _estimate_one(server: ServerConn, statement: str, types: tuple[int, ...]) -> PlanEstimate:
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


async def _type_names(server: ServerConn, types: tuple[int, ...]) -> str:
    """``(int4, text)`` for the parameter types a Parse declared; "" to let Postgres infer."""
    if not types or 0 in types:
        return ""
    oids = ",".join(str(t) for t in types)
    rows = await server.query(
        f"SELECT pg_catalog.format_type(t, NULL) FROM pg_catalog.unnest('{{{oids}}}'::pg_catalog.oid[])"
        " WITH ORDINALITY AS u(t, n) ORDER BY n"
    )
    return "(" + ", ".join(str(r[0]) for r in rows) + ")"
