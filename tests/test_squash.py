"""SquashFS images used in place: one file, mounted unprivileged with
Debian's squashfuse_ll inside the container's user namespace, for exactly
as long as any process of the container lives."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from chspawner.images.trees import remove_tree
from tests.harness.env import CHSPAWNER, VENV_BIN
from tests.harness.images import squashed, tarball
from tests.harness.procs import live_named
from tests.harness.users import as_user
from tests.harness.wait import read_line, wait_until
from tests.test_join import finish, read_namespaces, start_peers
from tests.test_kernels import DRIVER

ISSUE_1161 = ("ch-run 0.31 unmounts the image when its first command exits, under "
              "the processes it leaves (Charliecloud issue 1161); the builtin backend "
              "keeps it while any lives")


@pytest.fixture(scope="session")
def busybox_sqfs() -> Path:
    return squashed("busybox")


def servers(user) -> list[int]:
    """The test user's live squashfuse_ll processes."""
    return live_named(user.pw_uid, "squashfuse_ll")


def fuse_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if " fuse.squashfuse " in line]


def test_a_squashfs_file_is_an_image(rt, busybox_sqfs, busybox):
    out = rt.ok(str(busybox_sqfs), "--", "sh", "-c", "ls /bin/busybox; cat /etc/passwd | wc -l")
    assert out.splitlines()[0] == "/bin/busybox"
    # read-only, as a directory image is without -w
    result = rt.run(str(busybox_sqfs), "--", "touch", "/new")
    assert result.returncode != 0 and "Read-only" in result.stderr


@pytest.mark.builtin_only("ch-run 0.31 finds only directories by name in the store")
def test_a_squashfs_image_by_name_in_the_store(rt, busybox_sqfs, user, user_dir):
    store = user_dir / "store"
    as_user(user.pw_name, "mkdir", "-p", str(store / "img"))
    as_user(user.pw_name, "cp", str(busybox_sqfs), str(store / "img" / "tiny%box+1.sqfs"))
    out = rt.ok("-s", str(store), "tiny/box:1", "--", "ls", "/bin/busybox")
    assert out.strip() == "/bin/busybox"


def test_the_mount_point_option(rt, busybox_sqfs, user, user_dir):
    point = user_dir / "mnt"
    as_user(user.pw_name, "mkdir", str(point))
    assert rt.ok("-m", str(point), str(busybox_sqfs), "--", "true") == ""
    assert not os.listdir(point)  # mounted only inside the container
    result = rt.run("-m", str(user_dir / "missing"), str(busybox_sqfs), "--", "true")
    assert result.returncode == rt.exit_runtime
    assert len(result.stderr.strip().splitlines()) == 1 and "mount point" in result.stderr


def test_a_file_that_is_not_squashfs(rt, user, user_dir):
    bad = user_dir / "bad.sqfs"
    bad.write_text("not an image\n")
    os.chmod(bad, 0o644)
    result = rt.run(str(bad), "--", "true")
    assert result.returncode == rt.exit_runtime
    assert len(result.stderr.strip().splitlines()) == 1 and str(bad) in result.stderr


def test_a_damaged_squashfs_file(rt, busybox_sqfs, user, user_dir):
    """The magic number right, the rest cut off: an error naming the file,
    nothing left running."""
    damaged = user_dir / "cut.sqfs"
    damaged.write_bytes(busybox_sqfs.read_bytes()[:4096])
    os.chmod(damaged, 0o644)
    result = rt.run(str(damaged), "--", "true")
    assert result.returncode == rt.exit_runtime and str(damaged) in result.stderr
    wait_until(lambda: not servers(user), "the FUSE server's exit", timeout=20)


@pytest.mark.builtin_only(ISSUE_1161)
def test_the_image_stays_while_any_process_lives_then_nothing_is_left(
        rt, busybox_sqfs, user, user_dir):
    """A daemon left by the first command (a kernel's child, a server)
    keeps its image; once the last process exits, the FUSE server exits
    and no mount remains anywhere."""
    gate = user_dir / "go"
    daemon = (f"(while [ ! -e {gate} ]; do sleep 0.02; done; "
              f"ls /bin/busybox > {user_dir}/late; echo $? >> {user_dir}/late) "
              "> /dev/null 2>&1 &")
    before = set(servers(user))
    assert rt.ok(str(busybox_sqfs), "--", "sh", "-c", f"{daemon} echo first") == "first\n"
    # The first command is gone; its daemon and the image's server live on.
    (left,) = set(servers(user)) - before
    with open(f"/proc/{left}/stat") as f:  # not in the command's session
        assert f.read().rsplit(")", 1)[1].split()[3] == str(left)
    gate.touch()
    wait_until(lambda: (user_dir / "late").exists()
               and len((user_dir / "late").read_text().splitlines()) == 2,
               "the daemon's late look at the image", timeout=20)
    assert (user_dir / "late").read_text() == "/bin/busybox\n0\n"
    wait_until(lambda: left not in servers(user), "the FUSE server's exit", timeout=20)
    assert not fuse_mounts()


@pytest.mark.builtin_only("ch-run 0.31 ignores -w on a SquashFS image: nothing asked for "
                          "may be dropped silently")
def test_write_is_refused_write_fake_overlays(rt, busybox_sqfs, user, user_dir):
    result = rt.run("-w", str(busybox_sqfs), "--", "true")
    assert result.returncode == rt.exit_runtime and "-W" in result.stderr
    out = rt.ok("-W", str(busybox_sqfs), "--", "sh", "-c", "echo hi > /new; cat /new")
    assert out == "hi\n"


@pytest.mark.builtin_only("ch-run 0.31's FUSE server lives in its first peer's process")
def test_join_peers_share_one_mounted_image(rt, busybox_sqfs, user_dir, user):
    peers = start_peers(rt, busybox_sqfs, user_dir, 2, "--join-ct=2",
                        f"--join-tag=sq-{os.getpid()}")
    namespaces = {read_namespaces(p) for p in peers}
    live = servers(user)
    assert finish(peers, user_dir) == [0, 0]
    assert len(namespaces) == 1
    assert len(live) >= 1
    wait_until(lambda: not set(live) & set(servers(user)), "the FUSE server's exit", timeout=20)


@pytest.mark.builtin_only("ch-run links libsquashfuse: it needs no program")
def test_without_squashfuse_a_clear_error(rt, busybox_sqfs, user, user_dir):
    bin_dir = user_dir / "bin"
    bin_dir.mkdir()
    for tool in ("env",):
        os.symlink(shutil.which(tool), bin_dir / tool)
    result = rt.run(str(busybox_sqfs), "--", "true", env={"PATH": str(bin_dir)})
    assert result.returncode == rt.exit_runtime
    assert result.stderr.strip().splitlines() == [
        f"chspawner run: error: can't mount SquashFS image {busybox_sqfs}: squashfuse_ll "
        "not found in $PATH (Debian's package squashfuse)"]


def test_feature_squash(rt):
    if rt.backend == "ch-run":
        pytest.skip("ch-run 0.31 has no --feature=squash")
    assert rt.run("--feature=squash").returncode == 0


def test_concurrent_starts_from_one_file(builtin, busybox_sqfs, user):
    """Twenty at once (the bench does 100): each mounts the same file in its
    own namespace; all succeed, none is left behind."""
    procs = [builtin.popen(str(busybox_sqfs), "--", "true",
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(20)]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert results == [(0, "")] * 20
    wait_until(lambda: not servers(user), "every FUSE server's exit", timeout=20)


# ------------------------------------------- a warm mount between starts ---

WARM_ONLY = "ch-run 0.31 mounts its image afresh for every container"


def keepers(user) -> list[int]:
    return live_named(user.pw_uid, "chspawner-mount")


def warm(seconds: float) -> dict[str, str]:
    return {"CHSPAWNER_SQUASH_LINGER": str(seconds)}


def records(user) -> list[str]:
    private = f"/dev/shm/chspawner-{user.pw_uid}"
    return [n for n in (os.listdir(private) if os.path.isdir(private) else [])
            if n.startswith("chspawner-squash.")]


def wait_all_gone(user, timeout: float = 30) -> None:
    wait_until(lambda: not keepers(user) and not servers(user) and not records(user),
               "the keeper, the FUSE server and the record to go", timeout=timeout)


@pytest.mark.builtin_only(WARM_ONLY)
def test_a_warm_mount_serves_the_next_start_then_goes(builtin, busybox_sqfs, user):
    """$CHSPAWNER_SQUASH_LINGER: the first start's mount stays (a keeper
    holds it) and the next start of the image uses it, warm; LINGER seconds
    after the last start the keeper goes, and with it the server: nothing
    left."""
    wait_all_gone(user)
    assert builtin.ok(str(busybox_sqfs), "--", "true", env=warm(3)) == ""
    (server,), (keeper,) = servers(user), keepers(user)
    assert len(records(user)) == 1
    out = builtin.ok("-v", str(busybox_sqfs), "--", "ls", "/bin/busybox", env=warm(3))
    assert out == "/bin/busybox\n"
    assert servers(user) == [server] and keepers(user) == [keeper]   # the same mount
    wait_all_gone(user)
    assert not fuse_mounts()


@pytest.mark.builtin_only(WARM_ONLY)
def test_a_container_outlives_the_warm_mounts_keeper(builtin, busybox_sqfs, user, user_dir):
    """The keeper goes LINGER seconds after the last start, the mount stays
    as long as a container uses it, and goes with the last one."""
    wait_all_gone(user)
    gate = user_dir / "go"
    proc = builtin.popen(str(busybox_sqfs), "--", "sh", "-c",
                         f"echo up; while [ ! -e {gate} ]; do sleep 0.02; done; "
                         "ls /bin/busybox", env=warm(1), stdout=subprocess.PIPE)
    try:
        assert read_line(proc.stdout) == "up"
        wait_until(lambda: not keepers(user), "the keeper to go", timeout=20)
        assert servers(user) and not records(user)   # the container still has its image
        gate.touch()
        assert proc.stdout.read() == "/bin/busybox\n" and proc.wait(timeout=30) == 0
    finally:
        gate.touch()
        proc.wait(timeout=30)
        proc.stdout.close()
    wait_all_gone(user)


@pytest.mark.builtin_only(WARM_ONLY)
def test_concurrent_first_starts_make_one_warm_mount(builtin, busybox_sqfs, user):
    wait_all_gone(user)
    procs = [builtin.popen(str(busybox_sqfs), "--", "true", env=warm(2),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(10)]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert results == [(0, "")] * 10
    assert len(servers(user)) == 1 and len(keepers(user)) == 1
    # Other container IDs are another user namespace: a mount of their own.
    assert builtin.ok("-u", "0", str(busybox_sqfs), "--", "id", "-u", env=warm(2)) == "0\n"
    assert len(servers(user)) == 2 and len(keepers(user)) == 2
    wait_all_gone(user)


@pytest.mark.builtin_only(WARM_ONLY)
def test_a_killed_keeper_and_a_bad_linger(builtin, busybox_sqfs, user):
    wait_all_gone(user)
    assert builtin.ok(str(busybox_sqfs), "--", "true", env=warm(60)) == ""
    (keeper,) = keepers(user)
    os.kill(keeper, signal.SIGKILL)
    wait_until(lambda: not keepers(user) and not servers(user), "the killed keeper's mount "
               "to go", timeout=20)
    assert records(user)            # its record stays, naming a process gone
    assert builtin.ok(str(busybox_sqfs), "--", "echo", "cold", env=warm(1)) == "cold\n"
    wait_all_gone(user)
    result = builtin.run(str(busybox_sqfs), "--", "true", env=warm("soon"))
    assert result.returncode == 31
    assert result.stderr.strip().splitlines() == [
        "chspawner run: error: $CHSPAWNER_SQUASH_LINGER: not a number of seconds: 'soon'"]
    assert not servers(user) and not records(user)


# ------------------------------------------------------------ the store ---

def chspawner(user, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return as_user(user.pw_name, str(CHSPAWNER), *args, check=check, timeout=300)


@pytest.fixture(scope="module")
def squashed_store(user, kernel_store):
    """A store of the test user's with ``deb`` (ipykernel inside) kept also
    as a SquashFS file, and its directory then stripped of ipykernel: a
    kernel that starts ran from the file."""
    work = Path(tempfile.mkdtemp(prefix="chspawner-squash-", dir="/tmp"))
    os.chmod(work, 0o755)
    store = work / "store"
    store.mkdir()
    os.chown(store, user.pw_uid, user.pw_gid)
    as_user(user.pw_name, "mkdir", str(store / "img"))
    as_user(user.pw_name, "cp", "-a", f"{kernel_store}/img/deb", str(store / "img" / "deb"))
    made = chspawner(user, "images", "squash", "-q", "-s", str(store), "deb")
    assert made.stdout.strip() == str(store / "img" / "deb.sqfs")
    as_user(user.pw_name, "sh", "-c", f"rm -r {store}/img/deb/usr/lib/python3/dist-packages/"
                                       "ipykernel*")
    yield store
    remove_tree(work)


def test_a_squashed_image_runs_from_its_file_and_stays_listed(squashed_store, user):
    store = str(squashed_store)
    listed = chspawner(user, "images", "-s", store).stdout
    assert "\ndeb " in listed and "deb.sqfs" not in listed
    mounts = chspawner(user, "run", "-s", store, "deb", "--", "cat",
                       "/proc/self/mountinfo").stdout
    assert " / / " in mounts and " fuse.squashfuse " in mounts.split(" / / ", 1)[1].split(
        "\n", 1)[0]
    out = chspawner(user, "run", "-s", store, "deb", "--", "python3", "-c",
                    "import ipykernel; print('ok')").stdout
    assert out == "ok\n"  # (the directory has none left)


def test_a_kernel_from_a_squashed_image(user, user_dir, squashed_store):
    script = user_dir / "driver.py"
    script.write_text(DRIVER)
    os.chmod(script, 0o644)
    result = as_user(user.pw_name, "env", f"TMPDIR={user_dir}", str(VENV_BIN / "python"),
                     str(script), "chspawner-deb--python3", str(squashed_store), check=False,
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["marker"] == ["ok", "chspawner test image: Debian bookworm\n"]
    assert report["alive_after_shutdown"] == []


def test_squash_errors_change_nothing(user, user_dir, busybox):
    store = user_dir / "store"
    as_user(user.pw_name, "mkdir", "-p", str(store / "img"))
    result = chspawner(user, "images", "squash", "-s", str(store), "nosuch", check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"chspawner images: error: no image nosuch in store {store}"]
    assert os.listdir(store / "img") == []


def test_reimport_and_rm_drop_the_squashfs_file(user, user_dir, busybox):
    store = user_dir / "store"
    as_user(user.pw_name, "mkdir", "-p", str(store))
    tar = tarball(busybox, user_dir / "busybox.tar")
    chspawner(user, "import", "-q", "-s", str(store), str(tar), "box")
    chspawner(user, "images", "squash", "-q", "-s", str(store), "box")
    assert (store / "img" / "box.sqfs").is_file()
    chspawner(user, "import", "-q", "-s", str(store), str(tar), "box")  # replaced
    assert not (store / "img" / "box.sqfs").exists()  # (it would be run instead)
    chspawner(user, "images", "squash", "-q", "--compression=none", "-s", str(store), "box")
    assert chspawner(user, "run", "-s", str(store), "box", "--", "echo", "ok").stdout == "ok\n"
    chspawner(user, "images", "rm", "-s", str(store), "box")
    assert os.listdir(store / "img") == []
