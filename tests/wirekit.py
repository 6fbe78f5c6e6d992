"""Raw PostgreSQL v3 clients for the fault tests: asyncio streams, every read bounded.

The messages are built with guardproxy's own sans-IO codec where it has a
builder, and by hand where the point is to send what no codec would build.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from guardproxy.protocol import codec

TIMEOUT = 10.0
APP_DB = "app"
TEST_DEADLINE = 60.0


@pytest.fixture(name="start_proxy")
def start_proxy_with_deadline(start_proxy: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """conftest's ``start_proxy``, plus a deadline: when a test runs past it, its proxies
    are killed, so a client call blocked on a hung proxy fails instead of hanging.

    Blocking client libraries (psycopg) have no per-call timeout; this bounds them all.
    Import it into a test module to use it there.
    """
    handles: list[Any] = []

    def start(*args: Any, **kwargs: Any) -> Any:
        handle = start_proxy(*args, **kwargs)
        handles.append(handle)
        return handle

    def expire() -> None:
        for handle in handles:
            if handle.alive():
                print(
                    f"test deadline ({TEST_DEADLINE}s) passed: killing guardproxy on {handle.port}"
                )
                handle.proc.kill()

    timer = threading.Timer(TEST_DEADLINE, expire)
    timer.daemon = True
    timer.start()
    yield start
    timer.cancel()


@contextlib.contextmanager
def launched_proxy(pg: Any, log_dir: Path, **settings: Any) -> Iterator[Any]:
    """A guardproxy process for a whole test module (started as conftest starts them).

    Many fault tests only hurt one client of their own; sharing one proxy between
    them saves a process start each and shows it keeps serving after every fault.
    """
    from conftest import GUARDPROXY, ROOT, ProxyProcess, proxy_args
    from pgcluster import free_port, wait_for_port

    port = free_port()
    log_path = log_dir / f"guardproxy-{port}.log"
    args = proxy_args(pg.dsn(), port, settings)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*GUARDPROXY, *args], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env
        )
    handle = ProxyProcess(port, proc, log_path, args)
    try:
        wait_for_port("127.0.0.1", port, timeout=20)
        yield handle
    finally:
        handle.stop()


@contextlib.contextmanager
def deadline_for(handles: list[Any], node: Any) -> Iterator[None]:
    """Kills ``handles`` if the test runs past TEST_DEADLINE; prints their logs if it failed."""

    def expire() -> None:
        for handle in handles:
            if handle.alive():
                handle.proc.kill()

    timer = threading.Timer(TEST_DEADLINE, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        report = getattr(node, "rep_call", None)
        if report is not None and report.failed:
            for handle in handles:
                print(
                    f"\n----- shared guardproxy log ({handle.port}) -----\n{handle.log()[-4000:]}"
                )


@dataclass(frozen=True)
class Msg:
    kind: bytes  # the type letter, e.g. b"E"
    raw: bytes  # the whole message, header included

    def fields(self) -> dict[str, str]:
        return codec.error_fields(self.raw)


def untyped(code: int, payload: bytes = b"") -> bytes:
    """An untyped startup-phase packet (StartupMessage, SSLRequest, ...)."""
    return struct.pack("!ii", 8 + len(payload), code) + payload


def startup_packet(params: dict[str, str], major: int = 3, minor: int = 0) -> bytes:
    body = b"".join(codec.cstr(k) + codec.cstr(v) for k, v in params.items()) + b"\x00"
    return untyped((major << 16) | minor, body)


def v2_startup_packet(user: str, database: str) -> bytes:
    """A protocol 2.0 StartupPacket: fixed 296 bytes of padded fields."""

    def pad(text: str, size: int) -> bytes:
        return text.encode().ljust(size, b"\x00")

    body = pad(database, 64) + pad(user, 32) + pad("", 64) + pad("", 64) + pad("", 64)
    return untyped(2 << 16, body)


def errors_in(msgs: list[Msg]) -> list[dict[str, str]]:
    return [m.fields() for m in msgs if m.kind == b"E"]


def fatal_in(msgs: list[Msg]) -> dict[str, str]:
    fatal = [f for f in errors_in(msgs) if f.get("S") == "FATAL"]
    assert len(fatal) == 1, f"expected one FATAL ErrorResponse, got {msgs!r}"
    return fatal[0]


def data_rows(msgs: list[Msg]) -> list[list[str | None]]:
    rows = []
    for m in msgs:
        if m.kind != b"D":
            continue
        (count,) = struct.unpack_from("!h", m.raw, 5)
        pos, row = 7, []
        for _ in range(count):
            (length,) = struct.unpack_from("!i", m.raw, pos)
            pos += 4
            if length < 0:
                row.append(None)
            else:
                row.append(m.raw[pos : pos + length].decode())
                pos += length
        rows.append(row)
    return rows


class WireClient:
    """One raw TCP connection to the proxy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.local_port: int = writer.get_extra_info("sockname")[1]
        self.backend_key: tuple[int, int] | None = None

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> WireClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
        return cls(reader, writer)

    async def __aenter__(self) -> WireClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ sending

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), TIMEOUT)

    # ------------------------------------------------------------ receiving

    async def read_byte(self, timeout: float = TIMEOUT) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(1), timeout)

    async def read_message(self, timeout: float = TIMEOUT) -> Msg:
        async def read() -> Msg:
            header = await self.reader.readexactly(5)
            (length,) = struct.unpack_from("!i", header, 1)
            body = await self.reader.readexactly(length - 4)
            return Msg(header[:1], header + body)

        return await asyncio.wait_for(read(), timeout)

    async def read_until(self, kinds: bytes, timeout: float = TIMEOUT) -> list[Msg]:
        """Messages up to and including the first whose type is one of ``kinds``."""
        deadline = time.monotonic() + timeout
        out: list[Msg] = []
        while True:
            msg = await self.read_message(max(deadline - time.monotonic(), 0.01))
            out.append(msg)
            if msg.kind in kinds:  # one type letter in a bytes of letters
                return out

    async def read_until_eof(self, timeout: float = TIMEOUT) -> list[Msg]:
        """Every message until the proxy closes the connection; fails if it never does."""
        deadline = time.monotonic() + timeout
        out: list[Msg] = []
        while True:
            try:
                out.append(await self.read_message(max(deadline - time.monotonic(), 0.01)))
            except (asyncio.IncompleteReadError, ConnectionResetError):
                return out
            except TimeoutError:
                raise AssertionError(
                    f"the proxy did not close the connection within {timeout}s; got {out!r}"
                ) from None

    # ------------------------------------------------------------ conversations

    async def login(
        self,
        user: str = "agent-raw",
        database: str = APP_DB,
        major: int = 3,
        minor: int = 0,
        extra: dict[str, str] | None = None,
    ) -> list[Msg]:
        """Startup to ReadyForQuery; returns what came; fails on an ErrorResponse."""
        await self.send(
            startup_packet({"user": user, "database": database, **(extra or {})}, major, minor)
        )
        msgs = await self.read_until(b"ZE")
        assert msgs[-1].kind == b"Z", f"login failed: {errors_in(msgs)}"
        for m in msgs:
            if m.kind == b"K":
                self.backend_key = struct.unpack_from("!ii", m.raw, 5)
        return msgs

    async def query(self, sql: str) -> list[Msg]:
        """A simple Query up to its ReadyForQuery."""
        await self.send(codec.build_query(sql))
        return await self.read_until(b"Z")

    async def scalar(self, sql: str) -> str | None:
        msgs = await self.query(sql)
        assert not errors_in(msgs), errors_in(msgs)
        return data_rows(msgs)[0][0]

    # ------------------------------------------------------------ ending

    async def abort(self) -> None:
        """Drops the connection with a TCP reset, as a crashed client's kernel may."""
        sock = self.writer.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()
        await self.close()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), TIMEOUT)


async def eventually(
    predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Async wait_until: polls ``predicate`` (sync) without blocking the loop for long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def log_lines_about(log: str, client_port: int) -> list[str]:
    """Lines of a proxy log that name the client connected from ``client_port``."""
    pattern = re.compile(rf"127\.0\.0\.1:{client_port}(?!\d)")
    return [line for line in log.splitlines() if pattern.search(line)]
