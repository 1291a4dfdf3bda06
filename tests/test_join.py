"""--join: peers (e.g. MPI ranks on a node) share one container."""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from chspawner.images.trees import remove_tree
from tests.harness.users import as_user
from tests.harness.wait import read_line

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


# ------------------------------------------ another user's rendezvous ----

@pytest.fixture
def shm(user) -> Path:
    """A directory like /dev/shm (anyone may create in it, sticky), used as
    the rendezvous base, so the test's plants can't disturb real joins."""
    path = Path(tempfile.mkdtemp(prefix="chspawner-join-", dir="/dev/shm"))
    os.chmod(path, 0o1777)
    yield path
    remove_tree(path)


def plant(other_user, path: Path, kind: str) -> None:
    """The attacker takes ``path`` before the victim's first join."""
    attacker = str(path.parent / "attackers")
    as_user(other_user.pw_name, "mkdir", "-m", "777", attacker)
    if kind == "symlink":  # to a directory the attacker reads and writes
        as_user(other_user.pw_name, "ln", "-s", attacker, str(path))
    elif kind == "file":
        as_user(other_user.pw_name, "touch", str(path))
    else:
        as_user(other_user.pw_name, "mkdir", "-m", "777" if kind == "open" else "755",
                str(path))


@pytest.mark.parametrize("kind", ["dir", "open", "symlink", "file"])
def test_a_rendezvous_taken_by_another_user_fails_clearly(builtin, busybox, user,
                                                          other_user, user_dir, shm,
                                                          kind):
    """chtest2 took chtest's rendezvous name: the join fails at once with a
    one-line reason (never hangs, never joins anything of the attacker's);
    with a private $XDG_RUNTIME_DIR, it isn't even needed."""
    taken = shm / f"chspawner-{user.pw_uid}"
    plant(other_user, taken, kind)
    env = {"CHSPAWNER_JOIN_DIR": str(shm)}
    result = builtin.run("--join-ct=2", "--join-tag=t", str(busybox), "--", "true",
                         env=env, timeout=30)
    assert result.returncode == 31, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"--join: can't use {taken}: it belongs to {other_user.pw_name}" \
        in result.stderr
    assert os.listdir(shm / "attackers") == []  # nothing written there
    runtime = user_dir / "xdg"
    as_user(user.pw_name, "mkdir", "-m", "700", str(runtime))
    peers = start_peers(builtin, busybox, user_dir, 2, "--join-ct=2", "--join-tag=t",
                        env={**env, "XDG_RUNTIME_DIR": str(runtime)})
    namespaces = {read_namespaces(p) for p in peers}
    assert finish(peers, user_dir) == [0, 0]
    assert len(namespaces) == 1
    assert os.listdir(runtime) == []  # the last peer removed the lock


def test_the_lock_files_name_in_the_shared_directory_is_not_used(
        builtin, busybox, user, other_user, user_dir, shm):
    """The lock file itself is in the user's private directory: planting the
    name it once had (chspawner-join.UID.TAG, in /dev/shm) denies nothing."""
    as_user(other_user.pw_name, "touch", str(shm / f"chspawner-join.{user.pw_uid}.t"))
    peers = start_peers(builtin, busybox, user_dir, 2, "--join-ct=2", "--join-tag=t",
                        env={"CHSPAWNER_JOIN_DIR": str(shm)})
    namespaces = {read_namespaces(p) for p in peers}
    assert finish(peers, user_dir) == [0, 0]
    assert len(namespaces) == 1
    private = shm / f"chspawner-{user.pw_uid}"
    st = private.lstat()
    assert st.st_uid == user.pw_uid and st.st_mode & 0o777 == 0o700
