"""Talking to Slurm through its client commands (sbatch, squeue, scancel),
for the spawner (a user's server as a job) and the provisioner (a kernel
as a job): how a command is run and failures reported, and what a job's
state means."""
from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping

#: States in which a job still runs or will.
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED",
                           "RESIZING", "REQUEUED"})


class SlurmError(RuntimeError):
    """A Slurm command failed; the message says which and why, in one line."""


async def slurm_command(*argv: str, env: Mapping[str, str] | None = None,
                        preexec_fn: Callable[[], None] | None = None) -> str:
    """Run a Slurm client command; its stdout, or SlurmError with the end
    of its stderr."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None, preexec_fn=preexec_fn)
    except OSError as e:
        raise SlurmError(f"{argv[0]}: {e.strerror}") from None
    out, err = await process.communicate()
    if process.returncode != 0:
        # One line: Slurm's clients say "sbatch: error: ..." on several.
        lines = [line.strip().removeprefix(f"{argv[0]}: ")
                 for line in err.decode(errors="replace").splitlines() if line.strip()]
        raise SlurmError(f"{argv[0]}: {'; '.join(lines)[-300:] or 'failed'}")
    return out.decode()


async def job_status(job_id: str, run=slurm_command) -> tuple[str, str, str]:
    """(state, node, reason) of a job; state '' once Slurm has forgotten it.
    ``run`` runs the command (the spawner's runs it as the user)."""
    try:
        out = await run("squeue", "-h", "-j", job_id, "-o", "%T|%N|%r")
    except SlurmError as e:
        if "Invalid job id" in str(e):  # ended, and already forgotten
            return "", "", ""
        raise
    state, _, rest = out.strip().partition("|")
    node, _, reason = rest.partition("|")
    return state, node, reason


def job_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) fit to submit a job from inside another: the
    SLURM_* variables of the job we may be in would otherwise describe the
    new job's allocation to its tools; SLURM_CONF still says which cluster."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) or k == "SLURM_CONF"}


# ------------------------------------------------------------------------
# The one Slurm client (the API agreed in issue 13; the provisioner uses it).
# The lines above stay until the spawner moves to it.

import enum  # noqa: E402
import shlex  # noqa: E402
from collections.abc import Iterable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402


class JobState(enum.Enum):
    """What a job's Slurm state means to us."""
    PENDING = "pending"  # will run
    RUNNING = "running"  # runs now (SUSPENDED too: the process is there)
    GONE = "gone"        # ended, or unknown to Slurm

    @classmethod
    def of(cls, slurm_state: str) -> "JobState":
        state = slurm_state.strip().upper()
        if state in ("RUNNING", "SUSPENDED"):
            return cls.RUNNING
        if state in _PENDING_STATES:
            return cls.PENDING
        return cls.GONE  # COMPLETING: the program is gone, Slurm is tidying


_PENDING_STATES = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD",
                             "REQUEUE_FED", "RESIZING", "RESV_DEL_HOLD", "POWER_UP_NODE"})


@dataclass(frozen=True)
class Job:
    id: str
    state: JobState
    slurm_state: str = ""
    node: str = ""
    reason: str = ""

    @property
    def alive(self) -> bool:
        return self.state is not JobState.GONE


@dataclass(frozen=True)
class Resources:
    """A user's request."""
    cpus: int | None = None
    mem_gb: int | None = None
    hours: int | None = None
    partition: str = ""
    gpus: int = 0

    def sbatch_options(self) -> list[str]:
        options = []
        if self.cpus:
            options.append(f"--cpus-per-task={self.cpus}")
        if self.mem_gb:
            options.append(f"--mem={self.mem_gb}G")
        if self.hours:
            options.append(f"--time={self.hours}:00:00")
        if self.partition:
            options.append(f"--partition={self.partition}")
        if self.gpus:
            options.append(f"--gpus={self.gpus}")
        return options


def parse_job_id(sbatch_output: str) -> str:
    """The job id in ``sbatch --parsable``'s output ("123" or "123;cluster")."""
    job_id = sbatch_output.strip().split(";")[0].strip()
    if not job_id.isdigit():
        raise SlurmError(f"sbatch: no job id in its output {sbatch_output.strip()[:100]!r}")
    return job_id


def sbatch_argv(command: Sequence[str], *, job_name: str, output: str, chdir: str,
                resources: Resources | None = None, extra: Sequence[str] = (),
                background: Sequence[str] | None = None) -> list[str]:
    """sbatch for a one-task job running ``command`` (quoted once, here)."""
    wrap = "exec " + shlex.join(command)
    if background:
        wrap = shlex.join(background) + " </dev/null >/dev/null 2>&1 & " + wrap
    return ["sbatch", "--parsable", f"--job-name={job_name}", "--nodes=1", "--ntasks=1",
            "--export=ALL", f"--output={output}", f"--chdir={chdir}",
            *(resources.sbatch_options() if resources else []), *extra, "--wrap=" + wrap]


class SlurmClient:
    """Runs Slurm's client commands, with ``env`` and ``preexec_fn``."""

    def __init__(self, env: Mapping[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None):
        self.env = env
        self.preexec_fn = preexec_fn

    async def _run(self, *argv: str, env: Mapping[str, str] | None = None) -> str:
        return await slurm_command(*argv, env=env if env is not None else self.env,
                                   preexec_fn=self.preexec_fn)

    async def submit(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
        return parse_job_id(await self._run(*argv, env=env))

    async def jobs(self, job_ids: Iterable[str]) -> dict[str, Job]:
        ids = list(dict.fromkeys(job_ids))
        if not ids:
            return {}
        try:
            out = await self._run("squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T|%N|%r")
        except SlurmError as e:
            if "Invalid job id" in str(e):
                return {i: Job(i, JobState.GONE) for i in ids}
            raise
        found = {}
        for line in out.splitlines():
            fields = line.strip().split("|")
            if len(fields) == 4:
                job_id, state, node, reason = fields
                found[job_id] = Job(job_id, JobState.of(state), state, node,
                                    "" if reason == "None" else reason)
        return {i: found.get(i, Job(i, JobState.GONE)) for i in ids}

    async def job(self, job_id: str) -> Job:
        return (await self.jobs([job_id]))[job_id]

    async def cancel(self, job_id: str, *, signal: int | str | None = None,
                     batch_only: bool = False) -> None:
        options = [f"--signal={signal}"] if signal is not None else []
        if batch_only:
            options.append("--batch")
        await self._run("scancel", *options, job_id)

    async def cancel_named(self, job_name: str, user: str) -> None:
        await self._run("scancel", f"--name={job_name}", f"--user={user}")
