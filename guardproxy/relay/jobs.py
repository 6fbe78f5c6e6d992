"""The internal jobs a relay asks its session to run, and what they come back with.

A job is work that needs the lent server for the proxy's own exchanges before the
client may see anything: a managed write, a plan check, reading session settings
back. The relay describes it (``ManagedWrite``, ``PlanCheck``, ``CaptureSettings``);
the session runs it with the code in ``guardproxy.jobs`` on the server, in
internal mode, and hands the outcome back to ``Relay.job_done``. Jobs never see
the session or the relay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from guardproxy.jobs.write_plan import WriteRun
    from guardproxy.policy import SessionContext


class ManagedWrite:
    """Run one write under the proxy's control (see ``guardproxy.jobs.managed_write``)."""

    def __init__(
        self, request: bytes, run: WriteRun, simple: bool, row_cap: int = 0, byte_cap: int = 0
    ) -> None:
        self.request: Final = request  # the Query, or the Execute of the write's portal
        self.run: Final = run
        self.simple: Final = simple  # a simple Query (else an Execute inside a round)
        # the read caps its RETURNING rows are cut at (limits.max_rows_returned and
        # max_bytes_returned; 0: none), as any result
        self.row_cap: Final = row_cap
        self.byte_cap: Final = byte_cap


class PlanCheck:
    """Estimate the plan of a read before it runs (see ``guardproxy.jobs.plan_check``)."""

    def __init__(self, sql: str, types: tuple[int, ...]) -> None:
        self.sql: Final = sql
        self.types: Final = types


class CaptureSettings:
    """Read the session settings back from the server after a statement changed them."""


class JudgeLarge:
    """Judge a large statement in a judge worker process (``server/judge_workers.py``),
    off the event loop; needs no server."""

    def __init__(self, text: bytes, query: bool, context: SessionContext) -> None:
        self.text: Final = text
        self.query: Final = query
        self.context: Final = context  # the session's, with the text's own comments


Job = ManagedWrite | PlanCheck | CaptureSettings | JudgeLarge
