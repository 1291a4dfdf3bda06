"""The session's status for JupyterLab (chspawner.persist.session_status):
the endpoint's answer built from a fake job watch, the admin's warning
times, and the kernels' jobs as the provisioner registers them. The page's
side is in the labextension's unit tests; all of it at work, through a hub
and Slurm, in tests/test_browser_session.py."""
from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from chspawner.persist.session_status import (KernelJob, SessionStatus, partition_of,
                                              session_model, warn_minutes_from)
from chspawner.provisioner.launchers import BatchJob, kernel_jobs, register_kernel_job
from chspawner.slurm import Job, JobState, SlurmClient, SlurmError

pytestmark = pytest.mark.unit

NOW = 1_800_000_000.0


class FakeWatch:
    """A JobWatch's two questions, answered from a table; what was asked noted."""

    def __init__(self, jobs: dict[str, Job], places: dict[str, tuple[int, int]] | None = None):
        self.jobs, self.places = jobs, places or {}
        self.asked: list[tuple[str, float]] = []
        self.places_asked: list[tuple[str, str]] = []

    async def job(self, job_id: str, *, max_age: float = 0.0) -> Job:
        self.asked.append((job_id, max_age))
        if job_id not in self.jobs:
            raise SlurmError("squeue: slurm_load_jobs error: Unable to contact slurm controller")
        return self.jobs[job_id]

    async def queue_place(self, job_id: str, partition: str = "") -> tuple[int, int] | None:
        self.places_asked.append((job_id, partition))
        return self.places.get(job_id)


def model(watch: FakeWatch, **kwargs) -> dict:
    defaults = dict(server_job_id="100", kernels=[], warn_minutes=[15.0, 5.0], now=NOW)
    return asyncio.run(session_model(watch, **{**defaults, **kwargs}))


def test_the_servers_job_its_time_left_and_what_happens_at_its_end() -> None:
    watch = FakeWatch({"100": Job("100", JobState.RUNNING, "RUNNING", "n1",
                                  start_time=NOW - 600, end_time=NOW + 3900)})
    answer = model(watch)
    assert answer["now"] == NOW and answer["warn_minutes"] == [15.0, 5.0]
    assert answer["poll_seconds"] == 30 and answer["pending_poll_seconds"] == 5
    server = answer["server"]
    assert server == {"job_id": "100", "node": "n1", "state": "running",
                      "end_time": NOW + 3900, "time_left": server["time_left"],
                      "at_end": "your server stops then: save your work"}
    assert server["time_left"].startswith("1 h 05 min left (until ")
    # Asked with a max_age: a recent round (or the hub's table) answers.
    assert watch.asked == [("100", 30.0)]
    assert answer["kernels"] == []
    # A session the spawner moves before the end says so.
    moving = model(watch, at_walltime="move")["server"]["at_end"]
    assert moving == "your session moves to a new job before then: nothing to do"


def test_outside_a_job_no_server_and_slurm_unreachable_is_unknown() -> None:
    watch = FakeWatch({})
    assert model(watch, server_job_id=None)["server"] is None
    assert watch.asked == []  # (nothing asked of Slurm for it)
    server = model(watch)["server"]
    assert server["state"] == "unknown" and server["end_time"] is None
    assert server["time_left"] is None


def test_a_waiting_kernel_job_says_why_its_place_and_expected_start() -> None:
    watch = FakeWatch({
        "100": Job("100", JobState.RUNNING, "RUNNING", "n1", end_time=NOW + 600),
        "201": Job("201", JobState.PENDING, "PENDING", "", "Resources",
                   start_time=NOW + 1200, end_time=NOW + 4800),
        "202": Job("202", JobState.RUNNING, "RUNNING", "n2", end_time=NOW + 240),
        "203": Job("203", JobState.GONE, "TIMEOUT"),
    }, places={"201": (2, 7)})
    kernels = [KernelJob("k-wait", "201", "short"), KernelJob("k-run", "202"),
               KernelJob("k-ended", "203"), KernelJob("k-unknown", "204")]
    answer = model(watch, kernels=kernels)
    waiting, running = answer["kernels"]  # (the ended and the unknown left out)
    assert waiting["kernel_id"] == "k-wait" and waiting["state"] == "pending"
    assert waiting["waiting"].startswith(
        "job 201 waits: the nodes it needs are busy with other jobs (Resources); "
        "place 2 of 7 in the queue; Slurm expects it to start at ")
    assert waiting["waiting"].endswith("(in 20 min)")
    # For a notification (140 characters in JupyterLab's), without Slurm's word.
    assert waiting["waiting_brief"] == waiting["waiting"].replace(" (Resources)", "")
    # Pending: no time left yet (its limit runs from its start).
    assert waiting["end_time"] is None and waiting["time_left"] is None
    assert watch.places_asked == [("201", "short")]  # its partition's queue
    assert running == {"kernel_id": "k-run", "job_id": "202", "node": "n2",
                       "state": "running", "waiting": None, "waiting_brief": None,
                       "end_time": NOW + 240,
                       "time_left": running["time_left"],
                       "at_end": "the kernel restarts in a new job then: its variables "
                                 "are lost"}
    assert running["time_left"].startswith("4 min left (until ")


def test_a_kernels_own_watch_is_asked_about_its_job() -> None:
    server, own = FakeWatch({"100": Job("100", JobState.RUNNING, "RUNNING")}), \
        FakeWatch({"300": Job("300", JobState.RUNNING, "RUNNING", end_time=NOW + 60)})
    answer = model(server, kernels=[KernelJob("k", "300", watch=own)], max_age=7)
    assert [k["job_id"] for k in answer["kernels"]] == ["300"]
    assert own.asked == [("300", 7)] and server.asked == [("100", 7)]


def test_the_admins_warning_times(monkeypatch) -> None:
    monkeypatch.delenv("CHSPAWNER_WALLTIME_WARNINGS", raising=False)
    assert SessionStatus().warn_minutes == [15.0, 5.0]
    monkeypatch.setenv("CHSPAWNER_WALLTIME_WARNINGS", "5, 30,1")
    assert SessionStatus().warn_minutes == [30.0, 5.0, 1.0]
    # The server's own configuration wins over the spawner's environment.
    assert SessionStatus(warn_minutes=[10, 2, -1]).warn_minutes == [10.0, 2.0]
    assert warn_minutes_from("") == [15.0, 5.0]


def test_a_typo_in_the_warning_times_keeps_the_defaults_and_says_so(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert warn_minutes_from("15 min") == [15.0, 5.0]
    assert "CHSPAWNER_WALLTIME_WARNINGS='15 min' is not comma-separated minutes" \
        in caplog.text


def test_the_partition_a_kernel_job_asks_for() -> None:
    assert partition_of([]) == ""
    assert partition_of(["--cpus-per-task=2", "--partition=short"]) == "short"
    assert partition_of(["-p", "gpu", "--time=60"]) == "gpu"
    assert partition_of(["-pdebug"]) == "debug"
    assert partition_of(["--partition=a", "--partition=b"]) == "b"  # (sbatch's rule)


def test_kernel_jobs_are_found_by_kernel_id_while_their_provisioner_lives() -> None:
    client = SlurmClient(env={})
    queued = BatchJob(logging.getLogger("test"), client, job_id="400")
    not_submitted = BatchJob(logging.getLogger("test"), client)
    register_kernel_job("k-queued", queued)
    register_kernel_job("k-new", not_submitted)
    assert kernel_jobs().get("k-queued") is queued
    assert "k-new" not in kernel_jobs()  # (no job id yet: nothing to show)
    # A restart's job replaces the one before.
    restarted = BatchJob(logging.getLogger("test"), client, job_id="401")
    register_kernel_job("k-queued", restarted)
    assert kernel_jobs()["k-queued"] is restarted
    del queued, restarted
    gc.collect()
    assert "k-queued" not in kernel_jobs()  # (gone with its provisioner)


def test_the_page_is_told_once_why_the_last_job_ended_and_of_a_move() -> None:
    from chspawner.persist.session_status import notices
    assert notices({}, "12") == []
    said = notices({"CHSPAWNER_PREVIOUS_END": "Your last server's job 11 on node n1 ended: "
                    "it reached its time limit (TIMEOUT) (at 14:05).",
                    "CHSPAWNER_MOVED_FROM": "job 11 on n1"}, "12")
    assert [n["id"] for n in said] == ["previous-end:12", "moved:12"]
    assert said[0]["text"].endswith("(TIMEOUT) (at 14:05).")
    assert said[1]["text"] == ("Your session moved before the time limit: now job 12 (was "
                               "job 11 on n1). Kernels in jobs of their own went on.")
