"""A real one-node Slurm cluster on this machine, for tests.

Debian's own ``slurmctld``, ``slurmd`` and ``munged`` run here as they would
on a cluster, each in the foreground as a child of the test process, with a
private configuration, state, logs, ports and MUNGE socket in one temporary
directory.  Nothing of the host's Slurm or MUNGE setup is read or changed, so
a second harness (or a leftover of a crashed one) never collides with this
one, and a MUNGE daemon the machine already runs is left alone.

Used from pytest through the session fixture ``slurm`` at the bottom (which
tests/conftest.py imports), or directly (bench/slurm_spawn.py)::

    with Slurm() as cluster:
        print(cluster.run("srun", "hostname", user="chtest").stdout)
        job = cluster.submit("--wrap", "sleep 60", user="chtest")
        cluster.wait_job(job, {"RUNNING"})

For tests of what a job asks for: ``features(node, ...)`` and
``reservation(node, user)`` (context managers, set on the running
slurmctld) and ``submissions()`` (what slurmctld received, QOS included,
which Slurm drops without accounting).

For tests of how jobs end, opt-in (each changes what every job on the
cluster gets): ``accounting`` (slurmdbd on a throwaway MariaDB,
tests/harness/slurmdbd.py: sacct, and who cancelled a job),
``memory_limits`` (task/cgroup with ConstrainRAMSpace and memory a
consumable resource: a job over its --mem is killed, OUT_OF_MEMORY) and
``preemption`` (a second partition, ``urgent``, on the same node, whose
jobs preempt the default partition's: PREEMPTED).

Clients as the unprivileged test user go through scripts/as-user.sh with
``env SLURM_CONF=...``; other programs that call Slurm clients (spawners)
need ``cluster.env`` in their environment.

Must run as root (pytest does): slurmd starts jobs as their users.

Why foreground daemons: this machine's PID 1 reaps no orphans, so a daemon
that forks into the background stays a zombie after it exits, and "is it
gone yet?" can't be answered by signalling its PID.  As our own children we
wait() for them, and we see at once when one dies while starting.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path

import pytest

# A module attribute, not a copy: tests replace it (a port taken on purpose).
from tests.harness import net, procs, slurmdbd
from tests.harness.env import AS_USER
from tests.harness.text import tail

__all__ = ["Slurm", "SlurmError", "TERMINAL_STATES", "slurm"]

START_TIMEOUT = 30.0    # seconds for all three daemons to be up and the node idle
STOP_TIMEOUT = 15.0     # seconds a daemon gets after SIGTERM, and jobs after scancel
CLIENT_TIMEOUT = 60.0   # seconds for one Slurm client command
POLL = 0.05             # seconds between readiness polls
# Jupyter kernels want a CPU each and the test machines have two cores, so
# the node claims at least this many (slurmd is told to trust the config).
MIN_CPUS = 8
# scancel sends SIGTERM, then SIGKILL after KillWait (default 30 s); a
# kernel that ignores SIGTERM shouldn't hold a test up that long.
KILL_WAIT = 5
# With memory_limits: what a job that names no --mem may use (memory is a
# consumable resource then, so the default must leave room for the others).
DEF_MEM_PER_CPU = 1024  # MB
# With preemption: the partition whose jobs preempt the default one's.
URGENT_PARTITION = "urgent"

# Job states after which a job never runs again (squeue's long names).
TERMINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT"})


class SlurmError(RuntimeError):
    """The cluster failed to start or stop, or a client command failed."""


class _PortClash(Exception):
    """A daemon lost its port to another process; new ports cure it."""


# --- small helpers -----------------------------------------------------------

def _short_hostname() -> str:
    """What slurmd takes as its node name (``hostname -s``)."""
    return socket.gethostname().split(".")[0]


def _node_hardware() -> dict[str, str]:
    """``slurmd -C``'s first line as a dict: CPUs, RealMemory, ..."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True,
                         timeout=CLIENT_TIMEOUT)
    if out.returncode != 0:
        raise SlurmError(f"slurmd -C exited {out.returncode}: {tail(out.stderr)}")
    first = out.stdout.splitlines()[0]
    return dict(field.split("=", 1) for field in first.split() if "=" in field)


def _client_env(extra: Mapping[str, str]) -> dict[str, str]:
    """Our environment less any SLURM_* variable, plus extra.  Were pytest
    itself run in a Slurm job, srun would otherwise take the outer job's
    SLURM_JOB_ID & co. for its own allocation."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return env | dict(extra)


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


# --- one daemon ----------------------------------------------------------------

class _Daemon:
    """A foreground daemon we started: its process and where it writes."""

    def __init__(self, name: str, argv: list[str], workdir: Path,
                 log_path: Path, env: Mapping[str, str], user: str | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path            # the log the daemon writes itself
        self.out_path = workdir / f"{name}.out"  # its stdout/stderr
        self.env = dict(env)
        self.user = user
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.out_path, "wb") as out:
            # Our own session: a Ctrl-C at the terminal reaches pytest, whose
            # teardown then stops us, not the daemons behind its back.
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                **self._identity())

    def _identity(self) -> dict:
        if self.user is None:
            return {}
        return {"user": self.user, "group": self.user, "extra_groups": []}

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        """Its log and its stdout/stderr, together."""
        return _read(self.log_path) + _read(self.out_path)

    def dying(self) -> bool:
        """Exited, or logged a fatal error (Slurm's "fatal: ...")."""
        return not self.alive() or "fatal: " in self.output()

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait()

    def why(self) -> str:
        """One line on why it stopped: its log's tail, else its output's (a
        config error is fatal before the log file is opened)."""
        for path in (self.log_path, self.out_path):
            text = _read(path)
            if text.strip():
                return tail(text)
        return "(no log)"

    def failure(self, what: str) -> SlurmError:
        status = "" if self.alive() else f" (exited {self.process.returncode})"
        return SlurmError(f"{self.name} {what}{status}: {self.why()}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, wait, SIGKILL: the daemon is gone (and reaped) after."""
        if self.process is not None:
            procs.stop(self.process, timeout)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# --- the cluster ----------------------------------------------------------------

class Slurm:
    """slurmctld + slurmd for one node, with a private munged.

    ``conf``: the slurm.conf path; ``env``: what a Slurm client needs in its
    environment (``SLURM_CONF``); ``partition``, ``node``: names to ask for;
    ``cpus``: how many CPUs the node claims (at least MIN_CPUS, so several
    one-CPU jobs run at once even on a two-core machine).

    tests/harness/cluster.py's ``Cluster`` is this class with several nodes
    in network namespaces: it overrides the hooks marked "cluster hook".
    """

    # cluster hook: the slurmd files' stem (Slurm expands %n to the node).
    SLURMD_FILES = "slurmd"

    def __init__(self, workdir: Path | None = None, *, cpus: int | None = None,
                 partition: str = "debug", cluster_name: str = "chspawner-test",
                 accounting: bool = False, memory_limits: bool = False,
                 preemption: bool = False):
        self._own_workdir = workdir is None
        # /tmp, not $TMPDIR: munged wants every directory above its socket
        # open to all users, and the test user's clients need the conf.
        self.workdir = Path(workdir or tempfile.mkdtemp(
            prefix="chspawner-slurm-", dir="/tmp"))
        self.conf = self.workdir / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self.partition = partition
        self.cluster_name = cluster_name
        self.node = _short_hostname()
        self.nodes = [self.node]
        # Where slurmctld is reached: a name slurmctld takes for its own
        # (this host's) and an address for everyone else.
        self.controller = (self.node, "127.0.0.1")
        self.cpus = cpus
        self.munge_dir = self.workdir / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.ports: tuple[int, int] | None = None   # slurmctld's, slurmd's
        self._daemons: dict[str, _Daemon] = {}
        # The opt-in parts (see the module's docstring).
        self.accounting, self.memory_limits = accounting, memory_limits
        self.urgent_partition = URGENT_PARTITION if preemption else None
        self.database: slurmdbd.MariaDB | None = None
        self.dbd_port = 0

    def __enter__(self) -> Slurm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- starting ---

    def start(self) -> Slurm:
        deadline = time.monotonic() + START_TIMEOUT
        try:
            # The workdir holds the conf and MUNGE socket every user's clients
            # need: world-readable (mkdtemp makes it 0700).
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.workdir.chmod(0o755)
            self._start_munged(deadline)
            hardware = _node_hardware()
            last_clash: _PortClash | None = None
            for _ in range(3):
                try:
                    self._start_slurm(hardware, deadline)
                    return self
                except _PortClash as clash:
                    self._stop_slurm_daemons()
                    last_clash = clash
            raise SlurmError(f"slurm: no free ports after 3 tries; {last_clash}")
        except BaseException:
            self.stop()  # __exit__ won't run when __enter__ raises
            raise

    def _start_munged(self, deadline: float) -> None:
        """munged as user munge, on its own socket with a fresh key.

        munged insists the key is munge's own and private, and that every
        directory above the socket lets all users through (clients run as
        the test user)."""
        self.munge_dir.mkdir(mode=0o755)
        shutil.chown(self.munge_dir, "munge", "munge")
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        daemon = self._spawn("munged", [
            "munged", "--foreground", f"--socket={self.munge_socket}",
            f"--key-file={key}", f"--pid-file={self.munge_dir / 'munged.pid'}",
            f"--seed-file={self.munge_dir / 'munged.seed'}",
            f"--log-file={self.munge_dir / 'munged.log'}"],
            log_path=self.munge_dir / "munged.log", user="munge")
        self._poll(daemon, self._munge_works, deadline, "did not answer")

    def _munge_works(self) -> bool:
        """A credential can be made: munged is up on our socket."""
        result = subprocess.run(
            ["munge", "--no-input", f"--socket={self.munge_socket}"],
            capture_output=True, timeout=CLIENT_TIMEOUT)
        return result.returncode == 0

    def _start_slurm(self, hardware: Mapping[str, str], deadline: float) -> None:
        """slurmctld, then slurmd, on fresh ports and state; the node idle."""
        # A retry starts afresh: no state, and no old log whose "fatal:" would
        # read as this attempt's.
        for sub in ("state", "spool"):
            shutil.rmtree(self.workdir / sub, ignore_errors=True)
            (self.workdir / sub).mkdir()
        for log in (self.workdir / "slurmctld.log", *self.workdir.glob("slurmd*.log")):
            log.unlink(missing_ok=True)
        self.ports = (net.free_port(), net.free_port())
        if self.accounting:
            self._start_accounting(deadline)
        self.conf.write_text(self._config(hardware))
        self.conf.chmod(0o644)
        if self.memory_limits:
            # (slurmd reads cgroup.conf beside slurm.conf) autodetect: v1 on
            # a machine with v1's memory controller, v2 on a unified one.
            # No swap: a job over its memory is killed, not swapped out.
            (self.workdir / "cgroup.conf").write_text(
                "CgroupPlugin=autodetect\nConstrainRAMSpace=yes\n"
                "ConstrainSwapSpace=yes\nAllowedSwapSpace=0\n")
        # (slurmd reads gres.conf beside slurm.conf)
        (self.workdir / "gres.conf").write_text("".join(
            f"NodeName={self.node} Name=gpu File={device}\n" for device in self.GPU_FILES))
        daemon_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **self.env}
        # -D: foreground (see the module's docstring).
        ctld = self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)],
                           log_path=self.workdir / "slurmctld.log", env=daemon_env)
        self._poll(ctld, self._controller_up, deadline, "did not answer ping")
        self._start_nodes(daemon_env, deadline)

    def _start_accounting(self, deadline: float) -> None:
        """MariaDB, then slurmdbd on it (before slurmctld, which asks it
        for its TRES as it starts). slurmctld registers the cluster itself;
        with no AccountingStorageEnforce, jobs need no association."""
        if not slurmdbd.available():
            raise SlurmError("accounting: mariadb-server or slurmdbd missing: run "
                             "scripts/setup-system.sh")
        self.database = slurmdbd.MariaDB(self.workdir / "mariadb", net.free_port())
        self.database.install()
        db = self._spawn("mariadb", self.database.argv(),
                         log_path=self.database.log_path)
        self._poll(db, self.database.up, deadline, "did not answer")
        self.database.create_user()
        self.dbd_port = net.free_port()
        # slurmdbd reads slurmdbd.conf beside $SLURM_CONF's slurm.conf, and
        # wants it its SlurmUser's alone (it holds the database password).
        dbd_conf = self.workdir / "slurmdbd.conf"
        dbd_conf.write_text("\n".join([
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}",
            "DbdAddr=127.0.0.1", f"DbdHost={self.node}", f"DbdPort={self.dbd_port}",
            "SlurmUser=root", f"LogFile={self.workdir / 'slurmdbd.log'}",
            f"PidFile={self.workdir / 'slurmdbd.pid'}",
            *self.database.slurmdbd_lines(), ""]))
        dbd_conf.chmod(0o600)
        dbd = self._spawn("slurmdbd", ["slurmdbd", "-D"],
                          log_path=self.workdir / "slurmdbd.log",
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **self.env})
        self._poll(dbd, lambda: _listening(self.dbd_port), deadline, "did not listen")

    def _start_nodes(self, env: Mapping[str, str], deadline: float) -> None:
        """cluster hook: every node's slurmd, each node idle after."""
        slurmd = self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)],
                             log_path=self.workdir / "slurmd.log", env=env)
        self._poll(slurmd, self._node_idle, deadline,
                   f"did not bring node {self.node} to idle")

    def _config(self, hardware: Mapping[str, str]) -> str:
        return "\n".join([*self._common_config(), *self._nodes_config(hardware), ""])

    def _node_size(self, hardware: Mapping[str, str]) -> str:
        """A NodeName line's CPUs and RealMemory."""
        cpus = self.cpus or max(int(hardware["CPUs"]), MIN_CPUS)
        # Below the real memory, so the node is never drained for claiming
        # more than it has (memory isn't a consumable here anyway).
        memory = int(int(hardware["RealMemory"]) * 0.9)
        return f"CPUs={cpus} RealMemory={memory}"

    # The one node's "GPUs" (Slurm's GRES gpu, index 0 and 1): device nodes
    # every machine has, so that jobs can ask for GPUs (--gpus) and get
    # Slurm's SLURM_JOB_GPUS / SLURM_STEP_GPUS for them, as on a GPU node.
    GPU_FILES = ("/dev/null", "/dev/zero")

    def _nodes_config(self, hardware: Mapping[str, str]) -> list[str]:
        """cluster hook: the NodeName and PartitionName lines."""
        lines = [
            f"NodeName={self.node} NodeAddr=127.0.0.1 {self._node_size(hardware)} "
            f"Gres=gpu:{len(self.GPU_FILES)} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES "
            "MaxTime=INFINITE State=UP"]
        if self.urgent_partition:
            # partition_prio: a job of the higher tier that needs the node
            # preempts the lower tier's jobs there (PreemptMode=CANCEL below).
            lines[-1] += " PriorityTier=1"
            lines.append(f"PartitionName={self.urgent_partition} Nodes={self.node} "
                         "MaxTime=INFINITE State=UP PriorityTier=2")
        return lines

    def _ending_config(self) -> list[str]:
        """slurm.conf's lines for the opt-in parts (accounting, memory
        limits, preemption), in place of the defaults they change."""
        lines = []
        if self.accounting:
            lines += ["AccountingStorageType=accounting_storage/slurmdbd",
                      "AccountingStorageHost=127.0.0.1",
                      f"AccountingStoragePort={self.dbd_port}",
                      # (for MUNGE, the socket to the dbd's munged: ours)
                      f"AccountingStoragePass={self.munge_socket}"]
        else:
            lines.append("AccountingStorageType=accounting_storage/none")
        if self.memory_limits:
            lines += ["TaskPlugin=task/cgroup",
                      # Memory a consumable resource, so a job's --mem is its
                      # allocation, which task/cgroup enforces.
                      "SelectTypeParameters=CR_Core_Memory",
                      f"DefMemPerCPU={DEF_MEM_PER_CPU}",
                      # cgroup v1 paths hold the job id: not another
                      # cluster's on this machine (they all count from 1).
                      f"FirstJobId={1_000_000 + os.getpid() % 1000 * 10_000}"]
        else:
            lines += ["TaskPlugin=task/none", "SelectTypeParameters=CR_Core"]
        if self.urgent_partition:
            lines += ["PreemptType=preempt/partition_prio", "PreemptMode=CANCEL"]
        return lines

    def _extra_config(self) -> list[str]:
        """cluster hook: more slurm.conf lines."""
        return []

    def _common_config(self) -> list[str]:
        ctld_port, slurmd_port = self.ports
        work = self.workdir
        slurmd = self.SLURMD_FILES
        return [
            f"ClusterName={self.cluster_name}",
            # Explicit addresses: no name lookup to go wrong.
            "SlurmctldHost={}({})".format(*self.controller),
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            # Root throughout: no ownership dance for state and pid files.
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # Daemons, stepds and clients all use our munged, not the host's.
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={work / 'state'}",
            f"SlurmdSpoolDir={work / 'spool' / slurmd}",
            f"SlurmctldPidFile={work / 'slurmctld.pid'}",
            f"SlurmdPidFile={work / f'{slurmd}.pid'}",
            f"SlurmctldLogFile={work / 'slurmctld.log'}",
            f"SlurmdLogFile={work / f'{slurmd}.log'}",
            # No cgroups and no accounting unless asked for (_ending_config):
            # tests of how jobs end need them, nothing else does.
            "ProctrackType=proctrack/linuxproc",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            # slurmctld logs what each job was submitted with (submissions()):
            # the QOS asked for among it, which without accounting Slurm
            # drops (scontrol show job says "(null)").
            "JobSubmitPlugins=logging",
            "MpiDefault=none",
            "GresTypes=gpu",
            "SelectType=select/cons_tres",
            *self._ending_config(),
            # Trust the CPUs below over the hardware slurmd finds.
            "SlurmdParameters=config_overrides",
            # The node goes idle as soon as slurmd registers.
            "ReturnToService=2",
            # Schedule on the controller's 1 s tick: a batch job starts within
            # ~1 s, not ~3 s (srun's allocations are immediate either way).
            # Backfill every second (default 30 s): a pending job's expected
            # start (squeue --start) is known at once.
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1",
            f"KillWait={KILL_WAIT}",
            *self._extra_config()]

    def _spawn(self, name: str, argv: list[str], *, log_path: Path,
               env: Mapping[str, str] | None = None, user: str | None = None
               ) -> _Daemon:
        daemon = _Daemon(name, argv, self.workdir, log_path,
                         env or {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, user)
        self._daemons[name] = daemon
        daemon.start()
        return daemon

    def _poll(self, daemon: _Daemon, ready: Callable[[], bool], deadline: float,
              what: str) -> None:
        """Wait for ready() while the daemon lives; a port clash raises
        _PortClash, anything else a one-line SlurmError."""
        while True:
            # Dying first: ready() may hang on a port a stranger holds.
            if daemon.dying():
                failure = daemon.failure("failed to start")
                # Slurm's fatal() takes ~10 s to exit (threads wind down):
                # don't wait for it, it has said all it will.
                daemon.kill()
                if "Address already in use" in daemon.output():
                    raise _PortClash(str(failure))
                raise failure
            if ready():
                return
            if _remaining(deadline) <= 0:
                raise daemon.failure(f"{what} within {START_TIMEOUT:.0f} s")
            time.sleep(POLL)

    @contextlib.contextmanager
    def controller_down(self) -> Iterator[None]:
        """slurmctld stopped for the with-block, as in an outage or an
        upgrade, then started again from its saved state. Jobs keep running
        on the node meanwhile; Slurm clients fail."""
        ctld = self._daemons["slurmctld"]
        ctld.stop()
        try:
            yield
        finally:
            ctld.start()
            self._poll(ctld, self._controller_up, time.monotonic() + START_TIMEOUT,
                       "did not answer ping after a restart")

    def _controller_up(self) -> bool:
        # A short timeout: should a stranger hold the port, the ping would
        # wait MessageTimeout (10 s) for an answer that never comes.
        try:
            result = self.run("scontrol", "ping", check=False, timeout=2)
        except SlurmError:
            return False
        return "is UP" in result.stdout

    def _node_idle(self) -> bool:
        return self.node_state() == "idle"

    # --- stopping ---

    def stop(self) -> None:
        """Cancel every job, stop the daemons, remove the workdir.  Raises
        one SlurmError at the end if jobs outlived their cancelling."""
        problem = None
        try:
            problem = self._cancel_all_jobs()
        finally:
            self._stop_slurm_daemons()
            self._stop_daemon("munged")
            self._remove_files()
        if problem:
            raise SlurmError(problem)

    def _cancel_all_jobs(self) -> str | None:
        """scancel everything, then wait until squeue is empty: a job's
        slurmstepd outlives slurmd, so jobs left running would outlive the
        cluster.  Returns what went wrong, if anything."""
        ctld = self._daemons.get("slurmctld")
        if ctld is None or not ctld.alive():
            return None
        for partition in filter(None, (self.partition, self.urgent_partition)):
            self.run("scancel", f"--partition={partition}", check=False)
        deadline = time.monotonic() + STOP_TIMEOUT
        while True:
            result = self.run("squeue", "--noheader", "--format=%i %T", check=False)
            if result.returncode == 0 and not result.stdout.strip():
                return None
            if _remaining(deadline) <= 0:
                return (f"slurm: jobs left {STOP_TIMEOUT:.0f} s after scancel: "
                        f"{tail(result.stdout + result.stderr)}")
            time.sleep(POLL)

    def _stop_slurm_daemons(self) -> None:
        # The reverse of starting: the controller outlives its nodes.
        for name in reversed(list(self._daemons)):
            if name != "munged":
                self._stop_daemon(name)

    def _stop_daemon(self, name: str) -> None:
        daemon = self._daemons.pop(name, None)
        if daemon is not None:
            daemon.stop()

    def _remove_files(self) -> None:
        # slurmctld under a non-root SlurmUser can't unlink its pid file,
        # and a SIGKILLed daemon never does: remove them whatever happened.
        for pid_file in ("slurmctld.pid", "slurmdbd.pid", "munge/munged.pid"):
            (self.workdir / pid_file).unlink(missing_ok=True)
        for pid_file in self.workdir.glob("slurmd*.pid"):
            pid_file.unlink(missing_ok=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- for tests ---

    @property
    def processes(self) -> dict[str, subprocess.Popen]:
        """The daemons' processes, by name, while the cluster is up."""
        return {name: d.process for name, d in self._daemons.items() if d.process}

    def log(self, name: str) -> str:
        """A daemon's log: "slurmctld", "slurmd" (a cluster's:
        "slurmd-NODE") or "munged" ("" if none)."""
        if name == "munged":
            return _read(self.munge_dir / "munged.log")
        return _read(self.workdir / f"{name}.log")

    def argv(self, *argv: str, user: str | None = None) -> list[str]:
        """A client command line: as root, or as ``user`` via as-user.sh
        (whose clean environment gets SLURM_CONF through env)."""
        if user is None:
            return list(argv)
        extra = [f"{k}={v}" for k, v in self.env.items()]
        return [str(AS_USER), user, "env", *extra, *argv]

    def run(self, *argv: str, user: str | None = None, check: bool = True,
            timeout: float = CLIENT_TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm client (srun, sbatch, ...) to the end; text output.
        check: raise a one-line SlurmError if it exits non-zero."""
        try:
            result = subprocess.run(self.argv(*argv, user=user), capture_output=True,
                                    text=True, timeout=timeout,
                                    env=_client_env(self.env), **kwargs)
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{' '.join(argv)} timed out after {timeout:.0f} s; "
                             f"slurmctld: {tail(self.log('slurmctld'))}") from None
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} exited {result.returncode}: "
                             f"{tail(result.stderr or result.stdout)}")
        return result

    def popen(self, *argv: str, user: str | None = None, **kwargs) -> subprocess.Popen:
        """Start a Slurm client (an srun that stays, say) in the background."""
        return subprocess.Popen(self.argv(*argv, user=user), text=True,
                                env=_client_env(self.env), **kwargs)

    def submit(self, *sbatch_args: str, user: str | None = None) -> int:
        """sbatch; the job's ID."""
        out = self.run("sbatch", "--parsable", *sbatch_args, user=user).stdout
        return int(out.strip().split(";")[0])  # "ID" or "ID;cluster"

    def jobs(self, user: str, name_prefix: str = "") -> dict[str, str]:
        """{job id: state (squeue's long name)} of the user's jobs whose
        names start with name_prefix."""
        out = self.run("squeue", "-h", "-u", user, "-o", "%i %T %j").stdout
        return {job: state for job, state, name in
                (line.split(" ", 2) for line in out.splitlines())
                if name.startswith(name_prefix)}

    @contextlib.contextmanager
    def features(self, node: str, *features: str) -> Iterator[None]:
        """``node`` has ``features`` (what a job's --constraint asks for)
        inside the block, none after: set on the running slurmctld, as an
        admin's ``scontrol update`` would, so no restart and no other test's
        cluster configuration."""
        self._set_features(node, ",".join(features))
        try:
            yield
        finally:
            self._set_features(node, "")

    def _set_features(self, node: str, features: str) -> None:
        self.run("scontrol", "update", f"nodename={node}", f"AvailableFeatures={features}",
                 f"ActiveFeatures={features}")

    @contextlib.contextmanager
    def reservation(self, node: str, user: str) -> Iterator[str]:
        """A reservation of ``node`` for ``user``, from now, inside the
        block: its name. Only jobs submitted with --reservation=NAME run on
        the node meanwhile. At the end its jobs are cancelled (Slurm keeps
        a reservation that has some) and it is deleted."""
        name = f"chs-{os.getpid()}-{time.monotonic_ns() % 10**6}"
        self.run("scontrol", "create", "reservation", f"reservationname={name}",
                 "starttime=now", "duration=60", f"nodes={node}", f"users={user}",
                 "flags=ignore_jobs")  # (jobs already on the node don't stop it)
        try:
            yield name
        finally:
            self.run("scancel", f"--reservation={name}", check=False)
            deadline = time.monotonic() + 3 * STOP_TIMEOUT
            while True:
                result = self.run("scontrol", "delete", f"reservationname={name}",
                                  check=False)
                if result.returncode == 0 or "Invalid reservation" in result.stderr:
                    break
                if _remaining(deadline) <= 0:
                    raise SlurmError(f"reservation {name} not deleted: "
                                     f"{tail(result.stderr)}")
                time.sleep(POLL)

    def submissions(self, name: str = "") -> list[dict[str, str]]:
        """What jobs (called ``name``, if given) were submitted with, in
        order, as slurmctld got them (JobSubmitPlugins=logging): account,
        qos, partition, name, user_id, ... as text ("(null)": not given)."""
        found = []
        for line in self.log("slurmctld").splitlines():
            _, marker, fields = line.partition("job_submit: Job submit request: ")
            if not marker:
                continue
            # "account:A begin_time:0 ... name:N partition:P qos:Q ...": a
            # job's name may hold spaces, so split before each " key:".
            request = dict(field.split(":", 1) for field in
                           re.split(r" (?=[a-z_]+:)", fields.strip()))
            if not name or request.get("name") == name:
                found.append(request)
        return found

    def node_state(self, node: str | None = None) -> str:
        """sinfo's state of a node (idle, mixed, allocated, down*, ...);
        the first node's by default."""
        node = node or self.nodes[0]
        result = self.run("sinfo", "--noheader", f"--nodes={node}",
                          "--format=%T", check=False)
        return result.stdout.strip() if result.returncode == 0 else ""

    def wait_idle(self, timeout: float = STOP_TIMEOUT, node: str | None = None) -> None:
        """Wait until the node is idle again (no job holds any of it)."""
        node = node or self.nodes[0]
        deadline = time.monotonic() + timeout
        while (state := self.node_state(node)) != "idle":
            if _remaining(deadline) <= 0:
                raise SlurmError(f"node {node} still {state or '?'} after "
                                 f"{timeout:.0f} s; slurmd: "
                                 f"{tail(self.log(self._slurmd_name(node)))}")
            time.sleep(POLL)

    def _slurmd_name(self, node: str) -> str:
        """cluster hook: the name of the node's slurmd daemon and log."""
        return "slurmd"

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o``'s fields; {} once slurmctld forgot the job
        (MinJobAge, 300 s after it ended)."""
        result = self.run("scontrol", "show", "job", "--oneliner", str(job_id),
                          check=False)
        if result.returncode != 0:
            if "Invalid job id" in result.stderr:
                return {}
            raise SlurmError(f"scontrol show job {job_id} exited "
                             f"{result.returncode}: {tail(result.stderr)}")
        # Split only before " Key=": a value may hold "=" (TRES=cpu=1,node=1)
        # or, in a few (Command=, WorkDir=), a space.
        fields = re.split(r" (?=[^\s=]+=)", result.stdout.strip())
        return dict(field.split("=", 1) for field in fields if "=" in field)

    def job_state(self, job_id: int) -> str | None:
        """RUNNING, COMPLETED, CANCELLED, ...; None for an unknown job."""
        return self.job_info(job_id).get("JobState")

    def wait_job(self, job_id: int, states: Collection[str] | str = ("COMPLETED",),
                 timeout: float = CLIENT_TIMEOUT) -> str:
        """Wait until the job is in one of states; return that state.  A job
        that ends in another state fails at once, not at the timeout."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            state = info.get("JobState")
            if state in wanted:
                return state
            if state in TERMINAL_STATES or state is None:
                raise SlurmError(f"job {job_id} is {state or 'unknown'}, not "
                                 f"{'/'.join(sorted(wanted))}: "
                                 f"Reason={info.get('Reason')} "
                                 f"ExitCode={info.get('ExitCode')}")
            if _remaining(deadline) <= 0:
                raise SlurmError(f"job {job_id} still {state} after {timeout:.0f} s, "
                                 f"not {'/'.join(sorted(wanted))}: "
                                 f"Reason={info.get('Reason')}")
            time.sleep(POLL)


# --- pytest fixture ------------------------------------------------------------

@pytest.fixture(scope="session")
def slurm() -> Iterator[Slurm]:
    """A started one-node cluster, its node idle, for the whole session."""
    if os.geteuid() != 0:
        pytest.fail("the Slurm harness must run as root (slurmd starts jobs as users)")
    for tool in ("slurmctld", "slurmd", "munged", "srun"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            pytest.fail(f"{tool} missing: run scripts/setup-system.sh")
    with Slurm() as cluster:
        yield cluster
