"""SQL text the proxy writes itself: literals and the statement that raises a denial in order."""

from __future__ import annotations

from guardproxy.protocol.errors import GuardError


def literal(text: str) -> str:
    """A string literal that means ``text`` whatever standard_conforming_strings says."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def raise_sql(error: GuardError) -> str:
    """A statement that makes the server raise ``error`` (so a transaction aborts in order)."""
    using = f"ERRCODE = {literal(error.sqlstate)}, MESSAGE = {literal(error.message)}"
    if error.hint:
        using += f", HINT = {literal(error.hint)}"
    return f"DO $guardproxy$ BEGIN RAISE EXCEPTION USING {using}; END $guardproxy$"
