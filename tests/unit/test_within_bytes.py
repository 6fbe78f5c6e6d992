"""An error's or notice's text is cut like a row under max_bytes_returned: the text
fields together stay within the cap, the message says it was cut, the code stays."""

from __future__ import annotations

from guardproxy.relay.inflight import within_bytes


def _text_bytes(fields: dict[str, str]) -> int:
    return sum(len(fields.get(code, "").encode()) for code in "MDWH")


def test_a_short_error_is_left_as_it_is() -> None:
    fields = {"S": "ERROR", "C": "22P02", "M": 'invalid input syntax for type integer: "x"'}
    assert within_bytes(fields, 1000) is None


def test_a_table_in_an_error_is_cut_to_the_cap() -> None:
    table = ";".join(f"{i}:delivered" for i in range(500))
    fields = {
        "S": "ERROR",
        "C": "22P02",
        "M": f'invalid input syntax for type integer: "{table}"',
        "D": table,
        "W": f"SQL function with {table}",
    }
    cut = within_bytes(fields, 300)
    assert cut is not None
    assert _text_bytes(cut) <= 300
    assert cut["C"] == "22P02" and cut["S"] == "ERROR"
    assert cut["M"].startswith("invalid input syntax") and "max_bytes_returned" in cut["M"]
    assert "D" not in cut and "W" not in cut  # nothing left for them


def test_multibyte_text_is_cut_on_a_character() -> None:
    fields = {"M": "é" * 400}
    cut = within_bytes(fields, 101)
    assert cut is not None
    assert _text_bytes(cut) <= 101
    cut["M"].encode()  # whole characters only


def test_a_cap_smaller_than_the_mark_still_bounds_the_text() -> None:
    cut = within_bytes({"M": "x" * 100, "D": "y" * 100}, 10)
    assert cut is not None and "D" not in cut
    assert cut["M"].strip().startswith("[cut by guardproxy")  # none of the text, only the mark
