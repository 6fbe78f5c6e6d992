"""Durations written the way postgresql.conf writes them: ``5s``, ``500ms``, ``2min``.

Accepted units are Postgres' time units (``us``, ``ms``, ``s``, ``min``, ``h``, ``d``)
with an optional space and a decimal number. A bare number is rejected: Postgres
reads ``statement_timeout = 5`` as 5 milliseconds, and a policy author who meant
seconds would silently get a 1000 times stricter (or, elsewhere, looser) limit.
"""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS_MS = {
    "us": 0.001,
    "ms": 1.0,
    "s": 1000.0,
    "min": 60_000.0,
    "h": 3_600_000.0,
    "d": 86_400_000.0,
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$")


def parse_duration(value: object) -> timedelta:
    """Parse a policy duration; raise ValueError with what is expected."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(
            f"expected a duration with a unit such as '5s', '500ms' or '2min'; got {value!r}"
        )
    match = _DURATION.match(value.lower())
    if match is None or match.group(2) not in _UNITS_MS:
        raise ValueError(
            "expected a duration such as '5s', '500ms', '2min' or '1h' "
            f"(units: {', '.join(_UNITS_MS)}); got {value!r}"
        )
    ms = float(match.group(1)) * _UNITS_MS[match.group(2)]
    if ms <= 0:
        raise ValueError(f"a duration must be positive (omit the key for no limit); got {value!r}")
    return timedelta(milliseconds=ms)


def to_ms(value: timedelta) -> int:
    """Whole milliseconds, rounded up so that a limit is never loosened."""
    micro = value // timedelta(microseconds=1)
    return max(1, -(-micro // 1000))


def parse_setting_ms(text: str, default_unit: str = "ms") -> int | None:
    """A time setting as Postgres parses it (bare numbers in `default_unit`), in ms.

    Returns None when the text is not a valid time value.
    """
    match = _DURATION.match(text.lower()) if text else None
    if match is not None:
        unit = match.group(2)
        if unit not in _UNITS_MS:
            return None
        number = match.group(1)
    else:
        stripped = text.strip()
        if not re.fullmatch(r"-?\d+(?:\.\d+)?", stripped):
            return None
        number, unit = stripped, default_unit
    ms = float(number) * _UNITS_MS[unit]
    return round(ms)
