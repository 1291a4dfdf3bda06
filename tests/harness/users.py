"""Commands as an unprivileged user (through scripts/as-user.sh, from root),
and files that user owns."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.harness.env import AS_USER


def as_user(user: str, *argv: str, check: bool = True,
            **kwargs) -> subprocess.CompletedProcess:
    """Run a plain host command as ``user``; output captured as text unless
    ``capture_output=False``."""
    kwargs.setdefault("capture_output", True)
    return subprocess.run([str(AS_USER), user, *argv], text=True, check=check, **kwargs)


def as_user_env(user: str, env: dict[str, str], *argv: str,
                **kwargs) -> subprocess.CompletedProcess:
    """As :func:`as_user`, with extra environment variables."""
    return as_user(user, "env", *[f"{k}={v}" for k, v in env.items()], *argv, **kwargs)


def user_file(user, path: Path, text: str = "", mode: int = 0o644) -> Path:
    """``path`` with ``text``, owned by ``user`` (a pwd entry)."""
    path.write_text(text)
    os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(mode)
    return path


def as_user_or_exit(user: str, *argv: str, env: dict[str, str] | None = None) -> str:
    """For programs (bench/, scripts/): run as ``user``, return stdout, or
    exit with one line saying what failed and the end of its stderr."""
    result = as_user_env(user, env or {}, *argv, check=False)
    if result.returncode != 0:
        sys.exit(f"{' '.join(argv[:2])} failed: {result.stderr.strip()[-1500:]}")
    return result.stdout
