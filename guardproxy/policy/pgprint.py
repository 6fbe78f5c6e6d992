"""Printing rewritten statements as SQL every supported Postgres version accepts.

The judge prints the statements it rewrites with pglast, whose printer follows the
grammar of Postgres 17: a MERGE clause ``WHEN NOT MATCHED`` comes out as ``WHEN NOT
MATCHED BY TARGET``, which Postgres 15 and 16 reject as a syntax error. Both
spellings mean the same, so the short one (valid since 15) is printed instead.

Importing this module installs the change in pglast's printer registry; `engine`
imports it, so every tree the judge prints goes through it.
"""

from __future__ import annotations

from typing import Any

from pglast.printers import dml


class _MatchKind(dml.MergeMatchKindPrinter):
    def MERGE_WHEN_NOT_MATCHED_BY_TARGET(self, node: Any, output: Any) -> None:
        output.write("NOT MATCHED")


dml.merge_match_kind_printer = _MatchKind()
