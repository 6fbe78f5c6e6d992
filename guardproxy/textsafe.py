"""Text an agent wrote, made safe to show on an operator's terminal.

Statements, delete reasons, tags, agent ids and task names are chosen by agents,
so the CLI treats them as data: `visible(text)` spells out every character that a
terminal would act on instead of showing (C0 and C1 controls, DEL: escape
sequences, carriage returns that overwrite a line) or that changes how text is
shown without being seen (bidirectional overrides and isolates, zero-width
characters, the byte-order mark), as ``\\n``, ``\\x1b``, ``\\u202e``... A backslash
is doubled, so what is shown maps back to exactly one text.

Rich markup is never interpreted in such text: the CLI puts it in `rich.text.Text`
objects (or plain output), and `visible` is applied first in any case.
"""

from __future__ import annotations

import re

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
_UNSAFE = re.compile(
    "[\\\\\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufff9-\ufffb]"
)


def _escape(match: re.Match[str]) -> str:
    ch = match.group(0)
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(value: object) -> str:
    """``str(value)`` with every unsafe character escaped (see the module docstring);
    None becomes ""."""
    if value is None:
        return ""
    return _UNSAFE.sub(_escape, str(value))
