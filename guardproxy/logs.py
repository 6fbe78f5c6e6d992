"""The proxy's log lines: one line per event, whatever an agent put in them.

Agent ids (in trust mode), statements, tasks and error texts reach log lines. A
newline in one would forge a second line; an escape sequence would act on the
terminal of whoever reads the log. ``SafeFormatter`` escapes every such character
of the message (``guardproxy.safetext.visible``) but newlines, and indents every
line after the first: a message of several lines (a policy file's errors) stays
readable, and no text can make a line that looks like a log entry of its own. A
traceback, written by the proxy itself, keeps its lines.
"""

from __future__ import annotations

import logging
import sys

from guardproxy.safetext import visible

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class SafeFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = visible(record.message, keep="\n").replace("\n", "\n    ")
        return super().formatMessage(record)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter(FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
