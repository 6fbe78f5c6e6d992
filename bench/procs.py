"""Child processes of the harness: each in its own session, all stopped on exit.

Every long-lived process (PgBouncer, guardproxy) is started through
:class:`Processes`, which kills the whole process group of each child in
``stop_all()``. ``stop_all()`` runs from the harness's ``finally`` and again
from ``atexit``, so nothing outlives the run, on error or Ctrl-C alike.
CPU time is read from ``/proc/PID/stat`` over the process and all its
descendants (a proxy with several workers, or one started through runuser).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Processes:
    """The long-lived children of one harness run."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        atexit.register(self.stop_all)

    def spawn(
        self, cmd: list[str], log_path: Path, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    def stop_all(self) -> None:
        while self._procs:
            stop(self._procs.pop())


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def raise_on_termination() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so ``finally`` blocks run."""

    def handler(signum: int, _frame: object) -> None:
        print(f"got {signal.Signals(signum).name}; stopping", flush=True, file=sys.stderr)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 30.0) -> str | None:
    """Wait until something accepts on 127.0.0.1:port; return why not, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with code {proc.returncode} before listening"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return None
        time.sleep(0.05)
    return f"not listening on port {port} after {timeout:.0f}s"


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 onwards)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def _parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            parents[int(entry.name)] = int(fields[1])
    return parents


def process_tree(root: int) -> list[int]:
    """The pid and every live descendant of it."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds used so far by a process and its descendants."""
    ticks = 0
    for pid in process_tree(root):
        if fields := _stat_fields(pid):
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS
