"""Agent-chosen text made safe (guardproxy/safetext.py) and context values judged at the
door (guardproxy/policy/context.py: context_value_problem)."""

from __future__ import annotations

import sys
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardproxy.policy import parse_context_comment
from guardproxy.policy.context import (
    CONTEXT_VALUE_SQLSTATE,
    MAX_KEY,
    MAX_VALUE,
    context_value_problem,
)
from guardproxy.safetext import (
    UNSAFE_CATEGORIES,
    UNSAFE_RANGES,
    clip_utf8,
    describe_char,
    is_unsafe,
    visible,
)

HOSTILE = [
    ("ship\x00", "ship\\x00"),
    ("\x1b[2J\x1b[31mred", "\\x1b[2J\\x1b[31mred"),
    ("a\nforged | row", "a\\x0aforged | row"),
    ("tab\there\r", "tab\\x09here\\x0d"),
    ("\u202egnp.exe", "\\u202egnp.exe"),  # right-to-left override
    ("zero\u200bwidth", "zero\\u200bwidth"),
    ("c1\x9bcontrol", "c1\\x9bcontrol"),
    ("line\u2028sep", "line\\u2028sep"),
    ("bad\udcffutf8", "bad\\udcffutf8"),  # a lone surrogate: bytes that were not UTF-8
    ("tag\U000e0041", "tag\\U000e0041"),  # a language tag character (Cf)
    ("del\x7f", "del\\x7f"),
]


def test_the_ranges_are_exactly_the_unsafe_categories() -> None:
    in_ranges = {cp for a, b in UNSAFE_RANGES for cp in range(a, b + 1)}
    for cp in range(sys.maxunicode + 1):
        category = unicodedata.category(chr(cp))
        if category in UNSAFE_CATEGORIES:
            assert cp in in_ranges, f"U+{cp:04X} ({category}) is missing from UNSAFE_RANGES"
        elif cp in in_ranges:
            assert category == "Cn", f"U+{cp:04X} ({category}) is in UNSAFE_RANGES"
    assert is_unsafe("\x00") and is_unsafe("\U000e007f") and not is_unsafe("a")


@pytest.mark.parametrize(("raw", "shown"), HOSTILE)
def test_visible_escapes_every_unsafe_character(raw: str, shown: str) -> None:
    assert visible(raw) == shown


@pytest.mark.parametrize(
    "text", ["", "T-17", "refund 2", "Zoë's café 注文 🚚", "back\\slash \\x1b stays", "a" * 5000]
)
def test_printable_text_is_unchanged(text: str) -> None:
    assert visible(text) is text or visible(text) == text


def test_keep_leaves_line_breaks_of_a_statement() -> None:
    sql = "SELECT 1\n\tFROM t\r\n WHERE x = '\x00\x1b'"
    assert visible(sql, keep="\t\n\r") == "SELECT 1\n\tFROM t\r\n WHERE x = '\\x00\\x1b'"


@given(st.text())
def test_visible_output_has_no_unsafe_character_and_loses_no_safe_one(text: str) -> None:
    out = visible(text)
    assert not any(unicodedata.category(ch) in UNSAFE_CATEGORIES for ch in out)
    safe = [ch for ch in text if unicodedata.category(ch) not in UNSAFE_CATEGORIES]
    assert all(ch in out for ch in safe)
    out.encode("utf-8")  # storable: never a lone surrogate left (this would raise)


@given(st.text(), st.integers(min_value=0, max_value=64))
def test_clip_utf8_never_exceeds_the_limit_nor_splits_a_character(text: str, limit: int) -> None:
    clipped = clip_utf8(text, limit)
    assert text.startswith(clipped)
    assert len(clipped.encode("utf-8", "surrogatepass")) <= limit
    if clipped != text:  # maximal: one more character would not fit
        nxt = text[: len(clipped) + 1]
        assert len(nxt.encode("utf-8", "surrogatepass")) > limit


def test_describe_char_names_controls() -> None:
    assert describe_char("\x00") == "U+0000 (NUL)"
    assert describe_char("\x1b") == "U+001B (ESCAPE)"
    assert describe_char("\u202e") == "U+202E (RIGHT-TO-LEFT OVERRIDE)"


# ---------------------------------------------------------------- context values at the door


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("task", "T-17"),
        ("guard.step", "refund 2"),
        ("principals", "42,43"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("task", "Zoë's café 注文 🚚"),
        ("task", ""),  # clears the key
        ("task", "x" * MAX_VALUE),
    ],
)
def test_ordinary_context_values_pass(key: str, value: str) -> None:
    assert context_value_problem(key, value) is None


def test_the_nul_of_a_percent_encoded_comment_is_refused_with_what_and_why() -> None:
    # what an agent sends: /* task='ship%00' */ (decoded by the comment parser)
    value = parse_context_comment("UPDATE t SET x = 1 /* task='ship%00' */")["task"]
    problem = context_value_problem("task", value)
    assert problem is not None
    assert "task" in problem and "U+0000 (NUL)" in problem and "printable" in problem
    assert CONTEXT_VALUE_SQLSTATE == "22023"


@pytest.mark.parametrize(("raw", "_shown"), HOSTILE)
def test_every_unsafe_character_in_a_value_is_refused(raw: str, _shown: str) -> None:
    for key in ("task", "step", "principals", "guard.mytag"):
        problem = context_value_problem(key, raw)
        assert problem is not None and "contains U+" in problem, (key, raw)


def test_hostile_keys_and_over_long_values_are_refused() -> None:
    assert "context key" in (context_value_problem("ta\x1bsk", "x") or "")
    assert f"longer than {MAX_KEY}" in (context_value_problem("k" * (MAX_KEY + 1), "x") or "")
    # bytes, not characters: 1024 four-byte characters would overflow a btree index entry
    problem = context_value_problem("task", "🚚" * 300)
    assert problem is not None and "1200 bytes" in problem and f"{MAX_VALUE} bytes" in problem
    assert context_value_problem("task", "x" * (MAX_VALUE + 1)) is not None
