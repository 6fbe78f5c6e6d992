"""The floor for a Python proxy: a uvloop byte pipe that does nothing but copy.

Each client connection gets its own upstream connection (no pooling, no parsing,
no policies), and bytes are copied both ways as they arrive. Measured in place of
guardproxy, it shows how much of guardproxy's cost is Python and the event loop
themselves rather than what guardproxy does:

    .venv/bin/python -m bench.run --quick --targets direct,pgbouncer,guardproxy \\
        --guardproxy-cmd ".venv/bin/python -m bench.pipe"

It takes the flags the harness passes to ``guardproxy serve`` and uses only
``--upstream``, ``--listen-host`` and ``--listen-port``.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast
from urllib.parse import urlparse

import uvloop


class _Side(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.early: list[bytes] = []  # what the client sent before upstream answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class _Client(_Side):
    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.host, self.port = host, port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(_Side, self.host, self.port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        upstream.peer, self.peer = self, upstream
        assert upstream.transport is not None
        for chunk in self.early:
            upstream.transport.write(chunk)
        self.early.clear()


async def serve(listen_host: str, listen_port: int, upstream: str) -> None:
    target = urlparse(upstream)
    host, port = target.hostname or "127.0.0.1", target.port or 5432
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(host, port), listen_host, listen_port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="serve")
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, required=True)
    args, _ignored = parser.parse_known_args()
    uvloop.run(serve(args.listen_host, args.listen_port, args.upstream))


if __name__ == "__main__":
    main()
