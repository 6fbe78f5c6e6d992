"""The relay of one client session, without I/O: client messages in, bytes and requests out.

The session (``guardproxy.server.session``) owns the sockets. It feeds the relay
every client message (``on_client``) and every byte of the lent server
(``on_backend``); the relay judges, translates and tracks, and leaves behind:

* ``to_backend`` / ``to_client``: bytes to write, in order;
* ``phase``: what the session is doing (one ``Phase``; the only place it changes
  is ``_enter``); while it is not IDLE or ACTIVE no client message is taken;
* ``held``: a message waiting for a server (the session acquires one, calls
  ``attach`` and ``run_held``);
* ``job``: an internal job to run on the server (phase JOB; the outcome comes back
  through ``job_done``);
* ``wants_release``: the server may go back to the pool.

Everything decided about a statement lives in its ``registry.Statement`` record;
every executed request gets its own ``inflight.Execution``. Nothing about a
client's statements is kept on the server connection.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any, Final

import pglast

from guardproxy.delegation.postgres import settings_change
from guardproxy.policy.timeouts import explain_timeout
from guardproxy.protocol import codec
from guardproxy.protocol import messages as m
from guardproxy.protocol.errors import Denied, GuardError, ProtocolViolation, UpstreamError
from guardproxy.relay.autoprepare import AutoPrepare, Replay
from guardproxy.relay.inflight import Execution, Expected, Inflight, Pending, Sent, without_tag
from guardproxy.relay.jobs import CaptureSettings, Job, JudgeLarge, ManagedWrite, PlanCheck
from guardproxy.relay.judging import Analysis, Judgement, Judging, LocalAnswer, plain
from guardproxy.relay.registry import Portal, Registry, Statement, Undo, server_statement_name
from guardproxy.relay.session_sql import (
    Command,
    Deallocate,
    Mixed,
    Prepare,
    prepared_command,
)
from guardproxy.store.audit_writer import AuditEvent

if TYPE_CHECKING:
    from guardproxy.jobs.managed_write import WriteOutcome
    from guardproxy.jobs.write_plan import WriteRun
    from guardproxy.metrics import AgentStats
    from guardproxy.pool.backend import BackendState

log = logging.getLogger("guardproxy.relay")

Settings = tuple[tuple[str, str], ...]

# A Parse that cannot succeed: the server answers with an error, which aborts the
# transaction in order (and makes it skip to the next Sync); the client sees the
# proxy's own error in its place. A named statement, so the client's unnamed one stays.
ABORT_PARSE: Final = codec.build_parse(
    b"guardproxy_abort",
    b"guardproxy refused a statement: this error aborts the transaction",
    b"\x00\x00",
)
_SETTINGS_TAGS: Final = frozenset((b"SET", b"RESET", b"DISCARD ALL"))
_DDL_PREFIXES: Final = (b"CREATE", b"ALTER", b"DROP", b"COMMENT", b"GRANT", b"REVOKE")
_ROW_RETURNING: Final = frozenset((b"SELECT", b"FETCH", b"COPY", b"MOVE"))
_TIMEOUT_CODES: Final = frozenset(("57014", "25P03", "25P04"))
_KIND_PARSE_MAX: Final = 1 << 16  # a denied statement longer is not parsed for its kind


class Phase(Enum):
    LOGIN = "logging in"
    IDLE = "idle"  # logged in, no server lent
    ACTIVE = "active"  # a server is lent: a transaction, a round, or a pinned session
    WAITING = "waiting for a server"
    HOLDING = "holding"  # takes no client message until the server answered what it owes
    JOB = "running an internal job"
    ADMIN = "admin console"
    CLOSED = "closed"


class CursorRows:
    """An SQL cursor: what it delivered over its FETCHes (a cap holds per cursor), and
    the judgement of its DECLARE (a FETCH after that decision expired is refused)."""

    __slots__ = ("bytes", "declared", "rows", "text")

    def __init__(self, declared: Judgement | None = None, text: bytes = b"") -> None:
        self.rows = 0
        self.bytes = 0
        self.declared = declared
        self.text = text  # the client's DECLARE, when it was a message of its own


# SQL cursors followed per session; past this the oldest are forgotten
_CURSORS_KEPT: Final = 256


class Hooks:
    """What the relay tells the world outside it; the session fills these in."""

    def __init__(self) -> None:
        self.audit: Callable[[AuditEvent], bool] | None = None
        self.audit_accepting: Callable[[], bool] = lambda: True
        self.catalog_changed: Callable[[], None] = lambda: None
        self.pinned: Callable[[str], None] = lambda reason: None
        self.stale_statement: Callable[[bytes], None] = lambda name: None
        self.client_pid: Callable[[int], int] = lambda pid: pid


class Relay:
    def __init__(
        self,
        *,
        agent_id: str,
        stats: AgentStats,
        judging: Judging | None = None,
        settings: Settings = (),
        pinned: bool = False,
        hooks: Hooks | None = None,
        syntax_check: Callable[[bytes], GuardError | None] | None = None,
        max_statement_size: int = 0,
        offload_above: int = 0,
        auto_prepare: AutoPrepare | None = None,
        max_prepared: int = 0,
    ) -> None:
        self.agent_id = agent_id
        self.stats = stats
        self.judging = judging
        self.settings = settings
        self.hooks = hooks or Hooks()
        self.syntax_check = syntax_check
        # statements longer than this are refused (0: no limit); longer than
        # ``offload_above``, judged in a judge worker (0: never)
        self.max_statement_size = max_statement_size
        self.offload_above = offload_above
        # texts longer than this need one of those two looks (the rest skip both)
        self._long = min((n for n in (max_statement_size, offload_above) if n), default=1 << 62)
        self.auto_prepare = auto_prepare  # None: unnamed statements are parsed every time
        self.max_prepared = max_prepared  # statements prepared per server (0: no bound)
        # an auto-prepared statement whose Parse the relay answered as the first message of
        # a round, and the round's messages from its Bind on (see relay/autoprepare.py)
        self._replay_candidate: Statement | None = None
        self._replay: Replay | None = None
        self.replaying: deque[tuple[int, bytes]] = deque()  # client messages to run again
        self.phase = Phase.IDLE
        self.takes_messages = True  # the phase takes client messages (IDLE, ACTIVE)
        self.to_backend: list[bytes] = []
        self.to_client: list[bytes] = []
        self.inflight = Inflight(self, self.to_client)
        self.inflight.login_app_name = dict(settings).get("application_name", "").encode()
        self.registry = Registry()
        self.backend: BackendState | None = None
        self.pinned = pinned  # session pooling, or a statement that keeps backend state
        self.settings_dirty = False
        # a message waiting for a server: the step that goes on with it, its arguments,
        # and whether it is a whole request (a Query: an error ends it with ReadyForQuery)
        self.held: tuple[Callable[..., None], tuple[Any, ...], bool] | None = None
        self._held_undo: Undo | None = None  # what the held message changed in the registry
        self.job: Job | None = None
        self._after_job: tuple[Callable[..., None], tuple[Any, ...]] | None = None
        self._drained: Job | None = None  # the job to start once the server owes nothing
        # what to go on with once the server owes nothing (instead of a job)
        self._after_hold: tuple[Callable[..., None], tuple[Any, ...]] | None = None
        self.wants_release = False
        self.skip = False  # discarding client messages up to the next Sync (after an error)
        self.pending_error: GuardError | None = None  # the server was lost while idle
        self.in_round = False  # extended-protocol messages sent since the last Sync
        self.tx_started: float | None = None  # when the server's transaction began
        self.attached_at = 0.0
        self.stmt_started = 0.0
        self.cursors: dict[str, CursorRows] = {}
        self._abort_at_ready = False  # a capped Query refused in error mode: abort its transaction
        self._rolled_back = False  # the transaction that ends at the next ReadyForQuery "I" did
        # delegation: the server must see the token's principals before the next statement
        self.guard_dirty = False
        # the Delegation (None: no token) the lent server was given; _NOT_GIVEN: nothing yet
        self._guard_for: Any = _NOT_GIVEN
        self.queries = 0
        self.transactions = 0
        self.last_activity = time.perf_counter()

    # ------------------------------------------------------------ phase

    def _enter(self, phase: Phase) -> None:
        """The one place where the phase changes."""
        self.phase = phase
        self.takes_messages = phase is Phase.IDLE or phase is Phase.ACTIVE

    @property
    def search_path(self) -> str:
        for key, value in self.settings:
            if key == "search_path":
                return value
        return ""

    # ------------------------------------------------------------ server lending

    def attach(self, backend: BackendState) -> None:
        """A server is lent to this session; replays its settings there if they differ."""
        self.backend = backend
        self.inflight.backend = backend
        backend.unnamed = 0  # whoever had the server last may have left theirs
        self.transactions += 1
        self.attached_at = self.stmt_started = now = time.perf_counter()
        self.tx_started = now
        self.wants_release = False
        # whatever this server was given before, by this session or another, the round's
        # first message takes the session's own delegation settings with it (even when
        # that message opens an extended-protocol round), a session without a token too
        self._guard_for = _NOT_GIVEN
        if self.phase is not Phase.JOB:
            self._enter(Phase.ACTIVE)

    def replay_settings(self, sql: str | None) -> None:
        """Sends the statement that gives the server this session's settings (hidden)."""
        if sql is not None:
            # straight out: the delegation settings follow it (its RESET ALL clears them)
            self.to_backend.append(codec.build_query(sql))
            self.inflight.expect(Pending.QUERY, visible=False)
            if self.backend is not None:
                self.backend.unnamed = 0

    def detach(self) -> BackendState | None:
        """The session gives the server back (or lost it)."""
        backend, self.backend = self.backend, None
        self.inflight.backend = None
        self.inflight.reset()
        self.wants_release = False
        self.in_round = False
        self.tx_started = None
        self.registry.end_transaction()
        self.cursors.clear()
        self._replay = self._replay_candidate = None
        if self.phase in (Phase.ACTIVE, Phase.HOLDING):
            self._enter(Phase.IDLE)
        return backend

    def run_held(self) -> None:
        """Goes on with the message that waited for a server."""
        held, self.held = self.held, None
        self._held_undo = None
        if held is not None:
            held[0](*held[1])

    def waiting_for_server(self) -> None:
        self._enter(Phase.WAITING)

    def acquire_failed(self, error: GuardError) -> None:
        """No server came: the waiting message fails like a server error would."""
        held, self.held = self.held, None
        self._drop_held_undo()
        self._enter(Phase.IDLE)
        if held is not None:
            self._fail_request(held[2], error)

    def _drop_held_undo(self) -> None:
        """The held message never reached a server: its name is free again (a Parse
        that failed leaves no statement, as in Postgres)."""
        undo, self._held_undo = self._held_undo, None
        if undo is not None:
            self.registry.undo(undo, True)

    # ------------------------------------------------------------ client messages

    def on_client(self, kind: int, raw: bytes) -> None:
        """One client message (not Terminate); ProtocolViolation ends the session."""
        replay = self._replay
        if replay is not None:
            if replay.closed:
                self._replay = None  # more came after the Sync: the round cannot run again
            else:
                replay.messages.append((kind, raw))
        if self.skip or self.inflight.skipping:
            # after an error in the extended protocol, Postgres discards every message up
            # to the next Sync, a Query too: so does the relay, whoever failed
            if kind == m.FE_SYNC:
                if self.skip:
                    self.skip = False
                    self._sync()
                else:
                    self._sync(raw)
            return
        if self.pending_error is not None and kind not in (
            m.FE_COPY_DATA,
            m.FE_COPY_DONE,
            m.FE_COPY_FAIL,
        ):
            error, self.pending_error = self.pending_error, None
            self._fail_request(kind == m.FE_QUERY or kind == m.FE_SYNC, error)
            return
        if kind == m.FE_QUERY:
            self._query(raw)
        elif kind == m.FE_PARSE:
            self._parse(raw)
        elif kind == m.FE_BIND:
            self._bind(raw)
        elif kind == m.FE_EXECUTE:
            self._execute(raw)
        elif kind == m.FE_SYNC:
            self._sync(raw)
        elif kind == m.FE_DESCRIBE:
            self._describe(raw)
        elif kind == m.FE_CLOSE:
            self._close(raw)
        elif kind == m.FE_FLUSH:
            if self.backend is not None:
                self._send(raw)
        elif kind in (m.FE_COPY_DATA, m.FE_COPY_DONE, m.FE_COPY_FAIL):
            if self.backend is not None:  # stray COPY data with no server is dropped
                self._send(raw)
        elif kind == m.FE_FUNCTION_CALL:
            self._refuse(
                False,
                GuardError(
                    "the function call message (fast path) is not supported through guardproxy: "
                    "it would run a function without the policy seeing it",
                    hint="call the function in a SELECT statement",
                    sqlstate="0A000",
                ),
                query_like=True,
            )
        else:
            raise ProtocolViolation(f"unknown or unexpected message type {chr(kind)!r} from client")

    # ---- Query

    def _query(self, raw: bytes) -> None:
        if self.in_round and self.inflight.pending and self.backend is not None:
            # a Query before the Sync of an extended-protocol round: Postgres skips it if
            # a message before it failed, which only the server's answers tell
            self._wait_for_answers(self.on_client, m.FE_QUERY, raw)
            return
        text = codec.parse_query(raw)
        self.registry.simple_query()  # as in Postgres, whatever happens next
        if (len(text) > self._long or _nested(text, self.offload_above)) and (
            self._too_large(True, text) or self._offloaded(True, raw, text)
        ):
            return
        if self.judging is None and _LOOK_CLOSER.search(text.lower()) is None:
            # pooling only, and nothing the relay must see to: sent as the client wrote it
            if self.backend is None:
                self._hold_for_server(True, self._send_plain_query, raw)
            else:
                self._send_plain_query(raw)
            return
        command = prepared_command(text)
        if command is not None:
            self._prepared_command(text, command)
            return
        self._query_text(raw, text)

    def _query_text(self, raw: bytes, text: bytes, given: Analysis | None = None) -> None:
        judging = self.judging
        if judging is None:
            judgement = plain(text)
        else:
            try:
                judgement = judging.judge(
                    text, query=True, in_transaction=self._in_transaction(), given=given
                )
            except Denied as denial:
                self._deny(True, denial, text)
                return
            except LocalAnswer as answer:
                self._answer_locally(answer.response)
                return
            if judgement.plan_check is not None and self._check_plan(True, judgement, (), raw):
                return
        self._query_judged(raw, judgement)

    def _query_judged(self, raw: bytes, judgement: Judgement) -> None:
        if judgement.cursors:
            stale = self._stale_cursor(judgement) if self.cursors else None
            if stale is not None:
                self._deny(True, stale, judgement.sql.encode())
                return
            self._declare_cursors(judgement, codec.parse_query(raw) if raw else b"")
        write = judgement.write
        if write is not None and self.judging is not None:
            run = self.judging.write_run(write)
            if run.needs_management:
                if judgement.statements > 1:
                    self._deny(True, _alone(write.agent_type), judgement.sql.encode())
                    return
                request = codec.build_query(judgement.sent)
                self._managed(
                    ManagedWrite(request, run, True, judgement.row_cap, judgement.byte_cap), True
                )
                return
            audit: Any = (run, judgement)
        else:
            audit = None
        if self.backend is None:
            self._hold_for_server(True, self._send_query, judgement, audit, raw)
            return
        self._send_query(judgement, audit, raw)

    def _send_query(self, judgement: Judgement, audit: Any, raw: bytes = b"") -> None:
        self.queries += 1
        if not self.inflight.pending:
            self.stmt_started = time.perf_counter()
        self.stats.statements[judgement.kind, judgement.decision] += 1
        if self.judging is not None:
            self.judging.tally.n += 1
        self._note_effects(judgement)
        self._notices(judgement)
        execution = None
        if judgement.row_cap or judgement.byte_cap or audit is not None or judgement.shift:
            cursors = judgement.cursors
            execution = Execution(
                judgement.shift,
                judgement.row_cap,
                judgement.cap_error,
                self._cursor_source(judgement.cursor),
                audit,
                False,
                judgement.byte_cap,
                tuple(self._cursor_source(c) for c in cursors) if len(cursors) > 1 else (),
            )
        sent = judgement.sent
        if len(raw) == len(sent) + 6 and raw.find(sent, 5) == 5:
            self._send(raw)  # sent as the client wrote it: no new message to build
        else:
            self._send(codec.build_query(sent))
        self.inflight.expect(Pending.QUERY, True, execution)
        if judgement.cap_error:
            self._hold()  # its answer may turn into an error that aborts what follows

    def _send_plain_query(self, raw: bytes) -> None:
        """A Query of pooling only that neither pins, sets, nor prepares: what
        ``_send_query`` does for it, without the judgement it does not need."""
        self.queries += 1
        if not self.inflight.pending:
            self.stmt_started = time.perf_counter()
        self.stats.statements["query", "allowed"] += 1
        self._send(raw)
        self.inflight.expect(Pending.QUERY, True, None)

    def _notices(self, judgement: Judgement) -> None:
        """What the judge tells the client before the answer (a filter that matches
        nothing, ...): NoticeResponses, in order."""
        for text in judgement.notices:
            self.inflight.expect(Pending.SYNTH, True, codec.build_notice("01000", text))

    def _in_transaction(self) -> bool:
        backend = self.backend
        return backend is not None and (backend.status != b"I" or self.in_round)

    def _cursor_source(self, cursor: tuple[str, str] | None) -> CursorRows | None:
        if cursor is None or cursor[0] == "declare":
            return None
        return self.cursors.setdefault(cursor[1], CursorRows())

    def _declare_cursors(self, judgement: Judgement, text: bytes) -> None:
        """The cursors a statement declares, each with the judgement it runs under. A
        cursor outlives its transaction (WITH HOLD) and a FETCH may come in any later one."""
        cursors = self.cursors
        for cursor in judgement.cursors:
            if cursor is not None and cursor[0] == "declare":
                cursors.pop(cursor[1], None)
                if len(cursors) >= _CURSORS_KEPT:
                    del cursors[next(iter(cursors))]
                cursors[cursor[1]] = CursorRows(judgement, text)

    def _stale_cursor(self, judgement: Judgement) -> Denied | None:
        """The refusal of a FETCH from a cursor declared under a decision that expired
        since (a policy reload, DDL, principals its rewrite used): its rows would be
        those of a query no longer allowed as it stands."""
        judging = self.judging
        if judging is None:
            return None
        for cursor in judgement.cursors:
            if cursor is None or cursor[0] != "fetch":
                continue
            rows = self.cursors.get(cursor[1])
            declared = rows.declared if rows is not None else None
            if declared is not None and not judging.current(declared):
                assert rows is not None
                if _declared_alike(judging, rows, declared):
                    continue  # judged again now, its DECLARE would run as it did
                who = judging.policy.name
                return Denied(
                    f'cursor "{cursor[1]}" was declared before the policy or the session '
                    f"context changed: {who} may not go on reading it (policy {who}, cursors)",
                    rule="cursors",
                    hint=f"CLOSE {cursor[1]} and DECLARE it again",
                    sqlstate="0A000",
                )
        return None

    def _answer_locally(self, response: bytes) -> None:
        """The proxy answers this Query itself, after whatever the server still owes."""
        if self.backend is None:
            self.to_client.append(response + codec.ready_for_query(b"I"))
            return
        # an empty Query in its place keeps the order, the transaction status, and what
        # a Query does in the middle of a pipeline; its EmptyQueryResponse becomes ours
        self._send(codec.build_query(b""))
        self.inflight.expect(Pending.QUERY, True, response)

    # ---- large statements

    def _too_large(self, query: bool, text: bytes) -> bool:
        """A statement past max_statement_size is refused before anything reads it."""
        limit = self.max_statement_size
        if not limit or len(text) <= limit:
            return False
        self.stats.statements["query" if self.judging is None else "read", "denied"] += 1
        self._refuse(
            query,
            Denied(
                f"the statement is {len(text)} bytes long, more than max_statement_size "
                f"({limit} bytes), the most guardproxy takes from an agent in one statement",
                rule="limits.max_statement_size",
                hint="send shorter statements: split a large batch into several",
                sqlstate="54000",
            ),
        )
        return True

    def _offloaded(self, query: bool, raw: bytes, text: bytes) -> bool:
        """A large or deeply nested statement is judged in a judge worker, off the event
        loop: a job."""
        judging = self.judging
        if judging is None or not self.offload_above:
            return False
        if len(text) <= self.offload_above and not _nested(text, self.offload_above):
            return False
        try:
            context = judging.context_for(text)
        except Denied as denial:
            self._deny(query, denial, b"")
            return True
        self._after_job = (self._judged_large, (query, raw, text))
        self.job = JudgeLarge(text, query, context)
        self._enter(Phase.JOB)
        return True

    def _judged_large(self, query: bool, raw: bytes, text: bytes, analysis: Analysis) -> None:
        if analysis.command is not None:
            self._deny(
                query,
                Denied(
                    "PREPARE, EXECUTE and DEALLOCATE of statements this large or this nested "
                    f"are not supported (more than {self.offload_above} bytes, or "
                    f"{OFFLOAD_PARENTHESES} parentheses)",
                    rule="limits.max_statement_size",
                    hint="prepare the statement with the extended protocol (a Parse message)",
                    sqlstate="54000",
                ),
                b"",
            )
        elif query:
            self._query_text(raw, text, analysis)
        else:
            self._parse_text(raw, codec.parse_parse(raw), analysis)

    # ---- SQL-level PREPARE, EXECUTE, DEALLOCATE (see relay/session_sql.py)

    def _prepared_command(self, text: bytes, command: Command) -> None:
        judging = self.judging
        who = judging.policy.name if judging is not None else "an agent"
        where = (
            f"policy {who}, prepared statements" if judging is not None else "prepared statements"
        )
        if isinstance(command, Mixed):
            verb = command.command
            self._deny(
                True,
                Denied(
                    f"{who} must send {verb} as the only statement of its message: guardproxy "
                    f"resolves prepared statements itself ({where})",
                    rule="prepared",
                    hint=f"send {verb} in a message of its own",
                    sqlstate="0A000",
                ),
                text,
            )
            return
        if isinstance(command, Prepare | Deallocate):
            backend = self.backend
            if backend is not None and self.inflight.pending:
                # an aborted transaction changes nothing: the server's answers say
                self._wait_for_answers(self._prepared_command, text, command)
                return
            if backend is not None and backend.status == b"E":
                self._refuse(True, _ABORTED)
            elif isinstance(command, Deallocate):
                self._deallocate(command.name)
            else:
                self._prepare_sql(text, command)
            return
        statement = self.registry.statement(command.name)
        if statement is None:
            self._deny(
                True,
                Denied(
                    f"{who} may not EXECUTE {_show(command.name)}: prepared statement "
                    f'"{_show(command.name)}" does not exist in this session ({where})',
                    rule="prepared",
                    hint=f"PREPARE {_show(command.name)} AS ... in this session first",
                    sqlstate="26000",
                ),
                text,
            )
            return
        if judging is None:
            judgement = plain(text)
        else:
            try:
                judgement = judging.judge(
                    text, query=True, prepared=(_show(command.name), statement.text)
                )
            except Denied as denial:
                self._deny(True, denial, text)
                return
            current = self._current_statement(command.name, query=True)
            if current is None:
                return
            statement = current
        sent = judgement.sent[: judgement.shift] + b"EXECUTE " + statement.server_name
        if command.args:
            sent += b"(" + command.args + b")"
        judgement = judgement.with_sent(sent, statement.judgement.pins or judgement.pins)
        if self.backend is None:
            self._hold_for_server(True, self._execute_sql, statement, judgement)
            return
        self._execute_sql(statement, judgement)

    def _execute_sql(self, statement: Statement, judgement: Judgement) -> None:
        """EXECUTE of a registry statement: prepared on the server first, if need be, and
        only then run (a Parse that fails ends the client's Query with its error)."""
        backend = self.backend
        assert backend is not None
        if backend.prepared.get(statement.server_name, -1) < statement.generation:
            self._prepare_on_server(statement, visible=False)
            self._wait_for_answers(self._execute_prepared_sql, statement, judgement)
            return
        self._execute_prepared_sql(statement, judgement)

    def _execute_prepared_sql(self, statement: Statement, judgement: Judgement) -> None:
        backend = self.backend
        if backend is None or statement.server_name not in backend.prepared:
            # the Parse failed (its error went to the client) and the server skips to a
            # Sync: this one's ReadyForQuery ends the client's Query
            self._send(codec.SYNC)
            self.inflight.expect(Pending.SYNC, True, None)
            return
        if judgement.plan_check is not None and not self.in_round:
            # its plan is the prepared statement's, asked of the server by its name there
            executed = judgement.sent[judgement.shift :].decode(errors="replace")
            self._after_job = (self._plan_checked, (True, judgement, b""))
            self._start_job(PlanCheck(executed, ()))
            return
        self._query_judged(codec.build_query(judgement.sent), judgement)

    def _prepare_sql(self, text: bytes, command: Prepare) -> None:
        if command.name in self.registry.statements:
            self._refuse(True, _exists(command.name))
            return
        judging = self.judging
        if judging is None:
            judgement = plain(command.inner)
        else:
            try:
                judging.judge(text, query=True)  # the PREPARE as a whole: comments, context
                judgement = judging.judge(command.inner, query=False)
            except Denied as denial:
                self._deny(True, denial, text)
                return
        statement = Statement(command.name, command.inner, b"\x00\x00", judgement)
        self.registry.parse(statement, self.search_path, self.inflight.rounds_sent)
        self._answer_locally(codec.build_command_complete("PREPARE"))

    def _deallocate(self, name: bytes | None) -> None:
        judging = self.judging
        if name is None:
            self.registry.deallocate_all()
            if judging is not None:
                judging.forget_prepared(None)
            self._answer_locally(codec.build_command_complete("DEALLOCATE ALL"))
            return
        if self.registry.statement(name) is None:
            self._refuse(True, _no_statement(name))
            return
        self.registry.close_statement(name)
        if judging is not None:
            judging.forget_prepared(_show(name))
        self._answer_locally(codec.build_command_complete("DEALLOCATE"))

    # ---- Parse

    def _parse(self, raw: bytes) -> None:
        parsed = codec.parse_parse(raw)
        query = parsed.query
        if (len(query) > self._long or _nested(query, self.offload_above)) and (
            self._too_large(False, query) or self._offloaded(False, raw, query)
        ):
            return
        self._parse_text(raw, parsed)

    def _parse_text(
        self, raw: bytes, parsed: codec.ParseMessage, given: Analysis | None = None
    ) -> None:
        command = prepared_command(parsed.query)
        if command is not None:
            self._parse_command(parsed, command)
            return
        judging = self.judging
        if judging is None:
            judgement = plain(parsed.query)
        else:
            try:
                judgement = judging.judge(
                    parsed.query,
                    query=False,
                    in_transaction=self._in_transaction(),
                    given=given,
                )
            except Denied as denial:
                self._deny(False, denial, parsed.query)
                return
        self._parse_checked(raw, parsed, judgement)

    def _parse_command(self, parsed: codec.ParseMessage, command: Command) -> None:
        """A Parse of an SQL PREPARE, EXECUTE or DEALLOCATE. The names they use are the
        client's, which only the registry knows (the servers have the proxy's names):
        PREPARE and DEALLOCATE run on the registry when their portal is executed, and
        are answered by the proxy in order; EXECUTE is refused."""
        if isinstance(command, Prepare | Deallocate):
            if parsed.name and parsed.name in self.registry.statements:
                self._refuse(False, _exists(parsed.name))
                return
            statement = Statement(parsed.name, parsed.query, parsed.tail, plain(parsed.query))
            statement.command = command
            undo = self.registry.parse(statement, self.search_path, self.inflight.rounds_sent)
            self.inflight.expect(Pending.SYNTH, True, codec.PARSE_COMPLETE, undo)
            return
        verb = command.command if isinstance(command, Mixed) else "EXECUTE"
        who = self.judging.policy.name if self.judging is not None else "an agent"
        self._deny(
            False,
            Denied(
                f"{who} must send {verb} as a simple Query of its own: guardproxy resolves "
                "prepared statements itself, and the extended protocol runs them with Bind "
                "and Execute (policy prepared statements)",
                rule="prepared",
                hint=f"send {verb} ... as a simple Query, or Bind and Execute the statement",
                sqlstate="0A000",
            ),
            parsed.query,
        )

    def _run_command(self, statement: Statement) -> None:
        """Executes the portal of a PREPARE or DEALLOCATE sent with a Parse message."""
        command = statement.command
        judging = self.judging
        if isinstance(command, Prepare):
            if command.name in self.registry.statements:
                self._refuse(False, _exists(command.name))
                return
            if judging is None:
                judgement = plain(command.inner)
            else:
                try:
                    judging.judge(statement.text, query=False)  # comments, context
                    judgement = judging.judge(command.inner, query=False)
                except Denied as denial:
                    self._deny(False, denial, statement.text)
                    return
            prepared = Statement(command.name, command.inner, b"\x00\x00", judgement)
            undo = self.registry.parse(prepared, self.search_path, self.inflight.rounds_sent)
            done = codec.build_command_complete("PREPARE")
            self.inflight.expect(Pending.SYNTH, True, done, undo)
            return
        assert isinstance(command, Deallocate)
        if command.name is None:
            self.registry.deallocate_all()
            if judging is not None:
                judging.forget_prepared(None)
            done = codec.build_command_complete("DEALLOCATE ALL")
            self.inflight.expect(Pending.SYNTH, True, done)
            return
        if self.registry.statement(command.name) is None:
            self._refuse(False, _no_statement(command.name))
            return
        undo = self.registry.close_statement(command.name)
        if judging is not None:
            judging.forget_prepared(_show(command.name))
        done = codec.build_command_complete("DEALLOCATE")
        self.inflight.expect(Pending.SYNTH, True, done, undo)

    def _parse_checked(self, raw: bytes, parsed: codec.ParseMessage, judgement: Judgement) -> None:
        if parsed.name and parsed.name in self.registry.statements:
            self._parse_in_use(raw, parsed, judgement)
            return
        if judgement.plan_check is not None:
            types = codec.parameter_types(parsed.tail)
            if self._check_plan(False, judgement, types, raw):
                return
        self._parse_judged(parsed, judgement)

    def _parse_in_use(self, raw: bytes, parsed: codec.ParseMessage, judgement: Judgement) -> None:
        """A Parse of a name the client has taken. The Parse that took it may still fail
        (its answer is waited for, then the name looked up again); Postgres reports what
        is wrong with the new statement before the name, so the server checks it first
        under a name of the proxy's own."""
        if self.backend is None:
            self._hold_for_server(False, self._parse_in_use, raw, parsed, judgement)
            return
        if self.inflight.pending:
            self._wait_for_answers(self._parse_again, raw, parsed, judgement)
            return
        self.in_round = True
        self._send(codec.build_parse(_CHECK_NAME, judgement.sent, parsed.tail))
        self.inflight.expect(Pending.PARSE, False, Sent(b"", parsed.name, judgement.shift))
        self._send(codec.build_close_statement(_CHECK_NAME))
        self.inflight.expect(Pending.CLOSE, False, None)
        self._refuse(False, _exists(parsed.name))

    def _parse_again(self, raw: bytes, parsed: codec.ParseMessage, judgement: Judgement) -> None:
        if not self.inflight.skipping:  # else Postgres skipped the Parse: so does the relay
            self._parse_checked(raw, parsed, judgement)

    def _parse_judged(self, parsed: codec.ParseMessage, judgement: Judgement) -> None:
        statement = Statement(parsed.name, parsed.query, parsed.tail, judgement)
        if parsed.name and self.backend is None:
            # prepared lazily on the server that first runs it: a client that prepares
            # while all servers are busy (pgbench -M prepared) never waits for one here
            if self.judging is None and self.syntax_check is not None:
                error = self.syntax_check(parsed.query)
                if error is not None:
                    self._refuse(False, error)
                    return
            self.registry.parse(statement, self.search_path, self.inflight.rounds_sent)
            self.to_client.append(codec.PARSE_COMPLETE)
            self._notices(judgement)
            return
        undo = self.registry.parse(statement, self.search_path, self.inflight.rounds_sent)
        if self.backend is None:
            self._hold_for_server(False, self._send_parse, statement, undo)
            self._held_undo = undo
            return
        self._send_parse(statement, undo)

    def _send_parse(self, statement: Statement, undo: Undo) -> None:
        backend = self.backend
        assert backend is not None
        first = not self.in_round and not self.inflight.pending
        self.in_round = True
        if statement.name:
            self._prepare_on_server(statement, visible=True, undo=undo)
        elif self._auto_prepared(statement) and not (
            # a round before this one not answered yet may leave the transaction aborted,
            # where Postgres refuses a Parse (25P02): only the server can answer this one
            self.inflight.rounds_sent > self.inflight.rounds_done
            and statement.server_name in backend.prepared
        ):
            if statement.server_name in backend.prepared and backend.status != b"E":
                # the server has it already: nothing for Postgres to parse again
                self.inflight.expect(Pending.SYNTH, True, codec.PARSE_COMPLETE, undo)
                if first and backend.status == b"I":
                    self._replay_candidate = statement
            else:
                self._prepare_on_server(statement, visible=True, undo=undo)
        else:
            statement.auto = False
            sent = _unnamed_sent(statement, backend.unnamed)
            backend.unnamed = statement.generation
            self._send(codec.build_parse(b"", statement.judgement.sent, statement.types))
            self.inflight.expect(Pending.PARSE, True, sent, undo)
        self._notices(statement.judgement)

    def _auto_prepared(self, statement: Statement) -> bool:
        """Whether this unnamed statement is prepared on the servers (a text sent often)."""
        auto = self.auto_prepare
        if auto is None:
            return False
        judging = self.judging
        name = auto.name(
            judging.base_policy.name if judging is not None else "",
            statement.judgement.sent,
            statement.types,
            self.search_path,
        )
        if name is None:
            return False
        statement.server_name = name
        statement.auto = True
        return True

    def _prepare_on_server(
        self, statement: Statement, visible: bool, undo: Undo | None = None
    ) -> None:
        """Makes the server's copy of a named statement as new as the client's Parse."""
        backend = self.backend
        assert backend is not None
        sname = statement.server_name
        prepared = backend.prepared
        if sname in prepared or sname in backend.to_close:
            self._send(codec.build_close_statement(sname))
            self.inflight.expect(Pending.CLOSE, False, None)
            backend.to_close.discard(sname)
        elif self.max_prepared and len(prepared) >= self.max_prepared:
            oldest = next(iter(prepared))  # the least recently prepared goes
            del prepared[oldest]
            self._send(codec.build_close_statement(oldest))
            self.inflight.expect(Pending.CLOSE, False, oldest)
        self._send(codec.build_parse(sname, statement.judgement.sent, statement.types))
        backend.prepared[sname] = statement.generation
        self.inflight.expect(Pending.PARSE, visible, _sent(sname, statement), undo)

    def _current_statement(
        self,
        name: bytes,
        describe: bool = False,
        owner: Statement | None = None,
        query: bool = False,
    ) -> Statement | None:
        """The client's statement, judged again if its judgement expired (policy reload,
        DDL, a context its rewrite depends on); None when it cannot run (refused).
        ``owner``: the record a portal was bound from (it may be closed or replaced);
        ``query``: for a simple Query (an EXECUTE), whose refusal ends it."""
        statement = owner or self.registry.statement(name)
        if statement is None:
            self._refuse(query, _no_statement(name))
            return None
        judging = self.judging
        if statement.command is not None:
            return statement  # runs on the registry, judged when it runs
        if judging is not None and not describe and not judging.current(statement.judgement):
            try:
                judgement = judging.rejudge(statement.text)
            except Denied as denial:
                self._deny(query, denial, statement.text)
                return None
            statement.rejudged(judgement, self.search_path)
        return statement

    def _statement_on_server(self, statement: Statement) -> bytes:
        """The statement's name on the lent server, prepared there first if needed."""
        backend = self.backend
        assert backend is not None
        if statement.auto:
            if statement.server_name not in backend.prepared:
                self._prepare_on_server(statement, visible=False)
            return statement.server_name
        if not statement.name and self.registry.statement(b"") is not statement:
            # an unnamed statement the client has replaced since (a portal bound from it
            # is bound again): prepared under a name of its own, so that the client's
            # current unnamed statement on the server stays what it is
            if not statement.server_name:
                statement.server_name = server_statement_name(
                    statement.judgement.sent, statement.types, self.search_path
                )
            if backend.prepared.get(statement.server_name, -1) < statement.generation:
                self._prepare_on_server(statement, visible=False)
            return statement.server_name
        if not statement.name:
            if backend.unnamed != statement.generation:
                # the unnamed statement outlives a Sync: it may be bound on another server,
                # or on this one after another session or a Query of the proxy's own
                # replaced it there: what runs must never be someone else's
                self._send(codec.build_parse(b"", statement.judgement.sent, statement.types))
                self.inflight.expect(
                    Pending.PARSE, False, _unnamed_sent(statement, backend.unnamed)
                )
                backend.unnamed = statement.generation
            return b""
        if backend.prepared.get(statement.server_name, -1) < statement.generation:
            self._prepare_on_server(statement, visible=False)
        return statement.server_name

    # ---- Bind

    def _bind(self, raw: bytes) -> None:
        name, start, end = codec.bind_statement(raw)
        portal_name = codec.bind_portal(raw)  # a name in use: the server says so, in order
        statement = self._current_statement(name)
        if statement is None:
            return
        if statement.command is not None:  # nothing for a server to bind
            portal = Portal(portal_name, statement, raw, self.inflight.rounds_sent)
            undo = self.registry.bind(portal)
            self.inflight.expect(Pending.SYNTH, True, codec.BIND_COMPLETE, undo)
            return
        if self.backend is None:
            self._hold_for_server(False, self._send_bind, raw, start, end, statement, portal_name)
            return
        self._send_bind(raw, start, end, statement, portal_name)

    def _send_bind(
        self, raw: bytes, start: int, end: int, statement: Statement, portal_name: bytes
    ) -> None:
        self.in_round = True
        if self._replay_candidate is statement:
            self._replay = Replay(raw, statement)
        sname = self._statement_on_server(statement)
        if sname:
            raw = codec.replace_field(raw, start, end, sname)
        portal = Portal(portal_name, statement, raw, self.inflight.rounds_sent)
        undo = self.registry.bind(portal)
        self._send(raw)
        # what an error about it must say otherwise: the client's name, its own positions
        sent = _sent(sname, statement) if sname or statement.judgement.shift else None
        self.inflight.expect(Pending.BIND, True, sent, undo)

    # ---- Execute

    def _execute(self, raw: bytes) -> None:
        portal_name, max_rows = codec.execute_target(raw)
        portal = self.registry.portal(portal_name)
        if portal is not None and portal.statement.command is not None:
            self._run_command(portal.statement)
            return
        if self.backend is None:
            # a portal lives in a transaction, on its server: with none lent there is none
            self._refuse(
                False, GuardError(f'portal "{_show(portal_name)}" does not exist', sqlstate="34000")
            )
            return
        if self.judging is not None:
            try:
                self.judging.before_execution()
            except Denied as denial:
                self._deny(False, denial, b"")
                return
        self.in_round = True
        if portal is None:
            # a cursor declared in SQL, or no portal at all (the server says so, in order)
            cursor = self.cursors.get(portal_name.decode(errors="replace"))
            self._send_execute(raw, None, cursor)
            return
        if self.judging is not None and not self.judging.current(portal.statement.judgement):
            rebound = self._rebind(portal)
            if rebound is None:
                return
            portal = rebound
        judgement = portal.statement.judgement
        write = judgement.write
        if write is not None and self.judging is not None:
            run = self.judging.write_run(write, portal.parameters)
            if run.needs_management:
                if max_rows:
                    self._refuse(False, _no_row_limit(write.agent_type))
                    return
                self._managed(
                    ManagedWrite(raw, run, False, judgement.row_cap, judgement.byte_cap), False
                )
                return
            self._send_execute(raw, judgement, portal, (run, judgement))
            return
        if judgement.cursors:
            stale = self._stale_cursor(judgement) if self.cursors else None
            if stale is not None:
                self._deny(False, stale, judgement.sql.encode())
                return
            self._declare_cursors(judgement, portal.statement.text)
        source = self._cursor_source(judgement.cursor) if judgement.cursor is not None else portal
        self._send_execute(raw, judgement, source)

    def _rebind(self, portal: Portal) -> Portal | None:
        """A portal whose statement's judgement expired since it was bound (a reload, DDL,
        a context its rewrite or tag depends on): bound again, hidden, to the statement
        as judged now, so that it never runs with a stale decision. One that already
        delivered rows cannot start over: refused."""
        if portal.rows:
            self._refuse(
                False,
                GuardError(
                    f'portal "{_show(portal.name)}" was bound before the policy or the session '
                    "context changed, and has delivered rows already: it cannot go on",
                    hint="close the portal and bind the statement again",
                    sqlstate="0A000",
                ),
            )
            return None
        statement = self._current_statement(portal.statement.name, owner=portal.statement)
        if statement is None:
            return None
        sname = self._statement_on_server(statement)
        bind = portal.bind
        _, start, end = codec.bind_statement(bind)
        bind = codec.replace_field(bind, start, end, sname)
        if portal.name:
            self._send(codec.message(b"C", b"P" + portal.name + b"\x00"))
            self.inflight.expect(Pending.CLOSE, False, None)
        rebound = Portal(portal.name, statement, bind, portal.round)
        undo = self.registry.bind(rebound)
        self._send(bind)
        self.inflight.expect(Pending.BIND, False, _sent(sname, statement), undo)
        return rebound

    def _send_execute(
        self, raw: bytes, judgement: Judgement | None, source: Any, audit: Any = None
    ) -> None:
        self.queries += 1
        if not self.inflight.pending:
            self.stmt_started = time.perf_counter()
        execution = None
        judging = self.judging
        if judging is not None:
            judging.tally.n += 1
        if judgement is None:
            self.stats.statements["query" if judging is None else "read", "allowed"] += 1
            if isinstance(source, CursorRows) and judging is not None:
                # a cursor declared in SQL, run by a protocol Execute: its caps hold too
                policy = judging.policy
                execution = Execution(
                    0,
                    policy.max_rows_returned or 0,
                    policy.on_rows_returned_over == "error",
                    source,
                    None,
                    True,
                    policy.max_bytes_returned or 0,
                )
        else:
            self.stats.statements[judgement.kind, judgement.decision] += 1
            self._note_effects(judgement)
            if judgement.row_cap or judgement.byte_cap or audit is not None or judgement.shift:
                execution = Execution(
                    judgement.shift,
                    judgement.row_cap,
                    judgement.cap_error,
                    source,
                    audit,
                    True,
                    judgement.byte_cap,
                )
        self._send(raw)
        self.inflight.expect(Pending.EXECUTE, True, execution)
        if execution is not None and execution.cap_error and execution.counts():
            # its answer may turn into an error that must abort what follows: let the
            # server answer it now, and take nothing more from the client until then
            self._send(codec.FLUSH)
            self._hold()

    # ---- Sync, Describe, Close

    def _sync(self, raw: bytes = codec.SYNC) -> None:
        """A Sync: the client's own, or (after a refusal) one that ends the round."""
        self.in_round = False
        if self.backend is None:
            self.to_client.append(codec.ready_for_query(b"I"))
            return
        self._send(raw)
        replay = self._replay
        if replay is None or replay.closed:
            self.inflight.expect(Pending.SYNC, True, None)
            return
        # a round that may run again: its ReadyForQuery is the proxy's if it does
        self.inflight.expect(Pending.SYNC, not replay.failed, None)
        replay.closed_at = self.inflight.rounds_sent

    def _describe(self, raw: bytes) -> None:
        target, name = codec.describe_or_close_target(raw)
        if target == b"S":
            statement = self._current_statement(name, describe=True)
            if statement is None:
                return
            if statement.command is not None:  # no parameters, no rows
                self.inflight.expect(Pending.SYNTH, True, _NO_PARAMETERS + codec.NO_DATA)
                return
            if self.backend is None:
                self._hold_for_server(False, self._send_describe_statement, statement)
                return
            self._send_describe_statement(statement)
            return
        portal = self.registry.portal(name)
        if portal is not None and portal.statement.command is not None:
            self.inflight.expect(Pending.SYNTH, True, codec.NO_DATA)
            return
        if self.backend is None:
            self._hold_for_server(False, self._describe, raw)
            return
        self.in_round = True
        self._send(raw)
        self.inflight.expect(
            Pending.DESCRIBE, True, portal is not None and _no_rows(portal.statement)
        )

    def _send_describe_statement(self, statement: Statement) -> None:
        self.in_round = True
        sname = self._statement_on_server(statement)
        self._send(codec.message(b"D", b"S" + sname + b"\x00"))
        no_rows = _no_rows(statement)
        if sname != statement.name:  # its errors name the client's statement
            self.inflight.expect(
                Pending.DESCRIBE, True, Sent(sname, statement.name, 0, statement, no_rows)
            )
        else:
            self.inflight.expect(Pending.DESCRIBE, True, no_rows)

    def _close(self, raw: bytes) -> None:
        target, name = codec.describe_or_close_target(raw)
        if target == b"S":
            # the server's copy stays cached for reuse; the client's name goes.
            # Closing a name it never prepared closes nothing, as in Postgres.
            undo = self.registry.close_statement(name)
            self.inflight.expect(Pending.SYNTH, True, codec.CLOSE_COMPLETE, undo)
            return
        undo = self.registry.close_portal(name)
        if self.backend is None:
            self.to_client.append(codec.CLOSE_COMPLETE)  # no server, no portal
            return
        self.in_round = True
        self._send(raw)
        self.inflight.expect(Pending.CLOSE, True, None, undo)

    # ------------------------------------------------------------ refusing

    def _deny(self, query: bool, denial: Denied, text: bytes) -> None:
        """Refuses a statement the policy denies, and records it."""
        self.stats.statements[denial.kind or _kind_of(text, self.judging), "denied"] += 1
        self.stats.denials[denial.counted_as or denial.rule] += 1
        self._audit(
            text.decode(errors="replace"), "denied", rule=denial.rule, reason=denial.message
        )
        self._refuse(query, denial)

    def _refuse(self, query: bool, error: GuardError, query_like: bool = False) -> None:
        """Answers a request with an error as Postgres would, transaction state included.

        With a server lent, the server is made to fail in order (a Parse that cannot
        succeed), so its transaction aborts exactly as after any other error, and what
        the client sent before this still gets its answers first.
        """
        body = codec.build_error(error.sqlstate, error.message, hint=error.hint)
        if self.backend is None:
            if query or query_like:
                self.to_client.append(body + codec.ready_for_query(b"I"))
            else:
                self.to_client.append(body)
                self.skip = True
            return
        self._send(ABORT_PARSE)
        self.inflight.expect(Pending.ABORT, True, body)
        if query or query_like:
            self._send(codec.SYNC)
            self.inflight.expect(Pending.SYNC, True, None)
        else:
            self.skip = True
            self.in_round = True  # the server skips to the client's Sync: it stays lent

    def _fail_request(self, query: bool, error: GuardError) -> None:
        """An error for a request when no server is involved (lost, or never came)."""
        body = codec.build_error(error.sqlstate, error.message, hint=error.hint)
        if query:
            self.to_client.append(body + codec.ready_for_query(b"I"))
        else:
            self.to_client.append(body)
            self.skip = True

    # ------------------------------------------------------------ jobs

    def _hold(self) -> None:
        """Takes no client message until the server owes nothing."""
        self._enter(Phase.HOLDING)

    def _hold_for_server(self, query: bool, step: Callable[..., None], *args: Any) -> None:
        self.held = (step, args, query)

    def _wait_for_answers(self, step: Callable[..., None], *args: Any) -> None:
        """Goes on with ``step`` once the server answered all it was sent (Postgres
        holds extended-protocol answers until a Flush)."""
        self._send(codec.FLUSH)
        self._after_hold = (step, args)
        self._hold()

    def _managed(self, job: ManagedWrite, query: bool) -> None:
        run = job.run
        if run.audit_inline is not None and not self.hooks.audit_accepting():
            name = run.plan.agent_type
            # recorded like any denial: the audit writer tries the store again with it
            self._deny(
                query,
                Denied(
                    f"{name} may not write while the audit log cannot record it "
                    f"(policy {name}, audit.on_loss: fail_closed)",
                    rule="audit.on_loss",
                    hint="retry shortly; an operator must bring the audit store back",
                    sqlstate="53400",
                ),
                run.plan.statement.encode(),
            )
            return
        self._start_job(job)

    def _check_plan(
        self, query: bool, judgement: Judgement, types: tuple[int, ...], raw: bytes
    ) -> bool:
        """A read whose plan the policy limits: checked before it runs. True when taken."""
        if self.in_round:
            assert self.judging is not None
            self._deny(
                query,
                _plan_refusal(
                    self.judging.policy.name,
                    "it comes in the middle of an extended-protocol request (before its Sync)",
                    "0A000",
                    "send Sync before this statement",
                ),
                judgement.sql.encode(),
            )
            return True
        self._after_job = (self._plan_checked, (query, judgement, raw))
        self._start_job(PlanCheck(judgement.sql, types))
        return True

    def _plan_checked(self, query: bool, judgement: Judgement, raw: bytes) -> None:
        if query:
            self._query_judged(raw, judgement)
        else:
            self._parse_judged(codec.parse_parse(raw), judgement)

    def _start_job(self, job: Job) -> None:
        """Runs ``job`` on the server once it owes nothing (a server is acquired first)."""
        self.wants_release = False  # new work: the server stays
        if self.backend is None:
            query = isinstance(job, ManagedWrite) and job.simple
            self._hold_for_server(query, self._start_job, job)
            return
        self._guard_check()  # the job's statements run under the session's principals
        if self.inflight.pending:
            # Postgres holds extended-protocol answers until a Flush or a Sync
            self._send(codec.FLUSH)
            self._drained = job
            self._hold()
            return
        self.job = job
        self._enter(Phase.JOB)

    def job_done(self, outcome: Any) -> None:
        """The session ran ``self.job``; this applies what it came back with."""
        job, self.job = self.job, None
        self._enter(Phase.ACTIVE if self.backend is not None else Phase.IDLE)
        if isinstance(job, ManagedWrite):
            self._write_done(job, outcome)
        elif isinstance(job, PlanCheck):
            after, self._after_job = self._after_job, None
            if isinstance(outcome, Denied):
                query, judgement = (after[1][0], after[1][1]) if after else (False, None)
                self._deny(query, outcome, judgement.sql.encode() if judgement else b"")
            elif after is not None:
                after[0](*after[1])
        elif isinstance(job, CaptureSettings):
            if outcome is not None:
                self.settings = outcome
            self.wants_release = True
        elif isinstance(job, JudgeLarge):
            after, self._after_job = self._after_job, None
            if after is not None:
                after[0](*after[1], outcome)
            if self.phase is Phase.ACTIVE:
                self._after_round()

    def job_failed(self, error: GuardError) -> None:
        """The job's server failed (it is closed, never reused): the client gets the error."""
        job, self.job = self.job, None
        after, self._after_job = self._after_job, None
        self.detach()
        self._enter(Phase.IDLE)
        if isinstance(job, CaptureSettings):
            return
        query = job.simple if isinstance(job, ManagedWrite) else bool(after and after[1][0])
        self._fail_request(query, error)

    def _write_done(self, job: ManagedWrite, outcome: WriteOutcome) -> None:
        run = job.run
        stats = self.stats
        stats.statements["write", outcome.decision] += 1
        if outcome.decision != "denied" and self.judging is not None:
            self.judging.tally.n += 1
        stats.statement_time.observe(outcome.seconds)
        if outcome.rows is not None and outcome.decision not in ("denied", "failed"):
            stats.rows_affected += outcome.rows
        if outcome.decision == "replayed":
            stats.replays += 1
        elif outcome.decision == "denied":
            stats.denials[outcome.rule or run.plan.cap_rule or "write_safety"] += 1
        if run.audit_inline is None or outcome.decision not in ("allowed", "rewritten"):
            decision, rule, result = outcome.decision, outcome.rule, None
            if decision in ("allowed", "rewritten"):
                result = "succeeded"
                rule = run.plan.rule
            elif decision == "failed":
                decision, result = ("rewritten" if run.plan.soft_delete else "allowed"), "failed"
                rule = run.plan.rule
            elif decision == "denied" and outcome.rows is not None:
                result = "undone"  # it ran, past a cap or a budget, and was rolled back
            self._audit(
                run.plan.statement,
                decision,
                rule=rule,
                reason=outcome.reason,
                rows=outcome.rows,
                duration_ms=outcome.seconds * 1000,
                outcome=result,
            )
        response = outcome.response
        if (job.row_cap or job.byte_cap) and outcome.decision != "denied":
            response = self._capped_write_answer(response, job)
        self.to_client.append(response)
        if job.simple:
            self._after_round()
        elif outcome.aborted:
            self.skip = True  # the server skips to the client's Sync; so does the proxy
            self.inflight.skipping = True

    def _capped_write_answer(self, response: bytes, job: ManagedWrite) -> bytes:
        """A managed write's answer (run, or replayed from the ledger) with its RETURNING
        rows cut at the read caps, as any result is; the count of rows it changed stays
        (they changed), after a WARNING that says what was cut."""
        execution = Execution(cap=job.row_cap, byte_cap=job.byte_cap)
        out: list[bytes] = []
        for kind, raw in codec.split_messages(response):
            if kind == m.BE_DATA_ROW and not execution.take_row(len(raw) - 5):
                continue
            if kind == m.BE_COMMAND_COMPLETE and execution.cut:
                out.append(self._cut_notice(execution))
                execution = Execution(cap=job.row_cap, byte_cap=job.byte_cap)
            out.append(raw)
        return b"".join(out)

    # ------------------------------------------------------------ server answers

    def on_backend(self, data: bytes) -> None:
        self.inflight.feed(data)
        if self.phase is Phase.HOLDING and not self.inflight.pending:
            job, self._drained = self._drained, None
            after, self._after_hold = self._after_hold, None
            if job is not None and self.inflight.skipping:
                # a message before the job's Execute failed: Postgres skips that Execute
                job = self._after_job = None
            if job is not None:
                self.job = job
                self._enter(Phase.JOB)
                return
            self._enter(Phase.ACTIVE)
            if after is not None:
                after[0](*after[1])
                if not self.takes_messages:
                    return
            self._after_round()

    def on_complete(self, tag: bytes, execution: Execution | None) -> None:
        now = time.perf_counter()
        stats = self.stats
        stats.statement_time.observe(now - self.stmt_started)
        self.stmt_started = now
        if execution is not None and execution.audit is not None:
            execution.written += _count(tag) or 0
            if execution.extended:
                self._audit_write(execution, None)
        if tag[:7] == b"SELECT ":  # most statements: nothing to look for but the row count
            stats.rows_returned += int(tag[7:])
            return
        verb, _, count = tag.rpartition(b" ")
        if count.isdigit():
            if verb in _ROW_RETURNING:
                stats.rows_returned += int(count)
            else:
                stats.rows_affected += int(count)
        if tag == b"ROLLBACK":
            self._rolled_back = True
        elif tag.startswith(_DDL_PREFIXES):
            self.hooks.catalog_changed()
        if tag in _SETTINGS_TAGS:
            self.settings_dirty = True
            if tag != b"SET" and self.backend is not None:
                self.backend.guard_sent = None  # RESET ALL, DISCARD ALL: set them again
                self.guard_dirty = True
        if tag == b"LISTEN":
            self._pin("LISTEN")
        if tag == b"DISCARD ALL":
            # as Postgres forgets them all for a direct client: all recorded before it
            self.registry.discard_all(self.inflight.rounds_done)
            if self.backend is not None:
                self.backend.forget_statements()
        elif tag == b"DEALLOCATE ALL":
            self.registry.deallocate_all(self.inflight.rounds_done)
            if self.backend is not None:
                self.backend.forget_statements()

    def on_error(self, fields: dict[str, str], kind: Pending, payload: Any) -> bytes | None:
        now = time.perf_counter()
        stats = self.stats
        stats.statement_time.observe(now - self.stmt_started)
        self.stmt_started = now
        backend = self.backend
        if backend is not None and backend.status == b"T":
            stats.aborted_transactions += 1
        self._rolled_back = True  # its transaction (explicit or implicit) ends rolled back
        code = fields.get("C", "")
        if code == "57014":
            if "timeout" in fields.get("M", ""):
                stats.timeouts += 1
            else:
                stats.cancels += 1
        elif code == "25P03":
            stats.timeouts += 1
        if isinstance(payload, Execution) and payload.audit is not None:
            payload.failed = True
            payload.failure = f"{code}: {fields.get('M', '')}"
            if payload.extended:
                self._audit_write(payload, payload.failure)
        if isinstance(payload, Sent):
            if kind == Pending.BIND and payload.server_name and code == "0A000":
                # "cached plan must not change result type": every copy of it is stale
                self.hooks.stale_statement(payload.server_name)
                replay = self._replay
                if replay is not None and replay.statement is payload.statement:
                    replay.failed = True  # the client's unnamed statement runs again
                    return b""
            return _as_client_sees(fields, payload)
        if self.judging is not None and code in _TIMEOUT_CODES:
            # a timeout says which limit of the policy ended it, and what to do
            told = explain_timeout(self.judging.policy, fields)
            if told is not None:
                fields = dict(fields, M=told[0], H=told[1])
                return codec.build_error_fields(fields)
        return None

    def on_not_taken(self, entries: list[Expected], failed: bool) -> None:
        """Messages the server did not take: the first of ``entries`` failed (if
        ``failed``), the others came after it and before the Sync. What the relay
        recorded for them is undone, the last first."""
        backend = self.backend
        replay = self._replay
        if replay is not None and replay.failed and replay.closed:
            self.inflight.hide_round_end()
        for index in range(len(entries) - 1, -1, -1):
            kind, visible, payload, undo = entries[index]
            if undo is not None:
                self.registry.undo(undo, failed and index == 0)
            if kind == Pending.PARSE and isinstance(payload, Sent):
                if payload.statement is not None and not payload.server_name:
                    if backend is not None:
                        # a Parse that failed dropped the server's unnamed statement first;
                        # one the server skipped left it as it was
                        failed_here = failed and index == 0
                        backend.unnamed = 0 if failed_here else payload.unnamed_before
                elif payload.server_name and backend is not None:
                    # whatever copy the server has, it is not this one: closed first next time
                    backend.prepared.pop(payload.server_name, None)
                    backend.to_close.add(payload.server_name)
            elif kind == Pending.CLOSE and payload and backend is not None:
                backend.to_close.add(payload)  # an evicted statement the server still has
            elif kind == Pending.QUERY and not visible and backend is not None:
                # the delegation settings never reached the server: sent again
                backend.guard_sent = None
                self.guard_dirty = True

    def on_cut(self, execution: Execution, tag: bytes) -> bytes:
        """A result passed its row cap: what the client sees in place of its CommandComplete
        (``tag``)."""
        self.stats.statements["read", "truncated"] += 1
        rule, limit, hint = _cap_that_cut(execution)
        delivered = execution.delivered
        if self.judging is not None:
            self._audit("", "truncated", rule=rule, rows=delivered)
        if execution.cap_error:
            if execution.extended:
                # the round goes on on the server (it saw no error): make it fail here, as
                # the error says, and discard what the client sends up to its Sync
                self._send(ABORT_PARSE)
                self.inflight.expect(Pending.ABORT, False, b"")
                self.skip = True
            else:
                self._abort_at_ready = True
            return codec.build_error(
                "54000",
                f"the result has more than {limit}, the most this agent may read at once "
                f"(policy {rule})",
                hint=hint,
            )
        notice = self._cut_notice(execution)
        verb = tag.split(b" ", 1)[0].decode(errors="replace") or "SELECT"
        if verb in ("INSERT", "UPDATE", "DELETE", "MERGE"):
            # a write's RETURNING rows were cut, not what it changed: its count stays
            return notice + codec.build_command_complete(tag.decode(errors="replace"))
        if verb not in ("FETCH", "COPY"):
            verb = "SELECT"
        return notice + codec.build_command_complete(f"{verb} {delivered}")

    def _cut_notice(self, execution: Execution) -> bytes:
        """The WARNING a truncated result ends with: which cap cut it, and what to do."""
        rule, limit, hint = _cap_that_cut(execution)
        if execution.cut_by == "bytes":  # the rows cap names itself; the bytes cap says how much
            shown = f"result truncated to {execution.delivered} rows by policy ({rule}: at most {limit})"
        else:
            shown = f"result truncated to {execution.cap} rows by policy ({rule})"
        return codec.build_notice("01000", shown, severity="WARNING", hint=hint)

    def on_ready(self, status: bytes) -> None:
        replay = self._replay
        if replay is not None and replay.closed and self.inflight.rounds_done >= replay.closed_at:
            self._replay = None
            if replay.failed:
                self.replaying.extend(replay.messages)
        if status == b"I":
            if self.registry.portals:
                self.registry.end_transaction(self.inflight.rounds_done)
            judging = self.judging
            if judging is not None and judging.transaction_changes:
                judging.transaction_ended(self._rolled_back)
            self._rolled_back = False
            self.tx_started = None
        elif self.tx_started is None:
            self.tx_started = time.perf_counter()
        if self._abort_at_ready:
            self._abort_at_ready = False
            if status == b"T":
                # as after any error, the client's transaction is aborted: the next
                # statement gets 25P02, and only a ROLLBACK ends it
                self._send(ABORT_PARSE + codec.SYNC)
                self.inflight.expect(Pending.ABORT, False, b"")
                self.inflight.expect(Pending.SYNC, False, None)
        if self.phase is Phase.ACTIVE:
            self._after_round()

    def on_query_done(self, execution: Execution) -> None:
        self._audit_write(execution, execution.failure if execution.failed else None)

    def _audit_write(self, execution: Execution, failure: str | None) -> None:
        """An unmanaged write ended: recorded with its outcome (once)."""
        run, judgement = execution.audit
        execution.audit = None
        self._audit(
            run.plan.statement,
            judgement.decision,
            rule=judgement.rule,
            reason=failure,
            rows=None if failure is not None else execution.written,
            outcome="failed" if failure is not None else "succeeded",
        )

    def notification_pid(self, pid: int) -> int:
        return self.hooks.client_pid(pid)

    def _after_round(self) -> None:
        """The server answered all it owed: it may go back to the pool."""
        backend = self.backend
        if (
            backend is None
            or self.pinned
            or self.inflight.pending
            or backend.status != b"I"
            or self.in_round
            or self.held is not None
            or self.replaying
        ):
            return
        self.last_activity = now = time.perf_counter()  # an answer just went out: idle from here
        self.stats.transaction_time.observe(now - self.attached_at)
        if self.settings_dirty:
            self.settings_dirty = False
            self.job = CaptureSettings()
            self._enter(Phase.JOB)
            return
        self.wants_release = True

    def backend_lost(self, reason: UpstreamError) -> str | None:
        """The lent server's connection ended. Returns why the client must be closed, if it
        must: with part of a row already sent (``"mid-row"``) or a pinned session (``"pinned"``)."""
        inflight = self.inflight
        mid_row = inflight.mid_message
        rounds = inflight.rounds()
        awaiting = bool(inflight.pending)
        self.held = None
        self._drop_held_undo()
        self.job = self._drained = None
        self._after_job = self._after_hold = None
        self.detach()
        self._enter(Phase.IDLE)
        if mid_row:
            return "mid-row"
        if self.pinned:
            return "pinned"
        if not awaiting:
            self.pending_error = reason  # reported on the next request
            return None
        self.to_client.append(codec.build_error(reason.sqlstate, reason.message, hint=reason.hint))
        if rounds:
            self.to_client.append(codec.ready_for_query(b"I") * rounds)
        else:
            self.skip = True
        return None

    # ------------------------------------------------------------ bookkeeping

    def _send(self, data: bytes) -> None:
        self.wants_release = False  # new work: the server stays
        self._replay_candidate = None  # the round has sent something: it cannot run again
        self._guard_check()
        self.to_backend.append(data)
        if self.tx_started is None:
            self.tx_started = time.perf_counter()

    def _guard_check(self) -> None:
        """Before anything of the session's runs on the lent server (a message, or a job
        of the proxy's own): the server gets the session's delegation settings first."""
        judging = self.judging
        if judging is not None and (
            (self.guard_dirty and not self.in_round) or judging.delegation is not self._guard_for
        ):
            # a statement of the proxy's own is a Query, which must not come between the
            # messages of an extended-protocol round: a RESET ALL's effect is undone at
            # its end (a token can change only between rounds, see _parse)
            self._guard_settings(judging)

    def _guard_settings(self, judging: Judging) -> None:
        """What Postgres sees of the session's delegation (guard.principals, guard.task,
        guard.token_id) set on the lent server, hidden, before the next statement."""
        self.guard_dirty = False
        self._guard_for = judging.delegation
        backend = self.backend
        if backend is None or not judging.delegated:
            return
        sql, values = settings_change(backend.guard_sent, judging.delegation)
        if sql is not None:
            self.to_backend.append(codec.build_query(sql))
            self.inflight.expect(Pending.QUERY, False, None)
            backend.guard_sent = values
            backend.unnamed = 0

    def _note_effects(self, judgement: Judgement) -> None:
        """What running the statement does to the session: pins it, dirties its settings."""
        if judgement.pins is not None:
            self._pin(judgement.pins)
        if judgement.settings:
            self.settings_dirty = True

    def _pin(self, reason: str) -> None:
        if not self.pinned:
            self.pinned = True
            self.hooks.pinned(reason)

    def _audit(
        self,
        statement: str,
        decision: str,
        *,
        rule: str | None = None,
        reason: str | None = None,
        rows: int | None = None,
        duration_ms: float | None = None,
        outcome: str | None = None,
    ) -> None:
        record = self.hooks.audit
        judging = self.judging
        if record is None or judging is None:
            return
        ctx = judging.context
        delegation = judging.delegation
        record(
            AuditEvent(
                agent_id=ctx.agent_id,
                agent_type=judging.policy.name,
                statement=statement,
                decision=decision,
                task=ctx.task,
                step=ctx.step,
                principals=ctx.principals,
                rule=rule,
                reason=reason,
                rows=rows,
                duration_ms=duration_ms,
                outcome=outcome,
                tags=delegation.audit_tags() if delegation is not None else None,
            )
        )


# ---------------------------------------------------------------- helpers


# A statement with more parentheses than this is judged in a judge worker whatever its
# length: the analysis of nested subqueries costs far more per byte than a long list
OFFLOAD_PARENTHESES: Final = 256


def _nested(text: bytes, offload_above: int) -> bool:
    return bool(offload_above) and text.count(b"(") > OFFLOAD_PARENTHESES


_NOT_GIVEN: Final = object()  # a server given no delegation settings by this session yet


def _declared_alike(judging: Judging, rows: CursorRows, declared: Judgement) -> bool:
    """Whether the cursor's DECLARE, judged again now, would be sent as it was (the
    reload or catalog change did not touch it); then it is current again."""
    text = rows.text
    if not text or len(pglast.parser.split(text.decode(errors="replace"))) != 1:
        return False
    try:
        again = judging.rejudge(text)
    except Denied:
        return False
    if again.sent[again.shift :] != declared.sent[declared.shift :]:
        return False
    rows.declared = again
    return True


def _show(name: bytes) -> str:
    return name.decode(errors="replace")


_ABORTED: Final = GuardError(
    "current transaction is aborted, commands ignored until end of transaction block",
    sqlstate="25P02",
)
_NO_PARAMETERS: Final = codec.message(b"t", b"\x00\x00")  # ParameterDescription, none

# Words of a text that may pin its session, set settings or use prepared statements:
# without any, a Query of pooling only goes straight through (pinning.py and
# session_sql.py look closer at the others)
_LOOK_CLOSER: Final = re.compile(  # searched in the lower-cased text (faster than re.I)
    rb"listen|temp|advisory_lock|hold|prepare|load|execute|deallocate|set_config"
)

# A Parse of a name the client has taken is checked on the server under this name.
_CHECK_NAME: Final = b"gp_check"


def _sent(server_name: bytes, statement: Statement) -> Sent:
    return Sent(server_name, statement.name, statement.judgement.shift, statement)


def _cap_that_cut(execution: Execution) -> tuple[str, str, str]:
    """(rule, limit, hint) of the cap that cut a result."""
    if execution.cut_by == "bytes":
        return (
            "limits.max_bytes_returned",
            f"{execution.byte_cap} bytes of row data",
            "select fewer or smaller columns, aggregate less into one row, or page through the rows",
        )
    cap = execution.cap
    return (
        "limits.max_rows_returned",
        f"{cap} rows",
        f"add a LIMIT of at most {cap}, aggregate, or page through the rows",
    )


def _unnamed_sent(statement: Statement, before: int) -> Sent:
    return Sent(b"", statement.name, statement.judgement.shift, statement, False, before)


def _as_client_sees(fields: dict[str, str], sent: Sent) -> bytes | None:
    """The server's error about a Parse or Bind as the client's own would read: its
    statement's name, positions in its own text. None: nothing to change."""
    changed = fields
    if sent.server_name:
        server = f'"{sent.server_name.decode()}"'
        message = fields.get("M", "")
        if server in message:
            if not sent.client_name:  # Postgres' own words for the unnamed statement
                message = message.replace(
                    f"prepared statement {server} does not exist",
                    "unnamed prepared statement does not exist",
                )
            changed = dict(fields, M=message.replace(server, f'"{_show(sent.client_name)}"'))
    if sent.shift and "P" in fields:
        changed = without_tag(changed, sent.shift)
    return None if changed is fields else codec.build_error_fields(changed)


def _count(tag: bytes) -> int | None:
    count = tag.rpartition(b" ")[2]
    return int(count) if count.isdigit() else None


def _no_statement(name: bytes) -> GuardError:
    what = f'prepared statement "{_show(name)}"' if name else "unnamed prepared statement"
    return GuardError(f"{what} does not exist", sqlstate="26000")


def _exists(name: bytes) -> GuardError:
    return GuardError(f'prepared statement "{_show(name)}" already exists', sqlstate="42P05")


def _no_rows(statement: Statement) -> bool:
    """The statement's rewrite returns rows its agent's statement does not (a DELETE
    rewritten to soft-delete): Describe answers NoData, as for the agent's statement."""
    write = statement.judgement.write
    return write is not None and write.strip_rows


def _kind_of(text: bytes, judging: Judging | None) -> str:
    if judging is None:
        return "query"
    if len(text) > _KIND_PARSE_MAX:
        return "read"  # not parsed on the loop: a large statement's kind comes with it
    from guardproxy.relay.classify import statement_kind

    return statement_kind(text)


def _alone(agent_type: str) -> Denied:
    # one row count, one ledger entry, one transaction of the proxy's own: one statement
    return Denied(
        f"{agent_type} must send a bounded write (row cap, idempotency key, task budget or "
        f"soft delete) as a statement of its own, not inside a multi-statement message "
        f"(policy {agent_type}, write safety)",
        rule="write_safety",
        hint="send BEGIN, each write and COMMIT as separate statements",
        sqlstate="0A000",
    )


def _no_row_limit(agent_type: str) -> GuardError:
    return GuardError(
        f"{agent_type} may not execute a bounded write (row cap, idempotency key, task budget "
        f"or soft delete) with a row limit: its row count is known only when it has run to "
        f"the end (policy {agent_type}, write safety)",
        hint="execute the portal of a write with no row limit (0)",
        sqlstate="0A000",
    )


def _plan_refusal(name: str, why: str, sqlstate: str, hint: str) -> Denied:
    return Denied(
        f"{name} may not run this read: its plan must be checked before it runs "
        f"(limits.max_plan_cost / max_plan_rows), and {why} (policy {name}, limits)",
        rule="limits.plan_check",
        hint=hint or "send the read as a statement of its own, outside an aborted transaction",
        sqlstate=sqlstate,
    )


__all__ = ["Hooks", "Phase", "Relay", "WriteRun"]
