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


def replay_sql(settings: tuple[tuple[str, str], ...], app_name: str) -> str:
    """Resets a server's session and applies a client's settings, application_name as the proxy names it."""
    pairs = [(k, v) for k, v in settings if k != "application_name"] + [
        ("application_name", app_name)
    ]
    calls = ", ".join(f"pg_catalog.set_config({literal(k)}, {literal(v)}, false)" for k, v in pairs)
    return f"RESET ALL; SELECT {calls}"


def app_name_sql(app_name: str) -> str:
    return f"SELECT pg_catalog.set_config('application_name', {literal(app_name)}, false)"
