"""What a keeper leaves when it dies, and what the server makes of it: the
span whose output was not kept, the messages held but never sent, and
the execution whose end a session may have missed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from chspawner.persist.keeper import DELIM, Keeper
from chspawner.persist.keeper_state import (
    RECENT,
    SIZE,
    KeeperState,
    Takeover,
    clock,
    read_keeper_state,
    rebuilt_reply,
)
from chspawner.persist.kernel_manager import process_start
from chspawner.persist.records import KernelRecords

# No root, no services: part of the fast unit layer (pytest -m unit).
pytestmark = pytest.mark.unit

KERNEL = "7ab1eacd-f40a-494f-b066-717e217e1809"
REQUEST = {"msg_id": "req-1", "msg_type": "execute_request", "session": "page-a"}


def iopub(kind: str, content: dict, parent: dict | None = None) -> list[bytes]:
    """A kernel's IOPub message as the keeper receives it."""
    return [b"topic", DELIM, b"sig", json.dumps({"msg_type": kind, "date": ""}).encode(),
            json.dumps(parent or {}).encode(), b"{}", json.dumps(content).encode()]


def test_the_state_file_holds_the_last_message_and_the_cell_begun(tmp_path):
    path = tmp_path / "k.keeper-state"
    state = KeeperState(path, pid=4242, first_seq=1000)
    assert read_keeper_state(path)["last_seq"] == 999  # nothing yet
    state.message(1000, 5_000_000_000)
    state.execution_state("busy")
    state.began(REQUEST, 7)
    state.message(1001, 6_500_000_000, b"i" * 16)
    state.message(1002 + RECENT, 7_000_000_000, b"j" * 16)  # (its slot is 1002's)
    state.message(1001, 6_500_000_000)  # a torn store: the ring ahead of last_seq
    read = read_keeper_state(path)
    assert read == {"pid": 4242, "first_seq": 1000, "first_time": 5.0, "last_seq": 1001,
                    "last_time": 6.5, "execution_state": "busy",
                    "cell": {"parent": REQUEST, "count": 7},
                    "recent": {1001: (b"i" * 16).hex()}}
    state.errored("req-1", {"ename": "E", "evalue": "v", "traceback": []})
    state.ended("other", 1002)  # not the cell begun: ignored
    state.ended("req-1", 1003)
    assert read_keeper_state(path)["cell"]["ended_seq"] == 1003
    assert read_keeper_state(path)["cell"]["error"]["ename"] == "E"
    state.close()


def test_a_torn_cell_reads_as_unknown_and_a_stranger_file_as_nothing(tmp_path):
    path = tmp_path / "k.keeper-state"
    state = KeeperState(path, pid=1, first_seq=10)
    state.began(REQUEST, 1)
    state.close()
    data = bytearray(path.read_bytes())
    data[120] ^= 0xFF  # inside the cell's JSON: as a kill in mid-store would leave it
    path.write_bytes(bytes(data))
    assert read_keeper_state(path)["cell"] is None
    assert read_keeper_state(path)["first_seq"] == 10
    (tmp_path / "other").write_bytes(b"x" * SIZE)
    assert read_keeper_state(tmp_path / "other") is None
    assert read_keeper_state(tmp_path / "missing") is None


def test_a_keeper_records_as_it_numbers_and_its_successor_reports_it(tmp_path):
    records = KernelRecords(tmp_path)
    first = Keeper(records.path(KERNEL), "ipc://unused", first_seq=100)
    first.open_state()
    assert first.previous is None and first.info()["previous"] is None
    first.on_iopub(iopub("status", {"execution_state": "busy"}, REQUEST))
    first.on_iopub(iopub("execute_input", {"execution_count": 3, "code": ""}, REQUEST))
    first.on_iopub(iopub("stream", {"name": "stdout", "text": "1\n"}, REQUEST))
    died_at = time.time()
    # SIGKILLed: its state file stays as it was (no close_state).
    second = Keeper(records.path(KERNEL), "ipc://unused2", first_seq=10_000)
    second.open_state()
    second.on_iopub(iopub("status", {"execution_state": "idle"}, {"msg_id": "x"}))
    info = second.info()
    assert info["first_seq"] == 10_000 and info["first_time"] >= died_at - 1
    previous = info["previous"]
    assert previous["last_seq"] == 102 and previous["execution_state"] == "busy"
    assert previous["cell"] == {"parent": REQUEST, "count": 3}
    assert previous["last_time"] <= info["first_time"]
    # One that exits on purpose leaves nothing to report.
    second.close_state()
    assert not records.keeper_state_path(KERNEL).exists()
    third = Keeper(records.path(KERNEL), "ipc://unused3", first_seq=20_000)
    third.open_state()
    assert third.previous is None
    third.close_state()
    for k in (first, second, third):
        k.close()


def takeover(cell: dict | None, last_seq: int = 150) -> Takeover:
    return Takeover(first_seq=1000, first_time=1_700_000_003.25, previous={
        "last_seq": last_seq, "last_time": 1_700_000_001.0, "cell": cell,
        "execution_state": "busy"})


def test_who_is_resumed_and_what_each_lost():
    t = takeover({"parent": REQUEST, "count": 3})
    assert not t.resumed(None)  # a new page: nothing of the old keeper's
    assert not t.resumed(1005)  # already follows the new keeper
    assert t.resumed(140)
    assert t.unsent(140) == 10 and t.unsent(150) == 0 and t.unsent(None) == 0
    assert t.interrupted(140) == {"parent": REQUEST, "count": 3}
    assert t.interrupted(None) is None


def test_an_execution_whose_end_the_session_got_is_not_interrupted():
    t = takeover({"parent": REQUEST, "count": 3, "ended_seq": 145})
    assert t.interrupted(145) is None  # it has the end
    assert t.interrupted(144)["ended_seq"] == 145  # its end was held, never sent


def test_the_notice_says_the_span_and_what_was_held_but_unsent():
    t = takeover({"parent": REQUEST, "count": 3})
    text = t.notice(140)
    assert text.startswith("[chspawner] ")
    assert f"between {clock(1_700_000_001.0)} and {clock(1_700_000_003.25)} UTC (2.2 s)" \
        in text
    assert "10 earlier output message(s) the old keeper held" in text
    assert "held" not in t.notice(150)
    assert clock(0.5) == "1970-01-01 00:00:00.500"


def test_rebuilt_replies_carry_what_the_old_keeper_saw():
    assert rebuilt_reply({"count": 4}) == {"status": "ok", "execution_count": 4,
                                           "user_expressions": {}, "payload": []}
    error = {"ename": "E", "evalue": "v", "traceback": ["t"]}
    assert rebuilt_reply({"count": 4, "error": error}) == {
        "status": "error", "execution_count": 4, **error}
    assert rebuilt_reply(None)["execution_count"] is None


def test_a_takeover_comes_only_from_a_keeper_that_followed_a_dead_one():
    assert Takeover.from_info({"first_seq": 5, "previous": None}) is None
    assert Takeover.from_info({}) is None
    t = Takeover.from_info({"first_seq": 5, "first_time": 2.0,
                            "previous": {"last_seq": 3, "last_time": 1.0}})
    assert (t.first_seq, t.gap_start, t.old_last_seq) == (5, 1.0, 3)


def test_process_start_names_a_process_and_tells_a_gone_one():
    assert process_start(os.getpid()) == process_start(os.getpid()) != ""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_start(child.pid) == ""
