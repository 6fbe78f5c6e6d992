"""TLS towards Postgres: ``sslmode`` / ``sslrootcert`` of the upstream DSN, as libpq reads them."""

from __future__ import annotations

import os
import ssl


def upstream_context(sslmode: str, rootcert: str | None) -> ssl.SSLContext | None:
    """An SSLContext for the upstream connection, or None for sslmode disable."""
    if sslmode in ("disable", "allow", "prefer") and not rootcert:
        return None if sslmode == "disable" else _no_verify()
    if sslmode in ("require",) and not rootcert:
        return _no_verify()
    ctx = ssl.create_default_context(cafile=rootcert or os.environ.get("PGSSLROOTCERT"))
    ctx.check_hostname = sslmode == "verify-full"
    if sslmode == "require":
        # libpq: require with a root cert behaves like verify-ca
        ctx.check_hostname = False
    return ctx


def _no_verify() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
