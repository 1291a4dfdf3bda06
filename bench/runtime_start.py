"""Container start time: ``chspawner run`` against Charliecloud's ``ch-run``.

All run side by side in one hyperfine session, as the unprivileged user,
on the same images: ``/bin/true`` in the busybox image and
``python3 -S -c pass`` in the Debian image. ``chspawner run`` is the
installed command, exactly as users type it, twice: from the project's
venv (scripts/setup-venv.sh) and from a plain install a user would make,
``python3 -m venv`` and ``pip install`` with Debian's own Python and pip
(the wheel of this checkout, without dependencies: they add nothing to a
start). Prints each median and the ratios, and (with --check) fails if a
ratio is over its target.

Run as root (it drops to the test user): ``bench/run.sh`` or, from the
repository root, ``python -m bench.runtime_start [--runs N] [--check]``.
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.harness.env import CHSPAWNER, REPO, TEST_USER
from tests.harness.images import image_path
from tests.harness.users import as_user_or_exit

#: (label, image, command, target ratio) from the issue that set them.
CASES = [
    ("/bin/true", "busybox", ["/bin/true"], 6.0),
    ("python3 -S -c pass", "bookworm", ["python3", "-S", "-c", "pass"], 2.5),
]


def hyperfine(commands: dict[str, str], runs: int) -> dict[str, float]:
    """Median seconds per command, measured in one hyperfine run."""
    uid = pwd.getpwnam(TEST_USER).pw_uid
    with tempfile.TemporaryDirectory() as tmp:
        os.chown(tmp, uid, -1)
        result = Path(tmp) / "result.json"
        argv = ["hyperfine", "--style=none", "-N",
                "--warmup=10", f"--runs={runs}", f"--export-json={result}"]
        for name, command in commands.items():
            argv += ["--command-name", name, command]
        as_user_or_exit(TEST_USER, *argv)
        data = json.loads(result.read_text())
    return {r["command"]: r["median"] for r in data["results"]}


def plain_install(where: Path) -> Path:
    """This checkout's wheel installed in a venv made by Debian's Python,
    with the pip it brings (the ``chspawner`` command a user gets); returns
    that command. Made as root, readable by all."""
    wheels = where / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(wheels), str(REPO)], check=True, stdout=subprocess.DEVNULL)
    venv = where / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps",
                    *map(str, wheels.glob("*.whl"))], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["chmod", "-R", "a+rX", str(where)], check=True)
    return venv / "bin" / "chspawner"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a ratio is over its target")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o755)
        plain = plain_install(Path(tmp))
        print(f"{'command':<22} {'ch-run':>9} {'chspawner':>10} {'ratio':>6} "
              f"{'plain pip':>10} {'ratio':>6} {'target':>7}")
        over = False
        for label, image, command, target in CASES:
            tail = f"{image_path(image)} -- {' '.join(command)}"
            medians = hyperfine({"ch-run": f"ch-run {tail}",
                                 "chspawner": f"{CHSPAWNER} run {tail}",
                                 "plain": f"{plain} run {tail}"}, args.runs)
            ratio = medians["chspawner"] / medians["ch-run"]
            plain_ratio = medians["plain"] / medians["ch-run"]
            worst = max(ratio, plain_ratio)
            over |= worst > target
            print(f"{label:<22} {medians['ch-run'] * 1e3:>7.2f}ms "
                  f"{medians['chspawner'] * 1e3:>8.2f}ms {ratio:>5.2f}x "
                  f"{medians['plain'] * 1e3:>8.2f}ms {plain_ratio:>5.2f}x {target:>6.1f}x"
                  f"{'  OVER TARGET' if worst > target else ''}")
    return 1 if args.check and over else 0


if __name__ == "__main__":
    sys.exit(main())
