"""Plan estimates of reads (``limits.max_plan_cost``, ``limits.max_plan_rows``): the pure
parts. The runtime, before it runs a message whose `Decision.plan_check` is set:

1. for each text of `explain_statements(decision.sql)`, asks for its plan (a statement
   with ``$n`` for its generic plan: `parameter_count` says how many NULLs to pass),
   caching the answer by exact statement text (see guardproxy.server.plancheck);
2. `plan_estimate(answer)` reads the estimate from the ``EXPLAIN (FORMAT JSON)``
   output (the JSON text, or the value a driver decoded);
3. `plan_violation(policy, estimate)` says whether to refuse the message, before any
   of it runs; a refusal is an ErrorResponse with the violation's SQLSTATE (54000),
   message and hint, and names the estimate and the limit.

`max_plan_cost` is compared with the root's ``Total Cost``; `max_plan_rows` with the
rows the query would produce before any LIMIT (the ``Plan Rows`` of the first node
under the root's Limit nodes, so the row cap's own ``LIMIT n + 1`` does not hide a
runaway join).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pglast
import pglast.visitors
from pglast import ast, parser
from pglast.stream import RawStream

from .agent import AgentPolicy
from .rowcap import executed_query
from .rules import Violation

SQLSTATE_PROGRAM_LIMIT_EXCEEDED = "54000"
_EXPLAINABLE = (ast.SelectStmt, ast.DeclareCursorStmt, ast.ExecuteStmt)


@dataclass(frozen=True)
class PlanEstimate:
    total_cost: float
    rows: float  # before any LIMIT at the root


def explain_statements(sql: str) -> tuple[str, ...]:
    """``EXPLAIN (FORMAT JSON) ...`` for each read of `sql` (SELECT / VALUES / TABLE,
    DECLARE CURSOR, EXECUTE, the query of a COPY ... TO or an EXPLAIN ANALYZE), in
    order; writes and other statements are skipped."""
    raws = pglast.parse_sql(sql)
    slices = parser.split(sql, only_slices=True)
    out: list[str] = []
    for raw, where in zip(raws, slices, strict=True):
        stmt = raw.stmt
        if isinstance(stmt, ast.SelectStmt) and stmt.intoClause is not None:
            continue
        if isinstance(stmt, _EXPLAINABLE):
            out.append(f"EXPLAIN (FORMAT JSON) {sql[where].strip()}\n")
            continue
        query = executed_query(stmt)  # COPY (query) TO, EXPLAIN ANALYZE: the query
        if query is not None:
            out.append(f"EXPLAIN (FORMAT JSON) {RawStream()(query)}\n")
    return tuple(out)


def parameter_count(sql: str) -> int:
    """The highest ``$n`` of `sql`: how many parameters a generic plan of it needs."""
    highest = 0

    class _Params(pglast.visitors.Visitor):
        def visit_ParamRef(self, ancestors: Any, node: ast.ParamRef) -> None:
            nonlocal highest
            highest = max(highest, node.number or 0)

    _Params()(pglast.parse_sql(sql))
    return highest


def plan_estimate(answer: str | bytes | list[Any] | dict[str, Any]) -> PlanEstimate:
    """The estimate of one ``EXPLAIN (FORMAT JSON)`` answer; ValueError if it is not one."""
    doc: Any = json.loads(answer) if isinstance(answer, str | bytes) else answer
    if isinstance(doc, list):
        doc = doc[0] if doc else None
    plan = doc.get("Plan") if isinstance(doc, dict) else None
    if not isinstance(plan, dict):
        raise ValueError("not the output of EXPLAIN (FORMAT JSON)")
    total = float(plan.get("Total Cost", 0.0))
    node = plan
    while node.get("Node Type") == "Limit" and node.get("Plans"):
        node = node["Plans"][0]
    return PlanEstimate(total_cost=total, rows=float(node.get("Plan Rows", 0.0)))


def plan_violation(policy: AgentPolicy, estimate: PlanEstimate) -> Violation | None:
    """The refusal of a read whose estimate passes the policy's limits, or None."""
    name = policy.name
    cost, rows = policy.max_plan_cost, policy.max_plan_rows
    if cost is not None and estimate.total_cost > cost:
        return Violation(
            rule="limits.max_plan_cost",
            reason=f"{name} may not run this read: its plan is estimated to cost "
            f"{estimate.total_cost:.0f}, more than max_plan_cost = {cost:g} "
            f"(policy {name}, limits.max_plan_cost)",
            hint="narrow it: filter on indexed columns, join on keys, aggregate in the "
            "database, add a LIMIT",
            sqlstate=SQLSTATE_PROGRAM_LIMIT_EXCEEDED,
        )
    if rows is not None and estimate.rows > rows:
        return Violation(
            rule="limits.max_plan_rows",
            reason=f"{name} may not run this read: its plan is estimated to produce "
            f"{estimate.rows:.0f} rows, more than max_plan_rows = {rows} "
            f"(policy {name}, limits.max_plan_rows)",
            hint="narrow the WHERE clause or aggregate; check the join conditions",
            sqlstate=SQLSTATE_PROGRAM_LIMIT_EXCEEDED,
        )
    return None
