"""Comparing what Postgres answered with what a proxy answered.

``normalize`` takes out of a transcript exactly the differences listed in
``DOCUMENTED_DIFFERENCES`` that a normalization can take out (the backend key, the
order of ParameterStatus messages, the source fields of errors the proxy answers
itself, the prefix of its syntax errors, a notification's process id);
``compare`` finds the first answer that differs, message by message, and the login
and the parameters the client knows; ``documented`` recognises the documented
differences that move an answer rather than change it (a named Parse answered
without a server, EXECUTE of an unknown name or an unknown column
under a policy). Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffwire import Answer, Execute, Flush, Give, Parse, Query, Script, Steal, Sync, Transcript

from guardproxy.protocol import codec

# ---------------------------------------------------------------- documented differences

# Every way the answers through guardproxy may differ from Postgres' own, and why. The
# normalization below applies exactly these and nothing else; docs/reliability.md lists
# them for users.
DOCUMENTED_DIFFERENCES: dict[str, str] = {
    "backend key": (
        "BackendKeyData carries the proxy's own process id and secret (a cancel request "
        "goes to the proxy, which forwards it to whichever server runs the client's "
        "request); the login is compared without it"
    ),
    "parameter status": (
        "ParameterStatus messages are compared as the values the client ends up seeing "
        "at login and after each batch, not one by one: the proxy sends the login's set in "
        "another order, and does not show what a server reports while the proxy replays "
        "the client's settings on it"
    ),
    "application_name on the server": (
        "the server's application_name names the agent (agent id, then the client's own "
        "name) so that pg_stat_activity shows who runs what: SHOW application_name and "
        "current_setting('application_name') answer that; the ParameterStatus the client "
        "gets carries its own name (the scripts do not read it back)"
    ),
    "error source fields": (
        "F, L and R (the file, line and routine of Postgres' source that raised an error) "
        "are absent from the errors the proxy answers itself, with Postgres' SQLSTATE and "
        "message, without asking a server: a Bind or Describe of a statement the client "
        "never prepared, a Parse of a name it already prepared, an Execute of a portal "
        "outside a transaction; they are left out of every comparison"
    ),
    "syntax errors under a policy": (
        "with a policy, a statement Postgres' parser rejects is rejected by the same parser "
        "inside the proxy (pglast) before anything is sent: same SQLSTATE 42601, the "
        "message prefixed with 'the statement could not be parsed: ', a hint, no position"
    ),
    "a named Parse while no server is lent": (
        "a named Parse that arrives while the client holds no server is answered at once "
        "after Postgres' parser (in the proxy) found its syntax right, and prepared on the "
        "server that first runs it (docs/pooling.md: clients that prepare while every "
        "server is busy never wait); an error Postgres finds only when it analyses the "
        "statement (an unknown table or column) comes at its first Bind or Describe instead; "
        "and the Parse does not start the transaction Postgres' would (a BEGIN ISOLATION "
        "LEVEL right after it in the same round succeeds), nor does an unnamed Parse of a "
        "text auto-prepared on the server, which the proxy answers itself"
    ),
    "EXECUTE of a statement never PREPAREd, under a policy": (
        "the judge refuses EXECUTE of a name it has not seen prepared in the session with "
        "Postgres' SQLSTATE (26000) and its own message, since it cannot judge what it has "
        "not seen; in an aborted transaction too, where Postgres would answer 25P02"
    ),
    "an unknown column, under a policy": (
        "with a policy, a column reference the judge cannot trace to a column of a table "
        "in scope is refused before anything is sent (fail closed: it might name a denied "
        "column through a form the analysis does not know), with 42501 and a message "
        "saying which reference, where Postgres answers 42703 (column does not exist), or "
        "25P02 in a transaction already aborted"
    ),
    "notification pid": (
        "a NotificationResponse from the client's own session carries the process id of "
        "its BackendKeyData (the proxy's), as Postgres' carries its backend's pid; both "
        "are compared as 'own session'"
    ),
}


def _after_lazy_parse(
    script: Script, postgres: Normalized, unnamed: bool = False
) -> set[tuple[int, int]]:
    """The steps of a round that opened, outside a transaction, with a named Parse (the
    proxy answers it without a server): Postgres ran that Parse, the proxy did not yet.
    ``unnamed``: an unnamed Parse too (of a text auto-prepared on the server, which the
    proxy answers itself)."""
    status = {(b, s): msgs[-1][1] for b, s, msgs in postgres.answers if msgs and msgs[-1][0] == "Z"}
    out: set[tuple[int, int]] = set()
    idle, lazy = True, False
    for number, batch in enumerate(script):
        for index, step in enumerate(batch):
            if isinstance(step, (Sync, Query)):
                if lazy:
                    out.add((number, index))
                lazy = False
                idle = status.get((number, index), b"I" if idle else b"T") == b"I"
                continue
            if isinstance(step, Parse) and (step.name or unnamed) and idle and not lazy:
                lazy = True
            elif not isinstance(step, (Flush, Steal, Give)):
                idle = False
            if lazy:
                out.add((number, index))
    return out


def documented(diff: Any, script: Script, postgres: Normalized) -> str | None:
    """The documented difference a difference is (the ones normalizing cannot take out)."""
    if not diff.where.startswith("answer") or not isinstance(diff.expected, tuple):
        return None
    batch, step, expected = diff.expected
    got = diff.got[2] if isinstance(diff.got, tuple) else []
    sent = script[batch][step]
    lazy = "a named Parse while no server is lent"
    if (
        isinstance(sent, Parse)
        and sent.name
        and [m[0] for m in expected] == ["E"]
        and expected[0][1].get("C") != "42601"
        and got == [("1", b"")]
    ):
        return lazy  # the error Postgres found analysing it comes later
    if (
        isinstance(sent, (Query, Execute))
        and any(m[0] == "E" and m[1].get("C") == "25001" for m in expected)
        and (batch, step) in _after_lazy_parse(script, postgres, unnamed=True)
    ):
        return lazy  # Postgres' Parse had started the transaction a BEGIN ... ISOLATION found
    if (
        isinstance(sent, Query)
        and len(expected) == len(got) == 2
        and expected[0][0] == got[0][0] == "E"
        and expected[0][1].get("C") in ("26000", "25P02")  # unknown, or transaction aborted
        and got[0][1].get("C") == "26000"
        and " may not EXECUTE " in got[0][1].get("M", "")
        and expected[1] == got[1]
    ):
        return "EXECUTE of a statement never PREPAREd, under a policy"
    if (
        diff.target == "policy"
        and isinstance(sent, (Query, Parse))
        and len(expected) == len(got)
        and expected[0][0] == got[0][0] == "E"
        and expected[0][1].get("C") in ("42703", "25P02")  # unknown, or transaction aborted
        and got[0][1].get("C") == "42501"
        and "cannot trace to a table column" in got[0][1].get("M", "")
        and expected[1:] == got[1:]
    ):
        return "an unknown column, under a policy"
    return None


# ---------------------------------------------------------------- normalizing


Normal = tuple[Any, ...]


@dataclass
class Normalized:
    """A transcript with the documented differences taken out."""

    login: dict[str, str]
    answers: list[tuple[int, int, list[Normal]]]  # (batch, step, messages)
    params: list[dict[str, str]]  # the ParameterStatus values the client knows, per batch
    broken: str


def normalize(transcript: Transcript, pid: int) -> Normalized:
    params: dict[str, str] = {}
    login: dict[str, str] = {}
    for kind, body in transcript.login:
        if kind == b"S":
            name, value = _param(body)
            params[name] = value
            login[name] = value
        elif kind not in (b"K", b"Z"):
            login[f"message {kind.decode()}"] = body.hex()
    answers: list[tuple[int, int, list[Normal]]] = []
    seen: list[dict[str, str]] = []
    for number, batch in enumerate(transcript.batches):
        for answer in batch:
            answers.append((number, answer.step, _messages(answer, params, pid)))
        seen.append(dict(params))
    return Normalized(login, answers, seen, transcript.broken)


def _param(body: bytes) -> tuple[str, str]:
    return codec.parameter_status(b"S0000" + body)


def _messages(answer: Answer, params: dict[str, str], pid: int) -> list[Normal]:
    out: list[Normal] = []
    for kind, body in answer.msgs:
        if kind == b"S":
            name, value = _param(body)
            params[name] = value
        elif kind in (b"E", b"N"):
            out.append((kind.decode(), _error(body)))
        elif kind == b"A":
            sender = int.from_bytes(body[:4], "big", signed=True)
            out.append(("A", "own session" if sender == pid else "other", body[4:]))
        else:
            out.append((kind.decode(), body))
    return out


def fields_of(body: bytes) -> dict[str, str]:
    return codec.error_fields(b"E0000" + body)


_SOURCE_FIELDS = ("F", "L", "R")
_UNPARSED = "the statement could not be parsed: "


def _error(body: bytes) -> dict[str, str]:
    fields = fields_of(body)
    for code in _SOURCE_FIELDS:
        fields.pop(code, None)
    if fields.get("C") == "42601":
        # "syntax errors under a policy": compared by SQLSTATE and Postgres' own message
        message = fields["M"]
        fields = {"S": fields["S"], "C": "42601", "M": message.removeprefix(_UNPARSED)}
    return fields


def data_row(body: bytes) -> list[str | None]:
    count = int.from_bytes(body[:2], "big")
    pos, out = 2, []
    for _ in range(count):
        length = int.from_bytes(body[pos : pos + 4], "big", signed=True)
        pos += 4
        if length < 0:
            out.append(None)
        else:
            out.append(body[pos : pos + length].decode())
            pos += length
    return out


# ---------------------------------------------------------------- comparing


@dataclass
class Difference:
    target: str
    where: str
    expected: Any
    got: Any

    def __str__(self) -> str:
        return f"{self.target}: {self.where}:\n    postgres: {self.expected!r}\n    proxy:    {self.got!r}"


def compare(name: str, direct: Normalized, other: Normalized) -> list[Difference]:
    """The first difference in the answers (later ones usually follow from it), the login's."""
    diffs = []
    if direct.login != other.login:
        diffs.append(Difference(name, "login", direct.login, other.login))
    for i in range(max(len(direct.answers), len(other.answers))):
        a = direct.answers[i] if i < len(direct.answers) else None
        b = other.answers[i] if i < len(other.answers) else None
        if a != b:
            where = f"answer {i} (batch {a[0]}, step {a[1]})" if a else f"answer {i}"
            diffs.append(Difference(name, where, a, b))
            break
    else:
        for number, (pa, pb) in enumerate(zip(direct.params, other.params, strict=False)):
            if pa != pb:
                diffs.append(Difference(name, f"parameters after batch {number}", pa, pb))
                break
    if direct.broken != other.broken:
        diffs.append(Difference(name, "end of the run", direct.broken, other.broken))
    return diffs
