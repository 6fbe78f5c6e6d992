"""A token's narrowing applied to a policy: `narrow_policy(policy, narrowing) -> AgentPolicy`.

Pure. The result is the policy the judge is called with, unchanged, for the statements
of a delegated session. It is never wider than `policy`, by construction:

* statement classes: the policy's, intersected with the token's ``statements``;
* tables: only the policy's table rules that the token names (by the same parsed
  name: ``orders`` and ``public.orders`` are different keys, as in policies), each
  with the policy's operations intersected with the token's, minus operations whose
  statement class is gone; a table left with no operation is removed;
* everything else (columns, deny_columns, soft delete, row filters of the tables that
  remain, functions, limits, timeouts, role) is the policy's own.

A token asking for more than the policy allows gets the intersection, never more;
`narrowing_notes()` says what was asked and not granted, for ``guardproxy explain``.

Results are memoized per (policy object, narrowing), so sessions presenting tokens
with the same narrowing share one policy object and the judge's decision cache.
"""

from __future__ import annotations

from dataclasses import replace

from guardproxy.analysis.model import ALWAYS_ALLOWED_CLASSES, Op, StatementClass
from guardproxy.policy.agent import AgentPolicy, TableRule
from guardproxy.policy.checks import OP_CLASS

from .claims import Narrowing

_MEMO_SIZE = 1024
_memo: dict[tuple[int, Narrowing], tuple[AgentPolicy, AgentPolicy]] = {}


def narrow_policy(policy: AgentPolicy, narrowing: Narrowing | None) -> AgentPolicy:
    """The effective policy of a session whose token carries `narrowing` (None: `policy`)."""
    if narrowing is None:
        return policy
    key = (id(policy), narrowing)
    known = _memo.get(key)
    if known is not None and known[0] is policy:
        return known[1]
    narrowed = _narrow(policy, narrowing)
    if len(_memo) >= _MEMO_SIZE:
        _memo.clear()
    _memo[key] = (policy, narrowed)
    return narrowed


def _narrow(policy: AgentPolicy, narrowing: Narrowing) -> AgentPolicy:
    statements = policy.statements
    if narrowing.statements is not None:
        statements = statements & narrowing.statements
    tables: list[TableRule] = []
    for rule in policy.tables:
        ops = _ops(rule, narrowing, statements)
        if ops:
            tables.append(rule if ops == rule.ops else replace(rule, ops=ops))
    kept = {rule.key: rule for rule in tables}
    row_filters = tuple(
        (kept[rule.key], row_filter) for rule, row_filter in policy.row_filters if rule.key in kept
    )
    return replace(
        policy,
        statements=statements,
        tables=tuple(tables),
        row_filters=row_filters,
        description=f"{policy.description} (narrowed by a delegation token: "
        f"{narrowing.describe()})".lstrip(),
    )


def _ops(
    rule: TableRule, narrowing: Narrowing, statements: frozenset[StatementClass]
) -> frozenset[Op]:
    ops = rule.ops
    if narrowing.tables is not None:
        entry = narrowing.table(rule.schema, rule.name)
        if entry is None:
            return frozenset()
        if entry.ops is not None:
            ops = ops & entry.ops
    return frozenset(op for op in ops if OP_CLASS.get(op) in statements)


def narrowing_notes(policy: AgentPolicy, narrowing: Narrowing | None) -> list[str]:
    """What the token asks for that the policy does not allow (so it is not granted)."""
    if narrowing is None:
        return []
    notes: list[str] = []
    if narrowing.statements is not None:
        extra = narrowing.statements - policy.statements - ALWAYS_ALLOWED_CLASSES
        if extra:
            notes.append(
                f"statements {', '.join(sorted(extra))}: not allowed by policy {policy.name}, "
                "not granted"
            )
    rules = {(rule.schema, rule.name): rule for rule in policy.tables}
    for entry in narrowing.tables or ():
        rule = rules.get((entry.schema, entry.name))
        if rule is None:
            notes.append(
                f"table {entry.key}: not in the tables of policy {policy.name} (name it as "
                "the policy does), not granted"
            )
        elif entry.ops is not None and entry.ops - rule.ops:
            extra_ops = ", ".join(sorted(entry.ops - rule.ops))
            notes.append(
                f"table {entry.key}: {extra_ops} not allowed by policy {policy.name}, not granted"
            )
    return notes
