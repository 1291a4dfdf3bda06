"""How a kernel's process is run and followed: one small class per
mechanism, all with one interface, so the provisioner's lifecycle methods
delegate to whichever the kernelspec (or an adoption) chose.

- :class:`LocalProcess`: a child process here (jupyter_client's Popen).
- :class:`SrunStep`: the same child, ``srun`` running the kernel as a Slurm
  job step on a compute node; stopping it also cancels its job.
- :class:`BatchJob`: a Slurm batch job of the kernel's own: no process here,
  the job is what is followed (through the process's shared
  :class:`chspawner.slurm.JobWatch`: one squeue per interval for all the
  server's kernel jobs), signalled and cancelled.
- :class:`AdoptedProcess`: a kernel started by another process (an earlier
  server), followed by its PID.

Slurm is asked only through :class:`chspawner.slurm.SlurmClient`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from subprocess import Popen
from typing import Any

from jupyter_client.launcher import launch_kernel

from chspawner.slurm import (Job, JobState, JobWatch, SlurmClient, SlurmError, sbatch_argv,
                             shared_watch)

#: Seconds between the shared watch's rounds, for a BatchJob given no watch.
JOB_POLL_INTERVAL = 1.0
#: Seconds between looks at a process that isn't our child.
PID_POLL_INTERVAL = 0.1

Log = logging.Logger | logging.LoggerAdapter


class Launcher:
    """Runs one kernel process and follows it (the interface)."""

    #: The process here, when it is our child.
    process: Popen | None = None
    pid: int | None = None
    pgid: int | None = None
    #: The kernel's own Slurm job (BatchJob).
    job_id: str | None = None

    def __init__(self, log: Log):
        self.log = log

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` as this mechanism runs it (inside srun, say): what the
        provisioner's pre_launch hands jupyter_client, and start() gets."""
        return argv

    async def start(self, cmd: list[str], **popen_kwargs: Any) -> None:
        """Start ``cmd`` (from command()); ``popen_kwargs`` as jupyter_client's
        launch_kernel takes them (env, cwd, stdout...)."""
        raise NotImplementedError

    @property
    def has_process(self) -> bool:
        """Whether there is a kernel to follow (until wait() has seen it end)."""
        raise NotImplementedError

    async def poll(self) -> int | None:
        """None while the kernel runs, else its exit status (0 if unknown)."""
        raise NotImplementedError

    async def signal(self, signum: int) -> None:
        """Send ``signum`` to the kernel (its process group)."""
        raise NotImplementedError

    async def wait(self) -> int | None:
        """Until the kernel has ended; its exit status. Then has_process is False."""
        raise NotImplementedError

    async def cancel(self) -> None:
        """End what may outlive the kernel's process (its Slurm job)."""

    async def stop(self, signum: int) -> None:
        """Kill (SIGKILL) or terminate (SIGTERM) the kernel, and what holds it."""
        if self.has_process:
            try:
                await self.signal(signum)
            except ProcessLookupError:
                pass  # already gone
        await self.cancel()

    def failure(self, status: int) -> str | None:
        """Why the kernel ended before it was ready, if this mechanism can say."""
        return None


class LocalProcess(Launcher):
    """The kernel as our child process, with jupyter_client's launch_kernel."""

    async def start(self, cmd: list[str], **popen_kwargs: Any) -> None:
        for key in ("extra_arguments", "kernel_id"):  # not Popen's
            popen_kwargs.pop(key, None)
        self.process = launch_kernel(cmd, **popen_kwargs)
        self.pid = self.process.pid
        try:
            self.pgid = os.getpgid(self.pid)
        except OSError:
            self.pgid = None

    @property
    def has_process(self) -> bool:
        return self.process is not None

    async def poll(self) -> int | None:
        return self.process.poll() if self.process is not None else 0

    async def signal(self, signum: int) -> None:
        if self.process is None:
            return
        if self.pgid:  # the kernel's group: its own children too
            try:
                os.killpg(self.pgid, signum)
                return
            except OSError:
                pass  # then the process alone
        self.process.send_signal(signum)

    async def wait(self) -> int | None:
        if self.process is None:
            return 0
        while self.process.poll() is None:
            await asyncio.sleep(PID_POLL_INTERVAL)  # a child's end signals nothing async
        status = self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream:
                stream.close()
        self.process = None
        return status


class SrunStep(LocalProcess):
    """srun here, the kernel in a job step on a node: one task on one node,
    in a new job named after the kernel (so it can be cancelled by name),
    or as a step of the existing job ``jobid``."""

    def __init__(self, log: Log, client: SlurmClient, job_name: str, user: str,
                 jobid: str | None = None, srun_args: Sequence[str] = ()):
        super().__init__(log)
        self.client, self.job_name, self.user = client, job_name, user
        self.jobid, self.srun_args = jobid, list(srun_args)

    def command(self, argv: list[str]) -> list[str]:
        where = [f"--jobid={self.jobid}"] if self.jobid else [f"--job-name={self.job_name}"]
        return ["srun", *where, "--nodes=1", "--ntasks=1", "--kill-on-bad-exit=1",
                *self.srun_args, *argv]

    async def cancel(self) -> None:
        # Killing srun alone may leave its step running on the node; a job
        # that is the user's own (jobid) stays.
        await cancel_named(self.client, self.job_name, self.user, self.jobid, self.log)


class BatchJob(Launcher):
    """The kernel as a Slurm batch job of its own: followed through
    ``watch`` (default: the process's shared one for ``client``'s
    environment), which asks Slurm once per interval for every job it
    follows, however often jupyter_client polls; signalled and ended with
    scancel."""

    def __init__(self, log: Log, client: SlurmClient, *, job_name: str = "",
                 output: Path | None = None, chdir: str = "", sbatch_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, prefix: Sequence[str] = (),
                 job_id: str | None = None, watch: JobWatch | None = None):
        super().__init__(log)
        self.client, self.job_name, self.chdir = client, job_name, chdir
        self.watch = watch
        #: where the job writes its output ("%j": its id, known once submitted)
        self.output = output
        self.sbatch_args, self.env, self.job_id = list(sbatch_args), env, job_id
        #: what runs before the kernel inside the job (a kernel manager's keeper)
        self.prefix = list(prefix)
        #: The job as poll() last saw it, with Slurm's own word for its state
        #: (TIMEOUT, NODE_FAIL...): why it ended, once it has.
        self.last_seen: Job | None = None

    def command(self, argv: list[str]) -> list[str]:
        return [*self.prefix, *argv]

    async def start(self, cmd: list[str], **popen_kwargs: Any) -> None:
        # (the one builder: the command is quoted there)
        self.job_id = await self.client.submit(sbatch_argv(
            cmd, job_name=self.job_name, output=str(self.output),
            chdir=self.chdir, extra=self.sbatch_args), env=self.env)
        if self.output is not None and "%j" in str(self.output):
            self.output = Path(str(self.output).replace("%j", self.job_id))

    @property
    def has_process(self) -> bool:
        return self.job_id is not None

    def job_watch(self) -> JobWatch:
        if self.watch is None:
            self.watch = shared_watch(self.client.env, interval=JOB_POLL_INTERVAL)
        return self.watch

    async def job_state(self) -> JobState:
        """The job's state at the watch's next round; SlurmError when Slurm
        can't say (and never said)."""
        return (await self.job()).state

    async def job(self, max_age: float = 0.0) -> Job:
        """The job as the watch's next round (or its last, up to ``max_age``
        s old) saw it; while Slurm doesn't answer, as last seen; SlurmError
        when it never said."""
        self.last_seen = await self.job_watch().job(str(self.job_id), max_age=max_age)
        return self.last_seen

    async def poll(self) -> int | None:
        """None while the job runs or waits (or Slurm can't be asked: the
        controller being down says nothing about the kernel), else 0. A
        state up to an interval old will do: jupyter_client polls often."""
        if self.job_id is None:
            return 0
        watch = self.job_watch()
        try:
            job = await self.job(max_age=watch.interval)
        except SlurmError:
            return None  # (the watch logs the outage, once)
        return None if job.alive else 0

    async def signal(self, signum: int) -> None:
        if not self.job_id or not signum:  # (0 asks whether it runs: poll() answers)
            return
        try:
            await self.client.cancel(self.job_id, signal=signum)
        except SlurmError as e:
            self.log.warning("chspawner: can't signal kernel job %s: %s", self.job_id, e)

    async def wait(self) -> int | None:
        while True:  # (each look waits for the watch's next round: Slurm notifies nobody)
            try:
                if not (await self.job()).alive:
                    break
            except SlurmError:
                pass  # (never seen, Slurm down: asked again next round)
        self.job_id = None
        return 0

    async def stop(self, signum: int) -> None:
        await self.cancel()  # the job is all there is of it here

    async def cancel(self) -> None:
        if not self.job_id:
            return
        try:
            await self.client.cancel(self.job_id)
        except SlurmError as e:
            self.log.warning("chspawner: can't cancel kernel job %s: %s", self.job_id, e)

    def failure(self, status: int) -> str:
        """The job ended first: say so, with the last line of its output."""
        last: list[str] = []
        if self.output is not None:
            try:
                last = self.output.read_text(errors="replace").strip().splitlines()[-1:]
            except OSError:
                pass
        return (f"the kernel's Slurm job {self.job_id} ended before the kernel was "
                f"ready{': ' + last[0] if last else ''} (its output: {self.output})")


#: This process's kernels' batch jobs, by kernel id: the BatchJob a
#: provisioner made for each (a restart's replaces the one before). Kept
#: here because a kernel still waiting for its job is out of reach
#: elsewhere: jupyter_client's kernel manager keeps a starting kernel to
#: itself until it runs, and that wait is what its user wants explained.
#: Weak: an entry goes with its provisioner.
_kernel_jobs: weakref.WeakValueDictionary[str, BatchJob] = weakref.WeakValueDictionary()


def register_kernel_job(kernel_id: str, job: BatchJob) -> None:
    """Make ``job`` the batch job of kernel ``kernel_id`` (its provisioner's)."""
    _kernel_jobs[kernel_id] = job


def kernel_jobs() -> dict[str, BatchJob]:
    """The kernels' batch jobs that were submitted (have a job id), by kernel
    id; whether each still runs is its watch's to say."""
    return {kernel_id: job for kernel_id, job in list(_kernel_jobs.items()) if job.job_id}


class AdoptedProcess(Launcher):
    """A kernel another process started (an earlier server), known by its
    PID: followed through /proc, signalled by process group. An srun step
    is cancelled by its job's name when it stops."""

    def __init__(self, log: Log, pid: int, pgid: int | None = None,
                 srun: SrunStep | None = None):
        super().__init__(log)
        self.pid, self.pgid, self.srun = pid, pgid, srun

    async def start(self, cmd: list[str], **popen_kwargs: Any) -> None:
        raise RuntimeError("an adopted kernel is not started again: a restart launches anew")

    @property
    def has_process(self) -> bool:
        return self.pid is not None

    async def poll(self) -> int | None:
        return None if self.pid is not None and running(self.pid) else 0

    async def signal(self, signum: int) -> None:
        if self.pid is not None:
            os.killpg(self.pgid or self.pid, signum)

    async def wait(self) -> int | None:
        while await self.poll() is None:
            await asyncio.sleep(PID_POLL_INTERVAL)  # not our child: nothing to wait on
        self.pid = None
        return 0

    async def cancel(self) -> None:
        if self.srun is not None:
            await self.srun.cancel()


async def cancel_named(client: SlurmClient, job_name: str, user: str,
                       jobid: str | None, log: Log) -> None:
    """Cancel the kernel's own srun job by its name (not a job it was a step of)."""
    if jobid or not job_name:
        return
    try:
        await client.cancel_named(job_name, user)
    except SlurmError as e:
        log.warning("chspawner: can't cancel kernel job %s: %s", job_name, e)


def running(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (dead, not yet reaped by a parent that
    isn't us) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


__all__ = ["AdoptedProcess", "BatchJob", "JOB_POLL_INTERVAL", "Launcher", "LocalProcess",
           "SrunStep", "running"]
