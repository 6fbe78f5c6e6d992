"""guardproxy's own statements inside a managed write's transaction: the idempotency
ledger, task budgets and the inline audit record.

They run in the extended protocol, as statements prepared once per server under
fixed names and bound to a portal of their own, so that they fit anywhere in a
client's round: they never commit (no Sync, no simple Query), and they leave the
client's unnamed statement and unnamed portal alone. Every value an agent chose
(its key, task, step, the statement) is a bound parameter, never SQL text.

They run as the proxy's login role, which owns guardproxy's schema: when the
server runs the agent's statements as another role (``role=`` at connection
start), the role is switched for the ledger's statements and back, with
``set_config(..., true)``, which holds until the transaction ends.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from guardproxy.pool.backend import Backend, data_row
from guardproxy.protocol import codec
from guardproxy.protocol import messages as m
from guardproxy.protocol.errors import UpstreamError

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
PORTAL: Final = b"guardproxy_ledger"

# name -> SQL; every parameter is text, cast where the column needs it
STATEMENTS: Final[dict[bytes, str]] = {
    b"guardproxy_role": "SELECT pg_catalog.set_config('role', $1, true)",
    # A key past its time is claimed anew: its request, answer and expiry all reset, so
    # it protects the new write as a fresh key would.
    b"guardproxy_claim": (
        "INSERT INTO guardproxy.idempotency_keys AS k "
        "(key, agent_type, agent_id, task, request_hash, expires_at) "
        "VALUES ($1, $2, $3, $4, $5, pg_catalog.now() + pg_catalog.make_interval(secs => $6::float8)) "
        "ON CONFLICT (key) DO UPDATE SET agent_type = EXCLUDED.agent_type, "
        "agent_id = EXCLUDED.agent_id, task = EXCLUDED.task, "
        "request_hash = EXCLUDED.request_hash, command_tag = NULL, response = NULL, "
        "created_at = pg_catalog.now(), expires_at = EXCLUDED.expires_at "
        "WHERE k.expires_at < pg_catalog.now() RETURNING key"
    ),
    b"guardproxy_lookup": (
        "SELECT request_hash, pg_catalog.encode(response, 'hex') "
        "FROM guardproxy.idempotency_keys WHERE key = $1"
    ),
    b"guardproxy_store": (
        "UPDATE guardproxy.idempotency_keys SET command_tag = $2, "
        "response = pg_catalog.decode($3, 'hex') WHERE key = $1"
    ),
    b"guardproxy_budget": (
        "INSERT INTO guardproxy.task_budgets AS b (task, agent_type, statements, rows_written) "
        "VALUES ($1, $2, 1, $3::bigint) ON CONFLICT (task) DO UPDATE SET "
        "statements = b.statements + 1, rows_written = b.rows_written + EXCLUDED.rows_written, "
        "updated_at = pg_catalog.now() RETURNING statements, rows_written"
    ),
    # One slice (a twelfth of the window) of an agent's or a type's budget gains this
    # write; the answer is the total over the window. Slices past twice the window go.
    b"guardproxy_window": (
        "WITH old AS (DELETE FROM guardproxy.budget_usage WHERE scope = $1 AND subject = $2 "
        "AND bucket < pg_catalog.now() - pg_catalog.make_interval(secs => 2 * $4::float8)), "
        "added AS (INSERT INTO guardproxy.budget_usage AS u "
        "(scope, subject, bucket, statements, rows_written) VALUES ($1, $2, "
        "pg_catalog.to_timestamp(pg_catalog.floor(pg_catalog.date_part('epoch', "
        "pg_catalog.now()) / ($4::float8 / 12)) * ($4::float8 / 12)), 1, $3::bigint) "
        "ON CONFLICT (scope, subject, bucket) DO UPDATE SET statements = u.statements + 1, "
        "rows_written = u.rows_written + EXCLUDED.rows_written "
        "RETURNING bucket, statements, rows_written) "
        "SELECT (SELECT statements FROM added) + coalesce(sum(statements), 0), "
        "(SELECT rows_written FROM added) + coalesce(sum(rows_written), 0) "
        "FROM guardproxy.budget_usage WHERE scope = $1 AND subject = $2 "
        "AND bucket > pg_catalog.now() - pg_catalog.make_interval(secs => $4::float8) "
        "AND bucket <> (SELECT bucket FROM added)"
    ),
    b"guardproxy_audit": (
        "INSERT INTO guardproxy.audit_events "
        "(agent_id, agent_type, task, step, statement, decision, rows) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7::bigint)"
    ),
}

Rows = list[list[str | None]]


class LedgerError(UpstreamError):
    """One of the proxy's own statements failed: the transaction is aborted."""

    def __init__(self, detail: str, sqlstate: str) -> None:
        super().__init__(f"guardproxy's own bookkeeping failed: {detail}", sqlstate=sqlstate)
        self.detail = detail


def _bind(statement: bytes, values: Sequence[str | None]) -> bytes:
    parts = [PORTAL, b"\x00", statement, b"\x00", _I16.pack(0), _I16.pack(len(values))]
    for value in values:
        if value is None:
            parts.append(_I32.pack(-1))
        else:
            data = value.encode()
            parts.append(_I32.pack(len(data)) + data)
    parts.append(_I16.pack(0))  # results in text
    return codec.message(b"B", b"".join(parts))


_EXECUTE: Final = codec.message(b"E", PORTAL + b"\x00" + _I32.pack(0))
_CLOSE: Final = codec.message(b"C", b"P" + PORTAL + b"\x00")


class Ledger:
    def __init__(self, backend: Backend, agent_role: str | None) -> None:
        self.backend = backend
        # switch to the login role (which owns guardproxy's schema) and back, if the
        # agent's statements run as another role
        self.roles = (backend.upstream.user, agent_role) if agent_role else None

    async def run(self, *calls: tuple[bytes, Sequence[str | None]]) -> list[Rows]:
        """Runs the calls in order; returns each one's rows. LedgerError when one fails
        (the server then skips everything up to the client's next Sync)."""
        steps = list(calls)
        if self.roles is not None:
            owner, agent = self.roles
            steps = [(b"guardproxy_role", (owner,)), *steps, (b"guardproxy_role", (agent,))]
        backend = self.backend
        out: list[bytes] = []
        parsed: list[bytes] = []
        for name, values in steps:
            if name not in backend.own_statements:
                out.append(codec.build_parse(name, STATEMENTS[name].encode(), b"\x00\x00"))
                backend.own_statements.add(name)
                parsed.append(name)
            out += (_bind(name, values), _EXECUTE, _CLOSE)
        out.append(codec.FLUSH)
        backend.send(b"".join(out))
        results: list[Rows] = []
        rows: Rows = []
        expected = len(parsed) + 3 * len(steps)  # Parse/Bind/Close Complete and CommandComplete
        while expected:
            kind, raw = await backend.recv()
            if kind == m.BE_DATA_ROW:
                rows.append(data_row(raw))
            elif kind == m.BE_COMMAND_COMPLETE:
                results.append(rows)
                rows = []
                expected -= 1
            elif kind in (m.BE_PARSE_COMPLETE, m.BE_BIND_COMPLETE, m.BE_CLOSE_COMPLETE):
                expected -= 1
            elif kind == m.BE_ERROR:
                fields = codec.error_fields(raw)
                for name in parsed:  # it may have failed before they were kept
                    backend.own_statements.discard(name)
                raise LedgerError(fields.get("M", "error"), fields.get("C", "XX000"))
            elif kind == m.BE_PARAMETER_STATUS:
                setting, value = codec.parameter_status(raw)
                backend.params[setting] = value
        if self.roles is not None:
            results = results[1:-1]
        return results
