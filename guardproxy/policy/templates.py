"""Rewritten reads served from a template: the rewrite computed once per shape.

A read of a table with soft deletes or row filters is rewritten: the filter is
added to the statement's parse tree and the tree printed, about 0.7 ms. That
rewrite depends on the statement's structure, not on its constants, so the
judge computes it once for the normalized text (constants replaced by ``$n``)
and gives every later statement of that shape the printed template with the
statement's own constants put back in place of the ``$n``.

The constants are taken by aligning libpg_query's tokens of the statement with
those of its normalized text: every token must be the same, except where the
normalized text has a parameter that normalize introduced, which must stand for
exactly one constant token (or a minus sign and a number). Anything else gives
no constants, and the statement is judged in full. The template's parameters are
found with the same scanner, so a literal the rewrite wrote itself (a row
filter's value) is never mistaken for one. The judge also checks, once per
template, that the template filled with the first statement's constants has the
structure of that statement's own full rewrite (see `Judge`).
"""

from __future__ import annotations

from pglast import parser

_COMMENTS = frozenset(("C_COMMENT", "SQL_COMMENT"))
_NUMBERS = frozenset(("ICONST", "FCONST"))
_CONSTANTS = frozenset(
    ("ICONST", "FCONST", "SCONST", "USCONST", "BCONST", "XCONST", "TRUE_P", "FALSE_P", "NULL_P")
)

Tokens = list[tuple[str, str]]  # (token name, its text)


def tokens(sql: str) -> Tokens | None:
    """The statement's tokens without comments, or None if it does not scan."""
    try:
        scanned = parser.scan(sql)
    except parser.ParseError:
        return None
    return [(t.name, sql[t.start : t.end + 1]) for t in scanned if t.name not in _COMMENTS]


def first_new_parameter(statement: Tokens) -> int:
    """The number normalize gives its first parameter: one past the statement's own."""
    own = [int(text[1:]) for name, text in statement if name == "PARAM"]
    return max(own, default=0) + 1


def constants(statement: Tokens, normalized: Tokens, first_new: int) -> list[str] | None:
    """The constants normalize replaced, in the order of its parameters; None if the
    two token streams differ anywhere else."""
    found: list[str] = []
    i, count = 0, len(statement)
    for name, text in normalized:
        if i >= count:
            return None
        if name == "PARAM" and int(text[1:]) >= first_new:
            if int(text[1:]) != first_new + len(found):
                return None  # normalize numbers its parameters in text order
            own_name, own_text = statement[i]
            if own_name == "ASCII_45" and i + 1 < count and statement[i + 1][0] in _NUMBERS:
                found.append("-" + statement[i + 1][1])
                i += 2
            elif own_name in _CONSTANTS:
                found.append(own_text)
                i += 1
            else:
                return None
            continue
        if statement[i] != (name, text):
            return None
        i += 1
    return found if i == count else None


class Template:
    """A printed rewrite of a normalized statement, with its parameters' places."""

    __slots__ = ("first_new", "parts", "slots")

    def __init__(self, printed: str, first_new: int) -> None:
        scanned = parser.scan(printed)
        self.first_new = first_new
        self.parts: list[str] = []  # text between the parameters
        self.slots: list[int] = []  # which constant goes after parts[i]
        start = 0
        for token in scanned:
            if token.name != "PARAM":
                continue
            number = int(printed[token.start + 1 : token.end + 1])
            if number < first_new:
                continue  # the statement's own parameter (a Parse message's $n)
            self.parts.append(printed[start : token.start])
            self.slots.append(number - first_new)
            start = token.end + 1
        self.parts.append(printed[start:])

    @property
    def needs(self) -> int:
        """How many constants a statement must bring."""
        return max(self.slots, default=-1) + 1

    def fill(self, values: list[str]) -> str:
        out = [self.parts[0]]
        for slot, part in zip(self.slots, self.parts[1:], strict=True):
            out.append(values[slot])
            out.append(part)
        return "".join(out)
