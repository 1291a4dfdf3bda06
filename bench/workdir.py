"""A benchmark's work directory for a worker script run as the test user:
a home of the user's own inside it, the worker copied where the user can
read it, all removed at the end."""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.harness.env import TEST_USER


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
