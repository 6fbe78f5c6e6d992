"""The operator's HTTP port: /metrics (Prometheus), /healthz (alive), /readyz (can serve).

A tiny asyncio HTTP/1.0 responder on the proxy's own loop: three fixed paths,
GET only, one request per connection, bounded request size.

Nothing a client sent is echoed, and every answer is plain text that a browser may
not reinterpret (``X-Content-Type-Options: nosniff``, a ``Content-Security-Policy``
that allows nothing, control characters of the /readyz reason made visible): the
port can be opened in a browser without any page rendering text someone chose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from guardproxy.safetext import visible

log = logging.getLogger("guardproxy.http")

ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]
TEXT = "text/plain; charset=utf-8"
# sent with every answer: never sniffed as HTML, never running or loading anything
SAFE_HEADERS = (
    "X-Content-Type-Options: nosniff\r\n"
    "Content-Security-Policy: default-src 'none'; frame-ancestors 'none'\r\n"
    "Cache-Control: no-store\r\n"
)


class OpsServer:
    def __init__(self, registry: CollectorRegistry, ready: ReadyCheck) -> None:
        self.registry = registry
        self.ready = ready
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics, /healthz and /readyz on http://%s:%d", host, self.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            method, path = (parts[0], parts[1].split("?", 1)[0]) if len(parts) >= 2 else ("", "")
            if method != "GET":
                status, ctype, body = "405 Method Not Allowed", TEXT, b"GET only\n"
            elif path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
            elif path == "/healthz":
                status, ctype, body = "200 OK", TEXT, b"ok\n"
            elif path == "/readyz":
                ok, why = await self.ready()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = TEXT, (visible(why) + "\n").encode()
            else:
                status, ctype, body = (
                    "404 Not Found",
                    TEXT,
                    b"try /metrics, /healthz or /readyz\n",
                )
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"{SAFE_HEADERS}Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
