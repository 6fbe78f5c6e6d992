"""Before authentication: connections that never log in cannot keep agents out, a silent
socket is closed early, and text from the startup packet cannot forge a log line."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import psycopg

from guardproxy.protocol import codec


def silent(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_silent_sockets_cannot_keep_agents_out(start_proxy: Callable[..., Any]) -> None:
    proxy = start_proxy(max_pending_logins=4, client_startup_timeout=2, max_client_conn=3)
    flood = [silent(proxy.port) for _ in range(12)]
    try:
        time.sleep(0.2)
        # more silent sockets than the pending-login room, and than max_client_conn: an
        # agent still logs in (the oldest silent ones gave way)
        with psycopg.connect(proxy.dsn("agent-1"), connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        # and what never says anything is closed at client_startup_timeout, not later
        assert closed_within(flood[-1], 6)
        assert "no startup packet within client_startup_timeout" in proxy.log()
    finally:
        for sock in flood:
            sock.close()


def test_a_user_name_cannot_forge_a_log_line(start_proxy: Callable[..., Any]) -> None:
    proxy = start_proxy(auth_mode="scram", auth_file="/dev/null")
    sock = silent(proxy.port)
    try:
        sock.sendall(codec.build_startup({"user": "x\n2026-12-06 INFO guardproxy: forged"}))
        sock.settimeout(5)
        sock.recv(4096)
    finally:
        sock.close()
    time.sleep(0.3)
    assert not any(
        line.startswith("2026-12-06 INFO guardproxy: forged") for line in proxy.log().splitlines()
    )
