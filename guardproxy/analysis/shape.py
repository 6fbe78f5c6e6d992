"""The *shape* of a SQL text: the key of the decision cache.

``pglast.parser.normalize`` (libpg_query, C, a few microseconds) replaces every
constant that the server's query jumbling would replace with ``$n`` and leaves the
rest of the text as it was. Two texts with the same shape differ only in those
constants and in comments, so a decision that does not depend on a constant is the
same for both. Unlike the 64-bit fingerprint, the shape is the full text: two
different statements can never share a key by accident.

Agents put their context in sqlcommenter comments (``/* task='...' */``), usually at
the end or the start of the text. Left in, those comments would make every task a
new shape; `shape()` removes leading and trailing block comments. This is safe on
normalized text: string constants are gone (``$n``), and a text that still parses and
ends with ``*/`` can only end with a comment.
"""

from __future__ import annotations

from pglast import parser


def shape(sql: str) -> str | None:
    """The normalized text without edge comments, or None if it does not parse."""
    try:
        normalized = parser.normalize(sql)
    except parser.ParseError:
        return None
    if "/*" in normalized:
        return strip_edge_comments(normalized)
    return normalized


def strip_edge_comments(text: str) -> str:
    """Remove non-nested block comments at the start and at the end of `text`."""
    stripped = text.rstrip()
    while stripped.endswith("*/"):
        start = stripped.rfind("/*")
        if start < 0 or "*/" in stripped[start + 2 : -2]:
            break  # nested comment: leave it, a longer key is only a cache miss
        stripped = stripped[:start].rstrip()
    stripped = stripped.lstrip()
    while stripped.startswith("/*"):
        end = stripped.find("*/")
        if end < 0 or "/*" in stripped[2:end]:
            break
        stripped = stripped[end + 2 :].lstrip()
    return stripped
