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


@pytest.fixture
def rendezvous(user, user_dir):
    """A private $XDG_RUNTIME_DIR for the builtin's rendezvous, and a check
    that a tag left nothing behind there or in /dev/shm (ch-run's)."""
    runtime = user_dir / "xdg"
    as_user(user.pw_name, "mkdir", "-m", "700", str(runtime))

    def left(tag: str) -> list[str]:
        private = f"/dev/shm/chspawner-{user.pw_uid}"
        names = os.listdir("/dev/shm") + (os.listdir(private) if os.path.isdir(private)
                                          else [])
        return os.listdir(runtime) + [n for n in names if tag in n]
    left.env = {"XDG_RUNTIME_DIR": str(runtime)}
    return left


def join_tag_for(request) -> str:
    return f"t{os.getpid()}-{abs(hash(request.node.name)) % 10**8}"


@pytest.mark.parametrize("opts, env", [
    ([], {"SLURM_CPUS_ON_NODE": "1foo"}),              # digits, then anything
    (["--join-ct=0"], {"SLURM_CPUS_ON_NODE": "1"}),    # 0: not given
    ([], {"OMPI_COMM_WORLD_LOCAL_SIZE": "1", "SLURM_CPUS_ON_NODE": "x"}),
    ([], {"SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_CPUS_ON_NODE": "x"}),
])
def test_join_peer_count_is_read_as_ch_run_reads_it(rt, busybox, rendezvous, request,
                                                    opts, env):
    tag = join_tag_for(request)
    out = rt.ok("-j", f"--join-tag={tag}", *opts, str(busybox), "--", "echo", "ran",
                env={**env, **rendezvous.env})
    assert out == "ran\n"
    assert rendezvous(tag) == []


@pytest.mark.parametrize("opts, env, says", [
    ([], {}, ["peer group size"]),
    (["--join-ct=0"], {}, ["peer group size"]),
    (["--join-ct=-2"], {}, ["peer group size"]),
    ([], {"SLURM_CPUS_ON_NODE": "0"}, ["peer group size"]),
    # The first one set counts, even empty or bad: no looking further.
    ([], {"OMPI_COMM_WORLD_LOCAL_SIZE": "", "SLURM_CPUS_ON_NODE": "1"},
     ["OMPI_COMM_WORLD_LOCAL_SIZE", "no digits"]),
    ([], {"SLURM_STEP_TASKS_PER_NODE": "2147483648", "SLURM_CPUS_ON_NODE": "1"},
     ["SLURM_STEP_TASKS_PER_NODE", "out of range"]),
    ([], {"SLURM_CPUS_ON_NODE": "-9223372036854775809"},
     ["SLURM_CPUS_ON_NODE", "out of range"]),
])
def test_bad_peer_counts_are_errors_and_leave_nothing(rt, busybox, rendezvous, request,
                                                      opts, env, says):
    tag = join_tag_for(request)
    result = rt.run("-j", f"--join-tag={tag}", *opts, str(busybox), "--", "true",
                    env={**env, **rendezvous.env})
    assert result.returncode == rt.exit_runtime, result.stderr
    assert all(phrase in result.stderr for phrase in says), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert rendezvous(tag) == []


@pytest.mark.parametrize("opts, env", [
    (["--join-tag="], {}),
    (["-j"], {"SLURM_STEP_ID": ""}),
])
def test_an_empty_join_tag_is_an_error(rt, busybox, rendezvous, opts, env):
    result = rt.run("--join-ct=1", *opts, str(busybox), "--", "true",
                    env={**env, **rendezvous.env})
    assert result.returncode == rt.exit_runtime, result.stderr
    assert "tag" in result.stderr and "empty" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert rendezvous("\0") == []  # (no name has a NUL: the private directory only)
    shm = os.listdir("/dev/shm")  # ch-run's would be named for the empty tag
    assert "sem.ch-run_sem-" not in shm and "ch-run_shm-" not in shm


@pytest.mark.builtin_only("Charliecloud 0.31 leaves its semaphore and shared "
                          "memory in /dev/shm when the first peer fails, and "
                          "the other peers wait for it until they time out")
@pytest.mark.parametrize("count", [1, 2, 3])
def test_a_failed_set_up_leaves_no_rendezvous_file(rt, busybox, user_dir, rendezvous,
                                                  request, count):
    """The first peer can't make the container (its bind source is
    missing): it fails, and so does every peer after it, at once, saying
    why; the last one removes the rendezvous file."""
    tag = join_tag_for(request)
    for peer in range(count):
        result = rt.run(f"--join-ct={count}", f"--join-tag={tag}", "-b",
                        f"{user_dir}/absent:/mnt", str(busybox), "--", "true",
                        env=rendezvous.env, timeout=30)
        assert result.returncode == rt.exit_runtime, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert ("absent" if peer == 0 else "first peer failed") in result.stderr
        assert (rendezvous(tag) == []) == (peer == count - 1)


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


@pytest.mark.builtin_only("ch-run's semaphore of a killed group stays, and its next group "
                          "with that tag hangs or fails; the builtin sees the record is stale")
def test_a_killed_groups_record_does_not_stop_the_next(rt, busybox, user, rendezvous, request):
    """A group killed before all its peers came (an srun cancelled) leaves
    its record naming a winner that is gone; the next group with that tag
    (the next job's step 0, say) starts afresh."""
    tag = join_tag_for(request)
    peer = rt.popen("--join-ct=2", f"--join-tag={tag}", str(busybox), "--", "sh", "-c",
                    'echo up; read line', env=rendezvous.env,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert read_line(peer.stdout) == "up"
    assert rendezvous(tag) == [f"chspawner-join.{tag}"]
    peer.kill()   # (the launcher exec'd sh: this is the winner, gone)
    peer.wait()
    out = rt.ok("--join-ct=1", f"--join-tag={tag}", str(busybox), "--", "echo", "ran",
                env=rendezvous.env)
    assert out == "ran\n"
    assert rendezvous(tag) == []


@pytest.mark.builtin_only("ch-run's default tag is $SLURM_STEP_ID alone: step 0 of two "
                          "jobs of the user on one node would meet")
def test_two_jobs_step_0_are_two_groups(rt, busybox, user_dir, rendezvous):
    """The default tag is the job's step: the first rank of each of two
    jobs, both step 0, on one node, each make a container (with the step
    alone as the tag, the second would join the first's)."""
    def job(number):
        return {"SLURM_JOB_ID": number, "SLURM_STEP_ID": "0",
                "SLURM_STEP_TASKS_PER_NODE": "2", **rendezvous.env}
    peers = (start_peers(rt, busybox, user_dir, 1, "-j", env=job("7001"))
             + start_peers(rt, busybox, user_dir, 1, "-j", env=job("7002")))
    namespaces = {read_namespaces(p) for p in peers}
    # Each job still waits for its second rank: complete both.
    peers += (start_peers(rt, busybox, user_dir, 1, "-j", env=job("7001"))
              + start_peers(rt, busybox, user_dir, 1, "-j", env=job("7002")))
    namespaces |= {read_namespaces(p) for p in peers[2:]}
    assert finish(peers, user_dir) == [0, 0, 0, 0]
    assert len(namespaces) == 2
