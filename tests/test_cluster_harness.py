"""The multi-node cluster harness works: nodes apart, names resolving,
failures on demand, nothing left behind.

What the multi-node tests will rely on: each node has its own hostname and
address and its own slurmd; Slurm places jobs where asked; a server bound
to its node's address is reached from the service node and from the other
nodes (and only there); lose() is seen by Slurm as a node failure; a run,
even a crashed one, leaves no namespace, link, hosts line or daemon.
"""
from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import net
from tests.harness.cluster import (HOSTS, LOCK_DIR, SLURMD_TIMEOUT, Cluster,
                                   remove_stale_runs)
from tests.harness.env import REPO
from tests.harness.procs import live_processes, running
from tests.harness.wait import read_line, wait_until

# The session fixture `cluster` comes from conftest (tests.harness.cluster).

# A connection attempt from a node: "ok", or the error's name.
CONNECT = ("import socket, sys\n"
           "try:\n"
           "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()\n"
           "    print('ok')\n"
           "except OSError as e:\n"
           "    print(type(e).__name__)\n")


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def _leftovers(tag: str) -> list[str]:
    """What of run TAG is still here."""
    found = [f"netns {line}" for line in _namespaces().splitlines() if f"-{tag}-" in line]
    found += [f"link {line}" for line in _links().splitlines() if f"chsv{tag}" in line]
    found += [f"hosts {line}" for line in HOSTS.read_text().splitlines() if tag in line]
    if (LOCK_DIR / f"{tag}.lock").exists():
        found.append("lock file")
    return found


def test_each_node_has_its_hostname_and_address(cluster: Cluster,
                                                user: pwd.struct_passwd):
    assert len(cluster.nodes) >= 3
    assert len(set(cluster.address.values())) == len(cluster.nodes)
    for node in cluster.nodes:
        out = cluster.run("srun", "-w", node, "sh", "-c",
                          "hostname; hostname -I; printenv SLURMD_NODENAME",
                          user=user.pw_name).stdout.split()
        assert out == [node, cluster.address[node], node]


def test_names_resolve_on_every_node_and_here(cluster: Cluster):
    names = [cluster.service, *cluster.nodes]
    wanted = {cluster.service: cluster.service_address, **cluster.address}
    assert {name: socket.gethostbyname(name) for name in names} == wanted
    for node in cluster.nodes:
        out = cluster.run_on(node, "getent", "ahostsv4", *names).stdout
        for name, address in wanted.items():
            assert f"{address}" in out and name in out


def test_a_pinned_job_runs_on_its_node(cluster: Cluster, user: pwd.struct_passwd,
                                       user_dir: Path):
    b = cluster.nodes[1]
    out = user_dir / "where"
    job = cluster.submit(f"--nodelist={b}", f"--output={out}", "--wrap", "hostname",
                         user=user.pw_name)
    cluster.wait_job(job, "COMPLETED")
    assert cluster.job_info(job)["NodeList"] == b
    # The home/tmp file system is shared: the job's output is here.
    assert out.read_text().strip() == b


def test_a_server_is_reached_at_its_nodes_address_only(cluster: Cluster,
                                                       user: pwd.struct_passwd):
    a, b = cluster.nodes[:2]
    port = net.free_port()
    # Bound by name: the node's name resolves to its address there too.
    server = cluster.popen_on(a, "python3", "-m", "http.server", "--bind", a,
                              str(port), user=user.pw_name, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        def reached_from_host() -> bool:
            assert server.poll() is None, "the server exited"
            try:
                socket.create_connection((cluster.address[a], port), timeout=2).close()
                return True
            except OSError:
                return False
        wait_until(reached_from_host, "the server on node A", 20, every=0.05)

        def connect_from(node: str, host: str) -> str:
            return cluster.run_on(node, sys.executable, "-c", CONNECT, host,
                                  str(port)).stdout.strip()
        assert connect_from(b, a) == "ok"
        assert connect_from(b, cluster.address[a]) == "ok"
        assert connect_from(a, cluster.address[a]) == "ok"
        # Another node's loopback, and this host's, are other machines'.
        assert connect_from(b, "127.0.0.1") == "ConnectionRefusedError"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        server.kill()
        server.wait()


def test_the_service_node_is_reached_from_every_node(cluster: Cluster):
    """A server on this host's cluster address (a hub's, a proxy's) is
    reached from each node, by name and by address."""
    with socket.create_server((cluster.service_address, 0)) as server:
        port = server.getsockname()[1]
        for node in cluster.nodes:
            for host in (cluster.service, cluster.service_address):
                assert cluster.run_on(node, sys.executable, "-c", CONNECT, host,
                                      str(port)).stdout.strip() == "ok"


def test_lose_takes_a_node_down_and_restore_brings_it_back(cluster: Cluster,
                                                          user: pwd.struct_passwd):
    c = cluster.nodes[2]
    command = "sleep 3023"  # an odd duration, to find exactly our process
    job = cluster.submit(f"--nodelist={c}", "--no-requeue", "--output=/dev/null",
                         "--wrap", command, user=user.pw_name)
    try:
        cluster.wait_job(job, "RUNNING", timeout=30)
        steps = wait_until(lambda: live_processes(user.pw_uid, command), "the job to run",
                           10, every=0.05)
        start = time.monotonic()
        cluster.lose(c)
        assert not any(running(pid) for pid in steps)
        assert cluster.pids(c) == []
        # NOT_RESPONDING ("*") at the next ping, DOWN after SlurmdTimeout.
        state = cluster.wait_state(c, {"down", "down*", "idle*", "allocated*", "mixed*"},
                                   timeout=3 * SLURMD_TIMEOUT)
        print(f"{c} {state} {time.monotonic() - start:.1f} s after lose()")
        # The other nodes carry on.
        other = cluster.nodes[0]
        assert cluster.run("srun", "-w", other, "hostname",
                           user=user.pw_name).stdout.strip() == other
    finally:
        cluster.run("scancel", str(job), check=False)
        if c in cluster.lost:
            cluster.restore(c)
    assert cluster.node_state(c) == "idle"
    assert cluster.run("srun", "-w", c, "hostname", user=user.pw_name).stdout.strip() == c


def test_a_cut_link_isolates_a_node(cluster: Cluster, user: pwd.struct_passwd):
    b = cluster.nodes[1]
    port = net.free_port()
    server = cluster.popen_on(b, "python3", "-m", "http.server", "--bind", b,
                              str(port), user=user.pw_name, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _connects(cluster.address[b], port), "the server on node B",
                   20, every=0.05)
        cluster.lose(b, how="cut")
        try:
            assert not _connects(cluster.address[b], port)
            assert server.poll() is None  # alive, only unreachable
            cluster.wait_state(b, {"down*", "idle*"}, timeout=3 * SLURMD_TIMEOUT)
        finally:
            cluster.restore(b)
        assert _connects(cluster.address[b], port)
    finally:
        server.kill()
        server.wait()


def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def test_teardown_leaves_nothing(user: pwd.struct_passwd):
    """Even with a job running on a node that was cut off: the job's
    processes go with the rest."""
    command = "sleep 3029"
    with Cluster(nodes=2) as small:
        tag, workdir = small.tag, small.workdir
        made = _leftovers(tag)
        # 2 nodes' and the switch's namespaces, this host's veth, 3 hosts lines, lock.
        assert sorted(thing.split()[0] for thing in made) == \
            ["hosts"] * 3 + ["link", "lock"] + ["netns"] * 3, made
        daemons = list(small.processes.values())
        a, b = small.nodes
        assert small.run("srun", "-w", a, "hostname", user=user.pw_name).stdout.strip() == a
        job = small.submit(f"--nodelist={b}", "--output=/dev/null", "--wrap", command,
                           user=user.pw_name)
        small.wait_job(job, "RUNNING", timeout=30)
        steps = wait_until(lambda: live_processes(user.pw_uid, command), "the job to run",
                           10, every=0.05)
        small.lose(b, how="cut")
    assert _leftovers(tag) == []
    assert not workdir.exists()
    assert all(process.returncode is not None for process in daemons)
    assert not any(running(pid) for pid in steps)


def test_a_crashed_runs_leftovers_are_removed():
    """A run killed outright (SIGKILL, no teardown): the next start's
    cleanup removes its namespaces, links, hosts lines and daemons."""
    code = ("import time\n"
            "from tests.harness.cluster import Cluster\n"
            "c = Cluster(nodes=1).start()\n"
            "print(c.tag, c.workdir, flush=True)\n"
            "time.sleep(600)\n")  # a holder, killed below
    crashed = subprocess.Popen([sys.executable, "-c", code], cwd=REPO,
                               stdout=subprocess.PIPE, text=True)
    try:
        tag, workdir = read_line(crashed.stdout, 60).split()
    finally:
        crashed.send_signal(signal.SIGKILL)
        crashed.wait()
    daemons = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
               if _cmdline_has(pid, workdir)]
    assert daemons and _leftovers(tag)  # slurmctld, munged, slurmd outlived it
    assert tag in remove_stale_runs()
    assert _leftovers(tag) == []
    assert not Path(workdir).exists()
    wait_until(lambda: not any(running(pid) for pid in daemons), "the daemons to die", 10)


def _cmdline_has(pid: int, text: str) -> bool:
    try:
        return text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
