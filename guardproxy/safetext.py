"""Text an agent chose, made safe to show an operator and to store: pure functions.

Agents choose much of what operators read: agent ids (in trust mode), tasks, steps,
principals, tags, statements. Shown raw, a control character rewrites the operator's
terminal (ANSI escape sequences), a newline forges a row or a log line, a bidi
override reorders what is read; stored raw, a NUL or a lone surrogate is refused by
Postgres. The one definition of what is unsafe lives here:

* Unicode categories ``Cc`` (C0 and C1 controls, DEL; NUL included), ``Cf`` (format
  characters: bidi overrides and isolates, zero-width characters, the BOM), ``Cs``
  (lone surrogates: text that was not valid UTF-8), ``Zl`` and ``Zp`` (line and
  paragraph separators).

`visible` replaces each unsafe character by a backslash escape that shows its code
point (``\\x1b``, ``\\u202e``, ``\\U000e0001``), so it stays visible and nothing
reaches a terminal raw. Backslashes themselves are left alone: an agent can write
the six characters ``\\x1b``, but cannot make them act. Where an alteration must be
provable (the audit record), the caller keeps a marker of its own.
"""

from __future__ import annotations

import re
import unicodedata

UNSAFE_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Zl", "Zp"))
# The code points of those categories as ranges (Unicode 14, Python 3.11's unicodedata,
# plus the format controls Unicode 15 added), so that long text is searched by one
# regex rather than a category lookup per character. tests/unit/test_safetext.py
# checks them against unicodedata: every such character is in them, and nothing else
# but unassigned code points.
UNSAFE_RANGES = (
    (0x0000, 0x001F), (0x007F, 0x009F), (0x00AD, 0x00AD), (0x0600, 0x0605),
    (0x061C, 0x061C), (0x06DD, 0x06DD), (0x070F, 0x070F), (0x0890, 0x0891),
    (0x08E2, 0x08E2), (0x180E, 0x180E), (0x200B, 0x200F), (0x2028, 0x202E),
    (0x2060, 0x2064), (0x2066, 0x206F), (0xD800, 0xDFFF), (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB), (0x110BD, 0x110BD), (0x110CD, 0x110CD), (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0001, 0xE0001), (0xE0020, 0xE007F),
)  # fmt: skip
_UNSAFE = re.compile("[" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in UNSAFE_RANGES) + "]")


def is_unsafe(char: str) -> bool:
    """True for one character an operator surface must not pass through raw."""
    return _UNSAFE.fullmatch(char) is not None


def escape_char(char: str) -> str:
    """``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``: the code point, readable in ASCII."""
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def visible(text: str, keep: str = "") -> str:
    """``text`` with every unsafe character escaped, except those in ``keep``
    (``"\\t\\n\\r"`` for text whose lines matter, such as a statement).

    Text that is all printable (the usual case) is returned as it is, after one
    C-level check.
    """
    if text.isprintable():
        return text
    if not keep:
        return _UNSAFE.sub(_escape_match, text)
    return _UNSAFE.sub(lambda m: m[0] if m[0] in keep else escape_char(m[0]), text)


def _escape_match(match: re.Match[str]) -> str:
    return escape_char(match[0])


def first_unsafe(text: str, keep: str = "") -> str | None:
    """The first unsafe character of ``text`` (not counting ``keep``), or None."""
    if text.isprintable():
        return None
    for match in _UNSAFE.finditer(text):
        if match[0] not in keep:
            return match[0]
    return None


def describe_char(char: str) -> str:
    """``U+001B (ESCAPE)``: a character named for an error message."""
    name = unicodedata.name(char, "") or _CONTROL_NAMES.get(ord(char), "")
    return f"U+{ord(char):04X}" + (f" ({name})" if name else "")


_CONTROL_NAMES = {
    0x00: "NUL",
    0x07: "BELL",
    0x08: "BACKSPACE",
    0x09: "TAB",
    0x0A: "LINE FEED",
    0x0D: "CARRIAGE RETURN",
    0x1B: "ESCAPE",
    0x7F: "DELETE",
}


def clip_utf8(text: str, limit: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 encoding has at most ``limit`` bytes
    (never a split character). Lone surrogates count as the 3 bytes they would take."""
    if len(text) * 4 <= limit:
        return text
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    end = max(limit, 0)
    while end > 0 and data[end] & 0xC0 == 0x80:  # a continuation byte: inside a character
        end -= 1
    return data[:end].decode("utf-8", "surrogatepass")
