"""``chspawner run`` with one backend, as the unprivileged test user."""
from __future__ import annotations

import re
import subprocess

from tests.harness.env import AS_USER, CHSPAWNER

BACKENDS = ("builtin", "ch-run")


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
