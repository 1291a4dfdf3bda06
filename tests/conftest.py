"""Shared fixtures: the unprivileged user, the test images, the runtimes.

pytest runs as root (CI does), but every container is started as the
unprivileged test user through scripts/as-user.sh, with the installed
``chspawner`` console command, exactly as a user would type it.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from chspawner.images.trees import remove_tree

REPO = Path(__file__).resolve().parents[1]
AS_USER = REPO / "scripts" / "as-user.sh"
VENV_BIN = Path(sys.executable).parent
CHSPAWNER = VENV_BIN / "chspawner"
IMAGE_CACHE = Path(os.environ.get("CHSPAWNER_IMAGE_CACHE",
                                  "/var/cache/chspawner/images"))
TEST_USER = os.environ.get("CHSPAWNER_USER", "chtest")
# The other ordinary account on the same machine: the attacker in isolation tests.
OTHER_USER = os.environ.get("CHSPAWNER_OTHER_USER", "chtest2")
BACKENDS = ("builtin", "ch-run")

# The real-registry harness's session fixtures (registry, basic_registry,
# token_registry, test_images).
from registry import basic_registry, registry, test_images, token_registry  # noqa: E402,F401
# The one-node Slurm cluster's session fixture.
from slurm import slurm  # noqa: E402,F401


def ch_run_version() -> tuple[int, ...]:
    out = subprocess.run(["ch-run", "--version"], capture_output=True,
                         text=True, env={"USER": "root"})
    text = (out.stdout + out.stderr).strip()
    return tuple(int(n) for n in re.findall(r"\d+", text)[:2])


class Runtime:
    """``chspawner run`` with one backend, as the unprivileged test user."""

    def __init__(self, backend: str, user: str):
        self.backend = backend
        self.user = user
        # Charliecloud adopted distinct exit codes (31 runtime error, 49 can't
        # exec) after 0.38; Debian 12's 0.31 exits 1 for both.
        old_ch_run = backend == "ch-run" and ch_run_version() <= (0, 38)
        self.exit_runtime = 1 if old_ch_run else 31
        self.exit_exec = 1 if old_ch_run else 49

    def argv(self, *args: str, env: dict[str, str] | None = None) -> list[str]:
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        return [str(AS_USER), self.user, "env", *extra, str(CHSPAWNER), "run",
                f"--backend={self.backend}", *args]

    def run(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args, env=env), capture_output=True,
                              text=True, timeout=timeout, **kwargs)

    def popen(self, *args: str, env: dict[str, str] | None = None,
              **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args, env=env), text=True, **kwargs)

    def ok(self, *args: str, **kwargs) -> str:
        """Run, assert success, return stdout."""
        result = self.run(*args, **kwargs)
        assert result.returncode == 0, (result.returncode, result.stderr)
        return result.stdout


def as_user(user: str, *argv: str, check: bool = True,
            **kwargs) -> subprocess.CompletedProcess:
    """Run a plain host command as the test user."""
    return subprocess.run([str(AS_USER), user, *argv], capture_output=True,
                          text=True, check=check, **kwargs)


@pytest.fixture(scope="session")
def user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        pytest.fail(f"test user {TEST_USER} missing: run scripts/setup-system.sh")


@pytest.fixture(scope="session")
def other_user() -> pwd.struct_passwd:
    """A second unprivileged account: another user of the same machine."""
    try:
        return pwd.getpwnam(OTHER_USER)
    except KeyError:
        pytest.fail(f"test user {OTHER_USER} missing: run scripts/setup-system.sh")


def _image(name: str) -> Path:
    path = IMAGE_CACHE / name
    if not path.is_dir():
        pytest.fail(f"test image {path} missing: run scripts/build-image.sh {name}")
    return path.resolve()


@pytest.fixture(scope="session")
def busybox() -> Path:
    return _image("busybox")


@pytest.fixture(scope="session")
def bookworm() -> Path:
    return _image("bookworm")


@pytest.fixture(params=BACKENDS)
def rt(request, user) -> Runtime:
    """Each test using this runs once per backend."""
    if request.param == "ch-run" and request.node.get_closest_marker("builtin_only"):
        pytest.skip(request.node.get_closest_marker("builtin_only").args[0])
    return Runtime(request.param, user.pw_name)


@pytest.fixture
def builtin(user) -> Runtime:
    return Runtime("builtin", user.pw_name)


@pytest.fixture
def user_dir(user) -> Path:
    """A fresh directory owned by the test user, under the host /tmp."""
    path = Path(tempfile.mkdtemp(prefix="chspawner-test-", dir="/tmp"))
    os.chown(path, user.pw_uid, user.pw_gid)
    yield path
    remove_tree(path)


@pytest.fixture
def host_dir_outside_tmp(user) -> Path:
    """A user-owned host directory the busybox image has no path to (it has
    no /var), unlike anything under /tmp, which containers see."""
    path = Path(tempfile.mkdtemp(prefix="chspawner-test-", dir="/var/tmp"))
    os.chown(path, user.pw_uid, user.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def user_image(user, user_dir, busybox) -> Path:
    """A private, writable copy of the busybox image owned by the test user."""
    path = user_dir / "img"
    as_user(user.pw_name, "cp", "-r", str(busybox), str(path))
    return path


def user_file(user, path: Path, text: str = "", mode: int = 0o644) -> Path:
    path.write_text(text)
    os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(mode)
    return path


def parse_env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def lines(text: str) -> Sequence[str]:
    return text.strip().splitlines()


@pytest.fixture(scope="session")
def kernel_store(user, bookworm, busybox):
    """The test user's store with the Debian image (ipykernel inside) as
    ``deb``, busybox (no Python) as ``nopython``, and the Debian image with
    JupyterHub and JupyterLab as ``jupyter``."""
    work = Path(tempfile.mkdtemp(prefix="chspawner-kernels-", dir="/tmp"))
    os.chmod(work, 0o755)
    store = work / "store"
    store.mkdir()
    os.chown(store, user.pw_uid, user.pw_gid)
    # A tarball made as root: the image has files only root may read.
    tarball = work / "deb.tar"
    subprocess.run(["tar", "-C", str(bookworm), "-cf", str(tarball), "."], check=True)
    os.chmod(tarball, 0o644)
    for src, name in ((tarball, "deb"), (busybox, "nopython")):
        as_user(user.pw_name, str(CHSPAWNER), "import", "-q", "-s", str(store), str(src),
                name)
    tarball.unlink()
    subprocess.run(["tar", "-C", str(_image("jupyter")), "-cf", str(tarball), "."],
                   check=True)
    os.chmod(tarball, 0o644)
    as_user(user.pw_name, str(CHSPAWNER), "import", "-q", "-s", str(store), str(tarball),
            "jupyter")
    tarball.unlink()
    yield str(store)
    remove_tree(work)


@pytest.fixture
def drained(slurm):
    """The node takes no new jobs until the test calls the fixture's value
    (or ends): jobs queue."""
    slurm.run("scontrol", "update", f"nodename={slurm.node}", "state=drain",
              "reason=chspawner-test")
    resumed = []

    def resume() -> None:
        if not resumed:
            slurm.run("scontrol", "update", f"nodename={slurm.node}", "state=resume")
            resumed.append(True)
    yield resume
    resume()
