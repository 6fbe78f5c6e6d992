"""Words for row-filter decisions: the rule of each use, the reason, the hint.

A hint says what the agent *may* do, so it is built from the table's rule: an
agent whose policy lists only ``select`` on a filtered table is not told to
UPDATE it.
"""

from __future__ import annotations

from ..analysis.collector import RelationRecord
from ..analysis.model import Op
from .agent import AgentPolicy, key_path
from .rowfilter import RowFilter

_OPS = ("update", "delete", "insert")


def operation_rule(rule: str, table_filter: RowFilter, record: RelationRecord) -> str:
    """``row_filters.<t>.<op>`` when a per-operation condition applies to the use,
    ``row_filters.<t>`` (or the soft-delete rule) otherwise."""
    role = record.role
    if rule.startswith("row_filters.") and role in _OPS and getattr(table_filter, role) is not None:
        return f"{rule}.{role}"
    return rule


def filter_reason(agent_type: str, rule: str) -> str:
    """The reason of a statement a row filter rewrote (rule ``row_filters.<t>[.<op>]``)."""
    key = rule.removeprefix("row_filters.")
    table, _, op = key.rpartition(".")
    if op not in _OPS:
        table, op = key, ""
    if op == "insert":
        what = f"rows inserted into {table} are checked against its row filter"
    elif op:
        what = f"the rows of {table} a statement may {op} are filtered"
    else:
        what = f"rows of {table} are filtered"
    return f"{what} for {agent_type} (policy {agent_type}, {rule})"


def filtered_table_hint(policy: AgentPolicy, table_key: str) -> str:
    """What an agent may do with a filtered table it used in a way that cannot be filtered."""
    rule = next((t for t in policy.tables if t.key == table_key), None)
    if rule is None:
        return "rows of this table are filtered for this agent type: read them with SELECT"
    ways = []
    if Op.SELECT in rule.ops:
        ways.append("read them with SELECT")
    changes = [o.value.upper() for o in (Op.UPDATE, Op.DELETE) if o in rule.ops]
    if changes:
        ways.append(f"change them with {' / '.join(changes)} ... WHERE")
    allowed = ", ".join(sorted(o.value for o in rule.ops))
    return (
        f"rows of {table_key} are filtered for {policy.name} ({key_path('row_filters', table_key)})"
        + (f": {'; '.join(ways)}" if ways else "")
        + f"; on {table_key} {policy.name} may: {allowed}"
    )
