"""Where a kernel's keeper resumes a client session: after the last message
the session's server recorded as sent, in the acknowledgement file that
outlives that server; a session that never had one starts from now."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chspawner.persist.keeper import Keeper
from chspawner.persist.records import AckFile, CellMap, KernelRecords, ack_path, read_ack

# No root, no services: part of the fast unit layer (pytest -m unit).
pytestmark = pytest.mark.unit

KERNEL = "7ab1eacd-f40a-494f-b066-717e217e1809"


def keeper(state: Path, messages: int) -> Keeper:
    k = Keeper(state / f"{KERNEL}.json", "ipc://unused")
    for n in range(messages):
        k.on_iopub([b"frame", str(n).encode()])
    return k


def test_a_new_session_starts_from_now_and_resumes_after_its_acknowledgement(tmp_path):
    k = keeper(tmp_path, 5)
    try:
        k._follow(b"server-1", "session-a")
        assert k.followers[b"server-1"].cursor == 6  # nothing old replayed
        ack = AckFile(KernelRecords(tmp_path).acks_dir(KERNEL), "session-a")
        for n in range(4):
            k.on_iopub([b"frame", b"new"])
        ack.write(7)  # the server sent 6 and 7, then was killed
        ack.close()
        k._follow(b"server-2", "session-a")
        assert k.followers[b"server-2"].cursor == 8
        assert k.info()["sessions"] == {"session-a": 7}
        # Another client session knows nothing of this one's.
        k._follow(b"server-2b", "session-b")
        assert k.followers[b"server-2b"].cursor == 10
    finally:
        k.close()


def test_an_acknowledgement_older_than_the_buffer_is_reported_as_a_gap(tmp_path):
    k = Keeper(tmp_path / f"{KERNEL}.json", "ipc://unused", max_messages=3)
    try:
        k._follow(b"server-1", "s")  # from now: seq 0
        for n in range(10):
            k.on_iopub([b"frame", str(n).encode()])
        k._follow(b"server-2", "s")
        follower = k.followers[b"server-2"]
        assert follower.notice["lost"] == 7 and follower.cursor == 8
    finally:
        k.close()


def test_acknowledgement_files(tmp_path):
    acks = KernelRecords(tmp_path).acks_dir(KERNEL)
    assert read_ack(acks, "s") is None
    ack = AckFile(acks, "../../etc/passwd")
    assert read_ack(acks, "../../etc/passwd") is None  # opened, nothing sent yet
    ack.write(3)
    ack.write(12)
    # On record at once, for another reader, without closing or syncing.
    assert read_ack(acks, "../../etc/passwd") == 12
    ack.close()
    assert read_ack(acks, "../../etc/passwd") == 12
    # A client's session id names no path: the file is a hash inside the dir.
    assert ack_path(acks, "../../etc/passwd").parent == acks
    assert sorted(p.name for p in acks.iterdir()) == [ack_path(acks, "../../etc/passwd").name]
    assert oct(acks.stat().st_mode & 0o777) == "0o700"
    KernelRecords(tmp_path).remove(KERNEL)  # a kernel shut down takes its files along
    assert not acks.exists()


def test_an_acknowledgement_survives_its_writer_killed_at_once(tmp_path):
    """A store to the mapped file, then SIGKILL: no close, no sync, and
    the next reader still finds it."""
    acks = KernelRecords(tmp_path).acks_dir(KERNEL)
    code = ("import os, signal, sys; from pathlib import Path\n"
            "from chspawner.persist.records import AckFile\n"
            "AckFile(Path(sys.argv[1]), 's').write(41)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    died = subprocess.run([sys.executable, "-c", code, str(acks)])
    assert died.returncode == -9
    assert read_ack(acks, "s") == 41


def test_cell_map_survives_its_writer_and_stays_bounded(tmp_path):
    """A later server reads which cell each execution came from; a line
    cut short by a crash is skipped; the file is compacted to the newest."""
    path = KernelRecords(tmp_path).cells_path("k1")
    writer = CellMap(path, keep=10)
    writer.add("m1", "cell-a", "s1")
    writer.add("m2", "cell-b", "s1")
    with open(path, "a") as f:
        f.write('{"msg_id": "m3", "cell')  # the writer killed mid-line
    reader = CellMap(path, keep=10)
    assert (reader.cell("m1"), reader.cell("m2"), reader.cell("m3")) == ("cell-a", "cell-b", None)
    assert reader.session("m2") == "s1"
    path.write_text("")  # (start over without the torn line)
    writer = CellMap(path, keep=10)
    for i in range(25):
        writer.add(f"n{i}", f"c{i}")
    assert len(path.read_text().splitlines()) < 20
    later = CellMap(path, keep=10)
    assert later.cell("n24") == "c24" and later.cell("n0") is None
    reader.refresh()  # compacted under an old reader: read afresh
    assert reader.cell("n24") == "c24"


def test_cell_map_keeps_each_executions_count(tmp_path):
    """The count an execution began as is read by a later reader (a new
    server replaying it to a reloaded page) and kept through compaction."""
    path = KernelRecords(tmp_path).cells_path("k1")
    writer = CellMap(path, keep=3)
    writer.add("m1", "cell-a", "s1")
    writer.counted("m1", 7)
    writer.counted("unknown", 8)  # not a request the map holds: nothing
    assert CellMap(path).count("m1") == 7
    assert CellMap(path).count("unknown") is None
    for i in range(6):
        writer.add(f"n{i}", f"c{i}")
        writer.counted(f"n{i}", 10 + i)
    later = CellMap(path, keep=3)
    assert later.count("n5") == 15 and later.cell("n5") == "c5"
    assert later.count("m1") is None  # (compacted away with its cell)
