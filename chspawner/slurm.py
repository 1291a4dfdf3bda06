"""The one Slurm client: everything in chspawner that talks to Slurm goes
through here (the spawner's server jobs, the provisioner's kernel jobs).

* :class:`JobState`: one vocabulary for a job's state (pending, running,
  gone), mapped once from Slurm's own words;
* :func:`sbatch_argv` with :class:`Resources`: the one builder of an sbatch
  command line, pure (no Slurm needed to test it); the job's command is
  quoted here, once;
* :func:`parse_job_id`: sbatch --parsable's answer;
* :class:`SlurmClient`: runs sbatch, squeue and scancel (as this process's
  user, or as another with the environment and ``preexec_fn`` given); one
  squeue answers for many jobs.

Stdlib only, and nothing else of the project: the layer rules keep this
module at the bottom.
"""
from __future__ import annotations

import asyncio
import enum
import os
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

#: The most of a failing command's stderr a SlurmError keeps (characters).
MAX_ERROR = 300


class SlurmError(RuntimeError):
    """A Slurm command failed; the message says which and why, in one line
    ("sbatch: <why>")."""


class JobState(enum.Enum):
    """What a job's state means to us (as batchspawner's JobStatus)."""

    PENDING = "pending"  # will run
    RUNNING = "running"  # runs now: its processes are there
    GONE = "gone"        # ran and ended, or unknown to Slurm

    @classmethod
    def of(cls, slurm_state: str) -> JobState:
        """The meaning of Slurm's word for a job's state (squeue %T). A
        word this module doesn't know counts as pending: a job Slurm still
        lists has not been seen to end, and a server is never dropped on a
        guess."""
        word = slurm_state.strip().upper().split(" ")[0].rstrip("+")  # ("CANCELLED by 0")
        if word in _RUNNING:
            return cls.RUNNING
        if word in _GONE or not word:
            return cls.GONE
        return cls.PENDING


# Slurm's job states (squeue(1), "JOB STATE CODES"), by meaning.
_RUNNING = frozenset({
    "RUNNING",
    "SUSPENDED",  # kept: its processes are there, stopped
    "STOPPED",    # the same, by SIGSTOP, with its resources held
    "SIGNALING",  # running, a signal on its way
})
_GONE = frozenset({
    "COMPLETING",  # the program has ended; Slurm is tidying up after it
    "STAGE_OUT",   # the same, copying files out (burst buffers)
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED",
})
# (Pending, by the rule above: PENDING CONFIGURING REQUEUED REQUEUE_HOLD
# REQUEUE_FED SPECIAL_EXIT RESIZING RESV_DEL_HOLD -- held or queued again,
# they may run -- and any word a later Slurm adds.)


@dataclass(frozen=True)
class Job:
    """A job as squeue saw it."""

    id: str
    state: JobState
    slurm_state: str = ""  # Slurm's own word, for messages ("" = forgotten)
    node: str = ""
    reason: str = ""       # Slurm's reason ("" instead of "None")

    @property
    def alive(self) -> bool:
        """Whether it runs or will."""
        return self.state is not JobState.GONE


def parse_job_id(sbatch_output: str) -> str:
    """The job id in ``sbatch --parsable``'s answer: "123", or "123;cluster"
    on a federation."""
    job_id = sbatch_output.strip().split(";")[0].strip()
    if not job_id.isdigit():
        raise SlurmError(f"sbatch: no job id in its answer {sbatch_output.strip()[:80]!r}")
    return job_id


@dataclass(frozen=True)
class Resources:
    """What a user asks for (None, "" or 0: Slurm's default)."""

    cpus: int | None = None
    mem_gb: int | None = None
    hours: int | None = None
    partition: str = ""
    gpus: int = 0
    # The site's choices (the admin's, or the user's among the admin's).
    account: str = ""
    qos: str = ""
    reservation: str = ""
    constraint: str = ""

    def sbatch_options(self) -> list[str]:
        """sbatch options for this request, each one argument. A value
        with a newline or other control character is refused (ValueError):
        it could only be a mistake, and sbatch would read it as two."""
        for value in (self.partition, self.account, self.qos, self.reservation,
                      self.constraint):
            if any(not c.isprintable() for c in value):
                raise ValueError(f"sbatch option value {value!r} has a control character")
        options = []
        if self.cpus is not None:
            options.append(f"--cpus-per-task={self.cpus}")
        if self.mem_gb is not None:
            options.append(f"--mem={self.mem_gb}G")
        if self.hours is not None:
            options.append(f"--time={self.hours}:00:00")
        if self.partition:
            options.append(f"--partition={self.partition}")
        if self.gpus:
            options.append(f"--gpus={self.gpus}")
        for name in ("account", "qos", "reservation", "constraint"):
            if getattr(self, name):
                options.append(f"--{name}={getattr(self, name)}")
        return options


def sbatch_argv(command: Sequence[str], *, job_name: str, output: str, chdir: str,
                resources: Resources | None = None, extra: Sequence[str] = (),
                background: Sequence[str] | None = None,
                setup: Sequence[str] = ()) -> list[str]:
    """The sbatch command line of a one-task job that runs ``command``.

    ``output``: the job's log (Slurm's filename patterns apply: %j is the
    job id). ``extra``: more sbatch options, after the request (so an
    admin's may override it). ``background``: a command started beside
    ``command``, before it, with no input or output. ``command`` is then
    exec'd: it stays the job's script, which ``scancel --batch`` signals.
    ``setup``: shell lines (the site admin's, written as given, one a line)
    run first, in the job's shell: ``module load ...``, ``source ...``.

    The commands travel as the batch script's text (``--wrap``), quoted
    once, here, with shlex: no other layer quotes or splits them.

    ``--no-requeue``: a job whose node is lost ends (NODE_FAIL) rather than
    starting again as the same job on another node, where nothing expects
    it: a server's loss is the session manager's to mend, a kernel's its
    kernel manager's (a new kernel, a new job)."""
    if not command:
        raise ValueError("sbatch_argv: the job's command is empty")
    script = "exec " + shlex.join(command)
    if background:
        script = shlex.join(background) + " </dev/null >/dev/null 2>&1 & " + script
    if setup:
        script = "\n".join([*setup, script])
    return ["sbatch", "--parsable", f"--job-name={job_name}", "--nodes=1", "--ntasks=1",
            "--no-requeue", "--export=ALL", f"--output={output}", f"--chdir={chdir}",
            *(resources.sbatch_options() if resources else []), *map(str, extra),
            "--wrap=" + script]


def job_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) fit to submit a job from inside another: the
    SLURM_* variables of the job we may be in would otherwise describe the
    new job's allocation to its tools; SLURM_CONF still says which cluster."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) or k == "SLURM_CONF"}


class SlurmClient:
    """Runs Slurm's client commands: as this process's user, or (the
    spawner) with the ``env`` and ``preexec_fn`` given (as the hub's user).

    ``env``: the commands' environment; default: ours, less the SLURM_*
    variables of a job we may run in (:func:`job_environment`)."""

    def __init__(self, env: Mapping[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None):
        self.env = dict(env) if env is not None else None
        self.preexec_fn = preexec_fn

    async def run(self, *argv: str, env: Mapping[str, str] | None = None) -> str:
        """Run a Slurm client command; its stdout, or SlurmError with the end
        of its stderr, in one line."""
        if env is None:
            env = self.env if self.env is not None else job_environment()
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=dict(env), preexec_fn=self.preexec_fn)
        except OSError as e:
            raise SlurmError(f"{argv[0]}: {e.strerror}") from None
        out, err = await process.communicate()
        if process.returncode != 0:
            # One line: Slurm's clients say "sbatch: error: ..." on several.
            lines = [line.strip().removeprefix(f"{argv[0]}: ")
                     for line in err.decode(errors="replace").splitlines() if line.strip()]
            raise SlurmError(f"{argv[0]}: {'; '.join(lines)[-MAX_ERROR:] or 'failed'}")
        return out.decode(errors="replace")

    async def submit(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
        """Submit a job (``argv`` from :func:`sbatch_argv`); its id. ``env``:
        sbatch's environment, which the job gets (--export=ALL); default:
        the client's."""
        return parse_job_id(await self.run(*argv, env=env))

    async def jobs(self, job_ids: Iterable[str]) -> dict[str, Job]:
        """The jobs' states, by one squeue for all of them. A job squeue
        doesn't list (ended and forgotten) is GONE."""
        ids = list(dict.fromkeys(str(i) for i in job_ids))
        if not ids:
            return {}
        try:
            out = await self.run("squeue", "--noheader", f"--jobs={','.join(ids)}",
                                 "--format=%i|%T|%N|%r")
        except SlurmError as e:
            if "Invalid job id" not in str(e):
                raise
            # Slurm refuses an id it has forgotten when asked for it alone
            # (and, in some versions, when any of several is forgotten):
            # ask for the others one by one, then, rather than say all ended.
            if len(ids) == 1:
                return {ids[0]: Job(ids[0], JobState.GONE)}
            found: dict[str, Job] = {}
            for job_id in ids:
                found.update(await self.jobs([job_id]))
            return found
        found = {job.id: job for job in map(_parse_line, out.splitlines()) if job}
        return {i: found.get(i) or Job(i, JobState.GONE) for i in ids}

    async def job(self, job_id: str) -> Job:
        """One job's state (see :meth:`jobs`)."""
        return (await self.jobs([job_id]))[str(job_id)]

    async def cancel(self, job_id: str, *, signal: int | str | None = None,
                     batch_only: bool = False) -> None:
        """scancel: the job ends; or, with ``signal``, its processes (only its
        batch script's, with ``batch_only``) get that signal."""
        await self.run("scancel", *(["--batch"] if batch_only else []),
                       *([f"--signal={signal}"] if signal is not None else []), str(job_id))

    async def cancel_named(self, job_name: str, user: str) -> None:
        """Cancel ``user``'s jobs called ``job_name`` (one whose id we never
        learnt: its sbatch or srun was cut short)."""
        await self.run("scancel", f"--name={job_name}", f"--user={user}")

    async def associations(self, user: str) -> list[str]:
        """The accounts ``user`` may charge, from their Slurm associations
        (sacctmgr: needs slurmdbd), each once, in sacctmgr's order."""
        out = await self.run("sacctmgr", "--noheader", "--parsable2", "show", "assoc",
                             f"user={user}", "format=account")
        return list(dict.fromkeys(line.strip() for line in out.splitlines() if line.strip()))

    async def queue_place(self, job_id: str, partition: str = "") -> tuple[int, int] | None:
        """(place, of how many) of a pending job in the queue of pending jobs
        (of ``partition``), in Slurm's priority order; None if not there."""
        out = await self.run("squeue", "--noheader", "--states=PENDING", "--sort=-p,i",
                             "--format=%i", *([f"--partition={partition}"] if partition else []))
        queue = out.split()
        if str(job_id) not in queue:
            return None
        return queue.index(str(job_id)) + 1, len(queue)


def _parse_line(line: str) -> Job | None:
    """A Job from squeue's "%i|%T|%N|%r" line (None for a blank one)."""
    if not line.strip():
        return None
    job_id, _, rest = line.strip().partition("|")
    state, _, rest = rest.partition("|")
    node, _, reason = rest.partition("|")
    return Job(job_id, JobState.of(state), state, node,
               "" if reason in ("None", "(null)") else reason)

