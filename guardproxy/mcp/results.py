"""A statement's result made fit for an LLM reader: JSON values, bounded, every cut said.

Pure: Python values (as psycopg loads them) in, a JSON-ready dict out.

`ResultBuilder(bounds)` takes the columns, then rows one by one (`add` answers
whether it wants more), and `finish(command, notices)` returns::

    {"command": "SELECT", "columns": [{"name": "id", "type": "bigint"}, ...],
     "rows": [[1, "Ada"], ...], "row_count": 2, "complete": true,
     "cuts": [], "notices": []}

Three bounds, each cut announced in ``cuts`` (and ``complete`` false):

* rows: at most ``max_rows`` rows are shown; the builder asks for one more to know
  whether there were more;
* bytes: the rows' JSON text stays under ``max_bytes``; rows past it are left out;
* cells: a cell whose JSON text is longer than ``max_cell_chars`` is cut to that many
  characters (a cut JSON or array value becomes its cut text).

Values: numbers, booleans, null, strings and JSON values as themselves; ``numeric``
as a string (every digit kept); NaN and infinities as strings; timestamps, dates,
times, UUIDs and the like as their ISO or text form; ``bytea`` as ``\\x`` hex.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

CUT_MARK = "…"


@dataclass(frozen=True)
class Bounds:
    max_rows: int = 100
    max_bytes: int = 65536
    max_cell_chars: int = 1000


def json_value(value: Any) -> Any:
    """A JSON-ready form of one value loaded from Postgres."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, uuid.UUID | dt.timedelta):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return str(value)


def _cut_cell(value: Any, limit: int) -> tuple[Any, bool]:
    """The value, or its text cut to `limit` characters; and whether it was cut."""
    if isinstance(value, str):
        if len(value) <= limit:
            return value, False
        return value[:limit] + CUT_MARK, True
    if isinstance(value, dict | list):
        text = json.dumps(value, ensure_ascii=False)
        if len(text) <= limit:
            return value, False
        return text[:limit] + CUT_MARK, True
    return value, False


@dataclass
class ResultBuilder:
    bounds: Bounds
    columns: list[dict[str, str]] | None = None
    rows: list[list[Any]] = field(default_factory=list)
    _bytes: int = 0
    _more_rows: bool = False
    _bytes_cut: bool = False
    _cut_cells: list[str] = field(default_factory=list)
    _cut_cell_count: int = 0
    _seen: int = 0

    def set_columns(self, columns: Sequence[tuple[str, str]]) -> None:
        self.columns = [{"name": name, "type": type_name} for name, type_name in columns]

    def add(self, row: Sequence[Any]) -> bool:
        """Take one row; False once no more rows will be shown (stop reading reads)."""
        self._seen += 1
        if len(self.rows) >= self.bounds.max_rows:
            self._more_rows = True
            return False
        if self._bytes_cut:
            return False
        shown = []
        for index, raw in enumerate(row):
            value, cut = _cut_cell(json_value(raw), self.bounds.max_cell_chars)
            if cut:
                self._cut_cell_count += 1
                if len(self._cut_cells) < 3:
                    self._cut_cells.append(f"row {len(self.rows) + 1} {self._column(index)}")
            shown.append(value)
        size = len(json.dumps(shown, ensure_ascii=False)) + 1
        if self._bytes + size > self.bounds.max_bytes:
            self._bytes_cut = True
            return False
        self._bytes += size
        self.rows.append(shown)
        return True

    def _column(self, index: int) -> str:
        if self.columns is not None and index < len(self.columns):
            return f"column {self.columns[index]['name']!r}"
        return f"column {index + 1}"

    def cuts(self, total: int | None) -> list[str]:
        """What was left out, in words. `total`: rows the statement returned, when known."""
        out = []
        shown = len(self.rows)
        if self._more_rows:
            if total is not None:
                out.append(
                    f"only the first {shown} of {total} rows are shown "
                    f"(at most {self.bounds.max_rows} rows per result)"
                )
            else:
                out.append(
                    f"only the first {shown} rows are shown; the statement returned more "
                    f"(at most {self.bounds.max_rows} rows per result: narrow the query, "
                    "aggregate, or page with LIMIT / OFFSET)"
                )
        if self._bytes_cut:
            rest = f"{total - shown}" if total is not None else "the remaining"
            out.append(
                f"{rest} rows after the first {shown} were left out: the result passed "
                f"{self.bounds.max_bytes} bytes of JSON (select fewer or shorter columns)"
            )
        if self._cut_cell_count:
            where = ", ".join(self._cut_cells)
            more = " ..." if self._cut_cell_count > len(self._cut_cells) else ""
            out.append(
                f"{self._cut_cell_count} cell(s) were cut to {self.bounds.max_cell_chars} "
                f"characters, marked with {CUT_MARK} ({where}{more}); select a substring "
                "to read the rest"
            )
        return out

    def finish(self, command: str | None, notices: Sequence[str], drained: bool) -> dict[str, Any]:
        """The result dict; `drained`: every row of the statement went through `add`."""
        total = self._seen if drained else None
        cuts = self.cuts(total)
        return {
            "command": command,
            "columns": self.columns or [],
            "rows": self.rows,
            "row_count": len(self.rows),
            "complete": not cuts,
            "cuts": cuts,
            "notices": list(notices),
        }
