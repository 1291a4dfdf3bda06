"""What the user's Slurm jobs mean for their session, for JupyterLab's page:
``GET {base_url}chspawner/api/session``.

A jupyter_server extension (the spawners load it on the single-user
server's command line in kernels mode, where JupyterLab has chspawner's
JupyterLab extension, which polls this) answering::

    {"now": 1767000000.0,                 # the server's clock, epoch seconds
     "warn_minutes": [15, 5],             # when the page warns, before an end
     "poll_seconds": 30,                  # how often the page asks
     "pending_poll_seconds": 5,           # ... while a kernel's job waits
     "server": {"job_id", "node", "state", "end_time", "time_left", "at_end"}
               or null (the server is not in a Slurm job),
     "notices": [{"id", "text"}],         # said once each (a page remembers ids)
     "kernels": [{"kernel_id", "job_id", "node", "state": "pending"|"running",
                  "waiting": words or null, "waiting_brief": the same without
                  Slurm's own word for the reason (for a notification),
                  "end_time", "time_left", "at_end"}]}

Every sentence comes from :mod:`chspawner.slurm_words`; the page only
counts down and formats minutes. Job states come through the watch the
server's kernel jobs use (one squeue per interval for all, or the hub's
job table), asked with a ``max_age``: a page's poll adds no query while a
recent round (or table) has the job.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web
from traitlets import Float, List, default, validate
from traitlets.config import Configurable

from chspawner.provisioner.container import kernel_job_watch
from chspawner.provisioner.launchers import kernel_jobs
from chspawner.provisioner.settings import ProvisionerSettings, SettingsError
from chspawner.slurm import Job, JobState, JobWatch, SlurmError
from chspawner.slurm_words import (brief_waiting_words, kernel_end_words, server_end_words,
                                   time_left_words, waiting_words)

log = logging.getLogger(__name__)

#: The path, under the server's base URL.
PATH = "chspawner/api/session"
#: The admin's warning times, in minutes, comma-separated (set by the spawner).
WARNINGS_ENV = "CHSPAWNER_WALLTIME_WARNINGS"
#: What happens at the server job's end ("move": the session moves first).
AT_WALLTIME_ENV = "CHSPAWNER_AT_WALLTIME"
DEFAULT_WARN_MINUTES = [15.0, 5.0]
#: Why the user's last server's job ended, in words (set by the spawner).
PREVIOUS_END_ENV = "CHSPAWNER_PREVIOUS_END"
#: The job this server took over from in a planned move ("job 12 on n1").
MOVED_FROM_ENV = "CHSPAWNER_MOVED_FROM"
#: jupyter_server's permission this needs: it names the server's kernels.
AUTH_RESOURCE = "kernels"


class SessionStatus(Configurable):
    """The settings of the session's status in JupyterLab (its time left,
    the warnings before its end, a waiting kernel's words)."""

    warn_minutes = List(
        Float(), DEFAULT_WARN_MINUTES,
        help="Minutes before the end of the server's job, and of each kernel's job, at "
             "which JupyterLab warns its user, saying what will happen then (once per "
             "job and time). Default: $CHSPAWNER_WALLTIME_WARNINGS (comma-separated "
             "minutes, set by the spawner), else 15 and 5.",
    ).tag(config=True)
    max_age = Float(
        30.0, help="Seconds a job's state may be old when a page asks: within that, "
                   "the watch's last round (or the hub's job table) answers, and a page's "
                   "poll costs no query of Slurm.",
    ).tag(config=True)
    poll_seconds = Float(
        30.0, help="Seconds between a page's asks (it counts down in between).",
    ).tag(config=True)
    pending_poll_seconds = Float(
        5.0, help="Seconds between a page's asks while a kernel's job waits in the queue.",
    ).tag(config=True)
    notice_seconds = Float(
        600.0, help="Seconds after the server's start during which its pages are told, "
                    "once each, why the last server's job ended or that the session moved "
                    "to this job (a page opened later is not).",
    ).tag(config=True)

    #: When the server started (epoch), for notice_seconds.
    started = 0.0

    @default("warn_minutes")
    def _default_warn_minutes(self) -> list[float]:
        return warn_minutes_from(os.environ.get(WARNINGS_ENV, ""))

    @validate("warn_minutes")
    def _valid_warn_minutes(self, proposal: Any) -> list[float]:
        # (the page warns for each, largest first)
        return sorted({m for m in proposal["value"] if m > 0}, reverse=True)


def warn_minutes_from(text: str) -> list[float]:
    """$CHSPAWNER_WALLTIME_WARNINGS ("15,5") read; the defaults when unset or
    not numbers (logged: an admin's typo should not go unnoticed)."""
    if not text.strip():
        return list(DEFAULT_WARN_MINUTES)
    try:
        minutes = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        log.warning("chspawner: %s=%r is not comma-separated minutes; warning at %s",
                    WARNINGS_ENV, text, DEFAULT_WARN_MINUTES)
        return list(DEFAULT_WARN_MINUTES)
    return sorted({m for m in minutes if m > 0}, reverse=True)


class Watch(Protocol):
    """What of :class:`chspawner.slurm.JobWatch` the model needs."""

    async def job(self, job_id: str, *, max_age: float = 0.0) -> Job: ...

    async def queue_place(self, job_id: str, partition: str = "") -> tuple[int, int] | None: ...


@dataclass(frozen=True)
class KernelJob:
    """A kernel's batch job, as the model needs it."""

    kernel_id: str
    job_id: str
    partition: str = ""  # the queue its place is counted in ("": the whole queue)
    watch: Watch | None = None  # the kernel's own (default: the server's)
    #: it moves to a new job before the limit, its session with it
    moves_before_end: bool = False


def notices(env: Mapping[str, str], job_id: str | None) -> list[dict[str, str]]:
    """What the spawner asked the page to say once (see PREVIOUS_END_ENV,
    MOVED_FROM_ENV), each with an id the page remembers it by."""
    said = []
    if env.get(PREVIOUS_END_ENV):
        said.append({"id": f"previous-end:{job_id}", "text": env[PREVIOUS_END_ENV]})
    if env.get(MOVED_FROM_ENV):
        said.append({"id": f"moved:{job_id}",
                     # (under JupyterLab's 140 characters for a notification)
                     "text": f"Your session moved before the time limit: now job {job_id} "
                             f"(was {env[MOVED_FROM_ENV]}). Kernels in jobs of their own "
                             "went on."})
    return said


def partition_of(sbatch_args: Sequence[str]) -> str:
    """The partition sbatch's options ask for (the last one given wins, as
    with sbatch); "" for the cluster's default."""
    partition = ""
    args = list(sbatch_args)
    for i, arg in enumerate(args):
        if arg.startswith("--partition="):
            partition = arg.partition("=")[2]
        elif arg in ("--partition", "-p") and i + 1 < len(args):
            partition = args[i + 1]
        elif arg.startswith("-p") and len(arg) > 2:
            partition = arg[2:]
    return partition


async def session_model(watch: Watch, *, server_job_id: str | None,
                        kernels: Sequence[KernelJob], warn_minutes: Sequence[float],
                        at_walltime: str = "", max_age: float = 30.0,
                        poll_seconds: float = 30.0, pending_poll_seconds: float = 5.0,
                        now: float | None = None) -> dict[str, Any]:
    """The endpoint's answer (see the module's docstring). Jobs Slurm no
    longer runs are left out; a job Slurm can't tell about (an outage with no
    state seen yet) is the server's "unknown", or a kernel left out."""
    now = time.time() if now is None else now

    async def server() -> dict[str, Any] | None:
        if not server_job_id:
            return None
        model: dict[str, Any] = {"job_id": server_job_id, "node": "", "state": "unknown",
                                 "end_time": None, "time_left": None,
                                 "at_end": server_end_words(at_walltime)}
        try:
            job = await watch.job(server_job_id, max_age=max_age)
        except SlurmError:
            return model
        return {**model, "node": job.node, "state": job.state.value,
                **_time_left(job, now)}

    async def kernel(entry: KernelJob) -> dict[str, Any] | None:
        its_watch = entry.watch or watch
        try:
            job = await its_watch.job(entry.job_id, max_age=max_age)
        except SlurmError:
            return None
        if job.state is JobState.GONE:
            return None  # (ended: its kernel's own notice says how)
        waiting = brief = None
        if job.state is JobState.PENDING:
            try:
                place = await its_watch.queue_place(entry.job_id, entry.partition)
            except SlurmError:
                place = None
            waiting = waiting_words(job, place, now)
            brief = brief_waiting_words(job, place, now)
        return {"kernel_id": entry.kernel_id, "job_id": entry.job_id, "node": job.node,
                "state": job.state.value, "waiting": waiting, "waiting_brief": brief,
                **_time_left(job, now), "at_end": kernel_end_words(entry.moves_before_end)}

    # Together: one round of the watch answers them all.
    answers = await asyncio.gather(server(), *(kernel(k) for k in kernels))
    return {"now": now, "warn_minutes": list(warn_minutes),
            "poll_seconds": poll_seconds, "pending_poll_seconds": pending_poll_seconds,
            "server": answers[0],
            "kernels": [k for k in answers[1:] if k is not None]}


def _time_left(job: Job, now: float) -> dict[str, Any]:
    """end_time and its words, for a running job whose limit Slurm knows."""
    if job.state is not JobState.RUNNING or job.end_time is None:
        return {"end_time": None, "time_left": None}
    return {"end_time": job.end_time, "time_left": time_left_words(job.end_time, now)}


def server_watch(provisioner_config: Mapping[str, Any] | None) -> JobWatch:
    """The watch the server's kernel jobs use (the spawner's Slurm settings
    in the image kernels' provisioner config), so that the server's own job
    is asked about in the same rounds, or read from the same hub table."""
    try:
        settings = ProvisionerSettings.from_config(provisioner_config)
    except SettingsError:
        settings = ProvisionerSettings()  # (the kernels' start says what is wrong)
    return kernel_job_watch(settings)


class SessionStatusHandler(APIHandler):
    """``GET {base_url}chspawner/api/session``."""

    auth_resource = AUTH_RESOURCE

    def initialize(self, status: SessionStatus) -> None:
        self.status = status

    @web.authenticated
    @authorized
    async def get(self) -> None:
        # (ContainerKernelSpecManager's: the spawner's Slurm settings; else none)
        watch = server_watch(getattr(self.kernel_spec_manager, "provisioner_config", None))
        sessions = getattr(self.kernel_manager, "kernel_sessions", None)
        kernels = [KernelJob(kernel_id, str(job.job_id), partition_of(job.sbatch_args),
                             job.job_watch(),
                             sessions is not None and sessions.moves_before_limit(kernel_id))
                   for kernel_id, job in sorted(kernel_jobs().items())]
        status = self.status
        model = await session_model(
            watch, server_job_id=os.environ.get("SLURM_JOB_ID") or None, kernels=kernels,
            warn_minutes=status.warn_minutes, at_walltime=os.environ.get(AT_WALLTIME_ENV, ""),
            max_age=status.max_age, poll_seconds=status.poll_seconds,
            pending_poll_seconds=status.pending_poll_seconds)
        young = time.time() - status.started < status.notice_seconds
        model["notices"] = notices(os.environ, model["server"] and model["server"]["job_id"]) \
            if young else []
        # Kernels' sessions restored or moved (chspawner.persist.kernel_state),
        # for as long after as the server's own notices.
        if sessions is not None:
            model["notices"] += sessions.recent_notices(status.notice_seconds)
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(model))


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "chspawner.persist.session_status"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Add the handler (jupyter_server calls this at start)."""
    status = SessionStatus(parent=serverapp)
    status.started = time.time()  # (notices are said in the server's first minutes)
    web_app = serverapp.web_app
    pattern = url_path_join(web_app.settings["base_url"], PATH)
    web_app.add_handlers(".*$", [(pattern, SessionStatusHandler, {"status": status})])
    serverapp.log.info("chspawner: the session's status at %s (warnings %s min before "
                       "a job's end)", pattern, status.warn_minutes)
