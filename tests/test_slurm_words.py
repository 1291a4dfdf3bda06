"""Slurm's words said to a user (chspawner.slurm_words), and what the Slurm
client reads them from (chspawner.slurm's parsing, the watch's question
about who cancelled a job): every way a job waits or ends, in words, and
the kernel's notice built on them (chspawner.persist.kernel_manager).

Unit layer: no Slurm, no root. The same causes produced for real on the
test cluster: tests/test_kernel_endings.py.
"""
from __future__ import annotations

import asyncio
import os
import pwd
import time

import pytest

from chspawner.persist.kernel_manager import lost_kernel_notice, restarts_after, why_job_ended
from chspawner.slurm import Job, JobState, JobWatch, SlurmError, _parse_line, cancelled_by, \
    parse_time
from chspawner.slurm_words import (
    CANCELLER_UNKNOWN,
    duration,
    ended_on_purpose,
    ended_words,
    job_ended_words,
    job_ending,
    pending_words,
    time_left_words,
    waiting_words,
    when,
)

pytestmark = pytest.mark.unit

OWNER = 1001


def ended(state: str, by: int | None = None, node: str = "n2") -> Job:
    return Job("1234", JobState.of(state), state, node, cancelled_by=by)


# ------------------------------------------------------------ endings --

@pytest.mark.parametrize("state, words", [
    ("TIMEOUT", "it reached its time limit (TIMEOUT)"),
    ("OUT_OF_MEMORY", "it used more memory than its job asked for, and was killed "
                      "(OUT_OF_MEMORY)"),
    ("NODE_FAIL", "its node failed (NODE_FAIL)"),
    ("PREEMPTED", "it was preempted by a job of higher priority (PREEMPTED)"),
    ("FAILED", "its program ended with an error (FAILED)"),
    ("COMPLETED", "its program ended (COMPLETED)"),
    ("BOOT_FAIL", "its node failed to boot (BOOT_FAIL)"),
    ("DEADLINE", "it reached its deadline (DEADLINE)"),
    ("SPECIAL_EXIT", "it ended (SPECIAL_EXIT)"),
    ("CANCELLED+", "it was cancelled (CANCELLED)"),
])
def test_each_way_a_job_ends_has_its_words(state, words):
    assert ended_words(ended(state), OWNER) == words
    assert job_ended_words(ended(state), owner_uid=OWNER) == \
        f"job 1234 on node n2 ended: {words}" + \
        (f"; {CANCELLER_UNKNOWN}" if state.startswith("CANCELLED") else "")


def test_a_cancel_says_by_whom_you_an_administrator_or_that_it_is_not_known():
    root = pwd.getpwuid(0).pw_name
    assert ended_words(ended("CANCELLED", OWNER), OWNER) == "it was cancelled by you (CANCELLED)"
    assert ended_words(ended("CANCELLED", 0), OWNER) == \
        f"it was cancelled by an administrator, {root} (CANCELLED)"
    # A uid with no name here: its number.
    assert ended_words(ended("CANCELLED", 4_000_000_000), OWNER) == \
        "it was cancelled by an administrator, user 4000000000 (CANCELLED)"
    # sacct's own form of the state ("CANCELLED by 0") reads the same.
    assert JobState.of("CANCELLED by 0") is JobState.GONE
    unknown = job_ended_words(ended("CANCELLED"), owner_uid=OWNER)
    assert unknown == ("job 1234 on node n2 ended: it was cancelled (CANCELLED); by whom is "
                       "not known here: only Slurm's accounting (slurmdbd) records that")


def test_a_job_slurm_forgot_or_still_ends_says_so():
    assert ended_words(None) == "Slurm no longer knows the job (it ended a while ago)"
    assert ended_words(Job("9", JobState.GONE)) == ended_words(None)
    assert job_ended_words(None, "9", "n4") == \
        "job 9 on node n4 ended: Slurm no longer knows the job (it ended a while ago)"
    assert job_ended_words(None) == \
        "job ended: Slurm no longer knows the job (it ended a while ago)"
    completing = Job("9", JobState.GONE, "COMPLETING", "n4", "TimeLimit")
    assert job_ending(completing) and not job_ending(ended("TIMEOUT"))
    assert job_ended_words(completing) == "job 9 on node n4 ended: it is ending " \
                                          "(COMPLETING, TimeLimit)"


def test_only_a_cancel_is_on_purpose_and_only_it_keeps_the_kernel_down():
    for state in ("TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "FAILED",
                  "COMPLETED", ""):
        assert not ended_on_purpose(ended(state)) and restarts_after(ended(state)), state
    assert restarts_after(None)
    for by in (OWNER, 0, None):
        assert ended_on_purpose(ended("CANCELLED", by)) and not restarts_after(
            ended("CANCELLED", by))


@pytest.mark.parametrize("state, by, middle", [
    ("TIMEOUT", None, "it reached its time limit (TIMEOUT)"),
    ("OUT_OF_MEMORY", None, "it used more memory than its job asked for, and was killed "
                            "(OUT_OF_MEMORY)"),
    ("NODE_FAIL", None, "its node failed (NODE_FAIL)"),
    ("PREEMPTED", None, "it was preempted by a job of higher priority (PREEMPTED)"),
    ("FAILED", None, "its program ended with an error (FAILED)"),
])
def test_the_kernel_is_told_why_its_job_ended_and_that_a_new_one_starts(state, by, middle):
    because = why_job_ended(ended(state, by), owner_uid=OWNER)
    assert lost_kernel_notice(because) == (
        f"[chspawner] The kernel's job 1234 on node n2 ended: {middle}. A new kernel is "
        "starting, as a new job. Its variables and imports are gone: run the cells it "
        "needs again.")
    assert lost_kernel_notice(because, new_node="n3").startswith(
        f"[chspawner] The kernel's job 1234 on node n2 ended: {middle}. A new kernel was "
        "started on n3. ")


def test_a_cancelled_kernel_is_told_it_is_not_restarted():
    root = pwd.getpwuid(0).pw_name
    for by, middle in ((OWNER, "it was cancelled by you (CANCELLED)"),
                       (0, f"it was cancelled by an administrator, {root} (CANCELLED)"),
                       (None, f"it was cancelled (CANCELLED); {CANCELLER_UNKNOWN}")):
        job = ended("CANCELLED", by)
        told = lost_kernel_notice(why_job_ended(job, owner_uid=OWNER), restarts_after(job))
        assert told == (f"[chspawner] The kernel's job 1234 on node n2 ended: {middle}. It "
                        "is not restarted: a cancel is on purpose. Its variables and "
                        "imports are gone: start a kernel again to go on."), told
    # The owner by default: this process's user (the server's).
    assert "by you" in why_job_ended(ended("CANCELLED", os.getuid()))


# ------------------------------------------------------------ waiting --

def test_pending_reasons_in_words():
    assert pending_words("Priority") == \
        "jobs of higher priority are ahead of it in the queue (Priority)"
    assert pending_words("Resources") == \
        "the nodes it needs are busy with other jobs (Resources)"
    assert pending_words("None") == pending_words("") == "Slurm has yet to consider it"
    assert pending_words("QOSMaxCpuPerUserLimit") == \
        "a limit of its QOS is reached (QOSMaxCpuPerUserLimit)"
    assert pending_words("AssocGrpCpuLimit") == \
        "a limit of its account is reached (AssocGrpCpuLimit)"
    assert pending_words("MaxJobsPerUser") == "you have as many jobs as you may (MaxJobsPerUser)"
    assert pending_words("SomethingNew") == "Slurm holds it back (SomethingNew)"


def test_waiting_words_say_why_where_and_when():
    now = time.mktime((2026, 12, 5, 12, 0, 0, 0, 0, -1))
    job = Job("77", JobState.PENDING, "PENDING", "", "Resources", now + 3900)
    assert waiting_words(job, (3, 10), now) == (
        "job 77 waits: the nodes it needs are busy with other jobs (Resources); place 3 "
        "of 10 in the queue; Slurm expects it to start at 13:05 (in 1 h 05 min)")
    # No place, no expected start (or one already past): just why.
    assert waiting_words(Job("77", JobState.PENDING, "PENDING", "", "Priority"), None, now) \
        == "job 77 waits: jobs of higher priority are ahead of it in the queue (Priority)"
    assert waiting_words(Job("77", JobState.PENDING, "PENDING", "", "", now - 5), None,
                         now) == "job 77 waits: Slurm has yet to consider it"


def test_times_and_durations():
    now = time.mktime((2026, 12, 5, 12, 0, 0, 0, 0, -1))
    assert when(now + 65 * 60, now) == "13:05"
    assert when(now + 2 * 86400, now) == time.strftime("%a %d %b %H:%M",
                                                       time.localtime(now + 2 * 86400))
    assert (duration(40), duration(14 * 60 + 3), duration(7500), duration(-5)) == \
        ("40 s", "14 min", "2 h 05 min", "0 s")
    assert time_left_words(now + 3900, now) == "1 h 05 min left (until 13:05)"


# ---------------------------------------------- what Slurm's lines say --

def test_squeue_lines_with_six_fields_and_a_stand_ins_four():
    job = _parse_line("1234|RUNNING|n2|None|1764936000|1764939600\n")
    assert job == Job("1234", JobState.RUNNING, "RUNNING", "n2", "", 1764936000.0,
                      1764939600.0)
    pending = _parse_line("77|PENDING||Priority|N/A|N/A")
    assert (pending.state, pending.reason, pending.start_time, pending.end_time) == \
        (JobState.PENDING, "Priority", None, None)
    # A stand-in's squeue that prints the four older fields: no times.
    old = _parse_line("1234|TIMEOUT|n2|(null)")
    assert old == Job("1234", JobState.GONE, "TIMEOUT", "n2", "")
    assert _parse_line("   \n") is None


def test_times_as_squeue_prints_them():
    assert parse_time("1764936000") == 1764936000.0
    assert parse_time(" 1764936000 ") == 1764936000.0
    assert parse_time("2026-12-05T14:00:00") == \
        time.mktime(time.strptime("2026-12-05T14:00:00", "%Y-%m-%dT%H:%M:%S"))
    for nothing in ("N/A", "Unknown", "NONE", "", "2026-13-45T99:00:00"):
        assert parse_time(nothing) is None, nothing


def test_who_cancelled_as_sacct_says_it():
    assert cancelled_by("CANCELLED by 1001") == 1001
    assert cancelled_by("CANCELLED by 0") == 0
    assert cancelled_by("CANCELLED") is None
    assert cancelled_by("CANCELLED by ") is None
    assert cancelled_by("TIMEOUT") is None
    assert cancelled_by("CANCELLED+ by 5") == 5


# ----------------------------------------- the watch asks who cancelled --

class Accounting:
    """squeue and sacct answered from tables, every call kept."""

    def __init__(self, squeue: dict[str, str], sacct: dict[str, str] | None):
        self.squeue, self.sacct = squeue, sacct
        self.calls: list[tuple[str, ...]] = []

    async def run(self, *argv: str, env=None, timeout=None) -> str:
        self.calls.append(argv)
        await asyncio.sleep(0)
        ids = next(a for a in argv if a.startswith("--jobs=")).split("=", 1)[1].split(",")
        if argv[0] == "sacct":
            if self.sacct is None:
                raise SlurmError("sacct: Slurm accounting storage is disabled")
            return "".join(f"{i}|{self.sacct[i]}\n" for i in ids if i in self.sacct)
        return "".join(f"{i}|{self.squeue[i]}|n1|None|1|2\n" for i in ids if i in self.squeue)

    def times_env(self) -> dict[str, str]:
        return {}

    def count(self, command: str) -> int:
        return sum(1 for call in self.calls if call[0] == command)


def test_a_cancelled_job_squeue_lists_gets_its_canceller_from_one_sacct():
    """squeue says CANCELLED (no one's name: it has none to give); the
    round asks sacct once, for it and the forgotten job together; later
    rounds keep the answer without asking again."""
    client = Accounting({"1": "CANCELLED", "2": "RUNNING"},
                        {"1": "CANCELLED by 1001", "3": "TIMEOUT"})

    async def rounds():
        watch = JobWatch(client, interval=0.01)
        first = await asyncio.gather(*(watch.job(i) for i in ("1", "2", "3")))
        again = await asyncio.gather(*(watch.job(i) for i in ("1", "2", "3")))
        return first, again

    first, again = asyncio.run(rounds())
    assert [j.cancelled_by for j in first] == [1001, None, None]
    assert [j.slurm_state for j in first] == ["CANCELLED", "RUNNING", "TIMEOUT"]
    assert [j.cancelled_by for j in again] == [1001, None, None]
    sacct = [c for c in client.calls if c[0] == "sacct"]
    assert len(sacct) == 1 and "--jobs=3,1" in sacct[0], sacct


def test_without_accounting_a_cancel_is_asked_about_once_and_stays_unknown():
    client = Accounting({"1": "CANCELLED"}, None)

    async def rounds():
        watch = JobWatch(client, interval=0.01)
        return [await watch.job("1") for _ in range(3)]

    jobs = asyncio.run(rounds())
    assert [j.cancelled_by for j in jobs] == [None] * 3
    assert client.count("sacct") == 1 and client.count("squeue") == 3
