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
  squeue answers for many jobs;
* :class:`JobWatch` (one per process, event loop and Slurm identity:
  :func:`shared_watch`): everyone in the process who follows a job asks
  it, and it asks Slurm once per interval for all of them (one batched
  squeue; sacct, where slurmdbd is, for why a forgotten job ended); a
  failing query is waited out, never read as "job gone". Its numbers:
  :func:`watch_stats`;
* :class:`JobTable`: a watch's rounds shared through a directory, so that
  the single-user servers' watches of their kernel jobs read the hub's
  answers (the whole hub: one squeue per interval).

Stdlib only, and nothing else of the project: the layer rules keep this
module at the bottom.
"""
from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import shlex
import socket
import stat
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

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
    #: When it started, or (pending) when Slurm expects it to (squeue
    #: --start's figure, from the backfill scheduler); None: not known.
    start_time: float | None = None
    #: When its time limit ends it (running), epoch seconds; None: not known.
    end_time: float | None = None
    #: Who cancelled it, a user ID (sacct's "CANCELLED by UID"); None: not
    #: cancelled, or not known.
    cancelled_by: int | None = None

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

    async def run(self, *argv: str, env: Mapping[str, str] | None = None,
                  timeout: float | None = None) -> str:
        """Run a Slurm client command; its stdout, or SlurmError with the end
        of its stderr, in one line. ``timeout``: seconds after which the
        command is killed and SlurmError raised (a slurmctld that accepts
        connections but doesn't answer holds squeue far longer)."""
        if env is None:
            env = self.env if self.env is not None else job_environment()
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=dict(env), preexec_fn=self.preexec_fn)
        except OSError as e:
            raise SlurmError(f"{argv[0]}: {e.strerror}") from None
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
            raise SlurmError(f"{argv[0]}: no answer within {timeout:g} s") from None
        except asyncio.CancelledError:
            process.kill()  # (not left behind by a caller that gave up)
            raise
        if process.returncode != 0:
            # One line: Slurm's clients say "sbatch: error: ..." on several.
            lines = [line.strip().removeprefix(f"{argv[0]}: ")
                     for line in err.decode(errors="replace").splitlines() if line.strip()]
            raise SlurmError(f"{argv[0]}: {'; '.join(lines)[-MAX_ERROR:] or 'failed'}")
        return out.decode(errors="replace")

    def times_env(self) -> dict[str, str]:
        """The commands' environment, with times printed as epoch seconds
        (SLURM_TIME_FORMAT=%s): no time zone to guess."""
        env = self.env if self.env is not None else job_environment()
        return {**env, "SLURM_TIME_FORMAT": "%s"}

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
                                 SQUEUE_FORMAT, env=self.times_env())
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
    """A Job from squeue's "%i|%T|%N|%r|%S|%e" line (None for a blank one;
    a stand-in's "%i|%T|%N|%r" line gives no times)."""
    if not line.strip():
        return None
    job_id, state, node, reason, start, end = (line.strip().split("|", 5) + [""] * 5)[:6]
    return Job(job_id, JobState.of(state), state, node,
               "" if reason in ("None", "(null)") else reason,
               parse_time(start), parse_time(end))


def parse_time(text: str) -> float | None:
    """A time squeue printed: epoch seconds (SLURM_TIME_FORMAT=%s), or its
    standard form (2026-12-05T14:00:00, local time: a site's stand-in may
    not honour the variable); None for N/A, Unknown, NONE or nothing."""
    text = text.strip()
    if text.isdigit():
        return float(text)
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None


def cancelled_by(state: str) -> int | None:
    """The user ID in sacct's "CANCELLED by 1001"; None otherwise."""
    word, _, rest = state.strip().partition(" by ")
    return int(rest) if word.startswith("CANCELLED") and rest.strip().isdigit() else None



# ------------------------------------------------------------ the watch --

#: squeue's fields for a job, in :func:`_parse_line`'s order: id, state,
#: node, reason, start (expected, when pending), end (its time limit's).
SQUEUE_FORMAT = "--format=%i|%T|%N|%r|%S|%e"
#: Seconds between the watch's rounds, unless its owner says otherwise.
DEFAULT_INTERVAL = 1.0
#: Seconds one query may take before it counts as failed (and is killed).
DEFAULT_QUERY_TIMEOUT = 30.0
#: Seconds a job nobody asks about stays in the watch's table.
FORGET_AFTER = 600.0
#: A published table is fresh for this many intervals; a follower that
#: found it stale asks Slurm itself for this many more.
TABLE_FRESH_ROUNDS = 3
TABLE_SKIP_ROUNDS = 10
#: A follower's list of jobs counts for this many intervals after it was written.
FOLLOW_FRESH_ROUNDS = 10
#: The most a follower's list (bytes) and all lists (jobs) are read of.
MAX_FOLLOW_FILE = 64 * 1024
MAX_FOLLOWED = 100_000

log = logging.getLogger("chspawner.slurm")


@dataclass
class WatchStats:
    """A watch's numbers since it was made (for benchmarks and metrics)."""

    queries: int = 0            # squeue rounds run (each one squeue for all jobs asked)
    failures: int = 0           # of them, failed (Slurm unreachable, timed out, ...)
    latency_total: float = 0.0  # seconds, all rounds' squeue together
    latency_last: float = 0.0
    latency_max: float = 0.0
    jobs_last: int = 0          # jobs asked about in the last round
    jobs_max: int = 0           # the most in one round
    sacct_queries: int = 0      # sacct calls for jobs squeue no longer lists
    queue_queries: int = 0      # listings of the pending queue (queue places)
    outages: int = 0            # times Slurm stopped answering

    @property
    def latency_mean(self) -> float:
        return self.latency_total / self.queries if self.queries else 0.0


class JobWatch:
    """Follows Slurm jobs for everyone in a process with one query per
    interval: each caller awaits :meth:`job`, and every ``interval`` s the
    watch runs ONE ``squeue --jobs=ALL,ASKED,IDS`` (by job id: the answer is
    as long as what is followed, not as the cluster's queue, and it covers
    any user's jobs without naming conventions) and hands each caller its
    job's state. A caller arriving between rounds waits for the next one
    (or, with ``max_age``, takes the last state if that is fresh enough);
    after a quiet spell the next round starts at once.

    ``--states=all``: a job that ended recently (Slurm's MinJobAge) is
    listed with Slurm's word for how (TIMEOUT, NODE_FAIL...). A job squeue
    no longer lists is GONE; where Slurm keeps accounting (slurmdbd), one
    ``sacct`` for all such jobs of the round says how they ended. Without
    slurmdbd sacct says so once, and is not asked again.

    A failing query (slurmctld down, a timeout) is waited out: callers get
    the last state seen (never "gone" because Slurm didn't answer); one
    with none yet gets SlurmError. It is logged once per outage, and once
    when Slurm answers again. Nobody waiting: no queries (the round task
    ends)."""

    def __init__(self, client: SlurmClient, *, interval: float = DEFAULT_INTERVAL,
                 command: Sequence[str] = ("squeue",), sacct: Sequence[str] | None = ("sacct",),
                 query_timeout: float = DEFAULT_QUERY_TIMEOUT,
                 logger: logging.Logger | logging.LoggerAdapter | None = None,
                 table_dir: str = "", publish: bool = False):
        self.client = client
        self.interval = interval
        #: A directory shared with other processes (see JobTable): with
        #: ``publish``, each round's states are written there, for the jobs
        #: asked here and those followers list there; without, this watch
        #: reads them there first (a follower).
        self.table = JobTable(table_dir, self) if table_dir else None
        self.publish = publish
        self._table_skip_until = 0.0
        self.command = list(command)  # squeue, or a site's stand-in taking its arguments
        self.sacct = list(sacct) if sacct else None
        self.query_timeout = query_timeout
        self.log = logger or log
        self.stats = WatchStats()
        #: The error of the outage under way (None: Slurm answers).
        self.error: str | None = None
        self.outage_since: float | None = None
        self._failed_in_outage = 0
        self._known: dict[str, Job] = {}       # the last state seen, by job id
        self._seen: dict[str, float] = {}      # when (monotonic) it was seen
        self._asked: dict[str, float] = {}     # when someone last asked about it
        self._waiting: dict[str, list[asyncio.Future]] = {}
        self._task: asyncio.Task | None = None
        self._last_round = float("-inf")
        self._queue: tuple[float, dict[str, list[str]]] | None = None  # (when, by partition)
        self._queue_lock: asyncio.Lock | None = None

    # ------------------------------------------------------- asking --

    async def job(self, job_id: str, *, max_age: float = 0.0) -> Job:
        """The job as the next round (or, with ``max_age``, the last one up
        to that many seconds old) saw it. A round that failed gives the
        last state seen; SlurmError if there is none yet."""
        job_id = str(job_id)
        now = time.monotonic()
        self._asked[job_id] = now
        if max_age > 0 and job_id in self._known and now - self._seen[job_id] <= max_age:
            return self._known[job_id]
        if self.table is not None and not self.publish and now >= self._table_skip_until:
            job = await self.table.read(job_id, max_age)
            if job is not None:
                self._known[job_id], self._seen[job_id] = job, time.monotonic()
                return job
            # Nobody publishes (or not our job, yet): ask Slurm here a while.
            self._table_skip_until = time.monotonic() + TABLE_SKIP_ROUNDS * self.interval
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(job_id, []).append(future)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._rounds())
        try:
            return await future
        finally:
            waiters = self._waiting.get(job_id)
            if waiters and future in waiters:  # (given up on before its round)
                waiters.remove(future)
                if not waiters:
                    del self._waiting[job_id]

    def last(self, job_id: str) -> Job | None:
        """The last state seen of the job, asking nobody (None: never seen)."""
        return self._known.get(str(job_id))

    async def queue_place(self, job_id: str, partition: str = "") -> tuple[int, int] | None:
        """(place, of how many) of a pending job in the queue of pending jobs
        (of ``partition``), in Slurm's priority order; None if not there.
        One listing of the pending queue serves every caller for an
        interval. SlurmError if Slurm can't say."""
        if self._queue_lock is None:
            self._queue_lock = asyncio.Lock()
        async with self._queue_lock:
            if self._queue is None or time.monotonic() - self._queue[0] > self.interval:
                self.stats.queue_queries += 1
                out = await self.client.run(
                    *self.command, "--noheader", "--states=PENDING", "--sort=-p,i",
                    "--format=%i|%P", timeout=self.query_timeout)
                queues: dict[str, list[str]] = {"": []}
                for line in out.split():
                    job, _, partitions = line.partition("|")
                    queues[""].append(job)
                    for name in partitions.split(","):  # (a job may ask for several)
                        queues.setdefault(name, []).append(job)
                self._queue = (time.monotonic(), queues)
        queue = self._queue[1].get(partition, [])
        if str(job_id) not in queue:
            return None
        return queue.index(str(job_id)) + 1, len(queue)

    @property
    def watching(self) -> bool:
        """Whether a round is due or under way (someone waits)."""
        return self._task is not None and not self._task.done()

    def close(self) -> None:
        """Stop: the rounds end, and the waiting callers' awaits are cancelled."""
        if self._task is not None:
            self._task.cancel()
        for waiters in self._waiting.values():
            for waiter in waiters:
                waiter.cancel()
        self._waiting = {}

    # ------------------------------------------------------- rounds --

    async def _rounds(self) -> None:
        """One round per interval while anyone waits (here, or, publishing,
        a follower), then end."""
        while True:
            followed = self.table.followed() if self.table and self.publish else []
            if not self._waiting and not followed:
                break
            delay = self._last_round + self.interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            batch, self._waiting = self._waiting, {}
            batch = {job_id: waiters for job_id, waiters in batch.items()
                     if any(not w.done() for w in waiters)}
            for job_id in followed:
                batch.setdefault(job_id, [])
            if not batch:
                continue
            self._last_round = time.monotonic()
            await self._round(batch)
        self._forget()
        self._task = None  # (a done task would keep its event loop alive)

    async def _round(self, batch: dict[str, list[asyncio.Future]]) -> None:
        ids = list(batch)
        self.stats.jobs_last = len(ids)
        self.stats.jobs_max = max(self.stats.jobs_max, len(ids))
        asked_at = time.time()  # (what a published table says it is as of)
        try:
            try:
                jobs = await self._query(ids)
            except (OSError, ValueError, UnicodeError) as e:  # (a stand-in's odd answer)
                raise SlurmError(f"{self.command[0]}: {e}") from None
        except SlurmError as e:
            self._failed(e)
            for job_id, waiters in batch.items():
                known = self._known.get(job_id)
                for waiter in waiters:
                    if waiter.done():
                        continue
                    if known is None:
                        waiter.set_exception(SlurmError(str(e)))
                    else:
                        waiter.set_result(known)
            return
        self._answered()
        now = time.monotonic()
        for job_id, waiters in batch.items():
            job = jobs[job_id]
            self._known[job_id], self._seen[job_id] = job, now
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(job)
        if self.table is not None and self.publish:
            self.table.publish(jobs, asked_at)

    async def _query(self, ids: list[str]) -> dict[str, Job]:
        """The jobs' states: one squeue; sacct for the ones it doesn't list."""
        started = time.monotonic()
        self.stats.queries += 1
        try:
            found = await self._squeue(ids)
        except SlurmError:
            self.stats.failures += 1
            raise
        finally:
            took = time.monotonic() - started
            self.stats.latency_last = took
            self.stats.latency_total += took
            self.stats.latency_max = max(self.stats.latency_max, took)
        missing = [i for i in ids if i not in found]
        # A job already seen gone is not asked about again.
        for job_id in missing:
            known = self._known.get(job_id)
            if known is not None and not known.alive:
                found[job_id] = known
        missing = [i for i in missing if i not in found]
        # Who cancelled a job squeue still lists as CANCELLED only Slurm's
        # accounting knows (sacct's "CANCELLED by UID"): asked once, in the
        # same sacct as the missing ones, on the round it is first seen
        # cancelled (Slurm has recorded it by then: squeue says COMPLETING
        # first); later rounds keep what that said.
        cancelled = []
        for job_id, job in found.items():
            if job_id in missing or not job.slurm_state.upper().startswith("CANCELLED"):
                continue
            known = self._known.get(job_id)
            if known is not None and not known.alive and known.slurm_state == job.slurm_state:
                found[job_id] = replace(job, cancelled_by=known.cancelled_by)
            else:
                cancelled.append(job_id)
        if missing or cancelled:
            told = await self._sacct(missing + cancelled)
            found.update({i: told[i] for i in missing if i in told})
            for job_id in cancelled:
                if job_id in told:
                    found[job_id] = replace(found[job_id], cancelled_by=told[job_id].cancelled_by)
        return {i: found.get(i) or Job(i, JobState.GONE) for i in ids}

    async def _squeue(self, ids: list[str]) -> dict[str, Job]:
        """squeue's jobs among ``ids`` (those it lists, by id)."""
        try:
            out = await self.client.run(
                *self.command, "--noheader", "--states=all", f"--jobs={','.join(ids)}",
                SQUEUE_FORMAT, timeout=self.query_timeout, env=self.client.times_env())
        except SlurmError as e:
            if "Invalid job id" not in str(e):
                raise
            # squeue refuses an id it has forgotten asked for alone (and,
            # in some versions, a list holding one): halve the list rather
            # than ask for each job on its own (or say all ended).
            if len(ids) == 1:
                return {}
            half = len(ids) // 2
            return {**await self._squeue(ids[:half]), **await self._squeue(ids[half:])}
        # (squeue may list a job's array tasks or other jobs: only ours count)
        wanted = set(ids)
        return {job.id: job for job in map(_parse_line, out.splitlines())
                if job and job.id in wanted}

    async def _sacct(self, ids: list[str]) -> dict[str, Job]:
        """How the jobs squeue no longer lists ended (and who cancelled a
        cancelled one), where Slurm keeps accounting; {} where it doesn't
        (asked once) or can't say now."""
        if not self.sacct:
            return {}
        self.stats.sacct_queries += 1
        try:
            out = await self.client.run(
                *self.sacct, "--noheader", "--parsable2", "--allocations",
                f"--jobs={','.join(ids)}", "--format=JobID,State", timeout=self.query_timeout)
        except SlurmError as e:
            if "accounting storage is disabled" in str(e) or "No such file" in str(e):
                self.log.info("chspawner: no Slurm accounting here (%s): a job squeue "
                              "has forgotten counts as gone, without why", e)
                self.sacct = None
            return {}
        jobs = {}
        for line in out.splitlines():
            job_id, _, state = line.strip().partition("|")
            if job_id in ids and state:
                word = state.split(" ")[0]
                jobs[job_id] = Job(job_id, JobState.of(word), word,
                                   cancelled_by=cancelled_by(state))
        return jobs

    def _failed(self, error: SlurmError) -> None:
        self._failed_in_outage += 1
        if self.error is None:
            self.error, self.outage_since = str(error), time.monotonic()
            self.stats.outages += 1
            self.log.warning("chspawner: Slurm does not answer (%s): every job keeps its "
                             "last known state until it does", error)

    def _answered(self) -> None:
        if self.error is not None:
            self.log.info("chspawner: Slurm answers again, after %.1f s and %d failed "
                          "queries", time.monotonic() - (self.outage_since or 0.0),
                          self._failed_in_outage)
        self.error = self.outage_since = None
        self._failed_in_outage = 0

    def _forget(self) -> None:
        """Drop what nobody asked about for FORGET_AFTER s."""
        horizon = time.monotonic() - max(FORGET_AFTER, 10 * self.interval)
        for job_id in [i for i, asked in self._asked.items() if asked < horizon]:
            for table in (self._asked, self._known, self._seen):
                table.pop(job_id, None)


class JobTable:
    """A watch's results shared through a directory that the hub and the
    single-user servers see (a shared file system; the admin's, mode 1777
    like /tmp, as every user's server writes there):

    - ``jobs.json``: the publishing watch (the hub's) writes each round's
      states there: ``{"written": EPOCH_ASKED, "jobs": {ID: [STATE, NODE,
      REASON]}, "stats": its WatchStats}``, readable by all (as squeue's
      answer would be);
    - ``follow/UID-HOST-PID``: each follower (a server's watch of its
      kernels' jobs) lists the jobs it follows, one id a line; the hub adds
      them to its rounds while the list is fresh.

    So the whole hub, kernels included, is one squeue per interval. The
    directory itself should be writable by the hub's user alone (only
    ``follow/`` is everyone's); files are written without following links. A
    follower that finds the table stale (no hub publishing, or not yet its
    job) asks Slurm itself, as a watch without a table does. The hub reads
    followers' lists warily: regular files only (no link followed, no FIFO
    waited on), fresh ones, the first 64 KiB, job ids only (digits)."""

    def __init__(self, directory: str, watch: JobWatch):
        self.dir = directory
        self.watch = watch
        self._listed: tuple[str, ...] = ()   # what our follow file says
        self._listed_at = float("-inf")
        self._cache: tuple[float, dict] = (0.0, {})  # (jobs.json's mtime, its content)
        self._made = False
        self._failing = False

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "jobs.json")

    # ---------------------------------------------------- the hub --

    def publish(self, jobs: Mapping[str, Job], asked_at: float) -> None:
        """Write the round's states, as of ``asked_at`` (when Slurm was asked)."""
        table = {"written": asked_at,
                 "jobs": {i: [j.slurm_state, j.node, j.reason, j.start_time, j.end_time,
                              j.cancelled_by] for i, j in jobs.items()},
                 # (the hub's numbers, for a benchmark or a monitor outside it)
                 "stats": {**asdict(self.watch.stats),
                           "latency_mean": self.watch.stats.latency_mean}}
        tmp = os.path.join(self.dir, f".jobs.json.{os.getpid()}")
        try:
            if not self._made:  # (where every user's server lists its jobs)
                folder = os.path.join(self.dir, "follow")
                os.makedirs(self.dir, mode=0o755, exist_ok=True)
                os.makedirs(folder, exist_ok=True)
                if os.stat(folder).st_uid == os.getuid():
                    os.chmod(folder, 0o1777)
                self._made = True
            with _new_file(tmp, 0o644) as f:
                json.dump(table, f)
            os.replace(tmp, self.path)
        except OSError as e:
            if not self._failing:  # (once, not every round)
                self.watch.log.warning("chspawner: can't publish Slurm job states to %s: "
                                       "%s", self.dir, e)
            self._failing = True
            return
        self._failing = False

    def followed(self) -> list[str]:
        """The job ids of the fresh follow lists."""
        horizon = time.time() - FOLLOW_FRESH_ROUNDS * self.watch.interval
        ids: dict[str, None] = {}
        try:
            entries = list(os.scandir(os.path.join(self.dir, "follow")))
        except OSError:
            return []
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode) or info.st_mtime < horizon:
                    continue
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        continue
                    text = os.read(fd, MAX_FOLLOW_FILE).decode("ascii", "replace")
                finally:
                    os.close(fd)
            except OSError:
                continue
            for word in text.split():
                if word.isdigit() and len(word) < 20 and word.isascii():
                    ids[word] = None
            if len(ids) >= MAX_FOLLOWED:
                break
        return list(ids)[:MAX_FOLLOWED]

    # --------------------------------------------------- followers --

    async def read(self, job_id: str, max_age: float) -> Job | None:
        """The job from a table written after now - ``max_age`` (0: after
        now), waiting for it up to TABLE_FRESH_ROUNDS intervals; None if
        none comes (nobody publishes, or the hub hasn't listed it yet)."""
        self._follow(job_id)
        interval = self.watch.interval
        since = time.time() - max_age
        deadline = time.monotonic() + TABLE_FRESH_ROUNDS * interval
        while True:
            table = self._load()
            if table.get("written", 0) >= since and job_id in table.get("jobs", {}):
                state, node, reason, start, end, by = \
                    (list(table["jobs"][job_id]) + ["", "", "", None, None, None])[:6]
                return Job(job_id, JobState.of(state), state, node, reason,
                           _number(start), _number(end), by if isinstance(by, int) else None)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(interval / 4)  # (a file: nothing signals its rewrite)

    def _load(self) -> dict:
        try:
            mtime = os.stat(self.path).st_mtime
            if mtime != self._cache[0]:
                with open(self.path) as f:
                    table = json.load(f)
                self._cache = (mtime, table if isinstance(table, dict) else {})
        except (OSError, ValueError):
            return {}
        return self._cache[1]

    def _follow(self, job_id: str) -> None:
        """List the jobs this process follows (asked about lately), for the
        hub: rewritten when they change, and kept fresh."""
        horizon = time.monotonic() - FOLLOW_FRESH_ROUNDS * self.watch.interval
        ids = tuple(sorted({job_id, *(i for i, asked in self.watch._asked.items()
                                      if asked >= horizon)}))
        if ids == self._listed and \
                time.monotonic() - self._listed_at < FOLLOW_FRESH_ROUNDS / 2 * self.watch.interval:
            return
        folder = os.path.join(self.dir, "follow")
        name = os.path.join(folder, f"{os.getuid()}-{socket.gethostname()}-{os.getpid()}")
        try:
            os.makedirs(folder, exist_ok=True)
            with _new_file(name + ".tmp", 0o644) as f:
                f.write("".join(i + "\n" for i in ids))
            os.replace(name + ".tmp", name)
        except OSError as e:
            self.watch.log.debug("chspawner: can't list followed jobs in %s: %s", folder, e)
            return
        self._listed, self._listed_at = ids, time.monotonic()


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _new_file(path: str, mode: int):
    """``path`` opened for writing as a new file of ours: never through a
    link someone left there (a shared directory), an old one replaced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        os.unlink(path)  # (ours from before; another's, in a sticky folder: refused)
        fd = os.open(path, flags, mode)
    os.fchmod(fd, mode)  # (not the umask's)
    return os.fdopen(fd, "w")


# One watch per event loop and Slurm identity (its command's environment):
# everyone in the process who follows jobs that way shares it.
_watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, JobWatch]] = \
    weakref.WeakKeyDictionary()
#: Every watch made in this process (for watch_stats), by id.
_all_watches: weakref.WeakSet[JobWatch] = weakref.WeakSet()


def shared_watch(env: Mapping[str, str] | None = None, *,
                 interval: float = DEFAULT_INTERVAL, command: Sequence[str] = ("squeue",),
                 sacct: Sequence[str] | None = ("sacct",),
                 query_timeout: float = DEFAULT_QUERY_TIMEOUT,
                 logger: logging.Logger | logging.LoggerAdapter | None = None,
                 table_dir: str = "", publish: bool = False) -> JobWatch:
    """This event loop's watch for Slurm commands run, as this process's
    user, with ``env`` (default: :func:`job_environment`) and ``command``
    (and ``table_dir``, as publisher or follower: see JobTable); made on
    first use. ``interval`` and ``query_timeout``: the latest caller's (one
    setting of the admin's)."""
    env = dict(env) if env is not None else job_environment()
    key = (tuple(sorted(env.items())), tuple(command), tuple(sacct or ()), table_dir, publish)
    watches = _watches.setdefault(asyncio.get_running_loop(), {})
    watch = watches.get(key)
    if watch is None:
        watch = watches[key] = JobWatch(SlurmClient(env=env), interval=interval,
                                        command=command, sacct=sacct,
                                        query_timeout=query_timeout, logger=logger,
                                        table_dir=table_dir, publish=publish)
        _all_watches.add(watch)
    watch.interval, watch.query_timeout = interval, query_timeout
    return watch


def watch_stats() -> dict[str, float]:
    """The numbers of every watch of this process, added up (latency_max:
    the most; latency_mean: over all queries); ``watches``: how many."""
    total = WatchStats()
    watches = list(_all_watches)
    for watch in watches:
        for name, value in asdict(watch.stats).items():
            if name in ("latency_max", "latency_last", "jobs_max", "jobs_last"):
                setattr(total, name, max(getattr(total, name), value))
            else:
                setattr(total, name, getattr(total, name) + value)
    return {**asdict(total), "latency_mean": total.latency_mean, "watches": len(watches)}
