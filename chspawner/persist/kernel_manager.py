"""Kernels that outlive their Jupyter server (persistence level L2).

Configure a Jupyter server with::

    c.ServerApp.kernel_manager_class = "chspawner.persist.kernel_manager.PersistentKernelManager"
    c.ServerApp.kernel_websocket_connection_class = (
        "chspawner.persist.kernel_connection.ReplayingKernelConnection")

Then every kernel whose provisioner can be taken over by a new server (one
that is :class:`chspawner.provisioner.hooks.Adoptable`: the chspawner
container provisioner) is

- started in a session of its own with no parent-death watch, so it keeps
  running when the server dies;
- recorded in the state directory (kernel id, kernel name, connection info,
  provisioner info), rewritten after each restart;
- followed by a *keeper* (:mod:`chspawner.persist.keeper`), a process
  outside the server that keeps the kernel's last IOPub messages, numbered,
  for the websocket connection to replay.
- written into its notebook while no page holds it: the kernel's output,
  by the server, through its contents manager
  (:mod:`chspawner.persist.notebook_outputs`; the ``notebook_*`` settings).

A kernel the provisioner runs as a Slurm job of its own (launcher
``sbatch``: the provisioner's ``in_job``) has its keeper inside that job,
on the kernel's node (this kernel manager is a
:class:`~chspawner.provisioner.hooks.KernelJobHost`: the provisioner runs
the keeper's command before the kernel's), listening
on TCP (:mod:`chspawner.persist.keeper`, ``--job``): kernel and keeper
then outlive the server's own job. The record, the acknowledgement files
and the connection file live under $HOME, which the nodes share. A
restart of such a kernel is a new job, maybe on another node: its
websockets are closed, and clients reconnect to the new one.

The server watches each keeper on its host (``keeper_check_interval``:
one read of /proc per kernel, no process started): a keeper found dead
while its kernel runs is replaced, every open websocket of the kernel
follows the new one in place, and each notebook resumed across the gap is
told what it cost and gets the end of a cell that ended unseen in it (see
:mod:`chspawner.persist.keeper_state` and the websocket connection). A
keeper inside a kernel's job dies only with the job: that is a lost
kernel, restarted as such.

A server starting with the same state directory re-adopts every recorded
kernel that still runs, under its kernel id (and drops the records of the
dead ones) before it serves its first request. A kernel shut down on
purpose loses its record, and its keeper exits. A server that dies leaves
its kernels running; one stopped politely (SIGINT or SIGTERM, as the hub
stops a server its user asked to stop) shuts them down, unless
``keep_kernels_on_shutdown``, or ``keep_kernels_on_sigterm`` and the
signal was SIGTERM (under Slurm, the end of the server's job).

What this needs of jupyter_server's and jupyter_client's private parts goes
through :mod:`chspawner.persist.upstream_jupyter_server` and
:mod:`chspawner.persist.upstream_jupyter_client`.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.ioloop.restarter import AsyncIOLoopKernelRestarter
from jupyter_client.kernelspec import NATIVE_KERNEL_NAME
from jupyter_client.provisioning import KernelProvisionerFactory
from jupyter_core.paths import jupyter_runtime_dir
from jupyter_server.services.kernels.kernelmanager import (
    AsyncMappingKernelManager,
    ServerKernelManager,
)
from tornado.ioloop import PeriodicCallback
from traitlets import Bool, Float, Integer, Unicode, default

from chspawner.persist import upstream_jupyter_client as client_private
from chspawner.persist import upstream_jupyter_server as server_private
from chspawner.persist.keeper import signed_request
from chspawner.persist.kernel_connection import (
    close_connections,
    forget_connections,
    keeper_replaced,
    stop_following,
)
from chspawner.persist.keeper_state import Takeover
from chspawner.persist.kernel_state import age_words
from chspawner.persist.notebook_outputs import NotebookWriters
from chspawner.persist.records import KernelRecords, state_dir_name
from chspawner.persist.witness import Witness
from chspawner.provisioner.hooks import Adoptable, KernelJobHost
from chspawner.provisioner.sockets import PrivateIpcMixin
from chspawner.provisioner.transport import secure_client
from chspawner.slurm import Job, JobState
from chspawner.slurm_words import ended_on_purpose, job_ended_words, job_ending


def can_reattach(provisioner: Any) -> bool:
    """Whether a new server could take this kernel over by its PID or job
    (the chspawner provisioner can; jupyter_client's LocalProvisioner can't)."""
    return isinstance(provisioner, Adoptable)


def in_job(provisioner: Any) -> bool:
    """Whether the kernel runs in a Slurm job of its own (its keeper too)."""
    return isinstance(provisioner, Adoptable) and provisioner.in_job


def image_default_kernel_name(kernel_spec_manager: Any) -> str:
    """The server's default kernel: the chosen image's, when the kernelspec
    manager offers one (see ContainerKernelSpecManager.image_default_kernel),
    else jupyter_client's (the host's python3)."""
    chosen = getattr(kernel_spec_manager, "image_default_kernel", None)
    name = chosen() if chosen is not None else None
    return name or NATIVE_KERNEL_NAME


def restarts_after(job: Job | None) -> bool:
    """Whether a kernel whose job ended so is started again, as a new job.
    Yes when Slurm or the kernel ended it (its time limit, its memory, its
    node, a preemption, the kernel's own end: what jupyter_client does for
    any kernel found dead); no when someone cancelled it (scancel, the user
    or an administrator): that is on purpose, and a new job would undo it
    (and take the allocation again, or come back behind an administrator's
    back)."""
    return not ended_on_purpose(job)


def why_job_ended(job: Job | None, job_id: str = "", node: str = "",
                  owner_uid: int | None = None) -> str:
    """Why a kernel's job ended, in Slurm's vocabulary
    (chspawner.slurm_words): "job 1234 on node n2 ended: it reached its time
    limit (TIMEOUT)"; a cancelled one says by whom (you, an administrator),
    or that it is not known. ``job_id`` and ``node``: where the job (None:
    Slurm has forgotten it) doesn't say. ``owner_uid``: the kernel's user
    (this process's)."""
    return job_ended_words(job, job_id, node,
                           os.getuid() if owner_uid is None else owner_uid)


def lost_kernel_notice(because: str, restarting: bool = True, new_node: str = "",
                       snapshot_age: float | None = None) -> str:
    """What the notebooks of a kernel are told, in words, when its job
    ended (``because``: :func:`why_job_ended`'s words): as its restart
    begins (no ``new_node`` yet), once a new kernel took its place on
    ``new_node``, or (not ``restarting``) that none is started. With a
    ``snapshot_age``, the new kernel gets the session saved then."""
    if not restarting:
        then = ("It is not restarted: a cancel is on purpose. Its variables and imports "
                "are gone: start a kernel again to go on.")
    else:
        new = f"A new kernel was started on {new_node}" if new_node else \
            "A new kernel is starting, as a new job"
        if snapshot_age is None:
            then = f"{new}. Its variables and imports are gone: run the cells it needs again."
        else:
            then = (f"{new}, and the session saved {age_words(snapshot_age)} ago is restored "
                    f"into it: what ran since then must be run again.")
    return f"[chspawner] The kernel's {because}. {then}"


def moved_kernel_notice(new_node: str) -> str:
    """What the notebooks of a kernel that was moved (its session saved,
    restarted as a new job, see chspawner.persist.kernel_state) are told."""
    return (f"[chspawner] The kernel moved to a new job on {new_node or '?'}: its session "
            f"was saved and is restored there.")


def job_words(provisioner: Any, job: Job | None) -> str:
    """:func:`why_job_ended` for a kernel's provisioner (its job's id and
    node where Slurm forgot the job)."""
    return why_job_ended(job, str(getattr(provisioner, "job_id", "") or ""),
                         getattr(provisioner, "node", "") or "")


class KernelJobRestarter(AsyncIOLoopKernelRestarter):
    """jupyter_client's restarter (a kernel found dead is started again),
    for a kernel in a Slurm job of its own:

    - while Slurm is still ending the job (COMPLETING), it waits, up to
      the kernel manager's ``kernel_job_ending_wait``, for the job's final
      state, which says why it ended (the words the notebook gets);
    - a job someone cancelled on purpose (scancel: the user, an
      administrator) is not restarted (see :func:`restarts_after`): the
      notebook is told so and the kernel counts as dead, as after restarts
      that failed (jupyter_server then drops it, and a page shows it dead).

    Public parts of jupyter_client only: ``poll``, ``stop`` and the
    ``callbacks`` it fires."""

    _ending_since: float | None = None

    async def poll(self) -> None:
        km = self.kernel_manager
        if not isinstance(km, PersistentServerKernelManager) or not in_job(km.provisioner) \
                or await km.is_alive():
            self._ending_since = None
            return await super().poll()
        # (is_alive just asked the job watch: the provisioner's last_job is now's)
        job = km.ended_job()
        if job_ending(job):
            now = time.monotonic()
            self._ending_since = self._ending_since or now
            wait = getattr(km.parent, "kernel_job_ending_wait", 0.0)
            if now - self._ending_since < wait:
                return  # asked again at the next poll
        self._ending_since = None
        if job is not None and not restarts_after(job):
            await self.give_up(km, job)
            return
        await super().poll()

    async def give_up(self, km: PersistentServerKernelManager, job: Job) -> None:
        """The kernel stays dead: the restarter stops, its connections tell
        their notebooks why (notice_before_restart) and that it is dead, and
        jupyter_server drops it ("dead": as after restarts that failed)."""
        self.log.warning("chspawner: kernel %s is not restarted: its %s", km.kernel_id,
                         job_words(km.provisioner, job))
        self.stop()
        for callback in list(self.callbacks["dead"]):
            try:
                callback()
            except Exception:
                self.log.exception("chspawner: a 'dead' callback of kernel %s failed",
                                   km.kernel_id)
        try:  # (after: the callbacks still speak to its clients)
            await km.cleanup_resources(restart=False)
        except Exception:  # (a dead job's staging: nothing must stop the rest)
            self.log.exception("chspawner: cleaning up after kernel %s", km.kernel_id)


class PrivateIpcServerKernelManager(PrivateIpcMixin, ServerKernelManager):
    """jupyter_server's kernel manager, with the IPC sockets of a kernel on
    ``transport=ipc`` in the user's short private socket directory (see
    :mod:`chspawner.provisioner.sockets`): for servers without persistent
    kernels, as ``MappingKernelManager.kernel_manager_class``."""


class BusyIsActivity:
    """A kernel busy with a cell counts as activity, output or not.

    jupyter_server counts a kernel's IOPub messages as activity, so a cell
    that runs silently (a long computation, ``time.sleep``) with no browser
    open looks idle: jupyterhub-singleuser reports the server's last
    activity to the hub, and jupyterhub-idle-culler would stop the server
    in the middle of the work. Here ``last_kernel_activity`` (which the
    server's last activity is the latest of) is "now" while any kernel's
    execution state is busy. It is computed when read (at each activity
    report, every $JUPYTERHUB_ACTIVITY_INTERVAL), so it costs nothing in
    between. (A property in the subclass: jupyter_server's trait of the
    same name is written on every message, and stays the value when no
    kernel is busy.)"""

    @property
    def last_kernel_activity(self) -> datetime.datetime:
        for kernel_id in list(self.list_kernel_ids()):
            kernel = self._kernels.get(kernel_id)
            if getattr(kernel, "execution_state", None) == "busy":
                return server_private.utcnow()
        return self._last_kernel_activity

    @last_kernel_activity.setter
    def last_kernel_activity(self, value: datetime.datetime) -> None:
        self._last_kernel_activity = value


class EphemeralKernelManager(BusyIsActivity, AsyncMappingKernelManager):
    """jupyter_server's own kernel manager (kernels end with their server),
    for a server without persistent kernels that still offers the chosen
    image's kernels as :class:`PersistentKernelManager` does: the image's
    kernel is the default, and a kernel on ``transport=ipc`` binds in the
    short private socket directory (:class:`PrivateIpcServerKernelManager`).
    ChSpawner's kernels mode with ``persistent_kernels = False``."""

    @default("default_kernel_name")
    def _default_default_kernel_name(self) -> str:
        return image_default_kernel_name(self.kernel_spec_manager)

    @default("kernel_manager_class")
    def _default_kernel_manager_class(self) -> str:
        return "chspawner.persist.kernel_manager.PrivateIpcServerKernelManager"


class PersistentServerKernelManager(client_private.KernelManagerHooks, KernelJobHost,
                                    PrivateIpcMixin, ServerKernelManager):
    """One kernel: launched detached when it can be re-attached to, and
    reported to its :class:`PersistentKernelManager` on every (re)start."""

    keeper_address = Unicode("", help="The kernel's keeper, when it has one.")
    acks_dir = Unicode("", help="Where its connections record what they delivered.")
    #: The kernel moved (a job kernel restarted): websockets must start afresh.
    moved = False
    #: The node the kernel's job was lost with, until its restart is told,
    #: and why the job ended (why_job_ended's words).
    lost_node = ""
    lost_because = ""
    #: What the notebooks of this kernel are told, in words, after it was
    #: lost with its node; and the client sessions already told.
    notice = ""
    notice_told: set[str]
    #: The client sessions told before the restart (notice_before_restart).
    told_before_restart: set[str] | None = None
    #: Its session is to be restored once it runs again (a move, or a
    #: restart after its job ended with a snapshot there).
    restore_pending = False
    #: The parent header of the last cell the kernel began (its
    #: execute_input): where a notice shows, in that cell's output.
    running_cell: dict | None = None
    #: The keeper on this host: its PID and start time (/proc), for the
    #: watch (see PersistentKernelManager.keeper_check_interval).
    keeper_pid = 0
    keeper_started = ""
    #: A keeper being started for it (by the watch, a restart or adoption).
    keeper_starting = False
    #: Its keeper died and a new one took over: what sessions are told.
    takeover: Takeover | None = None
    #: The server's copy of its latest output, to fill a dead keeper's gap
    #: (chspawner.persist.witness), its subscription and the IOPub port.
    witness: Witness | None = None
    witness_stream: Any = None
    witness_port: int | None = None

    @default("restarter_class")
    def _default_restarter_class(self) -> type:
        return KernelJobRestarter

    async def restart_kernel(self, now: bool = False, newports: bool = False, **kw: Any):
        """A restart of a kernel whose job ended (jupyter_client's restarter
        found it dead): its time limit, its memory, its node, a preemption,
        its program's end (Slurm's word for its state tells which). Noted
        for the words after the restart."""
        provisioner = self.provisioner
        self.lost_node = self.lost_because = ""
        if in_job(provisioner) and await provisioner.poll() is not None:
            self.lost_node = getattr(provisioner, "node", "") or "?"
            self.lost_because = job_words(provisioner, provisioner.last_job)
        if getattr(provisioner, "moving", False):
            newports = True  # (a new job, maybe on another node: its own ports there)
        sessions = self.kernel_sessions()
        if self.lost_node and sessions is not None:
            sessions.wants_restore_after_loss(self)  # (its latest snapshot, if any)
        return await super().restart_kernel(now=now, newports=newports, **kw)

    def kernel_sessions(self) -> Any:
        """The server's KernelSessions (chspawner.persist.kernel_state), when
        that extension runs; None otherwise."""
        return getattr(self.parent, "kernel_sessions", None)

    def snapshot_age(self) -> float | None:
        """How old the session snapshot a restart would restore is (None:
        none, or the kernel does not record its session)."""
        sessions = self.kernel_sessions()
        if sessions is None or not sessions.records_session(self):
            return None
        return sessions.age(self.kernel_id)

    def ended_job(self) -> Job | None:
        """The kernel's job, if it ran in one of its own and Slurm was last
        seen to end it (None otherwise)."""
        provisioner = self.provisioner
        job = provisioner.last_job if in_job(provisioner) else None
        return None if job is None or job.alive else job

    def notice_before_restart(self, session: str) -> str:
        """For a client session, as jupyter_client's restarter found the
        kernel dead, before its restart (or, for a job cancelled on
        purpose, before it is given up: see KernelJobRestarter): the words
        for its notebook when the kernel's job ended ("" otherwise). Said
        then, they reach the cell the kernel was running: JupyterLab
        forgets that cell once it hears "restarting". Told sessions aren't
        told again after the restart."""
        job = self.ended_job()
        if job is None:
            return ""
        if self.told_before_restart is None:
            self.told_before_restart = set()
        if session in self.told_before_restart:
            return ""
        self.told_before_restart.add(session)
        restarts = restarts_after(job)
        return lost_kernel_notice(job_words(self.provisioner, job), restarts,
                                  snapshot_age=self.snapshot_age() if restarts else None)

    def kernel_job_command(self, staging: Path) -> list[str]:
        """For a kernel in a job of its own: the keeper, which starts it
        inside the job (see chspawner.persist.keeper, --job)."""
        parent = self.parent
        if not isinstance(parent, PersistentKernelManager):
            return []
        return [sys.executable, "-m", "chspawner.persist.keeper", "--job",
                "--record", str(parent.records.path(self.kernel_id)),
                "--connection-file", str(staging / "kernel.json"),
                "--address-file", str(staging / "keeper"),
                "--max-messages", str(parent.buffer_messages),
                "--max-bytes", str(parent.buffer_bytes),
                "--record-timeout", str(parent.keeper_record_timeout), "--"]

    async def launch_kernel_process(self, kernel_cmd: list[str], **kw: Any) -> None:
        if not can_reattach(self.provisioner) or not isinstance(self.parent,
                                                                PersistentKernelManager):
            return await super().launch_kernel_process(kernel_cmd, **kw)
        # No JPY_PARENT_PID: ipykernel would exit with the server. The
        # kernel gets its own session either way (jupyter_client does that).
        kw["independent"] = True
        # Not the server's stdout/stderr: a pipe whose reader is gone would
        # fail the kernel's writes once the server dies.
        records: KernelRecords = self.parent.records
        records.ensure()
        with open(records.log_path(self.kernel_id, "kernel"), "ab") as log:
            kw["stdout"] = kw["stderr"] = log
            return await super().launch_kernel_process(kernel_cmd, **kw)

    async def kernel_post_start(self, **kw: Any) -> None:
        await super().kernel_post_start(**kw)
        if isinstance(self.parent, PersistentKernelManager):
            await self.parent.kernel_started(self)


class PersistentKernelManager(BusyIsActivity, server_private.MappingKernelManagerHooks,
                              AsyncMappingKernelManager):
    """A jupyter_server kernel manager whose kernels survive the server."""

    server_name = Unicode(
        help="The JupyterHub server this is, among the user's named servers ('': "
             "the default one). Each has a state directory, so kernels of its own: "
             "one server never adopts, nor shuts down, another's. Default: "
             "$JUPYTERHUB_SERVER_NAME, which JupyterHub sets.",
    ).tag(config=True)

    @default("server_name")
    def _default_server_name(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVER_NAME", "")

    state_dir = Unicode(
        help="Where kernel records and keeper sockets live (created mode 0700). "
             "A server replacing another must use the same directory. "
             "Default: chspawner-kernels in the Jupyter runtime directory for the "
             "default server, chspawner-kernels-<hash of the name> for a named one.",
    ).tag(config=True)

    @default("state_dir")
    def _default_state_dir(self) -> str:
        return os.path.join(jupyter_runtime_dir(), state_dir_name(self.server_name))

    # Kernels survive their server's death (a kill, a lost node) either way:
    # this is about a server stopped politely (SIGTERM), which is how the hub
    # stops a server its user asked to stop, and then the user's kernels
    # should go too.
    keep_kernels_on_shutdown = Bool(
        False,
        help="Leave recorded kernels running when the server stops politely "
             "(SIGTERM), for the next server to re-adopt. False (default): shut "
             "them down, as stock jupyter_server does.",
    ).tag(config=True)

    buffer_messages = Integer(
        10000, help="IOPub messages each kernel's keeper holds for replay.",
    ).tag(config=True)

    buffer_bytes = Integer(
        64 << 20, help="Bytes of IOPub messages each kernel's keeper holds at most.",
    ).tag(config=True)

    kernel_job_ending_wait = Float(
        15.0,
        help="Seconds to wait, once a kernel's Slurm job is found ending (COMPLETING: "
             "Slurm still tidying up after it), for its final state, which says why it "
             "ended (its time limit, its memory, its node, a preemption, a cancel): the "
             "words its notebook gets, and whether it is restarted (not after a "
             "cancel). Past it, the kernel is restarted and the words give Slurm's "
             "reason.",
    ).tag(config=True)

    keeper_grace = Float(
        30.0,
        help="Seconds a keeper waits for its kernel's PID to come back (a "
             "restart) before it exits.",
    ).tag(config=True)

    keeper_check_interval = Float(
        2.0,
        help="Seconds between checks that each kernel's keeper (on the server's "
             "host) still runs. A keeper found dead while its kernel runs is "
             "replaced, every open notebook of the kernel follows the new one, and "
             "the cell that was running is told which span of its output was not "
             "kept (and made to finish if it ended meanwhile). A check reads one "
             "small /proc file per kernel: no process is started. 0: no checks "
             "(a dead keeper is then replaced only by the next server).",
    ).tag(config=True)

    witness_messages = Integer(
        10000,
        help="IOPub messages of each kernel (whose keeper runs on the server's host) "
             "that the server keeps a copy of, in its memory, to fill the gap should "
             "the keeper die: what the kernel printed between the keeper's death and "
             "its replacement then reaches every page exactly once. A gap longer than "
             "this (or witness_bytes) is told in the cell instead. 0: no copies.",
    ).tag(config=True)

    witness_bytes = Integer(
        16 << 20,
        help="Bytes of IOPub messages kept per kernel for a keeper's gap (see "
             "witness_messages).",
    ).tag(config=True)

    keeper_ready_timeout = Float(
        30.0,
        help="Seconds to wait for a new keeper to receive the kernel's IOPub.",
    ).tag(config=True)

    keeper_record_timeout = Float(
        300.0,
        help="Seconds the keeper of a kernel in a job of its own waits for the "
             "kernel's record; a kernel never recorded (its server died while it "
             "started) is ended, since no server would ever adopt it.",
    ).tag(config=True)

    keep_kernels_on_sigterm = Bool(
        False,
        help="Leave recorded kernels running when the server is stopped by "
             "SIGTERM (under Slurm, the end of the server's job: a cancel, its "
             "time limit, a preemption), for the next server. SIGINT (how the "
             "hub stops a server on request) still shuts them down. "
             "SlurmChSpawner sets it with kernel_jobs.",
    ).tag(config=True)

    # Outputs written into the notebook while no page holds its kernel
    # (chspawner.persist.notebook_outputs).
    notebook_outputs = Bool(
        True,
        help="Write a kernel's output into its notebook on the server while no "
             "browser holds the kernel (the page closed or reloaded, or its "
             "connection lost for notebook_write_after seconds), so that a reload, "
             "another browser or a download shows it. False: only a page that "
             "comes back with the same client session gets it (replayed).",
    ).tag(config=True)

    notebook_write_after = Float(
        300.0,
        help="Seconds after a kernel's last websocket ended abnormally (no close "
             "from its page: the network cut, a laptop shut) with no reconnect "
             "before the server writes the kernel's output into its notebook. A "
             "page closed or reloaded on purpose starts the writing at once; a "
             "page connecting stops it.",
    ).tag(config=True)

    notebook_write_interval = Float(
        2.0,
        help="Seconds the server gathers a kernel's output before writing it into "
             "the notebook (at most one write per interval while a cell prints; "
             "the end of an execution is written at once).",
    ).tag(config=True)

    notebook_outputs_per_cell = Integer(
        1000,
        help="Outputs (a run of printed text counts as one) kept per cell when the "
             "server writes a kernel's output into its notebook; beyond, the "
             "oldest are dropped and the cell's output says how many and why.",
    ).tag(config=True)

    notebook_output_bytes_per_cell = Integer(
        8 << 20,
        help="Bytes of output kept per cell when the server writes a kernel's "
             "output into its notebook; beyond, the oldest go (the start of a long "
             "printed text, line by line) and the cell's output says so.",
    ).tag(config=True)

    notebook_output_bytes_per_kernel = Integer(
        64 << 20,
        help="Bytes of output the server holds, for all the cells of one kernel, "
             "to write into its notebook (in the server's memory while it writes); "
             "beyond, the oldest outputs of the least recently changed cells go, "
             "and those cells say so.",
    ).tag(config=True)

    @default("default_kernel_name")
    def _default_default_kernel_name(self) -> str:
        """The chosen image's kernel, when the server offers one (see
        ContainerKernelSpecManager.image_default_kernel), not the host's."""
        return image_default_kernel_name(self.kernel_spec_manager)

    @default("kernel_manager_class")
    def _default_kernel_manager_class(self) -> str:
        return "chspawner.persist.kernel_manager.PersistentServerKernelManager"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.records = KernelRecords(self.state_dir)
        self.records.ensure()
        self.notebook_writers = NotebookWriters(self)
        self.stop_signal: int | None = None
        self._note_stop_signal()
        self._stop_politely_on_sigint()
        self._run_on_server_loop(self.adopt_recorded_kernels())

    def _stop_politely_on_sigint(self) -> None:
        """JupyterHub asks a server to stop with SIGINT first. Without a
        terminal, stock jupyter_server lets SIGINT raise KeyboardInterrupt,
        which skips its cleanup; its kernels then end by themselves when
        they notice their parent gone, but ours are detached on purpose and
        would be left running. So SIGINT takes the orderly way SIGTERM
        takes (kernels shut down, or kept with keep_kernels_on_shutdown)."""
        stop = server_private.stop_handler(self.parent)
        if stop is not None and threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, stop)

    def _note_stop_signal(self) -> None:
        """Remember which signal stops the server (see shutdown_all): the
        server's own stop handler, which it installs for SIGTERM later,
        is wrapped in place."""
        def note(sig: int) -> None:
            if self.stop_signal is None:  # the first says why (a later one may be a stop)
                self.stop_signal = sig
        server_private.on_stop_signal(self.parent, note)

    def _run_on_server_loop(self, coro) -> Any:
        """Run ``coro`` to completion now, before the server serves: on the
        loop the server will run (so the ZMQ streams made for adopted
        kernels belong to it)."""
        io_loop = getattr(self.parent, "io_loop", None)
        if io_loop is not None and not io_loop.asyncio_loop.is_running():
            return io_loop.asyncio_loop.run_until_complete(coro)
        from jupyter_core.utils import run_sync

        async def wrapper():
            return await coro
        return run_sync(wrapper)()

    # ------------------------------------------------------ recording ---

    async def kernel_started(self, km: PersistentServerKernelManager) -> None:
        """Called on every start and restart of a kernel: record it (new PID,
        maybe new ports) and make sure its keeper runs and hears it."""
        if not can_reattach(km.provisioner):
            return
        kernel_id = km.kernel_id
        provisioner_info = await km.provisioner.get_provisioner_info()
        if in_job(km.provisioner):
            keeper = await self._job_keeper_address(km, km.provisioner.staging)
        else:
            keeper = self.records.keeper_address(kernel_id)
        record = {
            "kernel_id": kernel_id,
            "kernel_name": km.kernel_name,
            # The spec itself: adoption must not depend on finding it again
            # (an image renamed or a store briefly unreachable).
            "kernel_spec": {**km.kernel_spec.to_dict(),
                            "resource_dir": km.kernel_spec.resource_dir},
            "connection_info": km.get_connection_info(),
            "provisioner_info": provisioner_info,
            "cwd": client_private.launch_cwd(km),
            "keeper": keeper,
            "recorded": time.time(),
        }
        self.records.write(kernel_id, record)
        if km.keeper_address and km.keeper_address != keeper:
            # A restart moved it (a new job): its open websockets follow a
            # keeper that is gone and talk to the old node.
            km.moved = True
            node = getattr(km.provisioner, "node", "") or "?"
            if km.lost_node:
                km.notice = lost_kernel_notice(
                    km.lost_because, True, node,
                    km.snapshot_age() if km.restore_pending else None)
                km.notice_told, km.told_before_restart = km.told_before_restart or set(), None
                km.lost_node = ""
                self.log.warning("chspawner: kernel %s: %s", kernel_id, km.notice)
            elif km.restore_pending:
                km.notice, km.notice_told = moved_kernel_notice(node), set()
            close_connections(kernel_id, "the kernel restarted elsewhere")
        km.keeper_address = keeper
        km.acks_dir = str(self.records.acks_dir(kernel_id))
        if km.moved:
            self.notebook_writers.moved(kernel_id)
        km.keeper_starting = True
        try:
            info = await keeper_info(km.keeper_address, timeout=0.5, key=km.session.key,
                                     connection=km.get_connection_info())
            if info is None and not in_job(km.provisioner):
                self._start_keeper(kernel_id)
            info = await self._wait_keeper_hears(km, info["last_seq"] if info else 0)
        finally:
            km.keeper_starting = False
        if not in_job(km.provisioner):
            self._learn_keeper(km, info)
            self._watch_keepers()
            self._witness(km)
        sessions = km.kernel_sessions()
        if km.restore_pending and sessions is not None:
            sessions.restore_after_restart(km)

    async def _job_keeper_address(self, km: PersistentServerKernelManager,
                                  staging: Path) -> str:
        """Where the keeper in the kernel's job listens: it writes its port
        beside the connection file once it follows the kernel."""
        deadline = time.monotonic() + self.keeper_ready_timeout
        while True:
            try:
                port = json.loads((staging / "keeper").read_text())["port"]
                return f"tcp://{km.provisioner.ip}:{port}"
            except (OSError, ValueError, KeyError):
                pass  # not written yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"the keeper in kernel {km.kernel_id}'s job did not "
                                   f"start within {self.keeper_ready_timeout:.0f} s")
            await asyncio.sleep(0.05)  # a polling interval: nothing signals the write

    def _start_keeper(self, kernel_id: str) -> None:
        with open(self.records.log_path(kernel_id, "keeper"), "ab") as log:
            # --detach: this child returns at once; the keeper itself belongs
            # to no one and outlives the server.
            subprocess.run(
                [sys.executable, "-m", "chspawner.persist.keeper", "--detach",
                 "--record", str(self.records.path(kernel_id)),
                 "--address", self.records.keeper_address(kernel_id),
                 "--max-messages", str(self.buffer_messages),
                 "--max-bytes", str(self.buffer_bytes), "--grace", str(self.keeper_grace)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, check=True,
                close_fds=True)

    async def _wait_keeper_hears(self, km: PersistentServerKernelManager,
                                 seen: int) -> dict | None:
        """Until the keeper's IOPub subscription is live (ZMQ's slow joiner),
        kernel output would be missed: ask the kernel for its info on the
        control channel (it then publishes its status) until the keeper
        reports a message newer than ``seen`` (and than its own start: a
        new keeper numbers from its start time). Its info then (None: it
        heard nothing in time)."""
        control = km.connect_control()
        deadline = time.monotonic() + self.keeper_ready_timeout
        try:
            while time.monotonic() < deadline:
                km.session.send(control, "kernel_info_request")
                info = await keeper_info(km.keeper_address, timeout=0.5, key=km.session.key,
                                         connection=km.get_connection_info())
                if info and info["last_seq"] > max(seen, info.get("first_seq", 1) - 1):
                    return info
                await asyncio.sleep(0.1)  # a polling interval, not a wait for something
            self.log.warning("chspawner: keeper of kernel %s heard nothing within %.0f s; "
                             "output may not be kept", km.kernel_id, self.keeper_ready_timeout)
            return None
        finally:
            control.close(linger=0)

    # ---------------------------------------------------- keeper watch ---

    def _learn_keeper(self, km: PersistentServerKernelManager, info: dict | None) -> None:
        """Remember which process the kernel's keeper is, for the watch."""
        pid = int((info or {}).get("pid") or 0)
        km.keeper_pid, km.keeper_started = pid, process_start(pid) if pid else ""

    def _watch_keepers(self) -> None:
        """Start the keeper watch (once, on the server's loop)."""
        if self.keeper_check_interval <= 0 or getattr(self, "_keeper_watch", None):
            return
        self._keeper_watch = PeriodicCallback(self._check_keepers,
                                              self.keeper_check_interval * 1000)
        self._keeper_watch.start()

    def _check_keepers(self) -> None:
        """Each kernel whose keeper runs here: is it still there? (One read
        of /proc/PID/stat each; its start time tells a reused PID.)"""
        for kernel_id in list(self.list_kernel_ids()):
            km = self._kernels.get(kernel_id)
            if not isinstance(km, PersistentServerKernelManager) or not km.keeper_pid \
                    or km.keeper_starting or in_job(km.provisioner):
                continue
            if process_start(km.keeper_pid) != km.keeper_started:
                km.keeper_starting = True
                asyncio.ensure_future(self._replace_keeper(km))

    def _witness(self, km: PersistentServerKernelManager) -> None:
        """Keep a copy of the kernel's latest output (see
        :mod:`chspawner.persist.witness`), subscribed afresh when a restart
        moved its IOPub port."""
        if self.witness_messages <= 0:
            return
        port = km.get_connection_info().get("iopub_port")
        if km.witness is not None and km.witness_port == port:
            return
        self._stop_witness(km)
        witness = Witness(self.witness_messages, self.witness_bytes)
        stream = km.connect_iopub()
        stream.socket.rcvhwm = 0  # none dropped on our side: the witness bounds itself
        stream.on_recv(witness.add)
        km.witness, km.witness_port, km.witness_stream = witness, port, stream

    def _stop_witness(self, km: Any) -> None:
        stream = getattr(km, "witness_stream", None)
        if stream is not None and not stream.closed():
            stream.close(linger=0)
        km.witness = km.witness_stream = None

    async def _fill_gap(self, km: PersistentServerKernelManager, info: dict) -> dict:
        """Hand the new keeper what the kernel published while none ran,
        from the witness, numbered on from the dead keeper's. The new
        keeper's info after (unchanged when nothing could be recovered)."""
        witness, previous = km.witness, info.get("previous")
        if witness is None or not previous or not info.get("first_ident"):
            return info
        # The witness's copy of the new keeper's first message may still
        # be on its way through the server's own socket.
        deadline = time.monotonic() + 2.0
        while not witness.holds(info["first_ident"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # (its stream is read on this loop meanwhile)
        recovery = witness.recover(previous, info["first_seq"], info["first_ident"])
        if recovery is None:
            self.log.warning("chspawner: kernel %s: the gap can't be filled from the "
                             "server's copy of its output", km.kernel_id)
            return info
        fills = ([b"fill", str(recovery.first_seq + i).encode(), *frames]
                 for i, frames in enumerate(recovery.messages))
        filled = await keeper_info(km.keeper_address, timeout=10.0, key=km.session.key,
                                   connection=km.get_connection_info(), before=fills)
        if not filled or filled.get("filled") != [recovery.first_seq, recovery.last_seq]:
            self.log.warning("chspawner: kernel %s: the new keeper did not take the gap's "
                             "%d message(s)", km.kernel_id, len(recovery.messages))
            return info
        self.log.info("chspawner: kernel %s: the gap filled: messages %d-%d from the "
                      "server's copy", km.kernel_id, recovery.first_seq, recovery.last_seq)
        return filled

    async def _replace_keeper(self, km: PersistentServerKernelManager) -> None:
        """The kernel's keeper died: if the kernel runs (and is wanted), a
        new keeper, which every open notebook of the kernel then follows."""
        kernel_id = km.kernel_id
        try:
            if kernel_id not in self or not self.records.path(kernel_id).exists() \
                    or await km.provisioner.poll() is not None:
                km.keeper_pid = 0  # the kernel's own end (or restart) takes it from here
                return
            self.log.warning("chspawner: the keeper of kernel %s (PID %d) died; starting "
                             "a new one", kernel_id, km.keeper_pid)
            # (in a thread: the server goes on serving while Python starts)
            await asyncio.to_thread(self._start_keeper, kernel_id)
            info = await self._wait_keeper_hears(km, 0)
            self._learn_keeper(km, info)
            if info is None:
                return
            info = await self._fill_gap(km, info)
            km.takeover = Takeover.from_info(info)
            if km.takeover is not None and not km.takeover.filled:
                self.log.warning("chspawner: kernel %s: %s", kernel_id,
                                 km.takeover.notice(None))
            keeper_replaced(kernel_id)
            self.notebook_writers.moved(kernel_id)  # a writing follows the new keeper too
        except Exception:
            self.log.exception("chspawner: can't replace the keeper of kernel %s", kernel_id)
        finally:
            km.keeper_starting = False

    def start_buffering(self, kernel_id: str, session_key: str, channels: dict) -> None:
        """The kernel's last page went away: jupyter_server keeps its
        session's streams, buffering what they receive, for its return;
        all but the keeper's, which the keeper keeps (see
        kernel_connection's ``stop_following``)."""
        super().start_buffering(kernel_id, session_key, channels)
        keeper = channels.get("iopub")
        if keeper is not None and kernel_id in self:
            stop_following(keeper, self.get_kernel(kernel_id).session.key)

    def changed_ports(self, kernel_id: str) -> list | None:
        """A kernel that moved counts as one whose ports changed: a session
        reconnecting gets fresh streams, not the ones it had buffered."""
        km = self.get_kernel(kernel_id)
        if isinstance(km, PersistentServerKernelManager) and km.moved:
            km.moved = False
            return list(km.ports)
        return super().changed_ports(kernel_id)

    def remove_kernel(self, kernel_id: str):
        # Called once a kernel is gone for good from this server: shut down
        # on purpose, or dead beyond restarting. Its keeper exits once the
        # record is gone.
        km = super().remove_kernel(kernel_id)
        if km is not None:
            self._stop_witness(km)
        self.records.remove(kernel_id)
        forget_connections(kernel_id)
        self.notebook_writers.forget(kernel_id)
        return km

    # ------------------------------------------------------- adopting ---

    async def adopt_recorded_kernels(self) -> None:
        """Take over every recorded kernel that still runs."""
        for kernel_id, record in self.records.all().items():
            if kernel_id in self:
                continue
            try:
                adopted = await self._adopt(kernel_id, record)
            except Exception:
                # Keep the record: the kernel may be alive and a later server
                # (or an admin) may still take it over.
                self.log.exception("chspawner: can't re-adopt kernel %s; its record "
                                   "stays in %s", kernel_id, self.records.directory)
                continue
            if adopted:
                self.log.info("chspawner: re-adopted kernel %s (%s)", kernel_id,
                              record.get("kernel_name"))
            else:
                self.log.info("chspawner: dropping the record of dead kernel %s", kernel_id)
                self.records.remove(kernel_id)

    async def _adopt(self, kernel_id: str, record: dict) -> bool:
        km = self.kernel_manager_factory(
            connection_file=os.path.join(self.connection_dir, f"kernel-{kernel_id}.json"),
            parent=self, log=self.log, kernel_name=record["kernel_name"],
            kernel_spec_manager=self.kernel_spec_manager)
        km.kernel_id = kernel_id
        if record.get("kernel_spec"):
            client_private.set_kernel_spec(km, km.kernel_spec_manager.kernel_spec_class(
                **record["kernel_spec"]))
        km.load_connection_info(record["connection_info"])
        provisioner_info = dict(record["provisioner_info"])
        km.provisioner = KernelProvisionerFactory.instance(parent=self).create_provisioner_instance(
            kernel_id, km.kernel_spec, parent=km)
        await km.provisioner.load_provisioner_info(provisioner_info)
        if in_job(km.provisioner):
            # Asked plainly: a Slurm that can't answer (not reachable, or
            # not this host's) leaves the record for a server that can ask.
            if await km.provisioner.job_state() is not JobState.RUNNING:
                return False
        elif await km.provisioner.poll() is not None:
            return False
        km.write_connection_file()
        # Started by an earlier server; a restart keeps its working
        # directory (and its ports).
        client_private.mark_started(km, record.get("cwd"))
        km.keeper_address = record.get("keeper") or self.records.keeper_address(kernel_id)
        km.acks_dir = str(self.records.acks_dir(kernel_id))

        info = await keeper_info(km.keeper_address, timeout=1.0, key=km.session.key,
                                 connection=km.get_connection_info())
        if info is None:  # keeper gone: start one (what the gap held is lost, and said)
            self.log.warning("chspawner: kernel %s had no keeper; starting one here",
                             kernel_id)
            km.keeper_address = record["keeper"] = self.records.keeper_address(kernel_id)
            self.records.write(kernel_id, record)
            self._start_keeper(kernel_id)
            info = await self._wait_keeper_hears(km, 0)
        # A keeper that took over from a dead one (now, or under the server
        # before us): the sessions it resumes are told what the gap cost.
        km.takeover = Takeover.from_info(info or {})
        if not in_job(km.provisioner):
            self._learn_keeper(km, info)
            self._watch_keepers()
            self._witness(km)
        client_private.add_kernel(self, kernel_id, km)
        km.execution_state = (info or {}).get("execution_state") or "idle"
        if km.execution_state in ("unknown", "starting"):
            km.execution_state = "idle"
        km.reason = ""
        km.last_activity = server_private.utcnow()
        # A kernel busy with a long cell answers nothing on shell until it is
        # done: the websocket's first kernel_info request would stall. Ask on
        # control instead (ipykernel answers there at once).
        server_private.adopt_kernel(self, kernel_id, km,
                                    asyncio.ensure_future(self._control_kernel_info(km)))
        await server_private.follow_kernel(self, kernel_id)
        self.notebook_writers.adopted(kernel_id)
        return True

    async def _control_kernel_info(self, km: PersistentServerKernelManager) -> dict:
        """The kernel's info over a transient control channel ({} when it
        doesn't answer within 10 s: the protocol is then assumed current)."""
        control = km.connect_control()
        reply: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_reply(frames):
            _idents, frames = km.session.feed_identities(frames)
            msg = km.session.deserialize(frames)
            if msg["msg_type"] == "kernel_info_reply" and not reply.done():
                reply.set_result(msg["content"])

        control.on_recv(on_reply)
        km.session.send(control, "kernel_info_request")
        try:
            return await asyncio.wait_for(reply, 10)
        except asyncio.TimeoutError:
            return {}
        finally:
            control.close(linger=0)

    # ------------------------------------------------------- shutdown ---

    async def shutdown_all(self, now: bool = False) -> None:
        """On server shutdown: with ``keep_kernels_on_shutdown`` (or
        ``keep_kernels_on_sigterm``, stopped by SIGTERM), let go of
        the recorded kernels (they keep running, for the next server) and
        shut down only the others."""
        self.notebook_writers.close_all()  # (the next server resumes a writing)
        keep = self.keep_kernels_on_shutdown or (
            self.keep_kernels_on_sigterm and self.stop_signal == signal.SIGTERM)
        if not keep:
            return await super().shutdown_all(now=now)
        kept = [kid for kid in self.list_kernel_ids() if self.records.path(kid).exists()]
        for kernel_id in kept:
            self._let_go(kernel_id)
        if kept:
            self.log.info("chspawner: leaving %d kernel(s) running for the next server",
                          len(kept))
        await super().shutdown_all(now=now)

    def _let_go(self, kernel_id: str) -> None:
        """Forget a kernel without stopping it."""
        self.stop_buffering(kernel_id)
        km = self.get_kernel(kernel_id)
        self._stop_witness(km)
        server_private.let_go(self, km, kernel_id)
        km.stop_restarter()
        client_private.close_control_socket(km)
        client_private.drop_kernel(self, kernel_id)


def process_start(pid: int) -> str:
    """A process's start time (/proc/PID/stat's 22nd field: clock ticks
    since boot), which with its PID names it; "" when it's gone (a zombie
    counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return ""
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return ""
    return fields[19]


async def keeper_info(address: str, timeout: float = 1.0, key: bytes = b"",
                      connection: dict | None = None,
                      before: Iterable[list[bytes]] = ()) -> dict | None:
    """A keeper's state, or None if nothing answers at ``address`` in time
    (the request signed with the kernel's ``key``; on TCP, CURVE with the
    keys in the kernel's ``connection`` info). The requests ``before`` are
    sent first on the same socket: the keeper has handled them when it
    answers."""
    path = address.removeprefix("ipc://")
    if address.startswith("ipc://") and not os.path.exists(path):
        return None
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        secure_client(sock, connection or {}, address)
        sock.connect(address)
        for request in before:
            await sock.send_multipart(signed_request(key, request))
        await sock.send_multipart(signed_request(key, [b"info"]))
        if not await sock.poll(int(timeout * 1000)):
            return None
        frames = await sock.recv_multipart()
        return json.loads(frames[1]) if frames[0] == b"info" else None
    finally:
        sock.close()
