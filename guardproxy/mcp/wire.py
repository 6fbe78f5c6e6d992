"""Sessions of an agent through the guardproxy listener: the MCP tools' only way to the data.

Every tool call opens its own client session of the calling agent at the proxy's
address (the agent id is the user name; the password, if the proxy asks for one,
comes from libpq's usual sources: ``PGPASSWORD`` or a password file, one line per
agent), runs one statement, and closes it. So the proxy's judge, rewrites, caps,
idempotency, budgets, tags, metrics and audit apply exactly as to any client, and
no transaction outlives a call: a call that is cancelled (its MCP client went away)
closes its session, and the proxy rolls back whatever was open.

The call's context travels as startup parameters (``-c guard.task=... -c
guard.step=...``), which the proxy reads like ``SET guard.*``; the session names
itself ``application_name = guardproxy-mcp``, which the proxy shows after the agent
id in ``pg_stat_activity``.

A call of an agent that authenticated with a delegation token (`delegation`) carries
that token to the proxy as ``-c guard.token=...``, and as the password when the
proxy asks for one in clear text (an agent without a password of its own logs in
with its token). libpq is told to send it for nothing else (``require_auth=
password,none``): when the proxy asks for SCRAM instead (the agent has a password
in the auth file), the session is opened again with libpq's own password, the token
in the options only, and the agent is remembered as one that logs in so.

`ProxyClient.run()` reads the rows of a `StatementShape.cursor` read through a
``DECLARE``d cursor in a transaction of its own, a chunk at a time, no more than the
result can show; every other statement runs in autocommit and its rows (the
``RETURNING`` of a write, a plan) are read whole and then bounded. A database error
or a denial becomes `DatabaseError` (SQLSTATE, message, detail, hint as the proxy
sent them); a session that cannot be opened becomes `ProxyUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg import conninfo
from psycopg.pq import TransactionStatus

from .results import ResultBuilder

APPLICATION_NAME = "guardproxy-mcp"
CURSOR_NAME = "guardproxy_mcp"
FETCH_CHUNK = 100
CANCEL_WAIT = 5.0  # seconds to cancel an abandoned statement before closing its session
MAX_REMEMBERED = 10_000  # agents remembered to log in with their own password
REQUIRE_AUTH = "password,none"  # what a delegation token may answer as a password
T = TypeVar("T")

Param = str | int | float | bool | None


@dataclass(frozen=True)
class CallContext:
    """Who runs the statement and for which task: the session's startup context."""

    agent_id: str
    task: str | None = None
    step: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    token: str | None = field(default=None, repr=False)  # a delegation token, never shown

    def options(self) -> str:
        """The libpq ``options`` string: ``-c guard.KEY=VALUE`` per key, escaped as
        the server reads it (a backslash before whitespace and before a backslash)."""
        pairs = {"task": self.task, "step": self.step, **self.tags, "token": self.token}
        return " ".join(f"-c guard.{key}={_escape(value)}" for key, value in pairs.items() if value)


def _escape(value: str) -> str:
    return "".join("\\" + ch if ch.isspace() or ch == "\\" else ch for ch in value)


class DatabaseError(Exception):
    """An ErrorResponse from the proxy or the database, as it came."""

    def __init__(
        self, sqlstate: str, message: str, detail: str = "", hint: str = "", severity: str = ""
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.detail = detail
        self.hint = hint
        self.severity = severity or "ERROR"

    @classmethod
    def from_psycopg(cls, exc: psycopg.Error) -> DatabaseError:
        diag = exc.diag
        return cls(
            diag.sqlstate or "",
            diag.message_primary or str(exc).strip(),
            diag.message_detail or "",
            diag.message_hint or "",
            diag.severity or "",
        )

    @property
    def denied(self) -> bool:
        """A refusal by policy (or privilege): the statement did not run."""
        return self.sqlstate == "42501"

    def text(self) -> str:
        """For the LLM: the proxy's message and hint, as psql would print them."""
        lines = [f"{self.severity} [{self.sqlstate}]: {self.message}"]
        if self.detail:
            lines.append(f"DETAIL: {self.detail}")
        if self.hint:
            lines.append(f"HINT: {self.hint}")
        return "\n".join(lines)


class ProxyUnavailable(Exception):
    """No session could be opened at the proxy (down, refused the login, full)."""


def _notice_text(diag: psycopg.errors.Diagnostic) -> str:
    text = f"{diag.severity or 'NOTICE'}: {diag.message_primary or ''}"
    if diag.message_hint:
        text += f" (HINT: {diag.message_hint})"
    return text


class ProxyClient:
    """Opens sessions of agents at the proxy's listen address (a ``postgresql://`` URL
    without a user name: the agent id is the user)."""

    def __init__(self, url: str, connect_timeout: float = 10.0) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        # agents with a token that log in with their own password (SCRAM), not the token
        self._own_password: set[str] = set()

    def conninfo(self, ctx: CallContext, token_password: bool = False) -> str:
        """`token_password`: the delegation token is also the password, sent only if
        the proxy asks for one in clear text (or for none)."""
        extra: dict[str, Any] = {}
        if token_password and ctx.token:
            extra = {"password": ctx.token, "require_auth": REQUIRE_AUTH}
        return conninfo.make_conninfo(
            self.url,
            user=ctx.agent_id,
            options=ctx.options() or None,
            application_name=APPLICATION_NAME,
            connect_timeout=max(1, int(self.connect_timeout)),
            **extra,
        )

    async def _connect(self, ctx: CallContext) -> psycopg.AsyncConnection[Any]:
        """A session of the agent (see the module docstring for a delegation token)."""
        token_password = bool(ctx.token) and ctx.agent_id not in self._own_password
        try:
            return await psycopg.AsyncConnection.connect(
                self.conninfo(ctx, token_password), autocommit=True, prepare_threshold=None
            )
        except psycopg.Error as exc:
            # libpq names the requirement when the proxy asked for another method
            if not token_password or f'"{REQUIRE_AUTH}"' not in str(exc):
                raise  # the login itself was refused
        # the proxy asked for SCRAM, which the token must not serve: the agent's own password
        conn = await psycopg.AsyncConnection.connect(
            self.conninfo(ctx), autocommit=True, prepare_threshold=None
        )
        if len(self._own_password) >= MAX_REMEMBERED:
            self._own_password.clear()
        self._own_password.add(ctx.agent_id)
        return conn

    @contextlib.asynccontextmanager
    async def session(
        self, ctx: CallContext, notices: list[str] | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        try:
            conn = await self._connect(ctx)
        except psycopg.Error as exc:
            if ctx.token:
                self._own_password.discard(ctx.agent_id)  # the next call tries the token again
            detail = DatabaseError.from_psycopg(exc)
            reason = detail.text() if detail.sqlstate else str(exc).strip()
            raise ProxyUnavailable(
                f"cannot open a session of {ctx.agent_id} at guardproxy: {reason}"
            ) from None
        if notices is not None:
            conn.add_notice_handler(lambda diag: notices.append(_notice_text(diag)))
        try:
            yield conn
        except psycopg.Error:
            # An error inside the read's transaction: end it cleanly before leaving.
            if conn.info.transaction_status != TransactionStatus.IDLE:
                with contextlib.suppress(psycopg.Error), anyio.move_on_after(5):
                    await conn.rollback()
            raise
        finally:
            # Closing must happen even when the call is being cancelled (its client left).
            with anyio.CancelScope(shield=True):
                await conn.close()

    async def run(
        self,
        ctx: CallContext,
        sql: str,
        params: Sequence[Param],
        builder: ResultBuilder,
        cursor: bool,
    ) -> dict[str, Any]:
        """Run one statement as `ctx.agent_id`; the bounded result (see `ResultBuilder`)."""
        notices: list[str] = []
        command: str | None
        work: Awaitable[tuple[str | None, bool]]
        try:
            async with self.session(ctx, notices) as conn:
                if cursor:
                    work = _read_with_cursor(conn, sql, params, builder)
                else:
                    work = _execute(conn, sql, params, builder)
                command, drained = await _cancel_if_abandoned(conn, work)
        except psycopg.Error as exc:
            raise DatabaseError.from_psycopg(exc) from None
        return builder.finish(command, notices, drained)

    async def fetch_all(
        self, ctx: CallContext, sql: str, params: Sequence[Any] = ()
    ) -> list[tuple[Any, ...]]:
        """Rows of a small query of the tools' own (catalog reads), as the agent."""
        try:
            async with self.session(ctx) as conn:
                return await _cancel_if_abandoned(conn, _fetch_all(conn, sql, params))
        except psycopg.Error as exc:
            raise DatabaseError.from_psycopg(exc) from None


async def _cancel_if_abandoned(conn: psycopg.AsyncConnection[Any], work: Awaitable[T]) -> T:
    """Await `work` on `conn`; if the call is cancelled meanwhile (its MCP client went
    away), cancel the statement at the proxy before the session is closed.

    Without this the cancellation would interrupt psycopg's own attempt to cancel,
    the session would just be closed, and a statement waiting upstream (on a lock,
    say) would wait on until Postgres noticed. `work` runs in a task of its own so
    that the caller's cancellation reaches only this wait.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_WAIT):
            if conn.info.transaction_status == TransactionStatus.ACTIVE:
                with contextlib.suppress(psycopg.Error):
                    await conn.cancel_safe(timeout=CANCEL_WAIT)
            with contextlib.suppress(BaseException):
                await task
        raise
    finally:
        if not task.done():
            task.cancel()


async def _fetch_all(
    conn: psycopg.AsyncConnection[Any], sql: str, params: Sequence[Any]
) -> list[tuple[Any, ...]]:
    cur = psycopg.AsyncRawCursor(conn)
    await cur.execute(sql, list(params) or None)
    return list(await cur.fetchall())


def _columns(description: Sequence[psycopg.Column] | None) -> list[tuple[str, str]]:
    return [(col.name, col.type_display) for col in description or ()]


async def _read_with_cursor(
    conn: psycopg.AsyncConnection[Any], sql: str, params: Sequence[Param], builder: ResultBuilder
) -> tuple[str | None, bool]:
    """A read through ``DECLARE``: fetch chunks until the result is full or the rows end."""
    await conn.set_autocommit(False)
    cur = psycopg.AsyncRawServerCursor(conn, CURSOR_NAME)
    await cur.execute(sql, list(params) or None)
    builder.set_columns(_columns(cur.description))
    drained = False
    wanted = True
    while wanted:
        chunk = await cur.fetchmany(FETCH_CHUNK)
        for row in chunk:
            wanted = builder.add(row)
            if not wanted:
                break
        if len(chunk) < FETCH_CHUNK and wanted:
            drained = True
            break
    await cur.close()
    await conn.commit()
    return "SELECT", drained


async def _execute(
    conn: psycopg.AsyncConnection[Any], sql: str, params: Sequence[Param], builder: ResultBuilder
) -> tuple[str | None, bool]:
    """Any other statement, in autocommit: all its rows go through the builder."""
    cur = psycopg.AsyncRawCursor(conn)
    await cur.execute(sql, list(params) or None)
    if cur.description is not None:
        builder.set_columns(_columns(cur.description))
        while chunk := await cur.fetchmany(FETCH_CHUNK):
            for row in chunk:
                builder.add(row)
    return cur.statusmessage, True
