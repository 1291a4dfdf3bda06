"""What Slurm's words about a job mean, said to its user.

One vocabulary for every place a user reads about their jobs (the spawn
page, the notebook, JupyterLab's status bar, the hub's page): why a job
waits (squeue's reason, translated), where it stands in the queue and when
Slurm expects it to start, how long it has left, and why it ended. Pure
functions of :class:`chspawner.slurm.Job` and plain values: nothing here
asks Slurm.

Stdlib only, and nothing of the project but chspawner.slurm.
"""
from __future__ import annotations

import pwd
import time

from chspawner.slurm import Job

#: squeue's pending reasons (squeue(1), "JOB REASON CODES"), said plainly.
#: The reasons of a limit (QOS..., Assoc...) are matched by prefix below.
PENDING_REASONS = {
    "Priority": "jobs of higher priority are ahead of it in the queue",
    "Resources": "the nodes it needs are busy with other jobs",
    "Dependency": "it waits for a job it depends on to end",
    "DependencyNeverSatisfied": "a job it depends on failed, so it can never start: "
                                "stop it and start again",
    "JobHeldUser": "it is held (by its owner): 'scontrol release JOBID' lets it run",
    "JobHeldAdmin": "an administrator holds it",
    "BeginTime": "it asked not to start before a later time",
    "Reservation": "it waits for its reservation to begin",
    "ReservationNotAvail": "its reservation is not available",
    "ReqNodeNotAvail": "nodes it needs are not available (down, drained or reserved)",
    "NodeDown": "a node it needs is down",
    "PartitionDown": "its partition is down",
    "PartitionInactive": "its partition does not take jobs now",
    "PartitionTimeLimit": "its time limit is longer than its partition allows, so it "
                          "can never start",
    "PartitionNodeLimit": "it asks for more nodes than its partition allows",
    "Licenses": "it waits for a license",
    "BadConstraints": "no node has the features it asks for",
    "InvalidAccount": "its account is not valid",
    "InvalidQOS": "its QOS is not valid",
    "launch failed requeued held": "it failed to start and is held; ask an administrator",
    "JobArrayTaskLimit": "other tasks of its array run",
    "Cleaning": "Slurm is still cleaning up after an earlier run of it",
    "Prolog": "its node runs the prologue",
    "Configuring": "its nodes are being set up",
    "BurstBufferResources": "it waits for burst buffer space",
    "FrontEndDown": "Slurm's front end is down",
    "SchedDefer": "Slurm has yet to consider it",
    "None": "Slurm has yet to consider it",
    "": "Slurm has yet to consider it",
}

#: How a job ended (Slurm's state), said plainly: "... {because}".
ENDINGS = {
    "TIMEOUT": "it reached its time limit",
    "OUT_OF_MEMORY": "it used more memory than its job asked for, and was killed",
    "NODE_FAIL": "its node failed",
    "PREEMPTED": "it was preempted by a job of higher priority",
    "BOOT_FAIL": "its node failed to boot",
    "DEADLINE": "it reached its deadline",
    "FAILED": "its program ended with an error",
    "COMPLETED": "its program ended",
    "REVOKED": "it was revoked (it runs on another cluster of the federation)",
}


def pending_words(reason: str) -> str:
    """Why a pending job waits, from squeue's reason ("Priority",
    "QOSMaxJobsPerUserLimit"...): a phrase, with Slurm's word after it."""
    # (Some reasons carry details: "ReqNodeNotAvail, UnavailableNodes:n1".)
    key = reason.split(",")[0].strip()
    if key.startswith("Nodes required for job"):  # (22.05's long form of it)
        key = "ReqNodeNotAvail"
    words = PENDING_REASONS.get(key)
    if words is None:
        if key.startswith("QOS"):
            words = "a limit of its QOS is reached"
        elif key.startswith("Assoc"):
            words = "a limit of its account is reached"
        elif key.startswith("MaxJobs") or key.startswith("MaxSubmit"):
            words = "you have as many jobs as you may"
        else:
            words = "Slurm holds it back"
    return f"{words} ({reason})" if reason and reason != "None" else words


def when(epoch: float, now: float | None = None) -> str:
    """A time soon, as the user's clock shows it: "14:05", or with its
    date when not today."""
    now = time.time() if now is None else now
    t, today = time.localtime(epoch), time.localtime(now)
    if t[:3] == today[:3]:
        return time.strftime("%H:%M", t)
    return time.strftime("%a %d %b %H:%M", t)


def duration(seconds: float) -> str:
    """"2 h 05 min", "14 min", "40 s"."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min"
    return f"{secs} s"


def waiting_words(job: Job, place: tuple[int, int] | None = None,
                  now: float | None = None) -> str:
    """A pending job, in one line: why it waits, its place in the queue,
    when Slurm expects it to start (if Slurm has worked that out)."""
    now = time.time() if now is None else now
    parts = [f"job {job.id} waits: {pending_words(job.reason)}"]
    if place:
        parts.append(f"place {place[0]} of {place[1]} in the queue")
    if job.start_time is not None and job.start_time > now:
        parts.append(f"Slurm expects it to start at {when(job.start_time, now)} "
                     f"(in {duration(job.start_time - now)})")
    return "; ".join(parts)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"user {uid}"


def ended_words(job: Job | None, owner_uid: int | None = None) -> str:
    """Why a job ended: "it reached its time limit (TIMEOUT)"; a cancelled
    one says by whom (you, or an administrator) where Slurm's accounting
    knows."""
    if job is None or not job.slurm_state:
        return "Slurm no longer knows the job (it ended a while ago)"
    word = job.slurm_state.split(" ")[0].rstrip("+").upper()
    if word == "CANCELLED":
        if job.cancelled_by is None:
            return "it was cancelled (CANCELLED)"
        if owner_uid is not None and job.cancelled_by == owner_uid:
            return "it was cancelled by you (CANCELLED)"
        who = "root" if job.cancelled_by == 0 else user_name(job.cancelled_by)
        return f"it was cancelled by an administrator, {who} (CANCELLED)"
    words = ENDINGS.get(word)
    return f"{words} ({word})" if words else f"it ended ({word})"


def time_left_words(end_time: float, now: float | None = None) -> str:
    """"1 h 05 min left (until 14:05)"."""
    now = time.time() if now is None else now
    return f"{duration(end_time - now)} left (until {when(end_time, now)})"


#: CHSPAWNER_AT_WALLTIME's value (set by the spawner) when the session is
#: moved to a new job before its server's job reaches its time limit.
AT_WALLTIME_MOVE = "move"


def server_end_words(at_walltime: str = "") -> str:
    """What the end of the server's job means to its user, by what the
    spawner does then (``at_walltime``: CHSPAWNER_AT_WALLTIME)."""
    if at_walltime.strip().lower() == AT_WALLTIME_MOVE:
        return "your session moves to a new job before then: nothing to do"
    return "your server stops then: save your work"


def kernel_end_words(moves_before: bool = False) -> str:
    """What the end of a kernel's own job means to its user: the kernel is
    started again in a new job, without its state; or (``moves_before``:
    its session is recorded and kernels move before their limit, see
    chspawner.persist.kernel_state) it moves first, its variables with it."""
    if moves_before:
        return "the kernel moves to a new job before then, its variables with it"
    return "the kernel restarts in a new job then: its variables are lost"


#: What a cancelled job's words add when Slurm did not say who cancelled it:
#: only its accounting (slurmdbd) records that, and a site may keep none.
CANCELLER_UNKNOWN = ("by whom is not known here: only Slurm's accounting (slurmdbd) "
                     "records that")


def job_ended_words(job: Job | None, job_id: str = "", node: str = "",
                    owner_uid: int | None = None) -> str:
    """A job that ended, in one clause: "job 1234 on node n2 ended: it
    reached its time limit (TIMEOUT)"; a cancelled one says by whom, or
    that it is not known. ``job_id`` and ``node`` stand in for what the
    job (None: Slurm has forgotten it) doesn't say."""
    job_id = (job.id if job is not None else "") or job_id
    node = (job.node if job is not None else "") or node
    what = " ".join(filter(None, ("job", job_id, f"on node {node}" if node else "")))
    because = ended_words(job, owner_uid)
    word = job.slurm_state.split(" ")[0].rstrip("+").upper() if job is not None else ""
    if word == "CANCELLED" and job.cancelled_by is None:
        because = f"{because}; {CANCELLER_UNKNOWN}"
    elif word == "COMPLETING" and job.reason:
        # (Slurm still tidies up after it: its final word is yet to come,
        # its reason says why it ends: TimeLimit, OutOfMemory, NodeDown...)
        because = f"it is ending ({word}, {job.reason})"
    return f"{what} ended: {because}"


def ended_on_purpose(job: Job | None) -> bool:
    """Whether someone ended the job on purpose (scancel: CANCELLED), as
    opposed to Slurm ending it (a limit, a node, a preemption) or its
    program ending."""
    return job is not None and \
        job.slurm_state.split(" ")[0].rstrip("+").upper() == "CANCELLED"


def job_ending(job: Job | None) -> bool:
    """Whether Slurm is still ending the job (COMPLETING, STAGE_OUT): its
    final state, which says why it ended, is yet to come."""
    return job is not None and \
        job.slurm_state.split(" ")[0].rstrip("+").upper() in ("COMPLETING", "STAGE_OUT")


def brief_waiting_words(job: Job, place: tuple[int, int] | None = None,
                        now: float | None = None) -> str:
    """:func:`waiting_words` without Slurm's own word for the reason (which
    may be a long sentence of its own): for where room is short, such as
    a notification, with the full words a click away."""
    words = waiting_words(job, place, now)
    if job.reason and job.reason != "None":
        words = words.replace(f" ({job.reason})", "", 1)
    return words
