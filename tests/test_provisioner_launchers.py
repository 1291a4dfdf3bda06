"""The launch mechanisms, each through the one interface: real processes
for the local and adopted ones; for the batch job, a Slurm client faked
(the real one runs in tests/test_kernels.py and tests/test_kernel_jobs.py)."""
from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from chspawner.provisioner.launchers import (AdoptedProcess, BatchJob, LocalProcess,
                                             SrunStep, running)
from chspawner.slurm import Job, JobState, SlurmError

# No root, no services: part of the fast unit layer (pytest -m unit).
pytestmark = pytest.mark.unit

LOG = logging.getLogger("test-launchers")


def run(coro):
    return asyncio.run(coro)


async def until(condition, seconds: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_local_process_lifecycle():
    async def main():
        launcher = LocalProcess(LOG)
        assert not launcher.has_process and await launcher.poll() == 0
        await launcher.start([sys.executable, "-c", "import time; time.sleep(60)"],
                             independent=True, kernel_id="k", extra_arguments=[])
        assert launcher.has_process and await launcher.poll() is None
        assert launcher.pgid == launcher.pid  # a group of its own
        await launcher.stop(signal.SIGKILL)
        assert await launcher.wait() == -signal.SIGKILL
        assert not launcher.has_process and launcher.process is None
    run(main())


def test_adopted_process_follows_a_pid_it_did_not_start():
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        async def main():
            launcher = AdoptedProcess(LOG, child.pid, child.pid)
            assert launcher.has_process and await launcher.poll() is None
            await launcher.signal(signal.SIGTERM)
            # Our child here: a zombie until reaped, which counts as gone.
            await until(lambda: _gone(child.pid))
            assert await launcher.wait() == 0 and not launcher.has_process
        run(main())
    finally:
        child.kill()
        child.wait()


async def _gone(pid: int) -> bool:
    return not running(pid)


def test_running_counts_a_zombie_as_gone():
    child = subprocess.Popen(["true"])

    async def is_zombie() -> bool:
        with open(f"/proc/{child.pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    run(until(is_zombie))
    assert not running(child.pid)
    child.wait()
    assert not running(child.pid)


def test_srun_step_command_and_cancel():
    client = FakeSlurm()
    step = SrunStep(LOG, client, "chspawner-kernel-x", "alice", srun_args=["--partition=p"])
    assert step.command(["relay", "kernel"]) == [
        "srun", "--job-name=chspawner-kernel-x", "--nodes=1", "--ntasks=1",
        "--kill-on-bad-exit=1", "--partition=p", "relay", "kernel"]
    run(step.cancel())
    assert client.calls == [("cancel_named", "chspawner-kernel-x", "alice")]
    in_job = SrunStep(LOG, client, "chspawner-kernel-x", "alice", jobid="42")
    assert in_job.command(["k"])[:2] == ["srun", "--jobid=42"]
    run(in_job.cancel())  # the user's own job stays
    assert len(client.calls) == 1


class FakeSlurm:
    """SlurmClient's interface, and JobWatch's, answering from ``states``."""

    interval = 1.0

    def __init__(self, states: list[str] = ()):
        self.states = list(states)
        self.calls: list[tuple] = []

    async def submit(self, argv, env=None) -> str:
        self.calls.append(("submit", list(argv)))
        return "77"

    async def job(self, job_id: str, *, max_age: float = 0.0) -> Job:
        self.calls.append(("job", job_id, max_age))
        state = self.states.pop(0) if self.states else ""
        if state == "error":
            raise SlurmError("squeue: slurm_load_jobs error: Unable to contact controller")
        return Job(job_id, JobState.of(state), state)

    async def cancel(self, job_id: str, *, signal=None, batch_only=False) -> None:
        self.calls.append(("cancel", job_id, signal))

    async def cancel_named(self, job_name: str, user: str) -> None:
        self.calls.append(("cancel_named", job_name, user))


def test_batch_job_submits_the_one_sbatch_argv(tmp_path: Path):
    client = FakeSlurm()
    job = BatchJob(LOG, client, job_name="chspawner-kernel-x",
                   output=tmp_path / "chspawner-kernel-x-%j.log", chdir="/home/a",
                   sbatch_args=["--time=1:00:00"], prefix=["keeper", "--"])
    run(job.start(job.command(["relay", "--", "python3", "a b"])))
    [(_, argv)] = client.calls
    assert argv == ["sbatch", "--parsable", "--job-name=chspawner-kernel-x", "--nodes=1",
                    "--ntasks=1", "--no-requeue", "--export=ALL",
                    f"--output={tmp_path}/chspawner-kernel-x-%j.log", "--chdir=/home/a",
                    "--time=1:00:00", "--wrap=exec keeper -- relay -- python3 'a b'"]
    assert job.job_id == "77" and job.has_process
    assert job.output == tmp_path / "chspawner-kernel-x-77.log"


def test_batch_job_follows_signals_and_cancels_its_job():
    client = FakeSlurm(["PENDING", "error", "RUNNING", "COMPLETING"])
    job = BatchJob(LOG, client, job_id="5", watch=client)

    async def main():
        assert await job.poll() is None          # queued
        assert await job.poll() is None          # Slurm can't say: not taken as an end
        await job.signal(signal.SIGINT)
        await job.signal(0)                      # (poll's question: no scancel)
        assert await job.poll() is None          # runs
        assert await job.wait() == 0             # COMPLETING: the kernel is gone
        assert not job.has_process
    run(main())
    assert ("cancel", "5", signal.SIGINT) in client.calls
    assert [c for c in client.calls if c[0] == "cancel"] == [("cancel", "5", signal.SIGINT)]
    job.job_id = "6"
    run(job.stop(signal.SIGKILL))  # a kill is the job's cancel
    assert client.calls[-1] == ("cancel", "6", None)


def test_batch_job_polls_take_the_watchs_state_up_to_an_interval_old():
    """jupyter_client polls often: a poll takes the shared watch's last
    round if it is fresh enough (the watch asks Slurm at most once per
    interval for all jobs); waiting for the job's end takes the next."""
    client = FakeSlurm(["RUNNING", "COMPLETED"])
    job = BatchJob(LOG, client, job_id="5", watch=client)
    assert run(job.poll()) is None
    assert run(job.wait()) == 0
    assert client.calls == [("job", "5", 1.0), ("job", "5", 0.0)]
    assert job.last_seen.slurm_state == "COMPLETED"


def test_a_job_that_ended_first_shows_the_end_of_its_log(tmp_path: Path):
    log = tmp_path / "k-9.log"
    log.write_text("starting\nTraceback...\nModuleNotFoundError: No module named 'x'\n")
    job = BatchJob(LOG, FakeSlurm(), job_id="9", output=log)
    assert job.failure(0) == (
        "the kernel's Slurm job 9 ended before the kernel was ready: "
        f"ModuleNotFoundError: No module named 'x' (its output: {log})")
    missing = BatchJob(LOG, FakeSlurm(), job_id="9", output=tmp_path / "none.log")
    assert missing.failure(0).endswith(f"was ready (its output: {tmp_path}/none.log)")


def test_local_process_failure_says_nothing_of_its_own():
    assert LocalProcess(LOG).failure(1) is None  # (the provisioner's exit reasons do)
