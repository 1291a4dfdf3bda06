"""Kernels in container images: a jupyter_client kernel provisioner.

A kernelspec selects it with::

    "metadata": {"kernel_provisioner": {"provisioner_name": "chspawner",
        "config": {"image": "pytorch:24", "binds": ["/scratch"],
                   "env": {"OMP_NUM_THREADS": "4"}, "backend": "builtin",
                   "home": true}}}

and its ``argv`` then runs inside the image, started through the one
RunSpec. The container runtime execs, so the process jupyter_client holds
*is* the kernel: interrupts, restarts and shutdowns reach it directly, and
LocalProvisioner's process handling serves unchanged.

Transport: a kernel's sockets carry its code and output, so other users
must not reach them (see :mod:`chspawner.provisioner.transport`). A kernel on
this host uses ZeroMQ IPC: its Unix sockets are in a private (0700)
staging directory under the host's temporary directory, which the
container sees at /tmp, so no bind is needed; its connection file, there
too, names them by their path inside the container, the server by theirs
here. Rather than choosing ports, the kernel gets a connection file whose
ports are 0, binds ports of its own choosing and writes them back (ipykernel
does), and we read them from there. A restart reuses the ports the clients
already know.

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
(``squeue``), adopted by a new server, and cancelled. A kernel manager may
run the kernel under a program of its own inside the job (its
``kernel_job_wrapper(staging)``: session_proxy's keeper does that). A
restart is a new job, maybe on another node.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.provisioning.local_provisioner import LocalProvisioner

from chspawner.images.store import Store, StoreError, check_name
from chspawner.provisioner.transport import TransportError, ipc_prefix
from chspawner.runtime.spec import RunSpec, to_argv
from chspawner.slurm import (ACTIVE_STATES, SlurmError, job_environment, job_status,
                             slurm_command)

PORTS = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")
#: Seconds between squeue calls while following a kernel's job.
JOB_POLL_INTERVAL = 1.0


class KernelStartError(RuntimeError):
    """The kernel could not start; the message says why, in one line."""


class ContainerProvisioner(LocalProvisioner):
    """Starts a kernelspec's argv inside a container image."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._staging: Path | None = None
        self._program = ""
        self._job_name: str | None = None
        self.job_id: str | None = None  # launcher sbatch: the kernel's job
        self._job_checked = (0.0, None)  # (when, what poll() said)

    @property
    def srun(self) -> bool:
        return self._option("launcher", "local") == "srun"

    @property
    def sbatch(self) -> bool:
        return self._option("launcher", "local") == "sbatch"

    @property
    def on_node(self) -> bool:
        """Whether the kernel runs on a compute node (srun or sbatch)."""
        return self.srun or self.sbatch

    # ----------------------------------------------------------- config --

    def _option(self, name: str, default: Any = None) -> Any:
        # Provisioner config comes from the kernelspec's metadata.
        return (self.kernel_spec.metadata.get("kernel_provisioner", {})
                .get("config", {}).get(name, default))

    def image_path(self) -> str:
        """The image as the runtime takes it: a store name or a directory,
        checked now so a missing image fails at once, by name."""
        image = self._option("image")
        if not image:
            raise KernelStartError("kernelspec names no image (provisioner config 'image')")
        if os.path.isabs(image):
            if not os.path.isdir(image):
                raise KernelStartError(f"image directory {image} does not exist")
            return image
        store = Store(self._option("storage"))
        try:
            return str(store.require(check_name(image)))
        except StoreError as e:
            raise KernelStartError(str(e)) from None

    # ---------------------------------------------------------- launch ---

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        km = self.parent
        restart = self._staging is not None and self._known_ports()
        if km is not None:
            km.cache_ports = False  # the kernel picks its ports (see above)
        if self.on_node:
            self.kernel_spec.interrupt_mode = "message"
        image = self.image_path()  # first: a missing image fails at once
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
        spec = RunSpec(
            image=image, command=cmd, binds=list(self._option("binds", [])),
            env=dict(self._option("env", {})), image_env=_has_environment(image),
            home=self._home(), cwd=self._container_cwd(kwargs.get("cwd")))
        kwargs["cmd"] = to_argv(spec, self._option("backend", "builtin"))
        if self.on_node:
            kwargs["cmd"] = [*self._relay_command(), *kwargs["cmd"]]
        if self.srun:
            kwargs["cmd"] = self._srun_command(kwargs["cmd"])
        wrapper = getattr(km, "kernel_job_wrapper", None)
        if self.sbatch and wrapper is not None:
            kwargs["cmd"] = [*wrapper(self._staging), *kwargs["cmd"]]
        self.log.info("chspawner: kernel in image %s: %s", image, " ".join(kwargs["cmd"]))
        return kwargs

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
        if not hasattr(km, "curve_publickey"):
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
                str(float(self._option("launch_timeout", 600))), "--"]

    def _known_ports(self) -> bool:
        return all(self.connection_info.get(p) for p in PORTS)

    def _home(self) -> bool:
        return self.on_node or bool(self._option("home", False))

    def _stage(self, connection_file: Path, keep_ports: bool) -> Path:
        """Copy the connection file into the staging directory, ports 0
        (or, on a restart, the ports clients already use), the IPC sockets
        named as the container sees them. On a node, the relay takes it
        from there (and the CURVE keys in it). Returns its path inside the
        container."""
        base, inside = self._staging_base()
        info = json.loads(connection_file.read_text())
        for port in PORTS:
            info[port] = self.connection_info.get(port, 0) if keep_ports else 0
        if self.on_node:
            # What the last run's job wrote (its relay; its keeper, if
            # kernel_job_wrapper runs one) must not pass for the new one's.
            for name in ("relay.json", "keeper"):
                (self._staging / name).unlink(missing_ok=True)
        else:
            info["ip"] = ipc_prefix(Path("/tmp") / self._staging.name)
        staged = self._staging / "kernel.json"
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=1)
        return inside / self._staging.relative_to(base) / "kernel.json"

    def _srun_command(self, argv: list[str]) -> list[str]:
        """srun, one task on one node, in a job named after this kernel (so
        it can be cancelled by name), or as a step of an existing job."""
        self._job_name = f"chspawner-kernel-{self._staging.name}"
        jobid = self._option("jobid")
        where = [f"--jobid={jobid}"] if jobid else [f"--job-name={self._job_name}"]
        return ["srun", *where, "--nodes=1", "--ntasks=1", "--kill-on-bad-exit=1",
                *[str(a) for a in self._option("srun_args", [])], *argv]

    def _check_command(self, image: str, cmd: list[str]) -> None:
        """A kernel whose program isn't in the image fails now, clearly."""
        program = cmd[0]
        if program.startswith("/") and not os.path.lexists(os.path.join(image, program[1:])):
            raise KernelStartError(f"image {self._option('image')} has no {program} "
                                   "(the kernelspec's argv[0])")

    def _container_cwd(self, cwd: str | None) -> str | None:
        """With ``home``, the host's $HOME is /home/$USER inside: a working
        directory under it maps there; otherwise the container starts in /."""
        home = os.path.expanduser("~")
        if cwd and self._home():
            rel = os.path.relpath(cwd, home)
            if not rel.startswith(".."):
                return os.path.normpath(f"/home/{_username()}/{rel}")
        return None

    def _sbatch_command(self, cmd: list[str], cwd: str | None) -> list[str]:
        """sbatch for a job running ``cmd``, named after this kernel, its
        output beside the connection file."""
        self._job_name = f"chspawner-kernel-{self._staging.name}"
        return ["sbatch", "--parsable", f"--job-name={self._job_name}", "--nodes=1",
                "--ntasks=1", "--export=ALL", f"--output={self._staging / 'job.log'}",
                f"--chdir={cwd or Path.home()}",
                *[str(a) for a in self._option("sbatch_args", [])],
                # The command travels as the wrap's arguments, quoted once, here.
                "--wrap=exec " + shlex.join(cmd)]

    async def _submit(self, cmd: list[str], **kwargs: Any) -> None:
        try:
            out = await slurm_command(*self._sbatch_command(cmd, kwargs.get("cwd")),
                                      env=job_environment(kwargs.get("env")))
        except SlurmError as e:
            raise KernelStartError(f"can't submit the kernel's job: {e}") from None
        self.job_id = out.strip().split(";")[0]
        self._job_checked = (0.0, None)
        self.pid = self.pgid = None
        self.log.info("chspawner: kernel %s is Slurm job %s", self.kernel_id, self.job_id)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any):
        if self.sbatch:
            await self._submit(cmd, **kwargs)
        else:
            await super().launch_kernel(cmd, **kwargs)
        try:
            info = await self._read_back_ports()
        except BaseException:
            if self.job_id:  # still queued, say: nobody would ever use it
                await self._cancel_job()
            raise
        self.connection_info.update({p: int(info[p]) for p in PORTS})
        if self.on_node:
            node = info["node"]
            try:
                self.connection_info["ip"] = socket.gethostbyname(node)
            except OSError as e:
                raise KernelStartError(f"kernel runs on node {node!r}, whose address "
                                       f"can't be resolved here: {e}") from None
            self.ip = self.connection_info["ip"]
        return self.connection_info

    async def _read_back_ports(self) -> dict:
        """Wait for the kernel to write the ports it bound; fail fast if it
        dies first."""
        # On a node, the relay says where the kernel is, once it is.
        staged = self._staging / ("relay.json" if self.on_node else "kernel.json")
        # A kernel on a node may first wait in the queue.
        timeout = float(self._option("launch_timeout", 600 if self.on_node else 60))
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = json.loads(staged.read_text())
                if self.on_node:
                    info = {**info["ports"], "node": info["node"]}
                if all(info.get(p) for p in PORTS):
                    return info
            except (OSError, ValueError, KeyError, TypeError):
                pass  # being rewritten: read again
            if self.job_id:
                if await self.poll() is not None:
                    raise KernelStartError(self._job_end_reason())
            else:
                status = self.process.poll() if self.process else None
                if status is not None:
                    raise KernelStartError(self._exit_reason(status))
            if time.monotonic() > deadline:
                raise KernelStartError(f"kernel in image {self._option('image')} did not "
                                       f"bind its ports within {timeout:.0f} s "
                                       "(provisioner config 'launch_timeout')")
            await asyncio.sleep(0.02)

    def _job_end_reason(self) -> str:
        log = self._staging / "job.log"
        try:
            last = log.read_text(errors="replace").strip().splitlines()[-1:]
        except OSError:
            last = []
        return (f"the kernel's Slurm job {self.job_id} ended before the kernel was "
                f"ready{': ' + last[0] if last else ''} (its output: {log})")

    def _exit_reason(self, status: int) -> str:
        image = self._option("image")
        if status == 31:
            return f"can't set up a container for image {image} (see the server log)"
        if status == 49:
            return (f"image {image} can't execute the kernel's program "
                    f"{self._program!r} (not found in the image?)")
        return (f"kernel in image {image} exited with status {status} before it was "
                "ready; is ipykernel installed in the image?")

    # --------------------------------------------------------- cleanup ---

    async def kill(self, restart: bool = False) -> None:
        await super().kill(restart)
        await self._cancel_job()

    async def terminate(self, restart: bool = False) -> None:
        await super().terminate(restart)
        await self._cancel_job()

    async def _cancel_job(self) -> None:
        """Killing srun alone may leave its job step running on the node;
        a batch job has no process here at all."""
        if self.job_id:
            try:
                await slurm_command("scancel", self.job_id, env=job_environment())
            except SlurmError as e:
                self.log.warning("chspawner: can't cancel kernel job %s: %s", self.job_id, e)
        elif self._job_name and not self._option("jobid"):
            process = await asyncio.create_subprocess_exec(
                "scancel", f"--name={self._job_name}", f"--user={_username()}",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            await process.wait()

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart)
        if not restart and self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    # ------------------------------------------------------- re-attach ---
    # A provisioner restored with load_provisioner_info() (by a new server
    # process) has the kernel's PID but no Popen object: it follows the
    # process by PID instead. A kernel in a job of its own (sbatch) is
    # followed by its job's state, whichever process started it.

    @property
    def has_process(self) -> bool:
        return self.process is not None or self._adopted() or self.job_id is not None

    def _adopted(self) -> bool:
        return self.process is None and self.pid is not None

    async def poll(self) -> int | None:
        if self.job_id:
            return await self._poll_job()
        if self._adopted():
            return None if _running(self.pid) else 0
        return await super().poll()

    async def job_state(self) -> str:
        """The kernel job's state now ('' once Slurm forgot it); SlurmError
        when Slurm can't say."""
        return (await job_status(self.job_id, run=_slurm_as_us))[0]

    async def _poll_job(self) -> int | None:
        """None while the kernel's job runs (or can't be asked about: the
        controller being down says nothing about the kernel), else 0. At
        most one squeue per JOB_POLL_INTERVAL: jupyter_client polls often."""
        checked_at, answer = self._job_checked
        if time.monotonic() - checked_at < JOB_POLL_INTERVAL:
            return answer
        try:
            state = await self.job_state()
        except SlurmError as e:
            self.log.warning("chspawner: can't ask Slurm about kernel job %s: %s",
                             self.job_id, e)
            return None
        # COMPLETING: the kernel is gone, Slurm is tidying up after it.
        answer = None if state in ACTIVE_STATES - {"COMPLETING"} else 0
        self._job_checked = (time.monotonic(), answer)
        return answer

    async def wait(self) -> int | None:
        if self.job_id:
            while await self.poll() is None:
                await asyncio.sleep(JOB_POLL_INTERVAL)
            self.job_id = None
            return 0
        if self._adopted():
            while await self.poll() is None:
                await asyncio.sleep(0.1)
            self.pid = None
            return 0
        return await super().wait()

    async def send_signal(self, signum: int) -> None:
        if self.job_id:
            if signum:  # (0 asks whether it runs: poll() answers that)
                try:
                    await slurm_command("scancel", f"--signal={signum}", self.job_id,
                                        env=job_environment())
                except SlurmError as e:
                    self.log.warning("chspawner: can't signal kernel job %s: %s",
                                     self.job_id, e)
            return
        if self._adopted():
            os.killpg(self.pgid or self.pid, signum)
            return
        await super().send_signal(signum)

    async def get_provisioner_info(self) -> dict:
        info = await super().get_provisioner_info()
        info["staging"] = str(self._staging) if self._staging else None
        info["image"] = self._option("image")
        info["job_name"] = self._job_name
        info["job_id"] = self.job_id
        # JSON, so a session manager can store it: the key is bytes here.
        info["connection_info"] = {k: v.decode() if isinstance(v, bytes) else v
                                   for k, v in info.get("connection_info", {}).items()}
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        connection = dict(provisioner_info.get("connection_info") or {})
        if isinstance(connection.get("key"), str):
            connection["key"] = connection["key"].encode()
        provisioner_info = {**provisioner_info, "connection_info": connection}
        await super().load_provisioner_info(provisioner_info)
        staging = provisioner_info.get("staging")
        self._staging = Path(staging) if staging else None
        self._job_name = provisioner_info.get("job_name")
        self.job_id = provisioner_info.get("job_id")


def _running(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (dead, not yet reaped by a parent that
    isn't us) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


async def _slurm_as_us(*argv: str) -> str:
    return await slurm_command(*argv, env=job_environment())


def _username() -> str:
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


def _has_environment(image: str) -> bool:
    return os.path.isfile(os.path.join(image, "ch", "environment"))
