"""--join: peers (e.g. MPI ranks on a node) share one container."""
from __future__ import annotations

import os
import subprocess

import pytest

from test_run import read_line

# Each peer prints its namespaces, then waits until the test lets it go, so
# all peers are alive at once (as MPI ranks are) without any sleep.
NAMESPACES = 'echo $(readlink /proc/self/ns/user) $(readlink /proc/self/ns/mnt)'
PEER = f'{NAMESPACES}; while [ ! -e /tmp/go ]; do sleep 0.02; done'


def read_namespaces(proc):
    line = read_line(proc.stdout)
    assert line.startswith("user:[") and " mnt:[" in line, line
    return line


def start_peers(rt, image, user_dir, count, *opts, env=None):
    env = {"TMPDIR": str(user_dir), **(env or {})}
    return [rt.popen(*opts, str(image), "--", "sh", "-c", PEER, env=env,
                     stdout=subprocess.PIPE) for _ in range(count)]


def finish(peers, user_dir):
    (user_dir / "go").touch()
    try:
        return [p.wait(timeout=30) for p in peers]
    finally:
        for p in peers:
            p.kill()
            p.wait()


def test_join_peers_share_one_container(rt, busybox, user_dir, user):
    peers = start_peers(rt, busybox, user_dir, 3, "--join-ct=3", f"--join-tag=t1-{os.getpid()}")
    namespaces = {read_namespaces(p) for p in peers}
    # While the peers live: a freed namespace's inode number is reused.
    alone = rt.ok(str(busybox), "--", "sh", "-c", NAMESPACES).strip()
    assert finish(peers, user_dir) == [0, 0, 0]
    assert len(namespaces) == 1
    assert alone not in namespaces
    private = f"/dev/shm/chspawner-{user.pw_uid}"
    left = os.listdir("/dev/shm") + (os.listdir(private) if os.path.isdir(private) else [])
    assert not [f for f in left if f"t1-{os.getpid()}" in f]  # cleaned up


@pytest.mark.parametrize("env", [
    {"SLURM_STEP_TASKS_PER_NODE": "2(x1)", "SLURM_STEP_ID": "77"},
    {"OMPI_COMM_WORLD_LOCAL_SIZE": "2", "SLURM_CPUS_ON_NODE": "9",
     "SLURM_STEP_ID": "78"},
])
def test_join_peer_count_and_tag_from_the_launcher(rt, busybox, user_dir, env):
    """MPI ranks started by srun or mpirun find their peers by themselves."""
    peers = start_peers(rt, busybox, user_dir, 2, "-j", env=env)
    namespaces = {read_namespaces(p) for p in peers}
    assert finish(peers, user_dir) == [0, 0]
    assert len(namespaces) == 1


def test_separate_tags_are_separate_containers(rt, busybox, user_dir):
    peers = (start_peers(rt, busybox, user_dir, 1, "--join-ct=2", "--join-tag=a")
             + start_peers(rt, busybox, user_dir, 1, "--join-ct=2", "--join-tag=b"))
    namespaces = {read_namespaces(p) for p in peers}
    # Each group still waits for its second peer: complete both.
    peers += (start_peers(rt, busybox, user_dir, 1, "--join-ct=2", "--join-tag=a")
              + start_peers(rt, busybox, user_dir, 1, "--join-ct=2", "--join-tag=b"))
    namespaces |= {read_namespaces(p) for p in peers[2:]}
    assert finish(peers, user_dir) == [0, 0, 0, 0]
    assert len(namespaces) == 2


def test_join_pid(rt, busybox, user_dir):
    first = start_peers(rt, busybox, user_dir, 1)[0]
    ns = read_namespaces(first)
    out = rt.ok(f"--join-pid={first.pid}", str(busybox), "--", "sh", "-c",
                NAMESPACES)
    assert out.strip() == ns
    assert finish([first], user_dir) == [0]


def test_join_without_peer_count_is_an_error(builtin, busybox):
    result = builtin.run("-j", str(busybox), "--", "true")
    assert result.returncode == 31
    assert "--join-ct" in result.stderr


def test_join_pid_of_a_dead_process(rt, busybox):
    result = rt.run("--join-pid=999999999", str(busybox), "--", "true")
    assert result.returncode == rt.exit_runtime
