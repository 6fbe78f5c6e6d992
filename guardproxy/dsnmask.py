"""Connection strings with their secrets masked, for display (SHOW CONFIG, logs). Pure.

`mask_dsn` replaces every password a libpq connection string can carry by ``***``
and leaves everything else exactly as written (hosts, ports, database, sslmode, the
paths of passfile, sslcert, sslkey...). Both libpq forms are understood:

* URIs, ``postgresql://`` or ``postgres://``: the password of the user info
  (``user:PASSWORD@host``), and the values of ``password``, ``sslpassword`` and any
  other secret-looking key in the query string (keys percent-decoded first, as libpq
  does);
* keyword/value strings, ``host=h user=u password='it\\'s'``: quoted or not, with
  spaces around ``=``; a ``dbname`` value that is itself a connection string is
  masked too.

It errs towards hiding. A password written without percent-encoding may contain
``@ : / ? = &``: the user info ends at the *last* ``@`` that is followed by
something shaped like a host list, and a secret query value runs to the next ``&``
that starts a known libpq keyword. A string that is malformed past a secret is
masked to its end. A value this cannot tell apart from a secret (an ``@`` inside a
later query value, for instance) may hide more than the password; it never shows
part of one.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "***"
_URI_PREFIXES = ("postgresql://", "postgres://")
# libpq's connection parameters (PostgreSQL 15 to 17)
LIBPQ_KEYWORDS = frozenset(
    [
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "passfile",
        "channel_binding",
        "connect_timeout",
        "client_encoding",
        "options",
        "application_name",
        "fallback_application_name",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "replication",
        "gssencmode",
        "sslmode",
        "requiressl",
        "sslcompression",
        "sslcert",
        "sslkey",
        "sslpassword",
        "sslrootcert",
        "sslcrl",
        "sslcrldir",
        "sslsni",
        "requirepeer",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "krbsrvname",
        "gsslib",
        "gssdelegation",
        "service",
        "target_session_attrs",
        "load_balance_hosts",
        "require_auth",
        "sslcertmode",
        "sslnegotiation",
    ]
)
SECRET_KEYWORDS = frozenset(("password", "sslpassword"))
_SECRET_WORDS = ("pass", "secret", "token", "pwd")
# what may follow the user info's "@": a host list, then the path, query or the end
_HOST_LIST = re.compile(r"[A-Za-z0-9._~%:\[\],-]*(?:[/?#]|\Z)")


def is_secret_key(key: str) -> bool:
    """A connection parameter whose value must never be shown. Unknown keys that look
    like secrets count too (libpq refuses unknown keys, but they are still shown)."""
    key = key.strip().lower()
    if key in SECRET_KEYWORDS:
        return True
    return key not in LIBPQ_KEYWORDS and any(word in key for word in _SECRET_WORDS)


def mask_dsn(dsn: str) -> str:
    """``dsn`` with every password replaced by ``***`` (see the module docstring)."""
    if dsn.lower().startswith(_URI_PREFIXES):
        return _mask_uri(dsn)
    if "=" in dsn:
        return _mask_keywords(dsn)
    return dsn


# ---------------------------------------------------------------- URIs


def _mask_uri(uri: str) -> str:
    start = uri.index("://") + 3
    rest = uri[start:]
    at = _userinfo_end(rest)
    head = uri[:start]
    if at >= 0:
        user, colon, _password = rest[:at].partition(":")
        head += user + (colon + MASK if colon else "")
        rest = rest[at:]
    query = rest.find("?")
    if query < 0:
        return head + rest
    return head + rest[: query + 1] + _mask_query(rest[query + 1 :])


def _userinfo_end(rest: str) -> int:
    """Index of the ``@`` ending the user info in what follows ``scheme://``, or -1."""
    ats = [i for i, ch in enumerate(rest) if ch == "@"]
    for i in reversed(ats):
        if _HOST_LIST.match(rest, i + 1):
            return i
    return ats[-1] if ats else -1  # nothing host-like after any "@": hide all before the last


def _mask_query(query: str) -> str:
    out: list[str] = []
    pos = 0
    while pos <= len(query):
        end = _param_end(query, pos)
        param = query[pos:end]
        key, eq, value = param.partition("=")
        name = unquote(key)
        if eq and is_secret_key(name):
            end = _secret_end(query, pos)
            param = key + eq + MASK
        elif eq and name.strip().lower() == "dbname" and _looks_like_dsn(unquote(value)):
            param = key + eq + MASK
        out.append(param)
        pos = end + 1
    return "&".join(out)


def _param_end(query: str, pos: int) -> int:
    amp = query.find("&", pos)
    return len(query) if amp < 0 else amp


def _secret_end(query: str, pos: int) -> int:
    """A secret value runs to the next "&" that starts a known keyword, else to the end."""
    amp = query.find("&", pos)
    while amp >= 0:
        key = unquote(query[amp + 1 :].partition("=")[0]).strip().lower()
        if "=" in query[amp + 1 :] and key in LIBPQ_KEYWORDS and "&" not in key:
            return amp
        amp = query.find("&", amp + 1)
    return len(query)


def _looks_like_dsn(value: str) -> bool:
    return "=" in value or "://" in value


# ---------------------------------------------------------------- keyword/value strings


def _mask_keywords(dsn: str) -> str:
    out: list[str] = []
    pos, n = 0, len(dsn)
    while pos < n:
        if _space(dsn[pos]):
            out.append(dsn[pos])
            pos += 1
            continue
        key_end = pos
        while key_end < n and dsn[key_end] != "=" and not _space(dsn[key_end]):
            key_end += 1
        key = dsn[pos:key_end]
        eq = key_end
        while eq < n and _space(dsn[eq]):
            eq += 1
        if eq >= n or dsn[eq] != "=":  # malformed: libpq refuses it; hide the rest if secret
            if is_secret_key(key):
                out.append(key + " " + MASK)
                return "".join(out)
            out.append(dsn[pos:eq])
            pos = eq
            continue
        value_start = eq + 1
        while value_start < n and _space(dsn[value_start]):
            value_start += 1
        value_end = _value_end(dsn, value_start)
        out.append(dsn[pos:value_start])
        value = dsn[value_start:value_end]
        if is_secret_key(key):
            out.append(MASK)
        elif key.lower() == "dbname" and _looks_like_dsn(value):
            out.append(_requote(value, mask_dsn(_unquoted(value))))
        else:
            out.append(value)
        pos = value_end
    return "".join(out)


def _space(char: str) -> bool:
    """libpq's isspace() in the C locale: Python's str.isspace() also takes \x1c-\x1f and
    Unicode spaces, which libpq reads as part of a keyword or value."""
    return char in " \t\n\v\f\r"


def _value_end(dsn: str, pos: int) -> int:
    """End of the value starting at ``pos``: a quoted value to its closing quote (to the
    end when unterminated), else to the next space; a backslash escapes one character."""
    n = len(dsn)
    if pos < n and dsn[pos] == "'":
        i = pos + 1
        while i < n:
            if dsn[i] == "\\":
                i += 2
                continue
            if dsn[i] == "'":
                return i + 1
            i += 1
        return n
    i = pos
    while i < n and not _space(dsn[i]):
        i += 2 if dsn[i] == "\\" else 1
    return min(i, n)


def _unquoted(value: str) -> str:
    inner = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == "'" else value
    return re.sub(r"\\(.)", r"\1", inner, flags=re.DOTALL)


def _requote(original: str, masked: str) -> str:
    if original.startswith("'"):
        return "'" + masked.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return masked.replace("\\", "\\\\").replace(" ", "\\ ")
