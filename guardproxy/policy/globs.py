"""Agent-id glob patterns (``analytics-*``) and whether two of them can match one id.

Patterns use `fnmatch.fnmatchcase` syntax, case-sensitive like Postgres user names:
``*`` any run of characters, ``?`` one character, ``[abc]`` / ``[a-z]`` / ``[!x]`` one
character of (or not of) a set; anything else matches itself.

`overlap()` decides exactly whether some agent id matches both patterns, and returns
the shortest such id as a witness for the error message. Patterns are regular
languages of a simple kind (sequences of character sets and stars), so the question
is decidable by walking both patterns at once (memoized over positions).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True, slots=True)
class CharSet:
    """One pattern position: a set of characters, or its complement."""

    chars: frozenset[str]
    negated: bool = False

    def intersect(self, other: CharSet) -> CharSet | None:
        if not self.negated and not other.negated:
            common = self.chars & other.chars
            return CharSet(common) if common else None
        if self.negated and other.negated:
            return CharSet(self.chars | other.chars, negated=True)
        positive, negative = (self, other) if not self.negated else (other, self)
        remaining = positive.chars - negative.chars
        return CharSet(remaining) if remaining else None

    def example(self) -> str:
        if not self.negated:
            return min(self.chars)
        for candidate in "x0aA-_":
            if candidate not in self.chars:
                return candidate
        return next(chr(c) for c in range(33, 0x10FFFF) if chr(c) not in self.chars)


STAR = None  # a token is a CharSet or STAR
Token = CharSet | None
ANY = CharSet(frozenset(), negated=True)


def tokenize(pattern: str) -> tuple[Token, ...]:
    """Split a glob into tokens, following fnmatch's rules for brackets."""
    tokens: list[Token] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if not tokens or tokens[-1] is not STAR:
                tokens.append(STAR)
        elif c == "?":
            tokens.append(ANY)
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                tokens.append(CharSet(frozenset("[")))  # unclosed: a literal bracket
                continue
            body = pattern[i:j]
            i = j + 1
            negated = body.startswith("!")
            if negated:
                body = body[1:]
            tokens.append(CharSet(_expand(body), negated=negated))
        else:
            tokens.append(CharSet(frozenset(c)))
    return tuple(tokens)


def _expand(body: str) -> frozenset[str]:
    chars: set[str] = set()
    k = 0
    while k < len(body):
        if k + 2 < len(body) and body[k + 1] == "-":
            lo, hi = body[k], body[k + 2]
            chars.update(chr(c) for c in range(ord(lo), ord(hi) + 1))
            k += 3
        else:
            chars.add(body[k])
            k += 1
    return frozenset(chars)


def matches(pattern: str, agent_id: str) -> bool:
    return fnmatch.fnmatchcase(agent_id, pattern)


def overlap(first: str, second: str) -> str | None:
    """An agent id matched by both patterns (the shortest), or None if there is none."""
    a, b = tokenize(first), tokenize(second)

    @cache
    def walk(i: int, j: int) -> str | None:
        if i == len(a) and j == len(b):
            return ""
        best: str | None = None

        def consider(prefix: str, rest: str | None) -> None:
            nonlocal best
            if rest is not None and (best is None or len(prefix) + len(rest) < len(best)):
                best = prefix + rest

        a_end, b_end = i == len(a), j == len(b)
        ta = None if a_end else a[i]
        tb = None if b_end else b[j]
        if not a_end and ta is STAR:
            consider("", walk(i + 1, j))  # the star matches nothing more
            if isinstance(tb, CharSet):
                consider(tb.example(), walk(i, j + 1))  # the star eats b's character
        if not b_end and tb is STAR:
            consider("", walk(i, j + 1))
            if isinstance(ta, CharSet):
                consider(ta.example(), walk(i + 1, j))
        if isinstance(ta, CharSet) and isinstance(tb, CharSet):
            common = ta.intersect(tb)
            if common is not None:
                consider(common.example(), walk(i + 1, j + 1))
        return best

    return walk(0, 0)
