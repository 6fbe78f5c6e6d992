"""Setting changes, whatever the syntax: SET, RESET, BEGIN / SET TRANSACTION modes, set_config().

Every way of changing a run-time parameter becomes a `SettingChange` with the
parameter's internal name, so the policy engine has one rule per parameter instead of
one per syntax (the bypass list of DESIGN.md section 4 names several syntaxes for the
same effect: ``BEGIN READ WRITE``, ``SET TRANSACTION READ WRITE``,
``SET default_transaction_read_only = off``, ``set_config(...)``).
"""

from __future__ import annotations

from pglast import ast
from pglast.enums import VariableSetKind

from .model import SettingChange

# Transaction modes as DefElem names (BEGIN / START TRANSACTION / SET TRANSACTION).
_TRANSACTION_MODES = {
    "transaction_read_only": "transaction_read_only",
    "transaction_isolation": "transaction_isolation",
    "transaction_deferrable": "transaction_deferrable",
}


def const_text(node: ast.Node | None) -> str | None:
    """The text of a literal (as Postgres would pass it to the parameter), else None."""
    if isinstance(node, ast.A_Const):
        if node.isnull:
            return None
        node = node.val
    if isinstance(node, ast.String):
        return str(node.sval)
    if isinstance(node, ast.Integer):
        return str(node.ival)
    if isinstance(node, ast.Float):
        return str(node.fval)
    if isinstance(node, ast.Boolean):
        return "on" if node.boolval else "off"
    if isinstance(node, ast.TypeCast):
        # SET x = interval '1s' and the like: the literal is what counts.
        return const_text(node.arg)
    return None


def _mode_changes(
    options: tuple[ast.Node, ...] | None, via: str, session: bool
) -> list[SettingChange]:
    changes: list[SettingChange] = []
    for opt in options or ():
        if not isinstance(opt, ast.DefElem):
            continue
        defname = opt.defname or ""
        name = _TRANSACTION_MODES.get(defname, defname)
        if session:
            # SET SESSION CHARACTERISTICS AS TRANSACTION ... sets the session default.
            name = f"default_{name}"
        value = const_text(opt.arg) if isinstance(opt.arg, ast.Node) else None
        if name.endswith(("read_only", "deferrable")) and value in ("0", "1"):
            value = "on" if value == "1" else "off"
        values = (value,) if value is not None else None
        changes.append(
            SettingChange(name=name, action="set", values=values, local=not session, via=via)
        )
    return changes


def from_variable_set(stmt: ast.VariableSetStmt) -> list[SettingChange]:
    """The changes of a SET / RESET statement."""
    kind = stmt.kind
    local = bool(stmt.is_local)
    if kind == VariableSetKind.VAR_RESET_ALL:
        return [SettingChange(name="all", action="reset", via="RESET")]
    name = (stmt.name or "").lower()
    if kind == VariableSetKind.VAR_SET_MULTI:
        if name == "transaction":
            return _mode_changes(stmt.args, "SET TRANSACTION", session=False)
        if name == "session characteristics":
            return _mode_changes(stmt.args, "SET SESSION CHARACTERISTICS", session=True)
        # SET TRANSACTION SNAPSHOT 'id': imports another transaction's snapshot.
        snapshot = tuple(v for v in (const_text(a) for a in stmt.args or ()) if v is not None)
        return [
            SettingChange(name=name.replace(" ", "_"), action="set", values=snapshot, local=True)
        ]
    if kind in (VariableSetKind.VAR_RESET, VariableSetKind.VAR_SET_DEFAULT):
        return [SettingChange(name=name, action="reset", local=local, via="RESET")]
    if kind == VariableSetKind.VAR_SET_CURRENT:
        return [SettingChange(name=name, action="current", local=local)]
    texts = [const_text(a) for a in stmt.args or ()]
    literal = all(t is not None for t in texts)
    values = tuple(t for t in texts if t is not None) if literal else None
    return [SettingChange(name=name, action="set", values=values, local=local)]


def from_transaction_options(options: tuple[ast.Node, ...] | None) -> list[SettingChange]:
    """BEGIN / START TRANSACTION modes."""
    return _mode_changes(options, "BEGIN", session=False)


def from_set_config(call: ast.FuncCall) -> SettingChange:
    """``set_config(name, value, is_local)``: literal arguments only, else unknown."""
    args = call.args or ()
    name = const_text(args[0]) if len(args) > 0 else None
    value = const_text(args[1]) if len(args) > 1 else None
    local_text = const_text(args[2]) if len(args) > 2 else None
    local = (local_text or "").lower() in ("true", "t", "on", "1", "yes")
    return SettingChange(
        name=name.lower() if name is not None else None,
        action="set",
        values=(value,) if value is not None else None,
        local=local,
        via="set_config",
    )
