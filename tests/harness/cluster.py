"""A real multi-node Slurm cluster on this machine, for tests.

The one-node harness (tests/harness/slurm.py's ``Slurm``, whose daemons,
MUNGE, configuration and clients this reuses) with its compute nodes apart:

- the **service node** is this host's own network namespace: slurmctld (and
  whatever a test adds: a hub, a proxy, a session manager) on the address
  the setup gives this host on the cluster's network, ``10.251.N.1/24`` (N:
  the first subnet no interface here uses);
- the network is a bridge in a namespace of its own (the "switch"), each
  node and this host joined to it by a veth pair.  Not a bridge here: on a
  machine whose firewall drops forwarded packets (Docker's FORWARD policy
  is DROP) with br_netfilter loaded, traffic between two nodes would be
  filtered by this host's rules; the switch's namespace has no rules;
- each **compute node** (three by default) is a network namespace of its
  own, with its own address (``10.251.N.11``, ``.12``, ...), its own
  loopback, and its own hostname (a UTS namespace per process started on
  it), running its own ``slurmd -N NODE`` (``NodeName=NODE
  NodeAddr=ADDRESS`` in slurm.conf);
- the **mount namespace is shared**: homes, /tmp and the image store are at
  the same paths on every node, as on a parallel file system, and so is
  the one munged's socket;
- **names resolve** everywhere: the node names (and ``SERVICE``, the
  service node's name on the cluster's network) go into /etc/hosts, one
  line each marked ``# chspawner-cluster:TAG``, removed at the end.
  /etc/hosts is edited in place (in a container it is a bind mount).

Only addresses inside the namespaces the setup makes are used.  Names are
unique per run (``TAG``: five hex digits, in the node names ``cTAG-nodeI``,
the namespaces ``chs-TAG-NODE`` and ``chs-TAG-switch``, this host's end of
its veth ``chsvTAG0``, the switch's ends ``chsvTAGI``), and each run holds
a lock file, /run/chspawner-cluster/TAG.lock, while it lives, naming its
workdir: a start first removes what runs whose lock nobody holds (crashed
ones) left behind: processes on their nodes, their slurmctld and munged
(found by the workdir in their command lines), namespaces, switch, veths,
hosts lines, workdir (``remove_stale_runs()``).

Starting takes well under a second; Slurm sees a lost node (``idle*``,
``allocated*``: not responding; then ``down``) some 10-20 s after
``lose()`` (SlurmdTimeout=12).

Usage (as root; pytest's session fixture ``cluster`` in tests/conftest.py)::

    with Cluster(nodes=3) as cluster:
        a, b, c = cluster.nodes                  # node names
        cluster.address[a]                       # "10.251.N.11"
        cluster.run("srun", "-w", b, "hostname", user="chtest")  # any Slurm client
        cluster.run_on(a, "hostname", "-I")       # a command on a node (as root)
        server = cluster.popen_on(a, "python3", "-m", "http.server",
                                  "--bind", cluster.address[a], "8000", user="chtest")
        cluster.lose(b)          # b's slurmd and every process on b killed
        cluster.wait_state(b, {"down", "idle*", "down*"})
        cluster.restore(b)       # slurmd back, b idle again
        cluster.lose(c, how="cut")  # c's link down: c lives on, unreachable

Everything (jobs, daemons, processes on the nodes, namespaces, switch,
veths, hosts lines, the workdir) is gone after ``stop()``/the with-block,
also when starting fails halfway.
"""
from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import pytest

from tests.harness import procs
from tests.harness.env import AS_USER
from tests.harness.slurm import (CLIENT_TIMEOUT, START_TIMEOUT, STOP_TIMEOUT, Slurm,
                                 SlurmError)
from tests.harness.text import tail

__all__ = ["Cluster", "SlurmError", "cluster"]

LOCK_DIR = Path("/run/chspawner-cluster")
HOSTS = Path("/etc/hosts")
MARK = "# chspawner-cluster:"
PREFIX = "chs"                  # of every namespace, bridge and veth made here
SUBNETS = ipaddress.ip_network("10.251.0.0/16")  # one /24 of it per run
FIRST_NODE_HOST = 11            # node i's address: .(10 + i)
# slurmctld pings nodes every SlurmdTimeout/3 s and marks one DOWN after
# SlurmdTimeout s without an answer: short, so lose() shows promptly, yet
# far above what a busy two-core machine takes to answer a ping.
SLURMD_TIMEOUT = 12
POLL = 0.05


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True,
                            timeout=CLIENT_TIMEOUT)
    if check and result.returncode != 0:
        raise SlurmError(f"ip {' '.join(args)} exited {result.returncode}: "
                         f"{tail(result.stderr)}")
    return result


# --- the host-wide state: locks, stale runs, /etc/hosts -------------------------

@contextlib.contextmanager
def _setup_lock() -> Iterator[None]:
    """Held while a run picks its subnet, edits /etc/hosts or cleans up: two
    runs starting at once don't take the same subnet."""
    LOCK_DIR.mkdir(mode=0o755, exist_ok=True)
    with open(LOCK_DIR / ".setup", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _held(tag: str) -> bool:
    """Whether a live run holds TAG's lock (flock: released when it dies)."""
    try:
        with open(LOCK_DIR / f"{tag}.lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False


def _our_namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines()
            if line.startswith(f"{PREFIX}-")]


def _our_links() -> list[str]:
    out = _ip("-o", "link", "show", check=False).stdout
    names = (line.split(":")[1].strip().split("@")[0] for line in out.splitlines())
    return [name for name in names if re.fullmatch(rf"{PREFIX}v[0-9a-f]{{5}}\d+", name)]


def _hosts_lines() -> list[str]:
    return HOSTS.read_text().splitlines(keepends=True)


def _write_hosts(lines: list[str]) -> None:
    # In place, not by rename: /etc/hosts may be a bind mount (containers).
    with open(HOSTS, "r+") as hosts:
        hosts.seek(0)
        hosts.write("".join(lines))
        hosts.truncate()


def _remove_hosts(tag: str) -> None:
    lines = _hosts_lines()
    kept = [line for line in lines if not line.rstrip().endswith(f"{MARK}{tag}")]
    if kept != lines:
        _write_hosts(kept)


def _tags_present() -> set[str]:
    tags = {path.stem for path in LOCK_DIR.glob("*.lock")}
    tags |= {name.split("-")[1] for name in _our_namespaces()}
    tags |= {name[len(PREFIX) + 1:len(PREFIX) + 6] for name in _our_links()}
    tags |= {line.rstrip().rpartition(MARK)[2] for line in _hosts_lines()
             if MARK in line}
    return tags


def _kill_namespace(netns: str) -> None:
    """SIGKILL every process in the network namespace, until none is left
    (they may be forking)."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        out = _ip("netns", "pids", netns, check=False).stdout
        pids = [int(pid) for pid in out.split() if procs.running(int(pid))]
        if not pids:
            return
        if time.monotonic() > deadline:
            raise SlurmError(f"processes in {netns} outlived SIGKILL: {pids}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(POLL)


def _kill_using(workdir: str) -> None:
    """SIGKILL the processes whose command line names workdir: a crashed
    run's slurmctld and munged (its own sessions, so they outlived it)."""
    needle = (workdir.rstrip("/") + "/").encode()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):  # it exited while we looked
            continue


def _remove_run(tag: str, stale: bool = False) -> None:
    """Everything of run TAG: its processes, namespaces, links, hosts lines
    and lock file; a stale (crashed) run's daemons and workdir too, which
    its lock file names.  Idempotent."""
    lock = LOCK_DIR / f"{tag}.lock"
    workdir = lock.read_text().strip() if stale and lock.exists() else ""
    # Only a directory Slurm's own default would have made, never "/".
    if re.fullmatch(r"/tmp/chspawner-slurm-[^/]+", workdir):
        _kill_using(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
    for netns in _our_namespaces():
        if netns.startswith(f"{PREFIX}-{tag}-"):
            _kill_namespace(netns)
            # The veth pair goes with the namespace holding one end.
            _ip("netns", "delete", netns, check=False)
    for link in _our_links():
        if link[len(PREFIX) + 1:].startswith(tag):
            _ip("link", "delete", link, check=False)
    _remove_hosts(tag)
    lock.unlink(missing_ok=True)


def remove_stale_runs() -> list[str]:
    """Remove what crashed runs left behind (runs whose lock nobody holds);
    their tags."""
    with _setup_lock():
        stale = sorted(tag for tag in _tags_present() if not _held(tag))
        for tag in stale:
            _remove_run(tag, stale=True)
    return stale


def _free_subnet() -> ipaddress.IPv4Network:
    """The first /24 of SUBNETS that no address or route here overlaps."""
    out = _ip("-4", "-o", "addr", "show").stdout + _ip("-4", "route", "show").stdout
    used = [ipaddress.ip_network(word, strict=False) for word in out.split()
            if re.fullmatch(r"\d+\.\d+\.\d+\.\d+(/\d+)?", word)]
    for subnet in list(SUBNETS.subnets(new_prefix=24))[1:]:
        if not any(subnet.overlaps(net) for net in used):
            return subnet
    raise SlurmError(f"cluster: no free /24 left in {SUBNETS}")


# --- the cluster -----------------------------------------------------------------

class Cluster(Slurm):
    """slurmctld on this host, ``nodes`` slurmds in network namespaces.

    ``nodes``: the node names, in order; ``address``: {node: its address};
    ``service_address``: this host's (slurmctld's) address; ``service``:
    its name in /etc/hosts; ``netns``: {node: its namespace's name};
    ``lost``: {node: how} for nodes lose() took away.  Everything of
    ``Slurm`` (run, submit, wait_job, node_state, ...) works as there.
    """

    SLURMD_FILES = "slurmd-%n"

    def __init__(self, nodes: int = 3, workdir: Path | None = None, *,
                 cpus: int | None = None, partition: str = "debug",
                 cluster_name: str = "chspawner-cluster"):
        if nodes < 1:
            raise ValueError(f"a cluster needs at least one node, not {nodes}")
        super().__init__(workdir, cpus=cpus, partition=partition,
                         cluster_name=cluster_name)
        self.tag = secrets.token_hex(3)[:5]
        self.nodes = [f"c{self.tag}-node{i}" for i in range(1, nodes + 1)]
        self.node = self.nodes[0]
        self.service = f"c{self.tag}-service"
        self.netns = {node: f"{PREFIX}-{self.tag}-{node}" for node in self.nodes}
        self.switch = f"{PREFIX}-{self.tag}-switch"
        self.uplink = f"{PREFIX}v{self.tag}0"     # this host's end; the switch's: up0
        self._veth = {node: f"{PREFIX}v{self.tag}{i}"  # the switch's ends
                      for i, node in enumerate(self.nodes, 1)}
        self.subnet: ipaddress.IPv4Network | None = None
        self.address: dict[str, str] = {}
        self.service_address = ""
        self.lost: dict[str, str] = {}
        self._lock = None

    # --- starting ---

    def start(self) -> Cluster:
        try:
            remove_stale_runs()
            self._make_network()
        except BaseException:
            self.stop()
            raise
        # Slurm.start stops us (network included) should it fail.
        return super().start()

    def _make_network(self) -> None:
        with _setup_lock():
            self._lock = open(LOCK_DIR / f"{self.tag}.lock", "w")
            fcntl.flock(self._lock, fcntl.LOCK_EX)
            # For the cleanup after a crash: whose daemons to kill.
            self._lock.write(f"{self.workdir}\n")
            self._lock.flush()
            self.subnet = _free_subnet()
            hosts = list(self.subnet.hosts())
            self.service_address = str(hosts[0])
            self.address = {node: str(hosts[FIRST_NODE_HOST - 2 + i])
                            for i, node in enumerate(self.nodes, 1)}
            self.controller = (self.controller[0], self.service_address)
            prefix = self.subnet.prefixlen
            switch = self.switch
            _ip("netns", "add", switch)
            _ip("-n", switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", switch, "link", "set", "br0", "up")
            _ip("link", "add", self.uplink, "type", "veth", "peer", "name", "up0",
                "netns", switch)
            _ip("-n", switch, "link", "set", "up0", "master", "br0", "up")
            _ip("addr", "add", f"{self.service_address}/{prefix}", "dev", self.uplink)
            _ip("link", "set", self.uplink, "up")
            for node in self.nodes:
                netns, veth = self.netns[node], self._veth[node]
                _ip("netns", "add", netns)
                _ip("link", "add", veth, "netns", switch, "type", "veth",
                    "peer", "name", "eth0", "netns", netns)
                _ip("-n", switch, "link", "set", veth, "master", "br0", "up")
                _ip("-n", netns, "link", "set", "lo", "up")
                _ip("-n", netns, "addr", "add", f"{self.address[node]}/{prefix}",
                    "dev", "eth0")
                _ip("-n", netns, "link", "set", "eth0", "up")
            entries = [(self.service_address, self.service),
                       *((self.address[node], node) for node in self.nodes)]
            _write_hosts(_hosts_lines() + [f"{addr} {name}  {MARK}{self.tag}\n"
                                           for addr, name in entries])

    def _extra_config(self) -> list[str]:
        # TmpFS: each node's own "local /tmp" (%n: the node's name), as a
        # real node has. Slurm's mpi/pmix plugin makes each step's PMIx
        # client directory there (spmix_appdir_UID_JOB.STEP): in the one
        # shared /tmp, the second node's would clash with the first's and
        # its tasks fail to launch.
        return [f"SlurmdTimeout={SLURMD_TIMEOUT}", f"TmpFS={self.workdir / 'tmpfs' / '%n'}"]

    def _nodes_config(self, hardware: Mapping[str, str]) -> list[str]:
        size = self._node_size(hardware)
        return [*(f"NodeName={node} NodeAddr={self.address[node]} {size} State=UNKNOWN"
                  for node in self.nodes),
                f"PartitionName={self.partition} Nodes={','.join(self.nodes)} "
                "Default=YES MaxTime=INFINITE State=UP"]

    def _start_nodes(self, env: Mapping[str, str], deadline: float) -> None:
        # All at once, then wait: three starts in a row would triple the time.
        for node in self.nodes:
            self._start_slurmd(node, env)
        for node in self.nodes:
            self._poll(self._daemons[self._slurmd_name(node)],
                       lambda node=node: self.node_state(node) == "idle", deadline,
                       f"did not bring node {node} to idle")

    def _start_slurmd(self, node: str, env: Mapping[str, str] | None = None) -> None:
        (self.workdir / "spool" / f"slurmd-{node}").mkdir(parents=True, exist_ok=True)
        tmpfs = self.workdir / "tmpfs" / node
        tmpfs.mkdir(parents=True, exist_ok=True)
        tmpfs.chmod(0o1777)   # as /tmp: anyone creates, only the owner removes
        self._spawn(self._slurmd_name(node),
                    self.on(node, "slurmd", "-D", "-N", node, "-f", str(self.conf)),
                    log_path=self.workdir / f"slurmd-{node}.log",
                    env=env or {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **self.env})

    def _slurmd_name(self, node: str) -> str:
        return f"slurmd-{node}"

    # --- on a node ---

    def on(self, node: str, *argv: str, user: str | None = None) -> list[str]:
        """The command line that runs argv on node: in its network
        namespace, with its hostname, as root or as user (as-user.sh)."""
        if node not in self.netns:
            raise SlurmError(f"no node {node!r} in this cluster: {' '.join(self.nodes)}")
        if user is not None:
            argv = (str(AS_USER), user, *argv)
        # exec all the way down: the process started is argv's own.
        return ["nsenter", f"--net=/run/netns/{self.netns[node]}", "unshare", "--uts",
                "sh", "-c", 'hostname "$0" && exec "$@"', node, *argv]

    def run_on(self, node: str, *argv: str, user: str | None = None,
               check: bool = True, timeout: float = CLIENT_TIMEOUT
               ) -> subprocess.CompletedProcess:
        """Run argv on node to the end; text output.  check: raise a
        one-line SlurmError if it exits non-zero."""
        try:
            result = subprocess.run(self.on(node, *argv, user=user), capture_output=True,
                                    text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{' '.join(argv)} on {node} timed out after "
                             f"{timeout:.0f} s") from None
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} on {node} exited {result.returncode}: "
                             f"{tail(result.stderr or result.stdout)}")
        return result

    def popen_on(self, node: str, *argv: str, user: str | None = None,
                 **kwargs) -> subprocess.Popen:
        """Start argv on node in the background (the caller stops it; lose()
        and stop() kill it anyway)."""
        return subprocess.Popen(self.on(node, *argv, user=user), **kwargs)

    def pids(self, node: str) -> list[int]:
        """The live processes on node (in its network namespace)."""
        out = _ip("netns", "pids", self.netns[node], check=False).stdout
        return [int(pid) for pid in out.split() if procs.running(int(pid))]

    # --- failures ---

    def lose(self, node: str, how: str = "kill") -> None:
        """Take node away, as a crash would.  how="kill": its slurmd and every
        process on it SIGKILLed (jobs' steps too); how="cut": its link down,
        its processes live on but nothing reaches them, nor they anything."""
        if node not in self.netns:
            raise SlurmError(f"no node {node!r} in this cluster: {' '.join(self.nodes)}")
        if node in self.lost:
            raise SlurmError(f"node {node} is already lost ({self.lost[node]})")
        if how == "kill":
            daemon = self._daemons.pop(self._slurmd_name(node))
            daemon.kill()
            _kill_namespace(self.netns[node])
        elif how == "cut":
            _ip("-n", self.switch, "link", "set", self._veth[node], "down")
        else:
            raise SlurmError(f"lose: how is 'kill' or 'cut', not {how!r}")
        self.lost[node] = how

    def restore(self, node: str, timeout: float = START_TIMEOUT) -> None:
        """Undo lose(node) and wait until Slurm has the node idle again."""
        how = self.lost.pop(node, None)
        if how is None:
            raise SlurmError(f"node {node} is not lost")
        if how == "kill":
            self._start_slurmd(node)
        else:
            _ip("-n", self.switch, "link", "set", self._veth[node], "up")
        # A node slurmctld set DOWN returns on registering (ReturnToService=2);
        # one only NOT_RESPONDING, on its next ping.
        self._poll(self._daemons[self._slurmd_name(node)],
                   lambda: self.node_state(node) == "idle",
                   time.monotonic() + timeout, f"did not bring node {node} back to idle")

    def wait_state(self, node: str, states: Collection[str],
                   timeout: float = 3 * SLURMD_TIMEOUT) -> str:
        """Wait until sinfo shows node in one of states (sinfo's %T: idle,
        down*, idle*, ...); that state."""
        deadline = time.monotonic() + timeout
        while (state := self.node_state(node)) not in states:
            if time.monotonic() > deadline:
                raise SlurmError(f"node {node} still {state or '?'} after "
                                 f"{timeout:.0f} s, not {'/'.join(sorted(states))}")
            time.sleep(POLL)
        return state

    # --- stopping ---

    def stop(self) -> None:
        """Slurm.stop (jobs, daemons, workdir), then the network: processes
        on the nodes, namespaces, switch, veths, hosts lines, lock."""
        try:
            # Jobs on a lost node would wait for SlurmdTimeout: end them now.
            if self.lost and "slurmctld" in self._daemons:
                self.run("scontrol", "update", f"nodename={','.join(self.lost)}",
                         "state=down", "reason=lost", check=False)
            super().stop()
        finally:
            with _setup_lock():
                _remove_run(self.tag)
            if self._lock is not None:
                self._lock.close()
                self._lock = None


# --- pytest fixture ------------------------------------------------------------

@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A started three-node cluster, every node idle, for the whole session."""
    if os.geteuid() != 0:
        pytest.fail("the cluster harness must run as root (namespaces, slurmd)")
    for tool in ("slurmctld", "slurmd", "munged", "srun", "ip", "nsenter", "unshare"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            pytest.fail(f"{tool} missing: run scripts/setup-system.sh")
    with Cluster() as started:
        yield started
