"""An analysis survives the trip from a judge worker process: pickled and restored, it
says what the original said (the classes on the hot path are compiled, and compiled
classes do not pickle: the trip carries plain values)."""

from __future__ import annotations

import pickle

import pytest

from guardproxy.policy.decision import Decision
from guardproxy.relay.judging import Analysis
from guardproxy.relay.session_sql import (
    Deallocate,
    Execute,
    Mixed,
    Prepare,
    command_parts,
    prepared_command,
)


def _allowed() -> Decision:
    return Decision(action="allow", rule="", reason="", hint="", sqlstate="", sql="SELECT 1")


@pytest.mark.parametrize(
    "text",
    [
        b"PREPARE q(int) AS SELECT $1",
        b"EXECUTE q(1)",
        b"DEALLOCATE q",
        b"DEALLOCATE ALL",
        b"PREPARE a AS SELECT 1; SELECT 2",
        b"SELECT 1",
    ],
)
def test_an_analysis_comes_back_from_a_worker_as_it_left(text: bytes) -> None:
    command = prepared_command(text)
    sent = Analysis(_allowed(), "write", "a temporary table", command)
    back = Analysis.restored(pickle.loads(pickle.dumps(sent.portable())))
    assert (back.decision, back.kind, back.pins) == (sent.decision, "write", "a temporary table")
    if command is None:
        assert back.command is None
        return
    assert type(back.command) is type(command)
    assert command_parts(back.command) == command_parts(command)


def test_every_kind_of_command_is_covered() -> None:
    kinds = {
        type(prepared_command(t))
        for t in (
            b"PREPARE q AS SELECT 1",
            b"EXECUTE q",
            b"DEALLOCATE q",
            b"PREPARE a AS SELECT 1; SELECT 2",
        )
    }
    assert kinds == {Prepare, Execute, Deallocate, Mixed}


def test_a_restored_decision_cannot_be_changed_in_place() -> None:
    decision = Decision(
        action="allow", rule="", reason="", hint="", sqlstate="", sql="", prepared={"q": "SELECT 1"}
    )
    back = Analysis.restored(pickle.loads(pickle.dumps(Analysis(decision).portable())))
    assert back.decision.prepared == {"q": "SELECT 1"}
    with pytest.raises(TypeError):
        back.decision.prepared["q"] = "DELETE FROM orders"  # type: ignore[index]
