"""The keeper's record of executions, from which a server rebuilds an
execute_reply that went to a server that is gone: only the session's own
executions, only those that ended after its last acknowledged message,
with the count and error their output showed."""
from __future__ import annotations

import datetime

import pytest

from chspawner.persist.missed_replies import Executions, timestamp

# No root, no services: part of the fast unit layer (pytest -m unit).
pytestmark = pytest.mark.unit


def run(executions: Executions, request: str, session: str, first_seq: int,
        error: bool = False) -> int:
    """One execution's IOPub messages from ``first_seq`` on; the seq of its end."""
    parent = {"msg_type": "execute_request", "msg_id": request, "session": session}
    messages = [("status", {"execution_state": "busy"}),
                ("execute_input", {"execution_count": 7, "code": "1 / 0"})]
    if error:
        messages.append(("error", {"ename": "ZeroDivisionError",
                                   "evalue": "division by zero", "traceback": ["tb"]}))
    messages.append(("status", {"execution_state": "idle"}))
    for seq, (kind, content) in enumerate(messages, first_seq):
        executions.note(seq, {"msg_type": kind, "date": "2026-11-23T09:00:00.000001Z"},
                        parent, content)
    return seq


def test_an_execution_that_ended_after_the_acknowledged_message_is_missed():
    executions = Executions()
    end = run(executions, "a", "me", first_seq=10)
    assert end == 12
    # The client got the count (seq 11) but not the end.
    assert executions.missed_by("me", acked=11) == [{
        "seq": 12, "ended": "2026-11-23T09:00:00.000001Z",
        "parent": {"msg_type": "execute_request", "msg_id": "a", "session": "me"},
        "reply": {"status": "ok", "execution_count": 7, "user_expressions": {},
                  "payload": []}}]
    assert executions.missed_by("me", acked=12) == []  # it got the end


def test_an_error_makes_an_error_reply_and_other_sessions_get_nothing():
    executions = Executions()
    run(executions, "b", "me", first_seq=1, error=True)
    [missed] = executions.missed_by("me", acked=0)
    assert missed["reply"] == {"status": "error", "execution_count": 7,
                               "ename": "ZeroDivisionError", "evalue": "division by zero",
                               "traceback": ["tb"]}
    assert executions.missed_by("someone-else", acked=0) == []


def test_running_executions_are_not_missed_and_old_ones_are_forgotten():
    executions = Executions(limit=2)
    parent = {"msg_type": "execute_request", "msg_id": "running", "session": "me"}
    executions.note(1, {"msg_type": "execute_input"}, parent, {"execution_count": 1})
    assert executions.missed_by("me", acked=0) == []  # no end yet: its reply will come
    run(executions, "c", "me", first_seq=2)
    run(executions, "d", "me", first_seq=6)
    assert list(executions.by_request) == ["c", "d"]


def test_timestamps():
    at = datetime.datetime(2026, 11, 23, 9, 0, tzinfo=datetime.timezone.utc)
    assert timestamp("2026-11-23T09:00:00Z") == at.timestamp()
    assert timestamp("2026-11-23T09:00:00+00:00") == at.timestamp()
    assert timestamp("") == float("inf")  # unreadable: nothing rebuilt
