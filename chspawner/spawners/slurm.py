"""``SlurmChSpawner``: ChSpawner's server as a Slurm job on a compute node.

The same recipe as ChSpawner's ``start()``; the steps that differ for a
job are overridden here: ``reattach`` (a job from before a hub restart),
``launch`` (sbatch, built by chspawner.slurm.sbatch_argv) and
``wait_ready`` (follow the job until the user's own process answers on
its node). All Slurm commands go through chspawner.slurm.SlurmClient, run
as the user; except the queries of job states, which every SlurmChSpawner
of the hub makes through the hub's one :class:`chspawner.slurm.JobWatch`
(one squeue per ``slurm_poll_interval`` for all servers, pending or
running, whatever their number), run as the hub's own user.

A job's output goes to the user's own log directory (``job_log_dir``),
one file per job; a job that ends before its server answers fails the
spawn with the end of its log.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import pwd
import secrets
import sys
import time
from pathlib import Path

from jupyterhub.utils import random_port
from traitlets import Bool, Dict, Enum, Float, Integer, List, Unicode, default, observe, validate

from chspawner.slurm import (Job, JobState, JobWatch, Resources, SlurmClient, SlurmError,
                             sbatch_argv, shared_watch)
from chspawner import slurm_words
from chspawner.spawners import joblog
from chspawner.spawners.listening import MINE, NONCE_ENV, TAKEN, read_report
from chspawner.spawners.local import ChSpawner, SpawnFailed
from chspawner.spawners.options import OptionError, check_devices

PATH = "/usr/local/bin:/usr/bin:/bin"


class SlurmChSpawner(ChSpawner):
    """The user's server as a Slurm job on a compute node, in an image or
    with its kernels in one (the same modes as ChSpawner).

    The hub chooses the server's port itself and passes it on the command
    line, so nothing reports back from the node: there is no report handler
    for a user's token to abuse. The job id is saved in the hub's database
    the moment sbatch answers, so a hub restarted during the queue wait
    knows the job: it is stopped (cancelled) rather than orphaned, or taken
    over by the next spawn request while still queued. User options for Slurm
    (partition, account, QOS, time, CPUs, memory) are checked against what
    the admin offers and reach sbatch as separate arguments, never through
    a shell or the batch script's text; the admin's site options
    (reservation, constraint, extra sbatch arguments, set-up lines) are
    added to every server's job.
    """

    partitions = List(Unicode(), help="Partitions users may choose (the first is the "
                      "default; empty: Slurm's default).").tag(config=True)
    max_cpus = Integer(8, help="Most CPUs a user may ask for.").tag(config=True)
    max_mem_gb = Integer(32, help="Most memory (GB) a user may ask for.").tag(config=True)
    max_hours = Integer(12, help="Longest time limit (hours) a user may ask for.").tag(
        config=True)
    max_gpus = Integer(0, help="Most GPUs a user may ask for (0: the form offers "
                       "none; asked for with sbatch --gpus).").tag(config=True)
    gpu_devices = List(
        Unicode(), ["nvidia.com/gpu"],
        help="The CDI devices a container gets when its job has the GPUs the user "
             "asked for (max_gpus): a whole GPU kind gives only the job's own GPUs "
             "(chspawner run --device, SLURM_JOB_GPUS). Empty: none.",
    ).tag(config=True)
    accounts = List(
        Unicode(), help="Slurm accounts users may charge their server's job (and its "
                        "kernels' jobs) to: the first is the default; the form offers a "
                        "choice when there are several; any other is refused. Empty: no "
                        "--account (Slurm's default account), unless accounts_from_slurm.",
    ).tag(config=True)
    accounts_from_slurm = Bool(
        False, help="Offer each user the accounts of their own Slurm associations "
                    "(sacctmgr show assoc user=NAME, asked as the user; needs slurmdbd), "
                    "in sacctmgr's order; with ``accounts`` set too, only those of them. "
                    "A user with none can't spawn, and is told why.",
    ).tag(config=True)
    qos = List(
        Unicode(), help="Slurm QOS users may choose (--qos): the first is the default; "
                        "the form offers a choice when there are several; any other is "
                        "refused. Empty: Slurm's default QOS.",
    ).tag(config=True)
    reservation = Unicode(
        "", help="The Slurm reservation every server's job (and kernel's job) runs in "
                 "(--reservation); empty: none.",
    ).tag(config=True)
    constraint = Unicode(
        "", help="Node features every server's job (and kernel's job) needs "
                 "(--constraint, Slurm's syntax, e.g. 'intel&ib'); empty: none.",
    ).tag(config=True)
    extra_sbatch_args = List(
        Unicode(), help="More sbatch options for the server's job, after the user's "
                        "request (so they may override it), each one argument, e.g. "
                        "['--exclusive', '--licenses=matlab']. Kernels' jobs have "
                        "kernel_sbatch_args.",
    ).tag(config=True)
    job_setup = List(
        Unicode(), help="Shell lines the server's job runs before the server starts, "
                        "one a line, as given (the admin's, never a user's), e.g. "
                        "['module load cuda/12', 'source /etc/profile.d/site.sh']. A "
                        "failing line doesn't stop the job (sh, no -e): add '|| exit 1'.",
    ).tag(config=True)
    slurm_env = Dict(Unicode(), help="Extra environment for Slurm commands "
                     "(e.g. SLURM_CONF).").tag(config=True)
    # (Not "poll_interval": that is JupyterHub's, for polling running servers.)
    slurm_poll_interval = Float(
        1.0, help="Seconds between the hub's queries of its jobs' states: ONE squeue "
                  "(--jobs=every job asked about) per interval for all the hub's servers, "
                  "pending or running, however many; a pending server learns that its job "
                  "runs within about this long. With kernel_jobs, each server follows its "
                  "kernels' jobs the same way, one squeue per interval for all of them. "
                  "Lower: quicker starts, more queries (one per interval, whatever the "
                  "number of users).",
    ).tag(config=True)
    queue_poll_interval = Float(
        help="Deprecated: the old name of slurm_poll_interval (which it sets).",
    ).tag(config=True)
    slurm_query_command = List(
        Unicode(), ["squeue"],
        help="The command the hub (and, with kernel_jobs, each server) runs to learn "
             "job states, given squeue's own arguments after it (--noheader "
             "--states=all --jobs=IDS --format=%i|%T|%N|%r|%S|%e, with SLURM_TIME_FORMAT=%s; "
             "and, for queue places, "
             "--states=PENDING --sort=-p,i --format=%i|%P); it must answer as squeue "
             "does. E.g. ['squeue', '--clusters=hpc'], or a site's wrapper that serves "
             "squeue's answers from a cache.",
    ).tag(config=True)
    slurm_accounting_command = List(
        Unicode(), ["sacct"],
        help="The command asked (with sacct's arguments) how the jobs squeue no "
             "longer lists ended (TIMEOUT, NODE_FAIL...), where Slurm keeps accounting "
             "(slurmdbd). Without it sacct says so once and is not asked again, and such "
             "jobs are simply gone. Empty: never asked.",
    ).tag(config=True)
    slurm_query_timeout = Float(
        30.0, help="Seconds one query of job states may take before it counts as failed "
                   "(and is killed). A failed query is waited out: every job keeps its "
                   "last known state (a running server is never dropped for it), and "
                   "the outage is logged once.",
    ).tag(config=True)

    slurm_table_dir = Unicode(
        "", help="A directory the hub and the compute nodes share (the hub creates it "
                 "and its follow/ folder, mode 1777: every user's server writes there): "
                 "with kernel_jobs, each server lists its kernels' jobs there, the hub "
                 "asks Slurm about them in its own round and publishes every job's "
                 "state there (jobs.json, readable by all users), and the servers read "
                 "it instead of running squeue themselves: the whole hub, kernels "
                 "included, is then one squeue per interval. A server that finds no "
                 "fresh table asks Slurm itself. Empty: each server with kernel jobs "
                 "runs its own squeue per interval.",
    ).tag(config=True)

    @observe("queue_poll_interval")
    def _old_interval_name(self, change) -> None:
        self.slurm_poll_interval = change["new"]

    kernel_jobs = Bool(
        True, help="Kernels mode with persistent_kernels: each kernel runs as a Slurm "
                   "job of its own (with the user's request), so that it outlives the "
                   "server's job: a server whose job is cancelled, times out or loses "
                   "its node is started again and takes its kernels over. False: "
                   "kernels run inside the server's job and end with it.",
    ).tag(config=True)
    kernel_move_lead = Float(
        600.0, help="With kernel_jobs and kernel_session_state: seconds before a kernel "
                    "job's time limit at which its kernel is moved to a new job (its "
                    "session saved, restored there) once it is idle. A kernel busy "
                    "until the limit is restarted after it with its latest snapshot. "
                    "0: no planned moves.",
    ).tag(config=True)
    kernel_jobs_elsewhere = Bool(
        False, help="With kernel_jobs: keep each kernel's job off the node its server "
                    "runs on (sbatch --exclude=that node), so that losing one node loses "
                    "the server (which the session manager starts again elsewhere, and "
                    "which takes its kernels over) or a kernel, never both. Needs "
                    "at least two nodes in the partition.",
    ).tag(config=True)
    bind_node_address = Bool(
        True, help="The server listens on its node's own address only (the one its "
                   "Slurm node name resolves to on the node, where the hub connects), not "
                   "on every address of the node (ip, 0.0.0.0), loopback included. Where "
                   "the name resolves to no address or a loopback one, the server listens "
                   "on ip.",
    ).tag(config=True)
    kernel_sbatch_args = List(
        Unicode(), help="More sbatch options for each kernel's job (kernel_jobs), "
                        "e.g. --account=...; they come after the user's request.",
    ).tag(config=True)
    stop_timeout = Float(
        10.0, help="Seconds a server asked to stop (SIGINT, as the hub asks a local "
                   "one) gets to shut its kernels down before its job is cancelled.",
    ).tag(config=True)

    avoid_lost_node = Float(
        600.0, help="Seconds for which the user's next server jobs leave out (sbatch "
                    "--exclude) the node of a server stopped while Slurm still ran its "
                    "job but the server did not answer: a node lost, which Slurm notices "
                    "only after its SlurmdTimeout, while the session manager starts the "
                    "server again within seconds (and Slurm would send the new job to the "
                    "dead node). 0: never.",
    ).tag(config=True)

    report_dir = Unicode(
        "{home}/.local/share/chspawner/servers",
        help="Where a server's job reports, on its node, that the user's own "
             "process listens on the server's port ({home}: the user's home, shared "
             "with the nodes; only the user may write there, and the hub must be able "
             "to read it). The hub routes to the server only after that report.",
    ).tag(config=True)
    job_log_dir = Unicode(
        "{home}/.local/state/chspawner/logs",
        help="Where the output of the user's Slurm jobs goes: the server's job "
             "(server-JOBID.log, or server-HASH-JOBID.log for a named server) and, in "
             "kernels mode with kernel_jobs, each kernel's job. {home}: the user's "
             "home, {username}: their name. It must be shared with the nodes. The "
             "spawner creates it as the user, mode 0700, before each submission; a "
             "job that ends before its server answers fails the spawn with the last "
             "lines of its log.",
    ).tag(config=True)

    walltime_move = Enum(
        ["never", "offer", "always"], "never",
        help="Whether a server's session outlives its job's time limit: before "
             "the end (move_lead), a successor job is queued with the same "
             "options; once its server answers, the hub's route is switched to "
             "it and the old job ends (its kernels' own jobs go on: kernel_jobs), "
             "so no request fails. 'always': every server; 'offer': the spawn "
             "form offers it (user option keep_session); 'never': only the "
             "images whose entry says \"move_at_walltime\": true. A successor "
             "that has not started by the old job's end is cancelled, and the "
             "session comes back as after any loss (the session manager).",
    ).tag(config=True)
    move_lead = Float(
        600.0, help="Seconds before the server's job ends at which its successor "
                    "is submitted (walltime_move): time for it to wait in the queue "
                    "and start.",
    ).tag(config=True)
    walltime_check_interval = Float(
        60.0, help="Seconds between looks at a server's job end time (Slurm's, as "
                   "the hub's one squeue per slurm_poll_interval last saw it: no "
                   "query of its own): a time limit changed by an admin is noticed "
                   "within this.",
    ).tag(config=True)
    walltime_warnings = List(
        Float(), [15.0, 5.0],
        help="Minutes before a job's time limit at which JupyterLab warns its "
             "user, saying what will happen then (the server's job, and each "
             "kernel's).",
    ).tag(config=True)

    job_id = Unicode("", help="The server's Slurm job (state).")
    successor_job_id = Unicode("", help="The job queued to take the server over "
                                        "before its time limit (state).")
    successor_port = Integer(0, help="The port of the successor's server (state).")
    successor_nonce = Unicode("", help="The successor's listening report's token (state).")
    spawn_nonce = Unicode("", help="This spawn's random token, which its job's "
                                   "listening report must carry (state).")
    node = Unicode("", help="Where it runs (state).")
    request = Dict(help="The validated Slurm request of this spawn.")
    keep_session = Bool(False, help="The user chose to keep the session past the "
                                    "job's time limit (walltime_move 'offer').")
    last_end = Unicode("", help="Why the user's last server's job ended by itself, "
                                "in words (state, kept after the server: the "
                                "spawn form and the next spawn's page say it).")

    RESOURCES = ("partition", "account", "qos", "cpus", "mem_gb", "hours", "gpus")
    #: The Slurm options a user chooses from the admin's lists, by trait.
    CHOICES = {"partition": "partitions", "account": "accounts", "qos": "qos"}

    @default("ip")
    def _default_ip(self):
        return "0.0.0.0"  # the hub connects to the node

    # ---------------------------------------------------- user options ---

    OPTION_TYPES = {**ChSpawner.OPTION_TYPES, "partition": str, "account": str, "qos": str,
                    "cpus": int, "mem_gb": int, "hours": int, "gpus": int,
                    "keep_session": bool}

    _slurm_accounts: list[str] | None = None  # (the user's associations, once asked)

    def offered(self, key: str) -> list[str]:
        """What a user may choose for ``key`` (partition, account, qos)."""
        values = list(getattr(self, self.CHOICES[key]))
        if key == "account" and self.accounts_from_slurm:
            mine = self._slurm_accounts or []
            values = [a for a in mine if not values or a in values]
        return values

    async def refresh_accounts(self) -> None:
        """Ask Slurm for the user's accounts (accounts_from_slurm)."""
        if not self.accounts_from_slurm:
            return
        try:
            self._slurm_accounts = await self.slurm().associations(self.user.name)
        except SlurmError as e:
            self.log.warning("chspawner: can't list %s's Slurm accounts: %s",
                             self.user.name, e)
            self._slurm_accounts = []

    def options_need_asking(self) -> bool:
        return self.accounts_from_slurm

    async def ask_for_options(self) -> None:
        await self.refresh_accounts()

    def validate_user_options(self, options: dict) -> None:
        self.check_option_types(options)
        if self.accounts_from_slurm and not self.offered("account"):
            raise OptionError("you have no Slurm account this hub may use; ask your "
                              "site's admins for one")
        if options.get("keep_session") and self.walltime_move != "offer":
            raise OptionError("keep_session is not offered here: this hub "
                              + ("moves every session before its time limit"
                                 if self.walltime_move == "always" else
                                 "does not move sessions past their time limit"))
        self.keep_session = bool(options.get("keep_session"))
        slurm = {k: options[k] for k in self.RESOURCES if k in options}
        request = self.default_request()
        for key, value in slurm.items():
            if key in self.CHOICES:
                if value not in self.offered(key):
                    raise OptionError(f"{key} {value!r} is not offered (offered: "
                                      f"{', '.join(self.offered(key)) or 'none'})")
            else:
                low, high = self.bounds()[key]
                if not low <= value <= high:
                    raise OptionError(self.type_problem(key, value))
            request[key] = value
        super().validate_user_options({k: v for k, v in options.items()
                                       if k not in slurm and k != "keep_session"})
        self.request = request

    def type_problem(self, key: str, value: object) -> str:
        if key == "keep_session":
            return "keep_session must be true or false"
        if key in self.bounds():
            low, high = self.bounds()[key]
            return f"{key} must be a whole number from {low} to {high}"
        return super().type_problem(key, value)

    def default_request(self) -> dict:
        return {**{key: next(iter(self.offered(key)), "") for key in self.CHOICES},
                "cpus": 1, "mem_gb": min(2, self.max_mem_gb), "hours": 1, "gpus": 0}

    def bounds(self) -> dict[str, tuple[int, int]]:
        return {"cpus": (1, self.max_cpus), "mem_gb": (1, self.max_mem_gb),
                "hours": (1, self.max_hours), "gpus": (0, self.max_gpus)}

    def options_form_context(self) -> dict:
        """ChSpawner's image and mode, then the Slurm request within bounds."""
        default_ = self.default_request()
        labels = {"cpus": "CPUs", "mem_gb": "Memory (GB)", "hours": "Hours",
                  "gpus": "GPUs"}
        numbers = [{"name": key, "label": labels[key], "min": low, "max": high,
                    "value": default_[key]}
                   for key, (low, high) in self.bounds().items()
                   if high >= max(low, 1)]  # (no GPUs offered: no field)
        labels = {"partition": "Partition", "account": "Account", "qos": "QOS"}
        choices = [{"name": key, "label": labels[key], "values": self.offered(key)}
                   for key in self.CHOICES]
        return {**super().options_form_context(), "choices": choices, "numbers": numbers,
                "keep_session": self.walltime_move == "offer",
                "last_end": self.last_end}

    @default("options_form")
    def _default_options_form(self):
        async def form(spawner=None) -> str:
            await self.refresh_accounts()  # (the user's accounts, if from Slurm)
            return self.render_options_form()
        return form

    def options_from_form(self, formdata: dict) -> dict:
        options = super().options_from_form(formdata)
        for key in self.RESOURCES:
            value = (formdata.get(key) or [""])[0]
            if not value:
                continue
            # A number field's ASCII digits alone: "²" and "٣" are digits to
            # str.isdigit() but not to int(); and not too many (int() refuses
            # over 4300); anything else stays text, for validate_user_options
            # to refuse with the field's bounds. A choice (an account "1234")
            # stays text.
            number = key in self.bounds() and value.isascii() and value.isdigit() \
                and len(value) <= 18
            options[key] = int(value) if number else value
        if self.walltime_move == "offer" and (formdata.get("keep_session") or [""])[0]:
            options["keep_session"] = True
        return options

    # ------------------------------------------------------ the request --

    def kernels_in_jobs(self) -> bool:
        return self.mode == "kernels" and self.persistent_kernels and self.kernel_jobs

    def resources(self) -> Resources:
        """The user's request (for the server's job, or each kernel's)."""
        return Resources(**(self.request or self.default_request()),
                         reservation=self.reservation, constraint=self.constraint)

    def server_resources(self) -> Resources:
        """What the server's own job asks for: the user's request; or, when
        kernels run in jobs of their own (which get the user's request),
        what a Jupyter server needs: 1 CPU, at most 2 GB, no GPU."""
        r = self.resources()
        if self.kernels_in_jobs():
            return dataclasses.replace(r, cpus=1, mem_gb=min(r.mem_gb, 2), gpus=0)
        return r

    @validate("gpu_devices")
    def _check_gpu_devices(self, proposal) -> list[str]:
        return check_devices(proposal["value"], f"{type(self).__name__}.gpu_devices")

    def container_devices(self) -> list[str]:
        """``devices``, and ``gpu_devices`` when the user asked for GPUs:
        the containers run in the jobs that have them (the server's job, or
        with kernel_jobs each kernel's own)."""
        devices = super().container_devices()
        if self.resources().gpus:
            devices += [d for d in self.gpu_devices if d not in devices]
        return devices

    def kernel_provisioner_config(self) -> dict:
        """ChSpawner's (the admin's binds), and with kernel_jobs each
        kernel in a batch job of its own, with the user's request."""
        config = super().kernel_provisioner_config()
        if self.kernels_in_jobs():
            config.update({"launcher": "sbatch",
                           "sbatch_args": [*self.resources().sbatch_options(),
                                           *self.kernel_sbatch_args],
                           "job_log_dir": str(self.log_dir()),
                           "away_from_server": self.kernel_jobs_elsewhere,
                           "slurm_poll_interval": self.slurm_poll_interval,
                           "slurm_query_command": list(self.slurm_query_command),
                           "slurm_accounting_command": list(self.slurm_accounting_command),
                           **({"slurm_table_dir": self.slurm_table_dir}
                              if self.slurm_table_dir else {})})
        return config

    def get_args(self) -> list[str]:
        args = super().get_args()
        if self.kernels_in_jobs():
            # A job's end (scancel, its time limit, a preemption) sends
            # SIGTERM: that is a loss, not the user's stop.
            args += ["--PersistentKernelManager.keep_kernels_on_sigterm=True",
                     f"--KernelState.move_lead={self.kernel_move_lead}"]
        return args

    def job_argv(self, exclude: list[str] | None = None) -> list[str]:
        """sbatch for the server's job: the server (``get_command()``), and
        beside it (before the exec: the server stays the job's script,
        which scancel --batch signals) the check that the port is the
        user's own (see _proven); its output in the user's log directory."""
        watch = [sys.executable, "-m", "chspawner.spawners.listening", "--port", str(self.port),
                 "--report", str(self.report_path()), "--timeout", str(self.start_timeout)]
        # (% starts one of sbatch's filename patterns: a literal one is %%.)
        log = str(self.log_dir()).replace("%", "%%") + f"/{self.server_stem()}-%j.log"
        return sbatch_argv(self.get_command(), job_name=f"jupyterhub-{self.user.name}",
                           output=log, chdir=self._home_dir(),
                           resources=self.server_resources(),
                           extra=[*(exclude or []), *self.lost_node_exclusion(),
                                  *self.extra_sbatch_args],
                           background=watch, setup=[*self.job_setup, *self.bind_lines()])

    _lost_node: tuple[str, float] | None = None  # (node, when its server stopped answering)

    def lost_node_exclusion(self) -> list[str]:
        """``--exclude=NODE`` while the node this user's last server was lost
        on is to be avoided (``avoid_lost_node``)."""
        if self._lost_node is None:
            return []
        node, since = self._lost_node
        if time.monotonic() - since > self.avoid_lost_node:
            return []
        return [f"--exclude={node}"]

    def bind_lines(self) -> list[str]:
        """The job script's lines that make the server listen on its node's
        own address (``bind_node_address``): the host of JUPYTERHUB_SERVICE_URL,
        which the single-user server binds (the hub's ``ip``), replaced by
        the address the node's name resolves to there, unless that is none
        or a loopback one. Constant text: nothing of a user's."""
        if not self.bind_node_address or ":" in self.ip:  # (IPv6: [::] has colons)
            return []
        url = "JUPYTERHUB_SERVICE_URL"
        return ['chspawner_ip=$(getent ahostsv4 "$SLURMD_NODENAME" | '
                "awk 'NR == 1 {print $1}')",
                'case "$chspawner_ip" in ""|127.*) ;; *) export '
                f'{url}="${{{url}%%://*}}://$chspawner_ip:${{{url}#*://*:}}" ;; esac']

    # ------------------------------------------------------------ Slurm --

    def slurm(self) -> SlurmClient:
        """The Slurm client, running its commands as the user."""
        return SlurmClient(env={"PATH": PATH, **self.slurm_env},
                           preexec_fn=self.make_preexec_fn(self.user.name))

    def job_watch(self) -> JobWatch:
        """The hub's one watch of job states, shared by all its
        SlurmChSpawners: its queries run as the hub's own user, who sees
        every user's jobs (squeue and sacct only read), so that one
        squeue serves them all."""
        return shared_watch({"PATH": PATH, **self.slurm_env},
                            interval=self.slurm_poll_interval,
                            command=self.slurm_query_command,
                            sacct=self.slurm_accounting_command,
                            query_timeout=self.slurm_query_timeout, logger=self.log,
                            table_dir=self.slurm_table_dir, publish=True)

    async def job(self, max_age: float | None = None) -> Job:
        """The server's job as the hub's watch saw it in its next round (or
        in its last, up to ``max_age`` s old; default: an interval). While
        Slurm doesn't answer: its last known state; SlurmError if none."""
        if max_age is None:
            max_age = self.slurm_poll_interval
        return await self.job_watch().job(self.job_id, max_age=max_age)

    # The steps of ChSpawner.start() that differ for a job.

    async def reattach(self) -> bool:
        """A job from before a hub restart, queued or starting: take it over
        rather than submit a second one."""
        if self.last_end and not self.job_id:
            self._emit(5, self.last_end)  # (why the last one ended, first)
        if self.job_id and await self._job_alive():
            self._emit(10, f"re-attaching to Slurm job {self.job_id}")
            return True
        self.job_id = self.node = ""
        return False

    async def launch(self) -> None:
        """Submit the server's job (``job_argv()``); its id is saved at once.
        On the hub's host, ensure_image put the image into the shared store
        already: compute nodes never talk to a registry."""
        self.spawn_nonce = secrets.token_hex(16)
        try:
            # (A site option with a newline, say one an admin's hook set from
            # user input, is refused here: ValueError, told in one line.)
            argv = self.job_argv()
            await joblog.make_dir(str(self.log_dir()), self.make_preexec_fn(self.user.name))
        except (ValueError, joblog.JobLogError) as e:
            raise SpawnFailed(f"can't submit the server's job: {e}") from None
        env = {**self.get_env(), NONCE_ENV: self.spawn_nonce, **self.slurm_env}
        try:
            self.job_id = await self.slurm().submit(argv, env=env)
        except SlurmError as e:
            raise SpawnFailed(f"can't submit the server's job: {e}") from None
        self._save_state()
        self._emit(10, f"submitted Slurm job {self.job_id}")

    async def wait_ready(self) -> tuple[str, int]:
        return await self._wait_running()

    async def _wait_running(self) -> tuple[str, int]:
        """Follow the job until its server answers on the node, reporting
        queue states; a job that ends first ends the spawn at once, with
        its state and the end of its log (not after the hub's http_timeout)."""
        if not self.spawn_nonce:
            raise SpawnFailed(f"Slurm job {self.job_id} was submitted by an earlier "
                              "chspawner, which did not check whose process listens on "
                              "its port, so it is not connected to; start your server again")
        last = None
        watch = self.job_watch()
        while True:
            # Each turn waits for the watch's next round: that paces it.
            job: Job | None = None
            try:
                job = await self.job(max_age=0)
                error = watch.error  # (a failed round gave the last known state)
            except SlurmError as e:
                error = str(e)
            if error:
                # A controller restart or outage is no reason to give up on
                # the job: keep asking (the hub's start_timeout bounds it).
                if last != "unreachable":
                    self._emit(30, f"can't reach Slurm ({error}); still trying")
                    last = "unreachable"
                if job is None:
                    continue
            report = self._report()
            if report and report["status"] == TAKEN:
                # (Its server can't listen there: the job ends, if it has
                # not yet; the hub stops it, which cancels it. Its node is
                # forgotten first: stop() must not connect to that port,
                # another user's process.)
                self.node = ""
                raise SpawnFailed(f"port {self.port} on node {report.get('node')} is taken "
                                  "by another user's process; your server was not "
                                  "connected to it. " + self.port_advice())
            if not job.alive:
                raise SpawnFailed(await self._ended_message(job))
            if job.state is JobState.RUNNING and job.node and not self.node:
                self.node = job.node
                self._save_state()
                self._emit(40, f"job {self.job_id} running on {job.node}, mode {self.mode}, "
                               f"image {self.image}")
            if self.node and self._proven(report) and await _answers(self.node, self.port):
                self._emit(60, f"server responding on {self.node}")
                return self.node, self.port
            if job.slurm_state != "RUNNING":
                words = await self._waiting_words(job)
                if words != last:  # (said again whenever it changes)
                    self._emit(30, words)
                    last = words

    async def _ended_message(self, job: Job) -> str:
        """Why the spawn failed: the job ended first; its state and the last
        lines of its log."""
        message = (f"Slurm job {self.job_id} ended before the server answered "
                   f"({job.slurm_state or 'gone'}{', ' + job.reason if job.reason else ''})")
        log = self.job_log_path()
        tail = await joblog.tail(str(log), self.make_preexec_fn(self.user.name))
        if tail:
            return f"{message}; the end of its log, {log}:\n{tail}"
        return f"{message}; its log: {log}"

    def log_dir(self) -> Path:
        """The user's job log directory (see ``job_log_dir``)."""
        return Path(self.job_log_dir.format(home=self._home_dir(), username=self.user.name))

    def server_stem(self) -> str:
        """This server's name in its files: "server" for the default one,
        "server-HASH" for a named one (a name may hold any character)."""
        if not self.name:
            return "server"
        return "server-" + hashlib.sha256(self.name.encode()).hexdigest()[:16]

    def job_log_path(self) -> Path:
        """The server's job's log (the %j of job_argv's output, filled in)."""
        return self.log_dir() / f"{self.server_stem()}-{self.job_id}.log"

    def report_path(self) -> Path:
        """This server's listening report (one file per server, rewritten
        by each spawn)."""
        return Path(self.report_dir.format(home=self._home_dir())) / f"{self.server_stem()}.json"

    def _report(self, nonce: str | None = None) -> dict | None:
        """The job's listening report of this spawn (or of the job whose
        token is ``nonce``: a successor's), if it wrote one yet."""
        nonce = self.spawn_nonce if nonce is None else nonce
        if not nonce:
            return None
        return read_report(self.report_path(), self.user_uid(), nonce)

    def _proven(self, report: dict | None, node: str | None = None,
                port: int | None = None) -> bool:
        """Whether the job reported, from the server's node, that the
        user's own process, alone, listens on the server's port (or on
        ``node`` and ``port``: a successor's): only then is the server
        routed to. Without a nonce (a job submitted before chspawner
        checked this) nothing proves it."""
        return bool(report) and report["status"] == MINE and \
            report.get("node") == (self.node if node is None else node) and \
            report.get("port") == (self.port if port is None else port)

    async def _waiting_words(self, job: Job) -> str:
        """What the spawn page says of a job not yet running: pending, why
        (Slurm's reason, in words), its place in its partition's queue
        (Slurm's priority order: one listing of the queue per interval for
        the whole hub) and when Slurm expects it to start, if it has worked
        that out (squeue --start's figure); or its state (CONFIGURING...)."""
        if job.state is not JobState.PENDING or job.slurm_state != "PENDING":
            return f"job {self.job_id} {job.slurm_state.lower()}" + \
                (f" ({job.reason})" if job.reason else "")
        try:
            place = await self.job_watch().queue_place(self.job_id,
                                                       self.request.get("partition", ""))
        except SlurmError:
            place = None
        return slurm_words.waiting_words(job, place)

    async def get_url(self) -> str:
        """Where the server is, asked by a hub restarted while it was not
        yet up: a job still queued or starting is waited for (and so
        re-attached), not declared dead after http_timeout and cancelled."""
        if self.job_id and not self.node:
            try:
                await self._wait_running()
            except Exception as e:  # the hub's startup check must not fail
                self.log.warning("chspawner: job %s: %s", self.job_id, e)
                return self.server.url
        if not self.node:
            return self.server.url
        return f"{self.server.proto}://{self.node}:{self.port}{self.server.base_url}"

    async def _job_alive(self, max_age: float | None = None) -> bool:
        try:
            return (await self.job(max_age)).alive
        except SlurmError:
            return False

    def _home_dir(self) -> str:
        return pwd.getpwnam(self.user.name).pw_dir

    def _save_state(self) -> None:
        """Write the job id to the hub's database now, not only when the
        spawn ends: a hub restart in between must find the job."""
        db = getattr(self.user, "db", None)
        if self.orm_spawner is not None and db is not None:
            self.orm_spawner.state = self.get_state()
            db.commit()

    async def poll(self):
        if not self.job_id:
            return 0
        try:
            job = await self.job()
        except SlurmError:
            # The controller being down says nothing about the server (the
            # watch logs the outage, once).
            return None
        if job.alive:
            self._plan_move()  # (a restarted hub's first poll)
            return None
        self._note_end(job)
        self.clear_state()
        return 1

    #: Seconds to wait for Slurm's final word on a job seen COMPLETING.
    ENDING_WAIT = 15.0

    def _note_end(self, job: Job) -> None:
        """Keep, in words, why the server's job ended without the hub
        stopping it (poll, or a stop by the session manager, found it
        gone): the spawn form and the next spawn's page say it, and so does
        JupyterLab in the next server (CHSPAWNER_PREVIOUS_END). squeue says
        COMPLETING first: Slurm's final word (TIMEOUT...) is waited for in
        the background, briefly, and the words made again from it."""
        node, uid, at = self.node, self.user_uid(), slurm_words.when(time.time())

        def words(job: Job) -> str:
            return (f"Your last server's {slurm_words.job_ended_words(job, job.id, node, uid)}"
                    f" (at {at}).")

        self.last_end = words(job)
        self.log.info("chspawner: %s: %s", self._log_name, self.last_end)
        if not slurm_words.job_ending(job):
            return

        async def final_word(job: Job) -> None:
            deadline = time.monotonic() + self.ENDING_WAIT
            while slurm_words.job_ending(job) and time.monotonic() < deadline:
                try:
                    job = await self.job_watch().job(job.id)
                except SlurmError:
                    return
            if not slurm_words.job_ending(job) and self.last_end and not self.job_id:
                self.last_end = words(job)
                self.log.info("chspawner: %s: %s", self._log_name, self.last_end)
                self._save_state()
        asyncio.ensure_future(final_word(job))

    async def stop(self, now=False):
        """Ask the server to stop as the hub asks a local one (SIGINT: it
        shuts its kernels down, jobs of their own included), then cancel
        its job. A plain cancel would read as a loss (SIGTERM) to a server
        that keeps its kernels for its successor."""
        if self.job_id:
            answering = bool(self.node) and await _answers(self.node, self.port)
            try:
                job: Job | None = await self.job()
            except SlurmError:
                job = None
            running = job is not None and job.state is JobState.RUNNING
            if job is not None and not job.alive:
                # It ended by itself (the session manager stops and starts a
                # lost server before the hub's poll has seen it): say why.
                self._note_end(job)
            if self.node and not answering:
                # Nothing there to shut kernels down. A job Slurm still runs
                # whose server does not answer: its node is gone (Slurm has
                # yet to notice), so the next job goes elsewhere. (A server
                # that ended, or a cancelled job, says nothing of its node.)
                if running:
                    self._lost_node = (self.node, time.monotonic())
            elif not now and running:
                await self._interrupt_and_wait()
            try:
                await self.slurm().cancel(self.job_id)
            except SlurmError as e:
                self.log.warning("chspawner: scancel %s: %s", self.job_id, e)
        if self._mover is not None:
            self._mover.cancel()
        await self._drop_successor()
        self.clear_state()

    async def _interrupt_and_wait(self) -> None:
        try:  # batch only: the job's script, which is the server (exec)
            await self.slurm().cancel(self.job_id, signal="INT", batch_only=True)
        except SlurmError as e:
            self.log.warning("chspawner: can't signal job %s: %s", self.job_id, e)
            return
        deadline = asyncio.get_running_loop().time() + self.stop_timeout
        # (Each look waits for the watch's next round: that paces the loop.)
        while asyncio.get_running_loop().time() < deadline and await self._job_alive(0):
            pass


    # --------------------------------------------- the planned move --

    def moves_at_walltime(self) -> bool:
        """Whether this server's session moves to a successor job before
        its time limit (``walltime_move``, the image's entry, the user's
        choice)."""
        if (self.site_entry(self.image) or {}).get("move_at_walltime"):
            return True
        return self.walltime_move == "always" or \
            (self.walltime_move == "offer" and self.keep_session)

    def get_env(self) -> dict:
        """ChSpawner's, and for JupyterLab's time-left display: what happens
        at the job's end, and when to warn (chspawner.persist.session_status)."""
        env = super().get_env()
        env["CHSPAWNER_AT_WALLTIME"] = "move" if self.moves_at_walltime() else "stop"
        env["CHSPAWNER_WALLTIME_WARNINGS"] = ",".join(f"{m:g}" for m in self.walltime_warnings)
        if self.last_end:
            env["CHSPAWNER_PREVIOUS_END"] = self.last_end
        return env

    async def start(self) -> tuple[str, int]:
        """ChSpawner's recipe; then, if the session moves at its time limit,
        the move is planned."""
        where = await super().start()
        self.last_end = ""  # (said: on this spawn's page and, once, in JupyterLab)
        self._plan_move()
        return where

    _mover: asyncio.Task | None = None

    def _plan_move(self) -> None:
        """Follow the job's end time and move the session before it
        (once per server: a hub restarted plans it again at its first poll)."""
        if not self.moves_at_walltime() or not self.job_id:
            return
        if self._mover is None or self._mover.done():
            self._mover = asyncio.ensure_future(self._move_before_walltime())

    async def _move_before_walltime(self) -> None:
        """Wait until ``move_lead`` s before the job's end (its end time as
        the hub's watch last saw it: an admin's new limit counts), then move;
        the successor's own end is followed in turn."""
        failed_for = ""
        while self.job_id:
            try:
                job = await self.job(max_age=self.walltime_check_interval)
            except SlurmError:
                job = None
            if job is not None and not job.alive:
                return  # (poll() tells the hub)
            due = None if job is None or job.end_time is None else \
                job.end_time - self.move_lead - time.time()
            if self.successor_job_id or (due is not None and due <= 0
                                         and failed_for != self.job_id):
                moving = self.job_id
                try:
                    moved = await self.move()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.log.exception("chspawner: %s: the planned move failed",
                                       self._log_name)
                    moved = False
                if not moved:
                    failed_for = moving  # (not tried again for this job)
                continue
            await asyncio.sleep(self.walltime_check_interval if due is None
                                else min(max(due, 0.1), self.walltime_check_interval))

    async def move(self) -> bool:
        """The planned move: a successor job with the same options, its
        server up first (proven the user's own, as at a spawn), then the
        hub's record and route switched to it, then the old job ended
        (SIGTERM: its server lets go of its kernels, which the successor
        has taken over). True if moved; False if the successor ended, or
        the old job did, first (the successor is then cancelled)."""
        old_job, old_node = self.job_id, self.node
        if not self.successor_job_id:
            await self._submit_successor()
        submitted = time.monotonic()
        self.log.info("chspawner: %s: job %s ends soon; successor job %s queued",
                      self._log_name, old_job, self.successor_job_id)
        node = await self._wait_successor()
        if not node:
            await self._drop_successor()
            return False
        answered = time.monotonic()
        # The switch: the hub's record, then the route (new requests go to
        # the successor; the old server finishes what it has).
        self.job_id, self.node, self.port = self.successor_job_id, node, self.successor_port
        self.spawn_nonce = self.successor_nonce
        self.successor_job_id, self.successor_port, self.successor_nonce = "", 0, ""
        self._save_state()
        if self.server is not None:
            self.server.ip, self.server.port = node, self.port
            db = getattr(self.user, "db", None)
            if db is not None:
                db.commit()
        proxy = getattr(self.user, "settings", {}).get("proxy")
        if proxy is not None:
            await proxy.add_user(self.user, self.name)
        switched = time.monotonic()
        self.log.info("chspawner: %s moved from job %s on %s to job %s on %s: queued and "
                      "started in %.1f s, route switched %.3f s after its server answered",
                      self._log_name, old_job, old_node, self.job_id, node,
                      answered - submitted, switched - answered)
        try:
            await self.slurm().cancel(old_job)
        except SlurmError as e:
            self.log.warning("chspawner: scancel %s: %s", old_job, e)
        return True

    async def _submit_successor(self) -> None:
        """Queue the successor: the same command and request, a port of
        its own (the admin's fixed one on another node) and a new token
        for its listening report."""
        fixed = not getattr(self, "_port_picked", False)
        port, nonce = (self.port if fixed else random_port()), secrets.token_hex(16)
        exclude = [f"--exclude={self.node}"] if fixed and self.node else []
        saved = self.port, self.spawn_nonce
        self.port, self.spawn_nonce = port, nonce
        try:
            argv = self.job_argv(exclude=exclude)
            env = {**self.get_env(), NONCE_ENV: nonce, **self.slurm_env,
                   # (its JupyterLab says so, once)
                   "CHSPAWNER_MOVED_FROM": f"job {self.job_id} on {self.node}"}
        finally:
            self.port, self.spawn_nonce = saved
        self.successor_job_id = await self.slurm().submit(argv, env=env)
        self.successor_port, self.successor_nonce = port, nonce
        self._save_state()

    async def _wait_successor(self) -> str:
        """The successor's node once its server answers there, proven the
        user's own; "" if it ends first, or the old job does."""
        watch = self.job_watch()
        while True:
            try:
                succ = await watch.job(self.successor_job_id)
                old = await watch.job(self.job_id, max_age=self.slurm_poll_interval)
            except SlurmError:
                continue  # (an outage: each look waits for the next round)
            if not succ.alive or not old.alive:
                self.log.warning("chspawner: %s: successor job %s %s before it answered",
                                 self._log_name, self.successor_job_id,
                                 "ended" if not succ.alive else "did not start: the old job "
                                 "ended first")
                return ""
            if succ.state is not JobState.RUNNING or not succ.node:
                continue
            report = self._report(self.successor_nonce)
            if report and report["status"] == TAKEN:
                self.log.warning("chspawner: %s: successor's port %d on %s is taken",
                                 self._log_name, self.successor_port, succ.node)
                return ""
            if self._proven(report, succ.node, self.successor_port) \
                    and await _answers(succ.node, self.successor_port):
                return succ.node

    async def _drop_successor(self) -> None:
        if self.successor_job_id:
            try:
                await self.slurm().cancel(self.successor_job_id)
            except SlurmError as e:
                self.log.warning("chspawner: scancel %s: %s", self.successor_job_id, e)
        self.successor_job_id, self.successor_port, self.successor_nonce = "", 0, ""
        self._save_state()

    # ------------------------------------------------------------- state --

    def get_state(self) -> dict:
        state = super().get_state()
        if self.job_id:  # (image and mode come from ChSpawner)
            # The port too: the hub records it only once start() returns.
            state.update(job_id=self.job_id, node=self.node, port=self.port,
                         spawn_nonce=self.spawn_nonce, keep_session=self.keep_session)
        if self.successor_job_id:
            state.update(successor_job_id=self.successor_job_id,
                         successor_port=self.successor_port,
                         successor_nonce=self.successor_nonce)
        if self.last_end:
            state["last_end"] = self.last_end
        return state

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.job_id = state.get("job_id", "")
        self.node = state.get("node", "")
        self.spawn_nonce = state.get("spawn_nonce", "")
        self.keep_session = bool(state.get("keep_session"))
        self.successor_job_id = state.get("successor_job_id", "")
        self.successor_port = state.get("successor_port", 0)
        self.successor_nonce = state.get("successor_nonce", "")
        self.last_end = state.get("last_end", "")
        if state.get("port"):
            self.port = state["port"]

    def clear_state(self) -> None:
        super().clear_state()
        self.job_id = self.node = self.spawn_nonce = ""
        self.successor_job_id, self.successor_port, self.successor_nonce = "", 0, ""
        # (last_end stays: it is about the server that ended.)


async def _answers(host: str, port: int) -> bool:
    """Whether something accepts connections at host:port."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True
