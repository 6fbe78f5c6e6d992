"""Operator surfaces other than the CLI treat agent text as data and show no secret:
the admin console (guardproxy/server/admin.py) and the HTTP port (server/http.py).

The admin views run on a real ``Proxy`` object (no sockets); a client session is a
plain record of the fields the views read. The HTTP port is served for real on
loopback. Through the real proxy: tests/integration/test_admin_console.py.
"""

from __future__ import annotations

import asyncio
import struct
import unicodedata
from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from guardproxy.config import Settings, parse_dsn
from guardproxy.safetext import UNSAFE_CATEGORIES
from guardproxy.server import admin
from guardproxy.server.app import Proxy
from guardproxy.server.http import OpsServer

HOSTILE_ID = "evil\x1b[2J\x1b]0;owned\x07\nforged|row\u202e\x00"
HOSTILE_TASK = "T\r\nagent|x\x9b31m\u2028"


def make_proxy(upstream: str = "postgresql://u:pw@127.0.0.1:5432/app", **kw: object) -> Proxy:
    settings = Settings(upstream=upstream, **kw)
    return Proxy(settings, parse_dsn(upstream))


def rows_of(answer: bytes) -> list[list[str | None]]:
    """The DataRows of an admin answer, decoded."""
    rows, pos = [], 0
    while pos < len(answer):
        kind, length = answer[pos : pos + 1], struct.unpack_from("!i", answer, pos + 1)[0]
        body = answer[pos + 5 : pos + 1 + length]
        if kind == b"D":
            (n,), p, row = struct.unpack_from("!h", body), 2, []
            for _ in range(n):
                (size,) = struct.unpack_from("!i", body, p)
                p += 4
                row.append(None if size < 0 else body[p : p + size].decode())
                p += max(size, 0)
            rows.append(row)
        pos += 1 + length
    return rows


def assert_all_visible(rows: list[list[str | None]]) -> None:
    for row in rows:
        for value in row:
            bad = [c for c in value or "" if unicodedata.category(c) in UNSAFE_CATEGORIES]
            assert not bad, (value, bad)


def hostile_session() -> SimpleNamespace:
    return SimpleNamespace(
        agent_id=HOSTILE_ID,
        agent_type="support",
        peer="127.0.0.1:5555",
        server=None,
        blocked=False,
        pinned=False,
        task=HOSTILE_TASK,
        transactions=0,
        queries=0,
    )


async def test_show_clients_shows_hostile_agent_ids_and_tasks_escaped() -> None:
    proxy = make_proxy()
    proxy.sessions[(1, 1)] = hostile_session()
    rows = rows_of(await admin.run(proxy, "SHOW CLIENTS"))
    assert_all_visible(rows)
    assert rows[0][0] == "evil\\x1b[2J\\x1b]0;owned\\x07\\x0aforged|row\\u202e\\x00"
    assert rows[0][5] == "T\\x0d\\x0aagent|x\\x9b31m\\u2028"


async def test_show_agents_and_kill_agent_escape_what_they_echo() -> None:
    proxy = make_proxy()
    proxy.stats.for_agent("support", HOSTILE_ID).rows_affected = 3
    rows = rows_of(await admin.run(proxy, "SHOW AGENTS"))
    assert_all_visible(rows)
    assert rows[0][0].startswith("evil\\x1b[2J")
    killed = rows_of(await admin.run(proxy, "KILL AGENT evil\x1b[2J\x9b"))
    assert_all_visible(killed)
    assert killed == [["evil\\x1b[2J\\x9b", "0"]]


SECRETS = ("p@ss:word", "p%40ss%3Aword", "ss:word", "querysecret", "keysecret")


async def test_show_config_shows_no_credential_form() -> None:
    upstream = (
        "postgresql://guard:p%40ss%3Aword@db.internal:5432/app"
        "?password=querysecret&sslpassword=keysecret&sslmode=require"
    )
    proxy = make_proxy(upstream)
    config = dict(tuple(r) for r in rows_of(await admin.run(proxy, "SHOW CONFIG")))
    assert config["upstream"] == (
        "postgresql://guard:***@db.internal:5432/app?password=***&sslpassword=***&sslmode=require"
    )
    text = "\n".join(f"{k}={v}" for k, v in config.items())
    for secret in SECRETS:
        assert secret not in text


async def test_show_config_masks_an_unencoded_at_sign_the_old_mask_stopped_at() -> None:
    proxy = make_proxy("postgresql://guard:p@ss:word@db.internal:5432/app")
    assert proxy.upstream.password == "p@ss:word"  # the proxy really uses all of it
    config = dict(tuple(r) for r in rows_of(await admin.run(proxy, "SHOW CONFIG")))
    assert config["upstream"] == "postgresql://guard:***@db.internal:5432/app"


# ---------------------------------------------------------------- the HTTP port


async def http_get(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_the_http_port_echoes_nothing_and_serves_only_inert_text() -> None:
    async def not_ready() -> tuple[bool, str]:
        return False, "upstream db\x1b[31m:5432 unreachable\n<script>alert(1)</script>"

    ops = OpsServer(CollectorRegistry(), not_ready)
    await ops.start("127.0.0.1", 0)
    try:
        hostile = b"GET /<script>alert(1)</script>\x1b[2J HTTP/1.0\r\nX: \x1b]0;t\x07\r\n\r\n"
        missing = await http_get(ops.port, hostile)
        assert missing.startswith(b"HTTP/1.0 404")
        assert b"<script>" not in missing and b"\x1b" not in missing
        ready = await http_get(ops.port, b"GET /readyz HTTP/1.0\r\n\r\n")
        head, _, body = ready.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 503")
        assert b"\x1b" not in body and body.count(b"\n") == 1  # one line, escapes visible
        assert b"db\\x1b[31m:5432" in body
        for answer in (missing, ready):
            headers = answer.partition(b"\r\n\r\n")[0].lower()
            assert b"content-type: text/plain; charset=utf-8" in headers
            assert b"x-content-type-options: nosniff" in headers
            assert b"content-security-policy: default-src 'none'" in headers
    finally:
        ops.close()
