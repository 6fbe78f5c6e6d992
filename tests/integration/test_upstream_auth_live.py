"""UpstreamAuth (guardproxy/pool/upstream_auth.py) logs in to the real Postgres with
each method the test cluster's pg_hba.conf asks for: SCRAM-SHA-256 (app_owner), md5
(md5_user) and trust (trust_user). A thin asyncio loop moves the bytes, as
ServerConn.startup does; everything it decides is the state machine's."""

from __future__ import annotations

import asyncio
import struct

import pytest
from pgcluster import PASSWORDS, PgCluster

from guardproxy.pool.upstream_auth import UpstreamAuth
from guardproxy.protocol import codec
from guardproxy.protocol.errors import UpstreamError

TIMEOUT = 10.0


async def login(pg: PgCluster, user: str, password: str | None) -> tuple[UpstreamAuth, str]:
    """Logs in; returns the machine and the server's answer to SELECT current_user."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(pg.host, pg.port), TIMEOUT)

    async def message() -> tuple[int, bytes]:
        header = await asyncio.wait_for(reader.readexactly(5), TIMEOUT)
        body = await asyncio.wait_for(
            reader.readexactly(struct.unpack("!i", header[1:])[0] - 4), TIMEOUT
        )
        return header[0], header + body

    try:
        auth = UpstreamAuth(user, password, where=f"{pg.host}:{pg.port}", tls=False)
        writer.write(codec.build_startup({"user": user, "database": "app"}))
        while True:
            kind, raw = await message()
            if kind == ord("R"):
                reply = auth.receive(raw)
                if reply is not None:
                    writer.write(reply)
                continue
            if kind == ord("E"):
                raise UpstreamError(codec.error_fields(raw).get("M", "?"), sqlstate="28P01")
            auth.check_authenticated(kind)
            if kind == ord("Z"):
                break
        writer.write(codec.build_query("SELECT current_user"))
        rows = []
        while (answer := await message())[0] != ord("Z"):
            if answer[0] == ord("D"):
                rows.append(answer[1][11:].decode())
        return auth, rows[0]
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("user", "method"),
    [("app_owner", "SCRAM-SHA-256"), ("md5_user", "md5"), ("trust_user", "trust")],
)
async def test_each_method_of_the_real_server_logs_in(
    pg: PgCluster, user: str, method: str
) -> None:
    auth, current = await login(pg, user, PASSWORDS.get(user))
    assert auth.authenticated and auth.method == method and current == user


async def test_a_wrong_password_is_refused_by_the_real_server(pg: PgCluster) -> None:
    with pytest.raises(UpstreamError, match="password authentication failed"):
        await login(pg, "app_owner", "not-the-password")
