"""``chspawner pull`` (and the other commands) as the test user against a
private store."""
from __future__ import annotations

import os
import subprocess

from tests.harness.env import AS_USER, CHSPAWNER


class Puller:
    """``chspawner`` as the test user against a private store."""

    def __init__(self, user, store):
        self.user, self.store = user, store

    def argv(self, *args):
        return [str(AS_USER), self.user.pw_name, "env", *self.env, str(CHSPAWNER), *args]

    env: list[str] = []

    def cli(self, *args, check=False, env=()):
        self.env = list(env)
        result = subprocess.run(self.argv(*args), capture_output=True, text=True,
                                timeout=300)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def pull(self, ref, *names, check=False, env=(), opts=()):
        return self.cli("pull", "-q", "--insecure", "-s", str(self.store), *opts, ref,
                        *names, check=check, env=env)

    def run(self, name, *command, check=True):
        return self.cli("run", "-s", str(self.store), name, *command, check=check)

    def image(self, name):
        return self.store / "img" / name.replace("/", "%").replace(":", "+")

    def clean(self):
        """No image in progress left anywhere, and no partial blob."""
        tmp = self.store / "tmp"
        return not (tmp.exists() and os.listdir(tmp))


def assert_one_line_error(result, *words):
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert line.startswith("chspawner pull: error: ")
    for word in words:
        assert word in line, line
