"""Bind mounts: what users ask for works, and nothing leaves the image."""
from __future__ import annotations

import ctypes
import os
import threading

import pytest

from tests.harness.users import as_user, user_file

ESCAPE_FIX = ("Charliecloud 0.31 checks bind destinations on the host, "
              "then mounts by path: a swap in between can redirect its bind")


def mkdir_as(user, path):
    as_user(user.pw_name, "mkdir", "-p", str(path))


@pytest.fixture
def data(user, user_dir):
    """A host directory to bind, owned by the test user, holding f."""
    path = user_dir / "data"
    mkdir_as(user, path)
    user_file(user, path / "f", "payload\n")
    return path


def test_bind_same_path_and_other_path(rt, user, user_dir, busybox, data):
    # SRC:DST onto a directory the image has.
    assert rt.ok("-b", f"{data}:/mnt", str(busybox), "--", "cat", "/mnt/f") == "payload\n"
    assert rt.ok(f"--bind={data}:/mnt", str(busybox), "--", "cat", "/mnt/f") == "payload\n"
    # Binds are writable: a write lands on the host.
    rt.ok("-b", f"{data}:/mnt", str(busybox), "--", "sh", "-c", "echo w > /mnt/g")
    assert (data / "g").read_text() == "w\n"
    # Repeatable.
    other = user_dir / "other"
    mkdir_as(user, other)
    out = rt.ok("-b", f"{data}:/mnt", "-b", f"{other}:/home", str(busybox), "--",
                "sh", "-c", "ls /mnt; ls /home")
    assert out.split() == ["f", "g"]


def test_bind_same_path_needs_destination(rt, busybox, host_dir_outside_tmp):
    """SRC alone means SRC:SRC; a missing destination needs -w or -W."""
    result = rt.run("-b", str(host_dir_outside_tmp), str(busybox), "--", "true")
    assert result.returncode == rt.exit_runtime
    assert "/var" in result.stderr  # the image has no /var


def test_bind_creates_destination_with_write(rt, user, user_dir, user_image, data):
    assert rt.ok("-w", "-b", f"{data}:/new/deep", str(user_image), "--",
                 "cat", "/new/deep/f") == "payload\n"
    assert (user_image / "new/deep").is_dir()


@pytest.mark.builtin_only("Charliecloud 0.31 has no --write-fake")
def test_bind_creates_destination_in_write_fake_overlay(rt, user, user_dir, busybox, data):
    assert rt.ok("-W", "-b", f"{data}:/new/deep", str(busybox), "--",
                 "cat", "/new/deep/f") == "payload\n"
    assert not (busybox / "new").exists()


def test_bind_source_missing(rt, user_dir, busybox):
    result = rt.run("-b", f"{user_dir}/absent:/mnt", str(busybox), "--", "true")
    assert result.returncode == rt.exit_runtime
    assert "absent" in result.stderr


def test_no_creating_under_another_bind(rt, user, user_dir, user_image, data):
    """-w may create directories in the image, never in a host directory
    bound into it: /tmp is the host's."""
    result = rt.run("-w", "-b", f"{data}:/tmp/created-by-bind", str(user_image),
                    "--", "true", env={"TMPDIR": str(user_dir)})
    assert result.returncode == rt.exit_runtime
    assert not (user_dir / "created-by-bind").exists()


def test_no_creating_under_an_earlier_user_bind(rt, user, user_dir, user_image, data):
    other = user_dir / "other"
    mkdir_as(user, other)
    result = rt.run("-w", "-b", f"{data}:/mnt", "-b", f"{other}:/mnt/new",
                    str(user_image), "--", "true")
    assert result.returncode == rt.exit_runtime
    assert not (data / "new").exists()


def refused(rt, result, *phrases):
    """A runtime error in one line, saying one of ``phrases`` (ch-run's
    wording differs with where its host-side lookup stops)."""
    assert result.returncode == rt.exit_runtime, result.stderr
    assert any(p in result.stderr for p in phrases), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize("dst", ["/..", "/mnt/../..", "/../../../escaped",
                                 "/../doesnotexist/a"])
def test_dotdot_cannot_leave_the_image(rt, user, user_dir, user_image, data, dst):
    """A destination that climbs above the image's root is refused, as in
    ch-run (never clamped to the root, where the bind would silently go
    missing), and nothing is made anywhere."""
    for opts in ([], ["-w"]):
        result = rt.run(*opts, "-b", f"{data}:{dst}", str(user_image), "--", "true")
        refused(rt, result, "subdirectory")
    for made in ("escaped", "doesnotexist"):
        for where in (user_dir, user_image, "/"):
            assert not os.path.exists(os.path.join(where, made))


@pytest.mark.builtin_only("Charliecloud 0.31 binds over the image's root "
                          "itself for '/.', then fails in pivot_root(2)")
def test_the_image_root_itself_is_refused(rt, user, user_image, data):
    as_user(user.pw_name, "ln", "-s", ".", str(user_image / "self"))
    for dst in ("/.", "/self", "/mnt/.."):
        result = rt.run("-b", f"{data}:{dst}", str(user_image), "--", "true")
        refused(rt, result, "subdirectory")


def test_relative_symlink_cannot_leave_the_image(rt, user, user_dir, user_image, data):
    as_user(user.pw_name, "ln", "-s", "../../../..", str(user_image / "up"))
    for opts in ([], ["-w"]):
        result = rt.run(*opts, "-b", f"{data}:/up/escaped", str(user_image), "--", "true")
        refused(rt, result, "subdirectory")
    assert not (user_dir / "escaped").exists()
    assert not (user_image / "escaped").exists()
    assert not os.path.exists("/escaped")


def test_relative_symlink_inside_the_image_is_followed(rt, user, user_image, data):
    as_user(user.pw_name, "ln", "-s", "mnt", str(user_image / "rel"))
    assert rt.ok("-b", f"{data}:/rel", str(user_image), "--",
                 "cat", "/mnt/f") == "payload\n"


@pytest.mark.parametrize("target", ["host", "/tmp", "/mnt"])
def test_absolute_symlink_destination_is_refused(
        rt, user, user_dir, user_image, host_dir_outside_tmp, data, target):
    """ch-run follows a destination's symlinks on the host, so it refuses an
    absolute one (it leads out of the image); so does the builtin backend,
    rather than follow it inside the image and bind somewhere not asked for
    (over the container's /tmp, say). Nothing is made, host or image."""
    target = str(host_dir_outside_tmp) if target == "host" else target
    as_user(user.pw_name, "ln", "-s", target, str(user_image / "abs"))
    before = sorted(os.listdir(user_image))
    for opts, dst in (([], "/abs"), (["-w"], "/abs"), (["-w"], "/abs/x")):
        result = rt.run(*opts, "-b", f"{data}:{dst}", str(user_image), "--", "true",
                        env={"TMPDIR": str(user_dir)})
        refused(rt, result, "subdirectory", "symlink not relative")
    assert list(host_dir_outside_tmp.iterdir()) == []
    assert not (user_dir / "x").exists()
    assert sorted(os.listdir(user_image)) == before
    assert not (user_image / "mnt/x").exists()


RENAME_EXCHANGE = 2


@pytest.mark.builtin_only(ESCAPE_FIX)
def test_symlink_swapped_during_setup_cannot_redirect_a_bind(
        rt, user, user_dir, user_image, data):
    """A directory in the image is swapped, over and over, with a symlink to
    a host directory while containers bind onto a path under it. Whatever
    the timing, nothing is ever created in the host directory."""
    libc = ctypes.CDLL(None, use_errno=True)
    victim = user_dir / "victim"
    for d in (victim, user_image / "swap"):
        mkdir_as(user, d)
    as_user(user.pw_name, "ln", "-s", str(victim), str(user_image / "swap-link"))
    stop = threading.Event()

    def swapper():
        a = os.fsencode(user_image / "swap")
        b = os.fsencode(user_image / "swap-link")
        while not stop.is_set():
            assert libc.renameat2(-100, a, -100, b, RENAME_EXCHANGE) == 0, \
                os.strerror(ctypes.get_errno())

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        outcomes = set()
        for _ in range(40):
            result = rt.run("-w", "-b", f"{data}:/swap/made", str(user_image),
                            "--", "true")
            outcomes.add(result.returncode)
            assert not (victim / "made").exists()
    finally:
        stop.set()
        thread.join()
    assert outcomes <= {0, rt.exit_runtime}
    assert list(victim.iterdir()) == []
