"""Session settings that follow a client from server to server.

``replay_sql``: what makes a server carry a client's settings (sent, hidden, when
a server is lent to a client whose settings differ from what it carries).
``capture``: after a statement changed settings (``SET``, ``RESET``,
``set_config()``, ``DISCARD ALL``), the session-level settings read back from the
server, so the record is exact even after a rolled-back ``SET`` or a ``SET LOCAL``.
"""

from __future__ import annotations

from guardproxy.pool.backend import Backend

Settings = tuple[tuple[str, str], ...]

CAPTURE_SETTINGS = (
    "SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session' ORDER BY name"
)


def literal(text: str) -> str:
    """A string literal that means ``text`` whatever standard_conforming_strings says."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def replay_sql(settings: Settings, app_name: str) -> str:
    """Resets a server's session and applies a client's settings, application_name as the
    proxy names it."""
    pairs = [(k, v) for k, v in settings if k != "application_name"] + [
        ("application_name", app_name)
    ]
    calls = ", ".join(f"pg_catalog.set_config({literal(k)}, {literal(v)}, false)" for k, v in pairs)
    return f"RESET ALL; SELECT {calls}"


def app_name_sql(app_name: str) -> str:
    return f"SELECT pg_catalog.set_config('application_name', {literal(app_name)}, false)"


async def capture(backend: Backend, own: Settings, proxy_app_name: str) -> Settings:
    """The client's session settings as the server has them now. ``own``: the settings
    the client had; ``proxy_app_name``: the application_name the proxy gave the server."""
    rows = await backend.query(CAPTURE_SETTINGS)
    captured = {str(r[0]): str(r[1]) for r in rows}
    backend.app_name = captured.get("application_name", "")
    if backend.app_name == proxy_app_name:
        # ours, not the client's: keep the client's own name in its settings
        client_name = dict(own).get("application_name")
        captured.pop("application_name", None)
        if client_name is not None:
            captured["application_name"] = client_name
    settings = tuple(sorted(captured.items()))
    backend.settings_key = settings
    return settings
