"""Errors of the policy layer."""

from __future__ import annotations


class PolicyError(Exception):
    """A policy set that cannot be used. `errors` lists every problem found, one a line.

    Each entry names the file, the key path inside it and what was expected, e.g.
    ``policies/analytics.yaml: tables.customers.ops[1]: expected one of select, insert,
    update, delete, truncate; got 'drop'``.
    """

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        count = len(self.errors)
        head = f"{count} error{'s' if count != 1 else ''} in the policy set"
        super().__init__(head + ":\n" + "\n".join(f"  {e}" for e in self.errors))
