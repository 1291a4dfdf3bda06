"""Kernels in images against native kernels, in one run, as the
unprivileged user.

* ready: ``start_kernel()`` to the first kernel_info reply, for Debian's
  ipykernel 6.17 run natively by the host's /usr/bin/python3 and the very
  same package inside the Debian test image through the provisioner;
  alternating rounds, medians (target: image <= 1.05x native);
* concurrent: N kernels started at once through the provisioner (all must
  be ready, with no port used twice); reports the spread of ready times.

Run as root (it drops to the test user): ``bench/run.sh`` or, from the
repository root, ``python -m bench.kernels [--rounds N] [--concurrent N] [--check]``.
"""
from __future__ import annotations

import argparse
import json
import pwd
import subprocess
import sys

from bench.workdir import install_test_image_kernel, user_workdir
from tests.harness.env import TEST_USER, VENV_BIN
from tests.harness.users import as_user_or_exit

TARGET = 1.05
NATIVE, IMAGE = "native-debian", "chspawner-deb--python3"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the ready ratio is over its target or a "
                             "concurrent kernel failed")
    args = parser.parse_args()
    user = pwd.getpwnam(TEST_USER)
    with user_workdir("kernels", "kernels_worker.py") as (work, home, worker):
        env = install_test_image_kernel(work, home)
        native = home / "share/jupyter/kernels" / NATIVE
        native.mkdir(parents=True)
        native.joinpath("kernel.json").write_text(json.dumps({
            "argv": ["/usr/bin/python3", "-m", "ipykernel_launcher", "-f",
                     "{connection_file}"],
            "display_name": "Python 3 (Debian, native)", "language": "python"}))
        subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(home)],
                       check=True)
        python = str(VENV_BIN / "python")
        ready = json.loads(as_user_or_exit(TEST_USER, python, str(worker), "ready",
                                           str(args.rounds), NATIVE, IMAGE, env=env))
        ratio = ready[IMAGE] / ready[NATIVE]
        print(f"{'kernel ready':<22} {'native':>9} {'in image':>9} {'ratio':>6} "
              f"{'target':>7}")
        print(f"{'start to kernel_info':<22} {ready[NATIVE]:>8.3f}s {ready[IMAGE]:>8.3f}s "
              f"{ratio:>5.2f}x {TARGET:>6.2f}x{'  OVER TARGET' if ratio > TARGET else ''}",
              flush=True)
        many = json.loads(as_user_or_exit(TEST_USER, python, str(worker), "concurrent",
                                          str(args.concurrent), IMAGE, env=env))
        print(f"{many['ready']}/{many['count']} kernels started at once ready in "
              f"{many['total']:.1f} s (first {many['first']:.1f} s, median "
              f"{many['median']:.1f} s, last {many['last']:.1f} s); port clash: "
              f"{'yes' if many['port_clash'] else 'none'}"
              + (f"; errors: {many['errors']}" if many["errors"] else ""))
    failed = ratio > TARGET or many["ready"] != many["count"] or many["port_clash"]
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
