"""Kernels in container images: a jupyter_client kernel provisioner.

A kernelspec selects it with::

    "metadata": {"kernel_provisioner": {"provisioner_name": "chspawner",
        "config": {"image": "pytorch:24", "binds": ["/scratch"],
                   "env": {"OMP_NUM_THREADS": "4"}, "backend": "builtin",
                   "home": true}}}

and its ``argv`` then runs inside the image, started through the one
RunSpec. The container runtime execs, so the process jupyter_client holds
*is* the kernel: interrupts, restarts and shutdowns reach it directly.

Transport: a kernel's sockets carry its code and output, so other users
must not reach them (see :mod:`chspawner.provisioner.transport`). A kernel on
this host uses ZeroMQ IPC: its Unix sockets are in a private (0700)
staging directory under the host's temporary directory, which the
container sees at /tmp, so no bind is needed; its connection file, there
too, names them by their path inside the container, the server by theirs
here. IPC "ports" are names in that directory, chosen by jupyter_client
(1-5), so any kernel can be given them: nothing relies on a kernel writing
its ports back (ipykernel does, IRkernel doesn't). The kernel is up once
its five sockets exist; one that names them PREFIX:PORT (IRkernel) gets
the PREFIX-PORT jupyter_client connects to as a symlink (see
:func:`chspawner.provisioner.transport.ipc_bound`). A restart reuses the
ports the clients already know.

Launcher ``srun`` runs the kernel on a compute node, inside the image, as a
Slurm job step (in a new allocation, or ``jobid``'s). Then the connection
file is staged under $HOME (which compute nodes share with the login node,
and which the container gets at /home/$USER), with a CURVE key pair made
here; on the node the kernel binds IPC in a private directory, and a relay
in the job (:mod:`chspawner.provisioner.transport`) offers its channels on TCP
with CurveZMQ to the holder of those keys only, writing the node's name and
its ports beside the connection file. Interrupts go as messages (srun takes
SIGINT for itself), and stopping the kernel also cancels its job.

Launcher ``sbatch`` runs the kernel as a batch job of its own (options in
``sbatch_args``), as srun does but with no client process here: the kernel
outlives the process that started it, and the job is what is followed
(``squeue``: one per ``slurm_poll_interval`` for all the server's kernel
jobs, through the process's shared :class:`chspawner.slurm.JobWatch`),
adopted by a new server, and cancelled. Its output goes to
``job_log_dir`` (the spawner gives the user's log directory), else beside
the connection file. A kernel manager may run the kernel under a program
of its own inside the job (one that is a
:class:`~chspawner.provisioner.hooks.KernelJobHost`: chspawner.persist's
keeper does that). A restart is a new job: on the same node when it was
asked while the kernel ran (see ``_same_node``), wherever Slurm puts it
when the kernel was found dead (its node lost); an srun step alike.

The settings are declared in :mod:`chspawner.provisioner.settings`; each
mechanism (local process, srun step, batch job, adopted PID) is a class of
:mod:`chspawner.provisioner.launchers`, to which the lifecycle methods
below delegate.
"""
from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase

from chspawner.provisioner.hooks import Adoptable, KernelJobHost
from chspawner.provisioner.launchers import (AdoptedProcess, BatchJob, Launcher, LocalProcess,
                                             SrunStep, register_kernel_job)
from chspawner.provisioner.session_state import (SNAPSHOTS, is_ipykernel,
                                                  recording_command, stage_recorder)
from chspawner.provisioner.settings import ProvisionerSettings, SettingsError
from chspawner.provisioner.transport import TransportError, clear_ipc, ipc_bound, ipc_prefix
from chspawner.runtime.launcher import SQUASH_SUFFIX, Fail, find_image
from chspawner.runtime.spec import Bind, RunSpec, to_argv
from chspawner.slurm import (Job, JobState, JobWatch, SlurmClient, SlurmError,
                             job_environment, shared_watch)

PORTS = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")
#: Seconds between looks at the file a starting kernel writes its ports to.
READ_BACK_INTERVAL = 0.02


class KernelStartError(RuntimeError):
    """The kernel could not start; the message says why, in one line."""


class ContainerProvisioner(LocalProvisioner, Adoptable):
    """Starts a kernelspec's argv inside a container image."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._settings: ProvisionerSettings | None = None
        self._staging: Path | None = None
        self._program = ""
        self._ipc_ports: dict[str, int] = {}
        self._job_name: str | None = None
        self.launcher: Launcher | None = None
        #: the compute node the kernel runs on (launcher srun or sbatch), once known
        self.node = ""
        #: a restart was asked while the kernel ran: it stays on its node
        self._restart_in_place = False
        #: the next restart is a move (see move_at_next_restart)
        self._moving = False

    # ----------------------------------------------------------- config --

    @property
    def settings(self) -> ProvisionerSettings:
        """The kernelspec's provisioner config, checked (KernelStartError
        for a value of the wrong type)."""
        if self._settings is None:
            config = (self.kernel_spec.metadata.get("kernel_provisioner") or {}).get("config")
            try:
                self._settings = ProvisionerSettings.from_config(config, self.log)
            except SettingsError as e:
                raise KernelStartError(str(e)) from None
        return self._settings

    @property
    def on_node(self) -> bool:
        """Whether the kernel runs on a compute node (srun or sbatch)."""
        return self.settings.on_node

    @property
    def in_job(self) -> bool:
        return self.settings.launcher == "sbatch"

    @property
    def staging(self) -> Path | None:
        return self._staging

    def image_path(self) -> str:
        """The image's directory, checked now so a missing image fails at
        once, by name: found as the runtime will find it (a directory, or a
        name in the store, which must be trusted), by the same function."""
        image = self.settings.image
        if not image:
            raise KernelStartError("kernelspec names no image (provisioner config 'image')")
        try:
            return find_image(image, self.settings.storage)
        except Fail as e:
            raise KernelStartError(str(e)) from None

    # ------------------------------------------- the launcher's process --
    # What jupyter_client's LocalProvisioner keeps as attributes is the
    # launcher's here.

    @property
    def process(self):
        return self.launcher.process if self.launcher else None

    @property
    def pid(self) -> int | None:
        return self.launcher.pid if self.launcher else None

    @property
    def pgid(self) -> int | None:
        return self.launcher.pgid if self.launcher else None

    @property
    def job_id(self) -> str | None:
        """The kernel's own Slurm job (launcher sbatch)."""
        return self.launcher.job_id if self.launcher else None

    # ---------------------------------------------------------- launch ---

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        settings = self.settings  # first: a wrong setting fails at once
        km = self.parent
        restart = self._staging is not None and self._known_ports()
        if km is not None:
            km.cache_ports = False  # the kernel picks its ports (see above)
        if self.on_node:
            self.kernel_spec.interrupt_mode = "message"
        image = self.image_path()  # a missing image fails at once
        self._private_transport(km)
        kwargs = await super().pre_launch(**kwargs)
        connection_file = Path(km.connection_file)
        staged = self._stage(connection_file, keep_ports=restart)
        cmd = [arg.replace(str(connection_file), str(staged)) for arg in kwargs["cmd"]]
        if cmd and cmd[0] == sys.executable != self.kernel_spec.argv[0]:
            # jupyter_client swaps a bare "python3" for the server's own
            # interpreter; inside the image it must stay the image's.
            cmd[0] = self.kernel_spec.argv[0]
        self._check_command(image, cmd)
        self._program = cmd[0]
        env = dict(settings.env)
        if settings.session_state:
            cmd = self._record_session(cmd, env)
        spec = RunSpec(
            image=image, command=cmd, binds=list(settings.binds), env=env,
            devices=list(settings.devices),
            image_env=_has_environment(image), home=self._home(),
            cwd=self._container_cwd(kwargs.get("cwd")))
        cmd = to_argv(spec, settings.backend)
        if self.on_node:
            cmd = [*self._relay_command(), *cmd]
        self.launcher = self._new_launcher(km, kwargs)
        kwargs["cmd"] = self.launcher.command(cmd)
        self.log.info("chspawner: kernel in image %s: %s", image, " ".join(kwargs["cmd"]))
        return kwargs

    def _new_launcher(self, km: Any, kwargs: dict[str, Any]) -> Launcher:
        """The mechanism the kernelspec's ``launcher`` names, for this start."""
        settings = self.settings
        if settings.launcher == "local":
            return LocalProcess(self.log)
        self._job_name = self._staging.name  # "chspawner-kernel-XXXXXXXX"
        client = SlurmClient(env=job_environment())
        away = _away_from_server(settings)
        where = self._same_node(away)  # (a restart's)
        if settings.launcher == "srun":
            return SrunStep(self.log, client, self._job_name, _username(),
                            jobid=_jobid(settings), srun_args=[*settings.srun_args, *where])
        prefix = km.kernel_job_command(self._staging) if isinstance(km, KernelJobHost) else []
        job = BatchJob(self.log, client, job_name=self._job_name, output=self._job_log(),
                       chdir=str(kwargs.get("cwd") or Path.home()),
                       sbatch_args=[*settings.sbatch_args, *away, *where],
                       env=job_environment(kwargs.get("env")), prefix=prefix,
                       watch=self._job_watch())
        # (the session status shows its wait, and its time left: see register_kernel_job)
        register_kernel_job(self.kernel_id, job)
        return job

    def _job_watch(self) -> JobWatch:
        """The server's one watch of its kernels' jobs (shared by them all)."""
        return kernel_job_watch(self.settings)

    def _same_node(self, away: list[str]) -> list[str]:
        """A restart asked while the kernel ran keeps it on its node: there,
        its address and the ports its clients already use stay its own (a
        client of a kernel that moved would talk to the old node). Not on a
        node the kernel must stay off (the server's, since moved there)."""
        node, self._restart_in_place = self.node if self._restart_in_place else "", False
        self._moving = False
        if not node or f"--exclude={node}" in away:
            return []
        return [f"--nodelist={node}"]

    def _job_log(self) -> Path:
        """Where the kernel's batch job writes its output: the user's log
        directory (``job_log_dir``), one file per job; else beside the
        connection file, as the staging directory goes with the kernel."""
        if not self.settings.job_log_dir:
            return self._staging / "job.log"
        directory = Path(self.settings.job_log_dir).expanduser()
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise KernelStartError(f"can't make the kernels' log directory {directory} "
                                   f"(provisioner config 'job_log_dir'): {e.strerror}") from None
        return directory / f"{self._job_name}-%j.log"

    def _private_transport(self, km: Any) -> None:
        """Make the staging directory, and choose the kernel's transport:
        IPC in it here; on a node, TCP through the CURVE relay, with a key
        pair of the kernel's own (kept across restarts, as its HMAC key)."""
        if self._staging is None:
            base = self._staging_base()[0]
            base.mkdir(parents=True, exist_ok=True)
            self._staging = Path(tempfile.mkdtemp(prefix="chspawner-kernel-", dir=base))
        if km is None:
            return
        if not self.on_node:
            km.transport = "ipc"
            try:
                km.ip = ipc_prefix(self._staging)
                ipc_prefix(Path("/tmp") / self._staging.name)
            except TransportError as e:
                raise KernelStartError(str(e)) from None
            return
        if not km.has_trait("curve_publickey"):
            raise KernelStartError("kernels on compute nodes need jupyter_client with "
                                   "CurveZMQ support (curve_publickey): upgrade it")
        km.transport = "tcp"
        km.ip = "127.0.0.1"  # (the node's, until the relay says where it is)
        if km.curve_publickey is None or km.curve_secretkey is None:
            km.curve_publickey, km.curve_secretkey = zmq.curve_keypair()

    def _staging_base(self) -> tuple[Path, Path]:
        """Where staging directories go, here and as the container sees it:
        the host's TMPDIR (/tmp inside), or for a kernel on a node under
        $HOME (shared with the nodes; /home/$USER inside)."""
        if self.on_node:
            runtime = Path(".local") / "share" / "jupyter" / "runtime"
            return Path.home() / runtime, Path("/home") / _username() / runtime
        return Path(os.environ.get("TMPDIR") or "/tmp"), Path("/tmp")

    def _relay_command(self) -> list[str]:
        """The CURVE relay, in the job, outside the container, from our own
        installation (which the nodes share, as they share $HOME)."""
        return [sys.executable, "-m", "chspawner.provisioner.transport", "--connection-file",
                str(self._staging / "kernel.json"), "--timeout",
                str(float(self.settings.timeout())), "--"]

    def _known_ports(self) -> bool:
        return all(self.connection_info.get(p) for p in PORTS)

    def _home(self) -> bool:
        return self.on_node or self.settings.home

    def _stage(self, connection_file: Path, keep_ports: bool) -> Path:
        """Copy the connection file into the staging directory, ports 0
        (or, on a restart, the ports clients already use), the IPC sockets
        named as the container sees them. On a node, the relay takes it
        from there (and the CURVE keys in it). Returns its path inside the
        container."""
        base, inside = self._staging_base()
        info = json.loads(connection_file.read_text())
        for port in PORTS:
            if keep_ports:
                info[port] = self.connection_info.get(port, 0)
            elif self.on_node:
                info[port] = 0  # the relay's business (it picks them on the node)
            # else: IPC "ports" are names in the private staging directory,
            # which jupyter_client chose (1-5): any kernel can bind them,
            # whether or not it writes its ports back.
        if not self.on_node:
            self._ipc_ports = {p: int(info[p]) for p in PORTS}
            clear_ipc(ipc_prefix(self._staging), self._ipc_ports)  # a previous run's, dead
        if self.on_node:
            # What the last run's job wrote (its relay; a KernelJobHost's
            # program, the keeper) must not pass for the new one's.
            for name in ("relay.json", "keeper"):
                (self._staging / name).unlink(missing_ok=True)
        else:
            info["ip"] = ipc_prefix(Path("/tmp") / self._staging.name)
        staged = self._staging / "kernel.json"
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=1)
        return inside / self._staging.relative_to(base) / "kernel.json"

    def _record_session(self, cmd: list[str], env: dict[str, str]) -> list[str]:
        """An ipykernel kernel started with chspawner's session recorder
        (settings ``session_state``), its snapshots under the user's home;
        any other kernel, or one without a view of the home, as it is."""
        if not is_ipykernel(cmd) or not self._home():
            self.log.warning("chspawner: session_state needs an ipykernel kernel "
                             "(-m ipykernel_launcher) and the home bound: not recorded")
            return cmd
        base, inside = self._staging_base()
        stage_recorder(self._staging)
        snapshots = Path.home() / SNAPSHOTS
        snapshots.mkdir(mode=0o700, parents=True, exist_ok=True)
        env["CHSPAWNER_SNAPSHOTS"] = str(Path("/home") / _username() / SNAPSHOTS)
        return recording_command(cmd, inside / self._staging.relative_to(base) / "session")

    def _check_command(self, image: str, cmd: list[str]) -> None:
        """A kernel whose program isn't in the image fails now, clearly."""
        program, tree = cmd[0], image_tree(image)
        if program.startswith("/") and tree is not None \
                and not os.path.lexists(os.path.join(tree, program[1:])):
            raise KernelStartError(f"image {self.settings.image} has no {program} "
                                   "(the kernelspec's argv[0])")

    def _container_cwd(self, cwd: str | None) -> str | None:
        """The notebook's directory (``cwd``, a host path) as the container
        sees it, so the kernel starts beside the notebook: under $HOME (with
        ``home``: /home/$USER inside), under a bind's source (its
        destination), or under the host's TMPDIR (/tmp inside, for a local
        kernel). The deepest match wins. A directory the container can't
        see: the home inside if bound, else / (and the log says so). No
        directory (a kernel started through the REST API without a path):
        the server's own, where a native kernel would start."""
        cwd = os.path.abspath(cwd or os.getcwd())
        inside_home = f"/home/{_username()}"
        views: list[tuple[str, str]] = []  # (host path, container path)
        for text in self.settings.binds:
            bind = Bind.parse(text)
            views.append((os.path.abspath(bind.src), bind.dst or os.path.abspath(bind.src)))
        if self._home():
            views.append((os.path.realpath(os.path.expanduser("~")), inside_home))
            views.append((os.path.expanduser("~"), inside_home))
        if not self.on_node:
            views.append((os.path.abspath(os.environ.get("TMPDIR") or "/tmp"), "/tmp"))
        for host, inside in sorted(views, key=lambda v: len(v[0]), reverse=True):
            rel = os.path.relpath(cwd, host)
            if rel == "." or not rel.startswith(".."):
                return os.path.normpath(os.path.join(inside, rel))
        fallback = inside_home if self._home() else None
        self.log.warning("chspawner: the kernel's directory %s is not visible in the "
                         "container; it starts in %s", cwd, fallback or "/")
        return fallback

    async def launch_kernel(self, cmd: list[str], **kwargs: Any):
        launcher = self.launcher
        try:
            await launcher.start(cmd, **kwargs)
        except SlurmError as e:  # (sbatch's: the other launchers run no Slurm command)
            raise KernelStartError(f"can't submit the kernel's job: {e}") from None
        self.cwd = kwargs.get("cwd", Path.cwd())
        if launcher.job_id:
            self.log.info("chspawner: kernel %s is Slurm job %s", self.kernel_id,
                          launcher.job_id)
        try:
            info = await self._read_back_ports()
        except BaseException:
            await launcher.cancel()  # a job still queued, say: nobody would ever use it
            raise
        self.connection_info.update({p: int(info[p]) for p in PORTS})
        if self.on_node:
            node = self.node = info["node"]
            try:
                self.connection_info["ip"] = socket.gethostbyname(node)
            except OSError as e:
                raise KernelStartError(f"kernel runs on node {node!r}, whose address "
                                       f"can't be resolved here: {e}") from None
            self.ip = self.connection_info["ip"]
        return self.connection_info

    def _ipc_bound(self) -> dict | None:
        """The kernel's IPC ports once it has bound all five sockets (see
        transport.ipc_bound), else None."""
        prefix = ipc_prefix(self._staging)
        return dict(self._ipc_ports) if ipc_bound(prefix, self._ipc_ports) else None

    async def _read_back_ports(self) -> dict:
        """Wait for the kernel to bind its sockets (here) or for its relay
        to say where it is (on a node); fail fast if it dies first."""
        # On a node, the relay says where the kernel is, once it is.
        staged = self._staging / ("relay.json" if self.on_node else "kernel.json")
        # A kernel on a node may first wait in the queue.
        timeout = self.settings.timeout()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if not self.on_node:
                    info = self._ipc_bound()
                    if info is not None:
                        return info
                else:
                    info = json.loads(staged.read_text())
                    info = {**info["ports"], "node": info["node"]}
                    if all(info.get(p) for p in PORTS):
                        return info
            except (OSError, ValueError, KeyError, TypeError):
                pass  # being rewritten: read again
            status = await self.launcher.poll()
            if status is not None:
                raise KernelStartError(self.launcher.failure(status)
                                       or self._exit_reason(status))
            if time.monotonic() > deadline:
                raise KernelStartError(f"kernel in image {self.settings.image} did not "
                                       f"bind its ports within {timeout:.0f} s "
                                       "(provisioner config 'launch_timeout')")
            await asyncio.sleep(READ_BACK_INTERVAL)  # nothing signals the write

    def _exit_reason(self, status: int) -> str:
        image = self.settings.image
        if status == 31:
            return f"can't set up a container for image {image} (see the server log)"
        if status == 49:
            return (f"image {image} can't execute the kernel's program "
                    f"{self._program!r} (not found in the image?)")
        return (f"kernel in image {image} exited with status {status} before it was "
                "ready; is ipykernel installed in the image?")

    # ----------------------------------------------------- lifecycle ---
    # The launcher runs and follows the kernel; a provisioner restored with
    # load_provisioner_info() (by a new server process) follows it by PID,
    # or by its job.

    @property
    def has_process(self) -> bool:
        return self.launcher is not None and self.launcher.has_process

    async def poll(self) -> int | None:
        return await self.launcher.poll() if self.launcher else 0

    async def wait(self) -> int | None:
        return await self.launcher.wait() if self.launcher else 0

    async def send_signal(self, signum: int) -> None:
        if self.launcher:
            await self.launcher.signal(signum)

    async def shutdown_requested(self, restart: bool = False) -> None:
        await self._note_restart(restart)
        await super().shutdown_requested(restart)

    async def kill(self, restart: bool = False) -> None:
        await self._note_restart(restart)
        if self.launcher:
            await self.launcher.stop(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self._note_restart(restart)
        if self.launcher:
            await self.launcher.stop(signal.SIGTERM)

    async def _note_restart(self, restart: bool) -> None:
        """As a restart begins (jupyter_client asks for the shutdown, or
        kills, first): whether the kernel still runs. A restart someone asked
        for keeps the kernel on its node; one of a kernel found dead (its
        node lost, its job at its time limit) goes wherever Slurm puts it."""
        if restart and not self._restart_in_place and not self._moving:
            self._restart_in_place = self.launcher is not None and \
                await self.launcher.poll() is None

    def move_at_next_restart(self) -> None:
        """The next restart is a move (its session saved first, see
        chspawner.persist.kernel_state): a new job wherever Slurm puts it
        (a drained node gets none), not kept on this node as a restart
        the user asked for is."""
        self._moving = True

    @property
    def moving(self) -> bool:
        """Whether the restart under way (or the next) is a move."""
        return self._moving

    async def job_state(self) -> JobState:
        """The kernel job's state now; SlurmError when Slurm can't say."""
        if not isinstance(self.launcher, BatchJob) or not self.launcher.job_id:
            return JobState.GONE
        return await self.launcher.job_state()

    @property
    def last_job(self) -> Job | None:
        """The kernel's job as Slurm last showed it (None: not in a job, or
        not asked yet)."""
        return self.launcher.last_seen if isinstance(self.launcher, BatchJob) else None

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart)
        if not restart and self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    # ------------------------------------------------------- re-attach ---

    async def get_provisioner_info(self) -> dict:
        info = await super().get_provisioner_info()
        info["staging"] = str(self._staging) if self._staging else None
        info["image"] = self.settings.image
        info["job_name"] = self._job_name
        info["job_id"] = self.job_id
        info["node"] = self.node
        # JSON, so a session manager can store it: the key is bytes here.
        info["connection_info"] = {k: v.decode() if isinstance(v, bytes) else v
                                   for k, v in info.get("connection_info", {}).items()}
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        connection = dict(provisioner_info.get("connection_info") or {})
        if isinstance(connection.get("key"), str):
            connection["key"] = connection["key"].encode()
        # The base's, not LocalProvisioner's: pid and pgid are the launcher's here.
        await KernelProvisionerBase.load_provisioner_info(
            self, {**provisioner_info, "connection_info": connection})
        self.ip = provisioner_info.get("ip")
        staging = provisioner_info.get("staging")
        self._staging = Path(staging) if staging else None
        self._job_name = provisioner_info.get("job_name")
        self.node = provisioner_info.get("node") or ""
        self.launcher = self._adopted_launcher(provisioner_info)

    def _adopted_launcher(self, info: dict) -> Launcher | None:
        """What follows a kernel another process started: its job, or its PID."""
        if info.get("job_id"):
            job = BatchJob(self.log, SlurmClient(env=job_environment()),
                           job_id=str(info["job_id"]), watch=self._job_watch())
            register_kernel_job(self.kernel_id, job)
            return job
        if info.get("pid") is None:
            return None
        srun = None
        if self.settings.launcher == "srun" and self._job_name:
            srun = SrunStep(self.log, SlurmClient(env=job_environment()), self._job_name,
                            _username(), jobid=_jobid(self.settings))
        return AdoptedProcess(self.log, int(info["pid"]), info.get("pgid"), srun=srun)


def kernel_job_watch(settings: ProvisionerSettings) -> JobWatch:
    """This process's one watch of kernel jobs run with ``settings`` (a
    server gives all its image kernels the same): whoever else in the server
    asks about a job through it (the session status, about the server's own
    job) costs no query of its own."""
    return shared_watch(job_environment(), interval=settings.slurm_poll_interval,
                        command=settings.slurm_query_command,
                        sacct=settings.slurm_accounting_command,
                        table_dir=settings.slurm_table_dir)


def _jobid(settings: ProvisionerSettings) -> str | None:
    return str(settings.jobid) if settings.jobid not in (None, "") else None


def _away_from_server(settings: ProvisionerSettings) -> list[str]:
    """The sbatch option that keeps a kernel's job off the server's node
    (``away_from_server``): the node of the job this server runs in."""
    node = os.environ.get("SLURMD_NODENAME", "")
    return [f"--exclude={node}"] if settings.away_from_server and node else []


def _username() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def image_tree(image: str) -> str | None:
    """Where to look at ``image``'s files without mounting it: the image
    directory; for a store's SquashFS image, the directory it was made
    from, kept beside it (None: a SquashFS file alone)."""
    if not os.path.isfile(image):
        return image
    tree = image.removesuffix(SQUASH_SUFFIX)
    return tree if tree != image and os.path.isdir(tree) else None


def _has_environment(image: str) -> bool:
    tree = image_tree(image)
    return tree is not None and os.path.isfile(os.path.join(tree, "ch", "environment"))
