"""Relay bugs the differential tests found and that are not fixed yet.

Each entry names the strict-xfail regression test that reproduces it
(``tests/integration/test_differential.py``) and matches the differences it causes,
so that the differential runs report them as known instead of failing on them,
and keep failing on anything else. Whoever fixes a bug removes its xfail marker
(the test then passes) and its entry here (the runs then fail if it comes back).
A matcher is narrow on purpose: it recognises the bug's own signature, never "some
difference in a script that also does X".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffwire import Execute, Query, Script, Sync

Matcher = Callable[[Any, Script, Any], bool]  # (Difference, script, Postgres' Normalized)


@dataclass(frozen=True)
class KnownBug:
    tests: tuple[str, ...]  # its strict-xfail tests in tests/integration/test_differential.py
    summary: str
    matches: Matcher


def _answer_messages(value: Any) -> list[Any]:
    """The normalized messages of one answer (batch, step, messages), or []."""
    return value[2] if isinstance(value, tuple) and len(value) == 3 else []


def _errors(value: Any) -> list[dict[str, str]]:
    return [m[1] for m in _answer_messages(value) if m[0] == "E"]


def _proxy_error(diff: Any, sqlstate: str, pattern: str) -> bool:
    return any(
        e.get("C") == sqlstate and re.fullmatch(pattern, e.get("M", "")) for e in _errors(diff.got)
    )


def _refused_round_poisons_pool(diff: Any, script: Script, postgres: Any) -> bool:
    return diff.where == "pool" and "got no answer" in str(diff.got)


def _query_in_failed_round(diff: Any, script: Script, postgres: Any) -> bool:
    """Postgres ignored a Query sent after an extended-protocol error and before the Sync;
    the first difference comes at or after that point."""
    failed: set[tuple[int, int]] = set()
    for batch, step, msgs in postgres.answers:
        if any(m[0] == "E" for m in msgs):
            failed.add((batch, step))
    skipping = False  # the server's skip to Sync outlives a batch that ends with a Flush
    for number, batch in enumerate(script):
        for index, step in enumerate(batch):
            if isinstance(step, Sync):
                skipping = False
            elif (number, index) in failed and not isinstance(step, Query):
                skipping = True
            elif skipping and isinstance(step, Query):
                return _at_or_after(diff, number)
    return False


def _at_or_after(diff: Any, batch: int) -> bool:
    where = diff.expected if isinstance(diff.expected, tuple) else diff.got
    if isinstance(where, tuple) and len(where) == 3:
        return bool(where[0] >= batch)
    return diff.where == "pool" or diff.where.startswith("rows")


def _parse_registered_though_it_failed(diff: Any, script: Script, postgres: Any) -> bool:
    expected, got = _answer_messages(diff.expected), _answer_messages(diff.got)
    if expected[:1] == [("1", b"")]:  # the name is free in Postgres, taken in the proxy
        return _proxy_error(diff, "42P05", r'prepared statement ".*" already exists')
    # the statement does not exist in Postgres, and the proxy used it
    missing = [
        e
        for e in _errors(diff.expected)
        if re.fullmatch(r'(unnamed )?prepared statement (".+" )?does not exist', e["M"])
    ]
    return bool(missing) and bool(got) and got[0][0] in ("2", "t", "T", "n")


def _unnamed_statement_taken_for_current(diff: Any, script: Script, postgres: Any) -> bool:
    """The client's unnamed statement used where another statement ran on the server since:
    the server says it has none (26000) where Postgres has it, or what runs is the other
    client's (its column and row are named ``noise``)."""
    if b"noise" in repr(diff.got).encode() and b"noise" not in repr(diff.expected).encode():
        return True
    expected = _answer_messages(diff.expected)
    return (
        bool(expected)
        and expected[0][0] != "E"
        and _proxy_error(diff, "26000", r"unnamed prepared statement does not exist")
    )


def _portal_closed_at_sync(diff: Any, script: Script, postgres: Any) -> bool:
    expected = _answer_messages(diff.expected)
    return (
        bool(expected)
        and expected[0][0] == "2"
        and _proxy_error(diff, "42P03", r'portal ".*" already exists')
    )


def _sql_deallocate_of_a_protocol_statement(diff: Any, script: Script, postgres: Any) -> bool:
    return _proxy_error(diff, "26000", r'prepared statement ".*" does not exist') and not any(
        e.get("C") == "26000" for e in _errors(diff.expected)
    )


def _name_checked_first(diff: Any, script: Script, postgres: Any) -> bool:
    """The relay's own check of a name in use answered where Postgres failed otherwise."""
    expected = _errors(diff.expected)
    if len(expected) != 1:
        return False
    if _proxy_error(diff, "42P03", r'portal ".*" already exists'):
        return expected[0].get("C") != "42P03" or expected[0]["M"].startswith("cursor ")
    return _proxy_error(diff, "42P05", r'prepared statement ".*" already exists') and (
        expected[0].get("C") != "42P05"
    )


def _parse_error_position(diff: Any, script: Script, postgres: Any) -> bool:
    expected, got = _errors(diff.expected), _errors(diff.got)
    if len(expected) != 1 or len(got) != 1 or "P" not in got[0]:
        return False
    return {**got[0], "P": expected[0].get("P")} == expected[0]


_SERVER_NAME = re.compile(r'"gp_[0-9a-f]{40}"')


def _server_name_in_error(diff: Any, script: Script, postgres: Any) -> bool:
    expected, got = _errors(diff.expected), _errors(diff.got)
    if len(expected) != 1 or len(got) != 1 or not _SERVER_NAME.search(got[0].get("M", "")):
        return False
    names = re.findall(r'"([^"]*)"', expected[0].get("M", ""))
    return any(
        {**got[0], "M": _SERVER_NAME.sub(f'"{name}"', got[0]["M"])} == expected[0] for name in names
    )


KNOWN_BUGS: dict[str, KnownBug] = {
    "server skipping to sync back in the pool": KnownBug(
        (
            "test_a_message_the_relay_refuses_does_not_leave_its_server_skipping_to_sync",
            "test_a_client_gone_after_a_failed_round_does_not_leave_its_server_skipping",
        ),
        "a server that ignores everything up to a Sync (after an error in an extended-"
        "protocol round) goes back to the pool, and the next client's Query on it is never "
        "answered: when the relay refuses a message itself while a server is lent (a Bind "
        "of a statement that does not exist: it sends a failing Parse) and no Sync follows "
        "in the same read; and when a client disconnects after such an error without a Sync",
        _refused_round_poisons_pool,
    ),
    "query in a failed round": KnownBug(
        ("test_a_query_after_a_failed_extended_message_is_ignored_as_postgres_does",),
        "after an extended-protocol error Postgres ignores everything up to the Sync, a "
        "Query too; the relay expects an answer to that Query, so every later answer is "
        "taken for the request before it (the proxy's own error replaces a Query's answer)",
        _query_in_failed_round,
    ),
    "parse registered though it failed": KnownBug(
        ("test_a_parse_that_failed_or_was_skipped_leaves_its_name_free",),
        "a named Parse that the server rejected, or skipped after an earlier error, stays "
        "in the registry: the client's next Parse of that name is refused with 42P05",
        _parse_registered_though_it_failed,
    ),
    "unnamed statement taken for current": KnownBug(
        (
            "test_a_client_never_runs_the_unnamed_statement_another_client_left_on_its_server",
            "test_the_unnamed_statement_survives_the_proxys_own_settings_capture",
        ),
        "the relay counts the client's unnamed statement as current on the server where it "
        "was parsed, but a Query or Parse run there since replaced or dropped it: another "
        "client's (the pool lent the server in between) or the proxy's own (reading the "
        "settings back after a SET). A later Bind or Describe of it fails with 26000 where "
        "Postgres has the statement, or runs the other client's statement: its rows, under "
        "its judgement (row filters of its principals, its write plan)",
        _unnamed_statement_taken_for_current,
    ),
    "server application_name shown after a reset": KnownBug(
        ("test_after_discard_all_the_client_is_told_its_own_application_name",),
        "after DISCARD ALL or RESET ALL the server reports its application_name reset to the "
        "pool's startup value, and the relay passes that ParameterStatus on: the client is "
        "told application_name = 'guardproxy' where Postgres reports the client's own",
        lambda diff, script, postgres: (
            diff.where.startswith("parameters after")
            and {k for k in {*diff.expected, *diff.got} if diff.expected.get(k) != diff.got.get(k)}
            == {"application_name"}
        ),
    ),
    "portal closed at sync still open": KnownBug(
        ("test_a_pipelined_bind_may_reuse_a_portal_closed_by_the_sync_before_it",),
        "a Sync outside a transaction block ends the implicit transaction and with it every "
        "portal; the relay forgets them only when the ReadyForQuery arrives, so a Bind of "
        "the same portal name in the next round, pipelined, is refused with 42P03 (and its "
        "Execute does not run)",
        _portal_closed_at_sync,
    ),
    "sql deallocate of a protocol statement": KnownBug(
        ("test_sql_deallocate_of_a_protocol_statement_deallocates_it",),
        "DEALLOCATE name of a statement prepared with Parse reaches the server under the "
        "client's name, which the server does not know (26000); the registry keeps it",
        _sql_deallocate_of_a_protocol_statement,
    ),
    "name checked first": KnownBug(
        ("test_a_name_in_use_is_reported_as_postgres_reports_it",),
        "the relay refuses a Parse of a statement name in use (42P05) and a Bind of an open "
        "portal (42P03) before Postgres' own checks: Postgres reports the statement's "
        "syntax or analysis error first (Parse), and a missing statement (26000) or a wrong "
        'number of parameters (08P01) first (Bind); and it says \'cursor "p" already '
        "exists', not 'portal'",
        _name_checked_first,
    ),
    "parse error position": KnownBug(
        ("test_the_position_of_a_parse_error_leaves_out_the_proxy_tag",),
        "under a policy, the position of an error answering a Parse counts the proxy's tag "
        "comment (positions are corrected for Query and Execute only)",
        _parse_error_position,
    ),
    "server statement name in errors": KnownBug(
        ("test_errors_name_the_clients_statement_not_the_servers",),
        "server errors about a named statement show its server-side name (gp_<hash>) "
        "instead of the client's",
        _server_name_in_error,
    ),
}


# ---------------------------------------------------------------- the example policies
# (diffpolicy.py): matchers of (problem, script, the proxy's transcript)


def _simple_delete_hard(problem: str, script: Script, transcript: Any) -> bool:
    soft = ("orders removed", "have no deleted_rows image")
    return any(p in problem for p in soft) and any(
        isinstance(step, Query) and step.sql.upper().startswith("DELETE FROM ORDERS")
        for batch in script
        for step in batch
    )


def _managed_execute_after_error(problem: str, script: Script, transcript: Any) -> bool:
    """The session stopped answering in a batch where an extended-protocol message failed
    and an Execute followed it before the Sync."""
    if "stopped answering" not in problem or not transcript.batches:
        return False
    batch = script[len(transcript.batches) - 1]
    failed = [a.step for a in transcript.batches[-1] if any(k == b"E" for k, _ in a.msgs)]
    for step in failed:
        for later in batch[step + 1 :]:
            if isinstance(later, Sync):
                break
            if isinstance(later, Execute):
                return True
    return False


KNOWN_POLICY_BUGS: dict[str, KnownBug] = {
    "hidden settings replay ends the client's round": KnownBug(
        ("test_portals_bound_before_a_settings_replay_is_answered_stay_managed",),
        "a server last used by another agent id gets a hidden application_name replay "
        "(a Query) ahead of the client's first message; its ReadyForQuery (idle) makes the "
        "relay drop every portal the client bound meanwhile in the same pipelined round, and "
        "a later Execute of such a portal is relayed unmanaged: a support UPDATE of 6 orders "
        "passed a cap of 2, the task budget counted 0 rows, no audit event, no idempotency "
        "(the harness's own probe uses the script's agent id, so the property runs meet it "
        "only on a server the pool opened for them: a soft-delete portal executed again "
        "answers the rewrite's SELECT tag)",
        lambda problem, script, transcript: bool(
            re.search(r"'DELETE [^']*' answered 'SELECT \d+'", problem)
        ),
    ),
    "simple-query managed write runs the client's text": KnownBug(
        ("test_a_simple_query_delete_of_a_soft_deleted_table_marks_the_row",),
        "a write the policy manages (soft delete, row cap, idempotency, budget), sent as a "
        "simple Query, runs the client's own Query message, not the judged text: a support "
        "agent's DELETE FROM orders removes the row instead of marking it, and no deleted_rows "
        "image is kept (the rewrite and the proxy's tag are lost; counts and caps still apply)",
        _simple_delete_hard,
    ),
    "managed execute after a failed message hangs": KnownBug(
        ("test_a_managed_write_after_a_failed_bind_is_skipped_to_sync",),
        "an Execute of a write the policy manages, pipelined after an extended-protocol "
        "message that failed (a Bind with a wrong parameter count or value), starts the "
        "managed-write job on a server that skips everything up to the Sync: the job waits "
        "forever, the session never answers again, and its server stays taken even after the "
        "client disconnects (six such sessions take support's whole pool)",
        _managed_execute_after_error,
    ),
}


def known_policy_bug(problem: str, script: Script, transcript: Any) -> str | None:
    for name, bug in KNOWN_POLICY_BUGS.items():
        if bug.matches(problem, script, transcript):
            return name
    return None


def known_bug(diff: Any, script: Script, postgres: Any) -> str | None:
    """The name of the known bug that explains ``diff``, if one does."""
    for name, bug in KNOWN_BUGS.items():
        if bug.matches(diff, script, postgres):
            return name
    return None


def classify(
    diffs: list[Any],
    script: Script,
    postgres: Any,
    documented: Callable[[Any, Script, Any], str | None],
) -> list[tuple[str | None, Any]]:
    """Each difference of one target with what explains it: a documented difference
    (``documented`` names it) or a known bug; None when nothing does.

    Only the first difference in the answers is compared; the rows left behind and the
    state of the pool after it follow from it, so they go with its explanation when it
    has one and nothing explains them on their own."""
    out: list[tuple[str | None, Any]] = [
        (documented(d, script, postgres) or known_bug(d, script, postgres), d) for d in diffs
    ]
    first = next((bug for bug, d in out if d.where.startswith("answer") and bug), None)
    return [(bug or (first if not d.where.startswith("answer") else None), d) for bug, d in out]
