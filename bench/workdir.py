"""A benchmark's work directory for a worker script run as the test user:
a home of the user's own inside it, the worker copied where the user can
read it, all removed at the end; the test image's kernel installed there."""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.harness.env import CHSPAWNER, TEST_USER
from tests.harness.images import image_path, tarball
from tests.harness.users import as_user_or_exit


@contextlib.contextmanager
def user_workdir(name: str, worker: str) -> Iterator[tuple[Path, Path, Path]]:
    """(work, home, worker): /tmp/chspawner-bench-NAME-*, traversable by all;
    ``home``, the test user's; ``worker``, bench/WORKER copied readable."""
    user = pwd.getpwnam(TEST_USER)
    work = Path(tempfile.mkdtemp(prefix=f"chspawner-bench-{name}-", dir="/tmp"))
    try:
        os.chmod(work, 0o755)
        home = work / "user"
        home.mkdir()
        os.chown(home, user.pw_uid, user.pw_gid)
        copy = work / worker
        shutil.copy(Path(__file__).with_name(worker), copy)
        os.chmod(copy, 0o644)
        yield work, home, copy
    finally:
        # (as root: the user's files in home included)
        subprocess.run(["rm", "-rf", str(work)], check=False)


def install_test_image_kernel(work: Path, home: Path) -> dict[str, str]:
    """The Debian test image imported into ``home``'s store as "deb" and its
    kernel installed under ``home`` (chspawner-deb--python3), as the test
    user; the environment the user's worker runs with to find them."""
    debian = tarball(image_path("bookworm"), work / "debian.tar")
    env = {"TMPDIR": str(home), "CH_IMAGE_STORAGE": str(home / "store"),
           "JUPYTER_PATH": str(home / "share/jupyter"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime")}
    as_user_or_exit(TEST_USER, str(CHSPAWNER), "import", "-q", str(debian), "deb", env=env)
    as_user_or_exit(TEST_USER, str(CHSPAWNER), "kernel", "install", "--prefix", str(home),
                    "deb", env=env)
    return env
