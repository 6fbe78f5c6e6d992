"""Several worker processes on one port (SO_REUSEPORT), and cancel requests between them.

The kernel spreads new connections over the workers. A cancel request arrives
on a new connection, so it may land on a worker that does not own the session:
each session's backend key carries its worker's index in the pid (see
cancel.py for the layout), and each worker listens on a private Unix socket
where the others forward cancel requests meant for it. A worker that gets a
cancel request this way handles it itself and never forwards it again. State
that must be shared between workers (idempotency, task budgets, the instance's
registry slot) lives in Postgres, never in a worker's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("guardproxy.workers")


class CancelRelay:
    """Receives cancel requests forwarded by sibling workers; forwards ours to them."""

    def __init__(
        self, directory: Path, port: int, worker: int, on_cancel: Callable[[int, int], None]
    ) -> None:
        self.directory = directory
        self.port = port
        self.worker = worker
        self.on_cancel = on_cancel
        self._server: asyncio.AbstractServer | None = None

    def path(self, worker: int) -> Path:
        return self.directory / f"guardproxy-{self.port}-w{worker}.sock"

    async def start(self) -> None:
        path = self.path(self.worker)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._server = await asyncio.start_unix_server(self._handle, str(path))
        os.chmod(path, 0o600)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            data = await asyncio.wait_for(reader.readexactly(8), 5)
            pid, secret = struct.unpack("!ii", data)
            self.on_cancel(pid, secret)
        writer.close()

    async def forward(self, worker: int, pid: int, secret: int) -> None:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path(worker))), 2
            )
        except (OSError, TimeoutError) as exc:
            log.info("cannot forward a cancel request to worker %d: %s", worker, exc)
            return
        writer.write(struct.pack("!ii", pid, secret))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path(self.worker).unlink()
